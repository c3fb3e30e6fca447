"""The catalogue of bad inputs: every one ends in exit status 2 and one message, never a traceback.

Each case builds its bad input (a damaged file, a wrong option, an unwritable place) and runs the
real command line. Every case asserts the same contract:

- exit status 2, and stderr ends with one ``sqz-export COMMAND: error: ...`` line;
- no traceback;
- the message names the culprit (the file, option, tensor or node) and what was expected;
- no output, complete or partial, is left behind;
- inputs are unchanged (sha256 of every input file before and after).

Most cases run in-process (``main(argv)``: no interpreter start per case); the ones that need a real
process (a file size limit, SIGINT, a terminal, a crash) run the entry point in a subprocess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pty
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from tiny_models import SAMPLE_TEXT, make_checkpoint, make_tiny_tokenizer, save_tiny_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sqz_export.checkpoint import MANIFEST_FILE as CHECKPOINT_MANIFEST
from sqz_export.checkpoint import file_checksums
from sqz_export.cli import main
from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE, export_checkpoint
from sqz_export.export.sqz_model import MANIFEST_FILE as EXPORT_MANIFEST

SEQ = ["--seq-len", "64"]
TINY_POSITIONS = 256  # max_position_embeddings of the tiny models


@dataclasses.dataclass
class World:
    """Good inputs shared by every case (built once per module; never modified by a case)."""

    root: Path
    model: Path
    text: Path
    checkpoint: Path
    export: Path
    fisher: Path
    opt_model: Path


def _quantize_args(world: World, out: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", str(world.model), "-o", str(out), "--dataset", str(world.text), *SEQ,
            "--calib-windows", "2", "--fisher-dtype", "fp32", "--sparsity", "0", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT)
    model = save_tiny_model(root / "model", "llama")
    checkpoint = make_checkpoint(root, "llama")
    export = root / "onnx"
    export_checkpoint(checkpoint, export, dtype=torch.float32)
    built = World(root, model, text, checkpoint, export, root / "fisher.safetensors", save_tiny_model(root / "opt", "opt"))
    assert main(_quantize_args(built, root / "quantized", "--fisher", str(built.fisher))) == 0
    return built


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (the inputs a case must leave as they were)."""
    digests = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def refresh_manifest(folder: Path, manifest_name: str) -> None:
    """Re-records the checksums of a folder's files, so only the edit under test is wrong with it."""
    path = folder / manifest_name
    manifest = json.loads(path.read_text())
    manifest["files"] = {name: entry for name, entry in file_checksums(folder).items() if name != manifest_name}
    path.write_text(json.dumps(manifest))


def edit_sqz_node(export: Path, target: Path, **attributes: object) -> Path:
    """A copy of an export folder whose first SqzLinear node has ``attributes`` changed."""
    folder = copy_folder(export, target)
    graph = onnx.load(str(folder / MODEL_FILE))
    node = next(n for n in graph.graph.node if n.op_type == "SqzLinear")
    for attribute in node.attribute:
        if attribute.name in attributes:
            value = attributes[attribute.name]
            if isinstance(value, int):
                attribute.i = value
            else:
                attribute.s = str(value).encode()
    onnx.save(graph, str(folder / MODEL_FILE))
    refresh_manifest(folder, EXPORT_MANIFEST)
    return folder


def save_model_folder(folder: Path, model: torch.nn.Module) -> Path:
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_llama(**changes: object) -> LlamaForCausalLM:
    config = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": TINY_POSITIONS}
    return LlamaForCausalLM(LlamaConfig(**(config | changes))).eval()


def unwritable_folder() -> Path:
    """A folder no file can be created in, even as root (sysfs); the case skips where there is none."""
    folder = Path("/sys")
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return folder
    os.close(fd)
    os.unlink(probe)
    pytest.skip("no unwritable folder on this machine (/sys accepts files)")


# --------------------------------------------------------------------------------------------------
# The catalogue. A case gets the shared inputs, a folder ``inp`` for its own bad inputs and a folder
# ``out`` for outputs (which must stay empty); it returns the argv and the text that names the culprit.
# --------------------------------------------------------------------------------------------------

