"""TensorRT: SqzLinear plugin engines against the torch reference and onnxruntime.

Skipped (with the reason) where the TensorRT Python package, a GPU, or the built plugin library is
absent; CI and the development machines have none of them. On a TensorRT machine build the plugin
first (plugins/README.md), then: ``pytest -m trt tests/test_trt.py``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_models import random_packed, run_prefill
from tolerances import tolerance

from sqz_export import atomic
from sqz_export.cli import main
from sqz_export.engine.build import (
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    find_plugin_library,
    import_tensorrt,
    load_plugin_library,
    make_trt_logger,
    network_flags,
)
from sqz_export.engine.runner import make_trt_runner
from sqz_export.errors import UserError
from sqz_export.export.signature import DecoderSignature
from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE
from sqz_export.formats import PackedLinear, to_rowmajor
from sqz_export.runtime import SqzLinear

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT Python package not installed"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU"),
]

MAX_M = 64
"""Largest row count of the one-layer engines: covers both kernels (GEMV up to 16 rows, tiled GEMM above)."""


@pytest.fixture(scope="module")
def plugin() -> tuple[ModuleType, Path]:
    trt = import_tensorrt()
    try:
        library = find_plugin_library()
    except UserError as exc:
        pytest.skip(f"plugin library not built: {exc}")
    load_plugin_library(trt, library)
    return trt, library


def one_layer_engine(trt: ModuleType, layer: PackedLinear, path: Path) -> None:
    """y = SqzLinear(x) as the only layer, built through the TensorRT network API and the registered creator."""
    logger = make_trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    x = network.add_input("x", trt.float16, (-1, layer.in_features))
    weights = [to_rowmajor(layer.qweight).numpy(), layer.lut.numpy()]
    attributes = {"bits": layer.bits, "in_features": layer.in_features, "out_features": layer.out_features, "layout": 2}
    if layer.sparse is not None and layer.sparse.nnz:
        sparse = layer.sparse
        weights += [sparse.row_ptr.numpy(), sparse.col.numpy(), sparse.val.numpy(), sparse.chunk_row.numpy()]
        attributes["chunk_nnz"] = sparse.chunk_nnz
    constants = [network.add_constant(w.shape, trt.Weights(np.ascontiguousarray(w))).get_output(0) for w in weights]
    creator = trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    fields = trt.PluginFieldCollection(
        [trt.PluginField(name, np.array([value], dtype=np.int32), trt.PluginFieldType.INT32) for name, value in attributes.items()]
    )
    plugin_layer = network.add_plugin_v3([x, *constants], [], creator.create_plugin("sqz_linear", fields, trt.TensorRTPhase.BUILD))
    y = plugin_layer.get_output(0)
    y.name = "y"
    network.mark_output(y)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, layer.in_features), (8, layer.in_features), (MAX_M, layer.in_features))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, "TensorRT could not build the one-layer engine (see the log)"
    atomic.write_bytes(path, memoryview(serialized))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("density", [0.0, 0.02])
@pytest.mark.parametrize("shape", [(96, 64), (64, 100)])
def test_one_layer_engine_matches_reference(
    plugin: tuple[ModuleType, Path], bits: int, density: float, shape: tuple[int, int], tmp_path: Path
) -> None:
    trt, library = plugin
    layer = random_packed(*shape, bits, density)
    engine = tmp_path / "one_layer.engine"
    one_layer_engine(trt, layer, engine)
    reference = SqzLinear(layer)
    generator = torch.Generator().manual_seed(1)
    with make_trt_runner(engine, library, profile=0) as runner:
        for m in (1, 5, 17, MAX_M):
            x = torch.randn(m, layer.in_features, generator=generator).to(torch.float16)
            y = runner.infer({"x": x.numpy()})["y"]
            expected = reference(x.to(torch.float32))
            torch.testing.assert_close(torch.as_tensor(np.asarray(y)).float(), expected, **tolerance("sqz_linear", torch.float16))


def test_decoder_engines_match_onnxruntime(
    plugin: tuple[ModuleType, Path], tiny_export: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """sqz-export build on the exported tiny LLaMA: prefill and one decode step against ORT on the same ONNX."""
    _, library = plugin
    folder = tiny_export("llama", "fp16")
    model_engine, baseline_engine = tmp_path / "model.engine", tmp_path / "baseline.engine"
    limits = ["--max-seq", "32", "--max-context", "64"]
    assert main(["build", str(folder / MODEL_FILE), "-o", str(model_engine), "--plugin-library", str(library), *limits]) == 0
    assert main(["build", "--baseline", str(folder / BASELINE_FILE), "-o", str(baseline_engine), *limits]) == 0

    prompt = np.array([[3, 17, 42, 9, 100, 7, 64]], dtype=np.int64)
    for onnx_name, engine in ((MODEL_FILE, model_engine), (BASELINE_FILE, baseline_engine)):
        signature = DecoderSignature.from_onnx(folder / onnx_name)
        expected = run_prefill(folder / onnx_name, prompt)
        with make_trt_runner(engine, library, profile="prefill") as runner:
            outputs = runner.infer(signature.feed(prompt))
        logits = np.asarray(outputs["logits"]).astype(np.float32)
        torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(expected.astype(np.float32)), **tolerance("model_logits", torch.float16))
        # One decode step after the engine's own cache.
        past = {name: np.asarray(outputs[present]) for name, present in zip(signature.past_names, signature.present_names, strict=True)}
        step = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
        feed = signature.feed(step, past)
        session = ort.InferenceSession(str(folder / onnx_name), providers=["CPUExecutionProvider"])
        expected_step = session.run(["logits"], feed)[0]
        with make_trt_runner(engine, library, profile="decode") as runner:
            step_logits = np.asarray(runner.infer(feed)["logits"]).astype(np.float32)
        torch.testing.assert_close(torch.from_numpy(step_logits), torch.from_numpy(expected_step.astype(np.float32)), **tolerance("model_logits", torch.float16))
