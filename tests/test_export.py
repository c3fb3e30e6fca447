"""The export driver: checkpoint -> folder with model.onnx (SqzLinear), baseline.onnx, manifest."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tiny_models import run_prefill, save_tiny_model
from tolerances import tolerance

from sqz_export.checkpoint import (
    load_quantized_model,
    read_checkpoint,
    sha256_file,
)
from sqz_export.cli import main
from sqz_export.errors import UserError
from sqz_export.export.baseline import tensor_bytes
from sqz_export.export.sqz_model import (
    BASELINE_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    POLYGRAPHY_INPUTS_FILE,
    export_checkpoint,
)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_export_matches_torch_reference(
    arch: str, dtype: str, tiny_export: Callable[[str, str], Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    out = tiny_export(arch, dtype)
    checkpoint = read_checkpoint(tiny_checkpoint(arch))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["op_counts"]["sqz::SqzLinear"] == len(checkpoint.packed)
    assert manifest["passes"]["sqz_linear"] == len(checkpoint.packed)
    assert "MatMul" in manifest["op_counts"]  # attention and lm_head stay MatMuls

    graph = onnx.load(str(out / MODEL_FILE))
    onnx.checker.check_model(graph, full_check=True)
    nodes = {node.name: node for node in graph.graph.node if node.op_type == "SqzLinear"}
    for name, layer in checkpoint.packed.items():
        node = nodes[f"/{name}/SqzLinear"]
        assert len(node.input) == (7 if layer.sparse is not None else 3)
    assert tensor_bytes(graph) < manifest["tensor_bytes"]["before_rewrite"]

    model, _ = load_quantized_model(tiny_checkpoint(arch))
    token_ids = np.arange(3, 40, dtype=np.int64)[None]
    with torch.no_grad():
        expected = model(torch.from_numpy(token_ids)).logits
    logits = run_prefill(out / MODEL_FILE, token_ids)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    assert logits.dtype == (np.float16 if dtype == "fp16" else np.float32)
    torch.testing.assert_close(torch.from_numpy(logits).float(), expected, **tolerance("model_logits", torch_dtype))


def test_export_folder_is_complete_and_checksummed(tiny_export: Callable[[str, str], Path]) -> None:
    out = tiny_export("llama", "fp16")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for name in (MODEL_FILE, BASELINE_FILE, POLYGRAPHY_INPUTS_FILE, "config.json", "tokenizer_config.json"):
        assert name in manifest["files"], name
        assert sha256_file(out / name) == manifest["files"][name]["sha256"]
    assert not [path for path in out.parent.iterdir() if path.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("name", [MODEL_FILE, BASELINE_FILE])
def test_tied_lm_head_reads_the_embedding(name: str, tiny_export: Callable[[str, str], Path]) -> None:
    """OPT ties lm_head to the input embedding: the file holds that matrix once, read through a Transpose."""
    graph = onnx.load(str(tiny_export("opt", "fp16") / name), load_external_data=False).graph
    assert "lm_head.weight_t" not in {init.name for init in graph.initializer}
    transposes = [node for node in graph.node if node.op_type == "Transpose" and node.output[0] == "lm_head.weight_t"]
    assert [node.input[0] for node in transposes] == ["model.decoder.embed_tokens.weight"]


def test_fp16_baseline_is_close_to_fp32(
    tiny_checkpoint: Callable[[str], Path], tiny_export: Callable[[str, str], Path]
) -> None:
    token_ids = np.arange(3, 30, dtype=np.int64)[None]
    fp16 = run_prefill(tiny_export("llama", "fp16") / BASELINE_FILE, token_ids)
    fp32 = run_prefill(tiny_export("llama", "fp32") / BASELINE_FILE, token_ids)
    assert fp16.dtype == np.float16
    torch.testing.assert_close(
        torch.from_numpy(fp16).float(), torch.from_numpy(fp32), **tolerance("model_logits", torch.float16)
    )


def test_mismatched_baseline_is_a_clear_error(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    other = save_tiny_model(tmp_path / "opt", "opt")
    with pytest.raises(UserError, match="does not match the checkpoint"):
        export_checkpoint(tiny_checkpoint("llama"), tmp_path / "out", baseline_from=str(other))
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to overwrite"):
        export_checkpoint(tiny_checkpoint("llama"), tmp_path / "out", with_baseline=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_cli_export_writes_json_summary(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    assert main(["export", str(tiny_checkpoint("opt")), "-o", str(out), "--no-baseline", "--json", str(summary)]) == 0
    result = json.loads(summary.read_text())
    assert result["rewritten"] == result["layers"] == len(read_checkpoint(tiny_checkpoint("opt")).packed)
    assert (out / MODEL_FILE).is_file() and not (out / BASELINE_FILE).exists()


def test_cli_export_rejects_old_opset(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tiny_checkpoint("llama")), "-o", str(tmp_path / "out"), "--opset", "17"]) == 2
    assert "opset 18" in capsys.readouterr().err


def test_tensors_stream_to_external_data(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Every tensor of at least 1 KiB goes to model.onnx.data (aligned), small ones stay inline, and
    no initializer holds an FP weight of a quantized layer; ORT reads the pair of files."""
    out = tmp_path / "out"
    export_checkpoint(tiny_checkpoint("llama"), out, with_baseline=False, dtype=torch.float32)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert f"{MODEL_FILE}.data" in manifest["files"]
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    external = {init.name: init for init in graph.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL}
    packed = read_checkpoint(tiny_checkpoint("llama")).packed
    large = {f"{name}.qweight" for name, layer in packed.items() if layer.qweight.numel() * 4 >= 1024}
    assert large and {name for name in external if name.endswith(".qweight")} == large
    assert all(int(next(e.value for e in init.external_data if e.key == "offset")) % 4096 == 0 for init in external.values())
    inline = [init for init in graph.graph.initializer if init.name not in external]
    assert inline and all(len(init.raw_data) < 1024 for init in inline)
    dense = [init.name for init in graph.graph.initializer if init.name.endswith((".weight_t", "_placeholder"))]
    assert dense == ["lm_head.weight_t"]  # the one non-quantized linear; no placeholder is left
    token_ids = np.arange(3, 20, dtype=np.int64)[None]
    model, _ = load_quantized_model(tiny_checkpoint("llama"))
    with torch.no_grad():
        expected = model(torch.from_numpy(token_ids)).logits
    torch.testing.assert_close(
        torch.from_numpy(run_prefill(out / MODEL_FILE, token_ids)), expected, **tolerance("model_logits", torch.float32)
    )