Case = Callable[[World, Path, Path], tuple[list[str], str]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(function: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = function
        return function

    return register


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# quantize: the model -----------------------------------------------------------------------------

@case("quantize-model-path-missing")
def _(w: World, inp: Path, out: Path):
    return _quantize_args(w, out / "c", "--model", str(inp / "nope")), "nope' does not exist"


@case("quantize-model-folder-empty")
def _(w: World, inp: Path, out: Path):
    (inp / "empty").mkdir()
    return _quantize_args(w, out / "c", "--model", str(inp / "empty")), "empty lacks config.json"


@case("quantize-model-folder-only-config")
def _(w: World, inp: Path, out: Path):
    (inp / "m").mkdir()
    shutil.copy(w.model / "config.json", inp / "m")
    return _quantize_args(w, out / "c", "--model", str(inp / "m")), "lacks a tokenizer"


@case("quantize-model-corrupt-gguf")
def _(w: World, inp: Path, out: Path):
    write(inp / "model.gguf", b"GGUF" + os.urandom(300))
    return _quantize_args(w, out / "c", "--model", str(inp / "model.gguf")), "model.gguf"


@case("quantize-model-weights-truncated")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.model, inp / "m")
    data = (folder / "model.safetensors").read_bytes()
    write(folder / "model.safetensors", data[: len(data) // 2])
    return _quantize_args(w, out / "c", "--model", str(folder)), "could not load the weights of model"


@case("quantize-model-unsupported-architecture")
def _(w: World, inp: Path, out: Path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    folder = save_model_folder(inp / "gpt2", gpt2)
    return _quantize_args(w, out / "c", "--model", str(folder), "--seq-len", "32"), "is a GPT2LMHeadModel; supported"


@case("quantize-nan-weights")
def _(w: World, inp: Path, out: Path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3, 5] = float("nan")
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    folder = save_model_folder(inp / "nan", model)
    return _quantize_args(w, out / "c", "--model", str(folder)), "model.layers.0.self_attn.q_proj.weight holds 1 NaN or infinite"


@case("quantize-zero-row-matrix")
def _(w: World, inp: Path, out: Path):
    folder = save_model_folder(inp / "zero", tiny_llama(intermediate_size=0))
    return _quantize_args(w, out / "c", "--model", str(folder), "--method", "rtn"), "mlp.gate_proj.weight has shape [0, 64]"


@case("quantize-seq-len-beyond-positions")
def _(w: World, inp: Path, out: Path):
    return _quantize_args(w, out / "c", "--seq-len", "10000"), f"--seq-len 10000 exceeds the {TINY_POSITIONS} positions"


# quantize: the dataset ---------------------------------------------------------------------------

@case("quantize-dataset-missing")
def _(w: World, inp: Path, out: Path):
    return _quantize_args(w, out / "c", "--dataset", str(inp / "nope.txt")), "nope.txt does not exist"


DATASET_FILE_CASES = {
    "quantize-dataset-binary-txt": ("binary.txt", bytes(range(256)) * 8, "binary.txt:2: not UTF-8 text (byte 0x80 at offset 128)"),
    "quantize-dataset-nul-bytes": ("nul.txt", "text\x00more\x00" * 100, "nul.txt: holds NUL bytes"),
    "quantize-dataset-wrong-type": ("data.csv", "a,b\n1,2\n", "data.csv must end in .txt or .jsonl"),
    "quantize-dataset-empty": ("empty.txt", "", "empty.txt has 0 tokens but 128 are needed"),
    "quantize-jsonl-line-not-utf8": ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: not UTF-8 text"),
    "quantize-jsonl-line-not-json": ("bad.jsonl", '{"text": "fine"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
    "quantize-jsonl-line-without-text": ("bad.jsonl", '{"text": "fine"}\n{"body": "no text field"}\n', "bad.jsonl:2: expected an object with a string field 'text'"),
}
"""Bad --dataset files: (file name, content, culprit)."""

for _name, (_file, _content, _culprit) in DATASET_FILE_CASES.items():
    case(_name)(lambda w, inp, out, file=_file, content=_content, culprit=_culprit: (
        _quantize_args(w, out / "c", "--dataset", str(write(inp / file, content))), culprit))


@case("quantize-dataset-is-a-folder")
def _(w: World, inp: Path, out: Path):
    return _quantize_args(w, out / "c", "--dataset", str(inp)), "is a folder; expected a .txt or .jsonl file"


@case("quantize-dataset-unknown-name")
def _(w: World, inp: Path, out: Path):
    return _quantize_args(w, out / "c", "--dataset", "wikitext3"), "unknown dataset 'wikitext3'"


@case("quantize-dataset-too-short")
def _(w: World, inp: Path, out: Path):
    path = write(inp / "short.txt", "x" * 100)
    return _quantize_args(w, out / "c", "--dataset", str(path), "--eval-windows", "1"), "short.txt has 100 tokens but 192 are needed (calibration 2 windows x 64 tokens + evaluation 1 windows x 64 tokens"


# quantize: options -------------------------------------------------------------------------------

QUANTIZE_OPTION_CASES = {
    "quantize-sensitive-fraction-above-sparsity": (["--sparsity", "0.45%", "--sensitive-fraction", "1%"], "sensitive_fraction=0.01 must be in [0, sparsity=0.0045]"),
    "quantize-sparsity-above-one": (["--sparsity", "150%"], "argument --sparsity: expected a fraction in [0, 1)"),
    "quantize-sparsity-nan": (["--sparsity", "nan"], "argument --sparsity: expected a fraction in [0, 1)"),
    "quantize-bits-unsupported": (["--bits", "5"], "argument --bits: invalid choice: 5"),
    "quantize-calib-windows-zero": (["--calib-windows", "0"], "argument --calib-windows: expected a positive integer, got 0"),
    "quantize-device-unknown": (["--device", "nonsense"], "device 'nonsense'"),
    "quantize-kmeans-starts-negative": (["--kmeans-starts", "-1"], "kmeans_n_init=-1"),
}
"""Bad options alone: (extra arguments of a good quantize command, culprit)."""

for _name, (_extra, _culprit) in QUANTIZE_OPTION_CASES.items():
    case(_name)(lambda w, inp, out, extra=_extra, culprit=_culprit: (_quantize_args(w, out / "c", *extra), culprit))


# quantize: outputs and caches --------------------------------------------------------------------

@case("quantize-output-under-a-file")
def _(w: World, inp: Path, out: Path):
    blocker = write(inp / "file.txt", "not a folder")
    return _quantize_args(w, out / "c", "-o", str(blocker / "ckpt")), "file.txt is a file, not a folder"


@case("quantize-output-read-only")
def _(w: World, inp: Path, out: Path):
    return _quantize_args(w, out / "c", "-o", str(unwritable_folder() / "sqz-ckpt")), "cannot create files in /sys"


@case("quantize-output-someone-elses-folder")
def _(w: World, inp: Path, out: Path):
    (inp / "mine").mkdir()
    write(inp / "mine" / "thesis.tex", "precious")
    return _quantize_args(w, out / "c", "-o", str(inp / "mine")), "mine exists and is not an sqz-export checkpoint"


@case("quantize-output-is-the-input-model")
def _(w: World, inp: Path, out: Path):
    return _quantize_args(w, out / "c", "-o", str(w.model)), f"{w.model} exists and is not an sqz-export checkpoint"


@case("quantize-json-is-a-folder")
def _(w: World, inp: Path, out: Path):
    return _quantize_args(w, out / "c", "--json", str(inp)), f"--json {inp} is a folder"


@case("quantize-fisher-not-a-cache")
def _(w: World, inp: Path, out: Path):
    path = write(inp / "notes.safetensors", "my notes")
    return _quantize_args(w, out / "c", "--fisher", str(path)), "notes.safetensors is not a safetensors cache"


@case("quantize-fisher-made-for-other-settings")
def _(w: World, inp: Path, out: Path):
    args = _quantize_args(w, out / "c", "--fisher", str(w.fisher), "--calib-windows", "3")
    return args, "was made for other settings (calibration.num_tokens: 128 -> 192; calibration.num_windows: 2 -> 3)"


@case("quantize-fisher-is-a-folder")
def _(w: World, inp: Path, out: Path):
    return _quantize_args(w, out / "c", "--fisher", str(inp)), "is a folder; expected a .safetensors cache file"


# eval --------------------------------------------------------------------------------------------

@case("eval-seq-len-beyond-positions-checkpoint")
def _(w: World, inp: Path, out: Path):
    return ["eval", str(w.checkpoint), "--dataset", str(w.text), "--seq-len", "10000", "--eval-windows", "1"], "--seq-len 10000 exceeds the 256 positions"


@case("eval-seq-len-beyond-positions-fp-model")
def _(w: World, inp: Path, out: Path):
    return ["eval", str(w.model), "--dataset", str(w.text), "--seq-len", "300", "--eval-windows", "1"], "--seq-len 300 exceeds the 256 positions"


@case("eval-checkpoint-truncated")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.checkpoint, inp / "ckpt")
    data = (folder / "model.safetensors").read_bytes()
    write(folder / "model.safetensors", data[:-100])
    return ["eval", str(folder), "--dataset", str(w.text), *SEQ], "model.safetensors: "


@case("eval-checkpoint-of-another-model")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.checkpoint, inp / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    write(folder / "config.json", json.dumps(config))
    refresh_manifest(folder, CHECKPOINT_MANIFEST)
    return ["eval", str(folder), "--dataset", str(w.text), *SEQ, "--eval-windows", "1"], "does not match its config.json model"


@case("eval-checkpoint-newer-format")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.checkpoint, inp / "ckpt")
    manifest = json.loads((folder / CHECKPOINT_MANIFEST).read_text())
    write(folder / CHECKPOINT_MANIFEST, json.dumps(manifest | {"format_version": 99}))
    return ["eval", str(folder), "--dataset", str(w.text), *SEQ], "format_version 99"


@case("eval-dataset-binary")
def _(w: World, inp: Path, out: Path):
    path = write(inp / "binary.txt", b"\xff\xfe" * 500)
    return ["eval", str(w.model), "--dataset", str(path), *SEQ], "binary.txt:1: not UTF-8 text"


@case("eval-json-read-only")
def _(w: World, inp: Path, out: Path):
    return ["eval", str(w.checkpoint), *SEQ, "--json", str(unwritable_folder() / "e.json")], "--json /sys/e.json: cannot create files"


# inspect -----------------------------------------------------------------------------------------

@case("inspect-not-a-checkpoint")
def _(w: World, inp: Path, out: Path):
    return ["inspect", str(inp)], "missing sqz_manifest.json"


@case("inspect-missing-path")
def _(w: World, inp: Path, out: Path):
    return ["inspect", str(inp / "nope")], "nope is not a folder"


@case("inspect-edited-weights")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.checkpoint, inp / "ckpt")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    write(folder / "model.safetensors", bytes(data))
    return ["inspect", str(folder)], "model.safetensors: sha256 does not match the manifest"


@case("inspect-manifest-not-json")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.checkpoint, inp / "ckpt")
    write(folder / CHECKPOINT_MANIFEST, "{not json")
    return ["inspect", str(folder)], "sqz_manifest.json: not valid JSON"


@case("inspect-weights-not-safetensors")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.checkpoint, inp / "ckpt")
    write(folder / "model.safetensors", "plain text, not tensors")
    refresh_manifest(folder, CHECKPOINT_MANIFEST)
    return ["inspect", str(folder)], "model.safetensors: cannot be read as safetensors"


