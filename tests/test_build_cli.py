"""`sqz-export build`: clean failures without TensorRT, input checks before TensorRT, profile plan.

The TensorRT build itself is tested in test_trt.py (skipped where TensorRT is absent).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from graph_passes.sqz_linear import sqz_linear_node
from sqz_export.cli import main
from sqz_export.engine import build as engine_build
from sqz_export.engine.build import BuildLimits, count_sqz_nodes, find_plugin_library, profile_shapes
from sqz_export.errors import UserError
from sqz_export.export.signature import DecoderSignature
from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE, read_manifest
from sqz_export.formats import PackedLinear, pack_indices

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HIDDEN, VOCAB, KV_HEADS, HEAD_DIM, LAYERS = 64, 128, 2, 8, 2


def packed_layer(bits: int = 3, k: int = HIDDEN, n: int = VOCAB) -> PackedLinear:
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 1 << bits, (n, k), generator=generator)
    lut = torch.randn(n, 1 << bits, generator=generator).to(torch.float16)
    return PackedLinear(bits=bits, in_features=k, out_features=n, qweight=pack_indices(indices, bits), lut=lut)


def write_decoder_graph(path: Path, with_sqz: bool) -> Path:
    """A graph with the exported decoder's inputs/outputs (LLaMA-style, 2 layers, fp16).

    The body is a stand-in (embedding-free): enough for the build command's checks, which read the
    signature and count SqzLinear nodes before TensorRT is involved.
    """
    past = [f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ] + [helper.make_tensor_value_info(name, TensorProto.FLOAT16, ["batch", KV_HEADS, "past", HEAD_DIM]) for name in past]
    presents = [name.replace("past_key_values.", "present.") for name in past]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", VOCAB])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT16, ["batch", KV_HEADS, "total", HEAD_DIM]) for name in presents]
    hidden = helper.make_tensor("hidden", TensorProto.FLOAT16, [1, 1, HIDDEN], np.ones(HIDDEN, np.float16).tolist())
    nodes = [helper.make_node("Identity", [p], [q]) for p, q in zip(past, presents, strict=True)]
    initializers = [hidden]
    if with_sqz:
        node, tensors = sqz_linear_node("lm_head", packed_layer(), "hidden", "logits")
        nodes.append(node)
        initializers += tensors
    else:
        weight = helper.make_tensor("w", TensorProto.FLOAT16, [HIDDEN, VOCAB], np.zeros(HIDDEN * VOCAB, np.float16).tolist())
        nodes.append(helper.make_node("MatMul", ["hidden", "w"], ["logits"]))
        initializers.append(weight)
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("sqz", 1)])
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model_onnx(tmp_path: Path) -> Path:
    return write_decoder_graph(tmp_path / "model.onnx", with_sqz=True)


@pytest.fixture
def baseline_onnx(tmp_path: Path) -> Path:
    return write_decoder_graph(tmp_path / "baseline.onnx", with_sqz=False)


def run_build(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["build", *args])
    return code, capsys.readouterr().err


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here; this checks the message of a machine without it")
@pytest.mark.parametrize("mode", ["model", "baseline"])
def test_without_tensorrt_fails_cleanly(
    mode: str, model_onnx: Path, baseline_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = tmp_path / "out.engine"
    args = [str(model_onnx)] if mode == "model" else ["--baseline", str(baseline_onnx)]
    code, err = run_build(capsys, *args, "-o", str(engine))
    assert code == 2
    assert "TensorRT Python package not found: pip install tensorrt" in err
    assert "Traceback" not in err
    assert not engine.exists()
    assert list(tmp_path.glob("*.tmp")) == []


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here; this checks the message of a machine without it")
def test_without_tensorrt_as_a_user_runs_it(model_onnx: Path, tmp_path: Path) -> None:
    from test_cli import run_cli

    result = run_cli("build", str(model_onnx), "-o", str(tmp_path / "model.engine"))
    assert result.returncode == 2
    assert "sqz-export build: error: TensorRT Python package not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_needs_exactly_one_graph(model_onnx: Path, baseline_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_build(capsys, "-o", "x.engine")
    assert code == 2 and "pass exactly one graph" in err
    code, err = run_build(capsys, str(model_onnx), "--baseline", str(baseline_onnx), "-o", "x.engine")
    assert code == 2 and "pass exactly one graph" in err


def test_graph_must_match_the_mode(model_onnx: Path, baseline_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_build(capsys, "--baseline", str(model_onnx), "-o", "x.engine")
    assert code == 2 and "has 1 SqzLinear nodes; --baseline expects the FP graph" in err
    code, err = run_build(capsys, str(baseline_onnx), "-o", "x.engine")
    assert code == 2 and "has no sqz::SqzLinear nodes; for the FP graph use --baseline" in err


def test_missing_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_build(capsys, str(tmp_path / "nope.onnx"), "-o", "x.engine")
    assert code == 2 and "ONNX file" in err and "nope.onnx: no such file" in err


def test_profiles_cover_decode_and_prefill(model_onnx: Path) -> None:
    signature = DecoderSignature.from_onnx(model_onnx)
    profiles = profile_shapes(signature, BuildLimits(max_batch=4, max_seq=128, max_context=1024))
    assert list(profiles) == ["decode", "prefill"]
    expected_inputs = {"input_ids", "attention_mask", "position_ids", *signature.past_names}
    decode, prefill = profiles["decode"], profiles["prefill"]
    assert set(decode) == set(prefill) == expected_inputs
    # decode: one token after a cache of 0..max_context-1; the mask covers cache + token.
    assert decode["input_ids"] == ((1, 1), (1, 1), (4, 1))
    assert decode["attention_mask"] == ((1, 1), (1, 512), (4, 1024))
    assert decode["past_key_values.0.key"] == ((1, KV_HEADS, 0, HEAD_DIM), (1, KV_HEADS, 511, HEAD_DIM), (4, KV_HEADS, 1023, HEAD_DIM))
    # prefill: a prompt of 1..max_seq tokens with an empty cache.
    assert prefill["input_ids"] == ((1, 1), (1, 64), (4, 128))
    assert prefill["position_ids"] == prefill["input_ids"]
    assert prefill["attention_mask"] == prefill["input_ids"]
    assert prefill["past_key_values.1.value"] == ((1, KV_HEADS, 0, HEAD_DIM), (1, KV_HEADS, 0, HEAD_DIM), (4, KV_HEADS, 0, HEAD_DIM))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_exported_graphs_are_planned(arch: str, tiny_export: Callable[[str, str], Path]) -> None:
    """On the real exporter's output: one plugin per quantized layer, and a profile for every graph input."""
    folder = tiny_export(arch, "fp16")
    layers = read_manifest(folder)["layers"]
    assert count_sqz_nodes(folder / MODEL_FILE) == len(layers) > 0
    assert count_sqz_nodes(folder / BASELINE_FILE) == 0
    for name in (MODEL_FILE, BASELINE_FILE):
        graph_inputs = {value.name for value in onnx.load(str(folder / name), load_external_data=False).graph.input}
        for shapes in profile_shapes(DecoderSignature.from_onnx(folder / name), BuildLimits()).values():
            assert set(shapes) == graph_inputs