def graph_arrays(path: Path) -> tuple[list[tuple[str, str]], dict[str, np.ndarray]]:
    model = onnx.load(str(path))
    nodes = [(node.op_type, node.name) for node in model.graph.node]
    return nodes, {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_streamed_baseline_equals_whole_load(
    arch: str, tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A safetensors source read tensor by tensor gives the baseline a whole load gives, bit for bit."""
    from sqz_export.export import sqz_model, source_weights

    checkpoint = read_checkpoint(tiny_checkpoint(arch))
    source = checkpoint.qconfig.source_model
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in checkpoint.packed.items()}
    assert source_weights.open_source(source) is not None  # the tiny sources are safetensors folders
    reads: list[str] = []
    get = source_weights.SafetensorsWeights.get
    monkeypatch.setattr(source_weights.SafetensorsWeights, "get", lambda self, name, dtype=None: reads.append(name) or get(self, name, dtype))
    sqz_model.export_baseline(source, checkpoint.hf_config, shapes, torch.float16, 18, tmp_path / "streamed.onnx")
    assert len(reads) == len(set(reads))  # every tensor read once
    assert any(name.endswith("q_proj.weight") for name in reads)
    monkeypatch.setattr(sqz_model, "open_source", lambda _source: None)
    sqz_model.export_baseline(source, checkpoint.hf_config, shapes, torch.float16, 18, tmp_path / "whole.onnx")
    streamed_nodes, streamed = graph_arrays(tmp_path / "streamed.onnx")
    whole_nodes, whole = graph_arrays(tmp_path / "whole.onnx")
    assert streamed_nodes == whole_nodes
    assert streamed.keys() == whole.keys()
    for name, array in whole.items():
        assert streamed[name].dtype == array.dtype and np.array_equal(streamed[name], array), name