# export ------------------------------------------------------------------------------------------

@case("export-output-someone-elses-folder")
def _(w: World, inp: Path, out: Path):
    (inp / "mine").mkdir()
    write(inp / "mine" / "notes.txt", "precious")
    return ["export", str(w.checkpoint), "-o", str(inp / "mine")], "mine exists and is not an sqz-export ONNX folder"


@case("export-opset-too-old")
def _(w: World, inp: Path, out: Path):
    return ["export", str(w.checkpoint), "-o", str(out / "x"), "--opset", "11"], "--opset 11: the SqzLinear ONNX function needs opset 18"


@case("export-baseline-of-another-model")
def _(w: World, inp: Path, out: Path):
    return ["export", str(w.checkpoint), "-o", str(out / "x"), "--baseline-from", str(w.opt_model)], "does not match the checkpoint: model_type 'opt'"


@case("export-baseline-missing")
def _(w: World, inp: Path, out: Path):
    return ["export", str(w.checkpoint), "-o", str(out / "x"), "--baseline-from", str(inp / "nope")], "nope' does not exist"


@case("export-checkpoint-of-another-model")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.checkpoint, inp / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    write(folder / "config.json", json.dumps(config | {"hidden_size": 32, "head_dim": 8}))
    refresh_manifest(folder, CHECKPOINT_MANIFEST)
    return ["export", str(folder), "-o", str(out / "x"), "--no-baseline"], "ckpt"