def test_limits_are_checked(model_onnx: Path) -> None:
    signature = DecoderSignature.from_onnx(model_onnx)
    with pytest.raises(UserError, match="--max-seq 4096 exceeds --max-context 2048"):
        profile_shapes(signature, BuildLimits(max_seq=4096, max_context=2048))


def test_plugin_library_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(engine_build.PLUGIN_LIBRARY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine_build, "REPO_ROOT", tmp_path / "repo")
    with pytest.raises(UserError, match="libsqz_trt_plugin.so not found.*--plugin-library"):
        find_plugin_library()
    with pytest.raises(UserError, match="--plugin-library .*missing.so: no such file"):
        find_plugin_library(tmp_path / "missing.so")
    monkeypatch.setenv(engine_build.PLUGIN_LIBRARY_ENV, str(tmp_path / "gone.so"))
    with pytest.raises(UserError, match="SQZ_PLUGIN_LIBRARY=.*gone.so: no such file"):
        find_plugin_library()
    monkeypatch.delenv(engine_build.PLUGIN_LIBRARY_ENV)
    built = tmp_path / "build" / "plugins" / "sqzLinearPlugin" / "libsqz_trt_plugin.so"
    built.parent.mkdir(parents=True)
    built.write_bytes(b"")
    assert find_plugin_library() == built
    monkeypatch.setenv(engine_build.PLUGIN_LIBRARY_ENV, str(built))
    assert find_plugin_library() == built