# compare -----------------------------------------------------------------------------------------

@case("compare-not-an-export-folder")
def _(w: World, inp: Path, out: Path):
    return ["compare", str(inp)], "no manifest.json; expected a folder written by `sqz-export export`"


@case("compare-mismatched-onnx")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.export, inp / "onnx")
    shutil.copy(folder / BASELINE_FILE, folder / MODEL_FILE)  # another graph under the model's name
    return ["compare", str(folder), "--dataset", str(w.text), *SEQ], f"{folder / MODEL_FILE}: {(folder / BASELINE_FILE).stat().st_size} bytes, the manifest says"


@case("compare-seq-len-beyond-positions")
def _(w: World, inp: Path, out: Path):
    return ["compare", str(w.export), "--dataset", str(w.text), "--seq-len", "10000"], "--seq-len 10000 exceeds the 256 positions"


@case("compare-engine-missing")
def _(w: World, inp: Path, out: Path):
    return ["compare", str(w.export), *SEQ, "--engine", str(inp / "model.engine")], "--engine " + str(inp / "model.engine") + ": no such file"


@case("compare-checkpoint-of-another-model")
def _(w: World, inp: Path, out: Path):
    return ["compare", str(w.export), *SEQ, "--checkpoint", str(w.opt_model)], f"--checkpoint {w.opt_model} is not a model of export"


@case("compare-plot-read-only")
def _(w: World, inp: Path, out: Path):
    return ["compare", str(w.export), *SEQ, "--plot", str(unwritable_folder() / "p.png")], "--plot /sys/p.png: cannot create files"


@case("compare-sqz-node-wrong-bits")
def _(w: World, inp: Path, out: Path):
    folder = edit_sqz_node(w.export, inp / "onnx", bits=5)
    return ["compare", str(folder), "--dataset", str(w.text), *SEQ], "attribute bits=5, expected one of (2, 3, 4, 8)"


# generate ----------------------------------------------------------------------------------------

@case("generate-not-an-export-folder")
def _(w: World, inp: Path, out: Path):
    return ["generate", "--onnx", str(inp), "--prompt", "hi"], "no manifest.json"


@case("generate-sqz-node-wrong-namespace")
def _(w: World, inp: Path, out: Path):
    folder = edit_sqz_node(w.export, inp / "onnx", plugin_namespace="other")
    return ["generate", "--onnx", str(folder), "--prompt", "hi"], "attribute plugin_namespace='other', expected 'sqz'"


@case("generate-sqz-node-wrong-features")
def _(w: World, inp: Path, out: Path):
    folder = edit_sqz_node(w.export, inp / "onnx", in_features=65)
    return ["generate", "--onnx", str(folder), "--prompt", "hi"], "has shape [64, 6], expected [64, 9] for bits=3, in_features=65"


@case("generate-graph-not-onnx")
def _(w: World, inp: Path, out: Path):
    folder = copy_folder(w.export, inp / "onnx")
    write(folder / MODEL_FILE, os.urandom(2000))
    refresh_manifest(folder, EXPORT_MANIFEST)
    return ["generate", "--onnx", str(folder), "--prompt", "hi"], "model.onnx: not an ONNX model"


@case("generate-empty-prompt")
def _(w: World, inp: Path, out: Path):
    return ["generate", "--onnx", str(w.export), "--prompt", ""], "--prompt '' gives no tokens"


@case("generate-beyond-positions")
def _(w: World, inp: Path, out: Path):
    return ["generate", "--onnx", str(w.export), "--prompt", "hi", "--max-new-tokens", "1000"], "exceed the model's 256 positions"


# build -------------------------------------------------------------------------------------------

@case("build-file-is-not-onnx")
def _(w: World, inp: Path, out: Path):
    path = write(inp / "model.onnx", "this is a text file")
    return ["build", str(path), "-o", str(out / "m.engine")], "model.onnx: not an ONNX model"


@case("build-onnx-missing")
def _(w: World, inp: Path, out: Path):
    return ["build", str(inp / "nope.onnx"), "-o", str(out / "m.engine")], "nope.onnx: no such file"


@case("build-plugin-library-missing")
def _(w: World, inp: Path, out: Path):
    args = ["build", str(w.export / MODEL_FILE), "-o", str(out / "m.engine"), "--plugin-library", str(inp / "libnope.so")]
    return args, f"--plugin-library {inp / 'libnope.so'}: no such file"


@case("build-sqz-node-wrong-layout")
def _(w: World, inp: Path, out: Path):
    folder = edit_sqz_node(w.export, inp / "onnx", layout=1)
    return ["build", str(folder / MODEL_FILE), "-o", str(out / "m.engine")], "attribute layout=1, expected 2"


@case("build-output-read-only")
def _(w: World, inp: Path, out: Path):
    return ["build", str(w.export / MODEL_FILE), "-o", str(unwritable_folder() / "m.engine")], "-o /sys/m.engine: cannot create files"


@case("build-max-seq-above-context")
def _(w: World, inp: Path, out: Path):
    args = ["build", str(w.export / MODEL_FILE), "-o", str(out / "m.engine"), "--max-seq", "4096", "--max-context", "2048"]
    return args, "--max-seq 4096 exceeds --max-context 2048"


def assert_clean_failure(code: int, err: str, culprit: str, status: int = 2) -> None:
    assert code == status, err
    assert "Traceback" not in err, err
    assert culprit in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sqz-export ") and ": error: " in last, err


def run_main(argv: list[str]) -> int:
    """``main(argv)``'s exit status; argparse's own errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


def test_the_catalogue_covers_every_command() -> None:
    assert len(CASES) >= 40
    assert {name.split("-")[0] for name in CASES} == {"quantize", "eval", "inspect", "export", "compare", "generate", "build"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_cleanly(name: str, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    argv, culprit = CASES[name](world, inp, out)
    before = tree_digest(world.root, inp)
    capsys.readouterr()
    code = run_main(argv)
    err = capsys.readouterr().err
    assert_clean_failure(code, err, culprit)
    assert list(out.iterdir()) == [], "an output was left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"], "a temporary output was left behind"
    assert tree_digest(world.root, inp) == before, "an input was modified"


# --------------------------------------------------------------------------------------------------
# Cases that need a process of their own.
# --------------------------------------------------------------------------------------------------

def cli_process(args: list[str], **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "SQZ_PROGRESS_INTERVAL": "0"}
    env.pop("SQZ_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "sqz_export", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


def test_a_file_size_limit_fails_the_write_cleanly(world: World, tmp_path: Path) -> None:
    """A full disk, simulated by RLIMIT_FSIZE: the write fails with EFBIG (sqz-export ignores SIGXFSZ)."""
    out = tmp_path / "ckpt"
    before = tree_digest(world.root)
    limit = 32 * 1024  # the tiny model.safetensors is larger; the interpreter writes nothing this big

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = cli_process(_quantize_args(world, out, "--method", "rtn"), preexec_fn=limit_file_size)
    _, err = process.communicate(timeout=300)
    assert_clean_failure(process.returncode, err, f"could not write {out}: File too large")
    # No checkpoint; the blocks finished before the write failed wait in the run folder for --resume.
    assert [path.name for path in tmp_path.iterdir()] == [".ckpt.sqz-run"], "a partial output was left behind"
    assert "--resume continues" in err
    assert tree_digest(world.root) == before
    resumed = cli_process([*_quantize_args(world, out, "--method", "rtn"), "--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]


def test_sigint_mid_run_leaves_no_partial_output(world: World, tmp_path: Path) -> None:
    out, cache = tmp_path / "ckpt", tmp_path / "fisher.safetensors"
    before = tree_digest(world.root)
    args = _quantize_args(world, out, "--calib-windows", "60", "--seq-len", "128", "--fisher", str(cache))
    # A shell that starts the test suite in the background ignores SIGINT for it, and Python keeps an
    # inherited SIG_IGN: give the CLI the default disposition, as a terminal's Ctrl-C would find it.
    process = cli_process(args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stderr is not None
    seen = []
    for line in process.stderr:  # progress lines arrive without a terminal; interrupt mid-calibration
        seen.append(line)
        if "sqz_export.progress: calibration: " in line:
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=300)
    err = "".join(seen) + rest
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1], err
    assert list(tmp_path.iterdir()) == [], "a partial output was left behind"
    assert tree_digest(world.root) == before


def run_in_terminal(args: list[str]) -> tuple[int, str]:
    """Runs the CLI with stdin/stdout/stderr on a pseudo-terminal (progress bars, isatty true)."""
    leader, follower = pty.openpty()
    env = {key: value for key, value in os.environ.items() if key not in ("CI", "SQZ_DEBUG")}
    process = subprocess.Popen([sys.executable, "-m", "sqz_export", *args], stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=300), b"".join(chunks).decode(errors="replace")


ISSUE_CASES = [
    "quantize-model-folder-empty",
    "quantize-model-folder-only-config",
    "quantize-dataset-binary-txt",
    "build-file-is-not-onnx",
    "quantize-output-read-only",
    "quantize-fisher-not-a-cache",
    "quantize-sensitive-fraction-above-sparsity",
    "quantize-seq-len-beyond-positions",
    "eval-seq-len-beyond-positions-checkpoint",
    "quantize-fisher-made-for-other-settings",
    "quantize-dataset-too-short",
]
"""The cases the bad-input report listed, which must also fail cleanly with a terminal attached."""


@pytest.mark.parametrize("name", [*ISSUE_CASES, "generate-sqz-node-wrong-namespace"])
def test_bad_input_fails_cleanly_at_a_terminal(name: str, world: World, tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    argv, culprit = CASES[name](world, inp, out)
    code, text = run_in_terminal(argv)
    assert_clean_failure(code, text, culprit)
    assert list(out.iterdir()) == []


def test_debug_prints_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--debug", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "missing sqz_manifest.json" in err.strip().splitlines()[-1]
    monkeypatch.setenv("SQZ_DEBUG", "1")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_internal_error_says_where_its_traceback_is(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import sqz_export.cli.inspect as inspect_command

    def broken(args: object) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inspect_command, "run", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "internal error (a bug in sqz-export): ZeroDivisionError: a bug; the traceback is in " in err
    report = Path(err.strip().rsplit(" ", 1)[-1])
    assert report.parent == tmp_path / "sqz-export"
    assert "Traceback" in report.read_text() and "ZeroDivisionError: a bug" in report.read_text()


# --------------------------------------------------------------------------------------------------
# The real model (slow): model-dependent checks fail right after its config is read, before the
# weights load, so the user waits for the config and tokenizer only.
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("command", [["quantize", "-o", "{out}"], ["eval"]])
def test_real_model_seq_len_beyond_positions_fails_before_the_weights_load(command: list[str], tmp_path: Path) -> None:
    args = [part.format(out=tmp_path / "ckpt") for part in command] + ["--seq-len", "10000"]
    process = cli_process(args)
    _, err = process.communicate(timeout=600)
    assert_clean_failure(process.returncode, err, "--seq-len 10000 exceeds the 8192 positions")
    assert "loading model" not in err  # load_weights logs this line first
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_model_short_dataset_fails_before_the_weights_load(tmp_path: Path) -> None:
    text = write(tmp_path / "short.txt", "A few words only.")
    process = cli_process(["quantize", "-o", str(tmp_path / "ckpt"), "--dataset", str(text)])
    _, err = process.communicate(timeout=600)
    assert_clean_failure(process.returncode, err, "short.txt has ")
    assert "tokens but 16384 are needed" in err and "loading model" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]
