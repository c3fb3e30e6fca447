"""The onnxruntime session helper: the SqzLinear unpack modes and the memory warning."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sqz_export import ort_session
from sqz_export.cli import main
from sqz_export.export.signature import DecoderSignature, load_graph
from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE, read_manifest
from sqz_export.generate import OnnxGenerator

PROMPT = [5, 17, 42, 9, 33, 71]


def test_quantized_weights_counts_every_sqz_linear(tiny_export: Callable[[str, str], Path]) -> None:
    folder = tiny_export("llama", "fp32")
    layers = read_manifest(folder)["layers"]
    expected = sum(layer["in_features"] * layer["out_features"] for layer in layers.values())
    assert expected > 0
    assert ort_session.quantized_weights(load_graph(folder / MODEL_FILE)) == expected
    assert ort_session.quantized_weights(load_graph(folder / BASELINE_FILE)) == 0


def prefill_logits(path: Path, unpack: str) -> np.ndarray:
    signature = DecoderSignature.from_onnx(path)
    session = ort_session.create_session(path, unpack=unpack)
    return session.run(["logits"], signature.feed(np.asarray([PROMPT])))[0]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_call_mode_matches_session_mode(tiny_export: Callable[[str, str], Path], dtype: str) -> None:
    """Unpacking on every run computes the same weights; only the MatMul's path (a constant weight is
    prepacked) may change the last bits."""
    path = tiny_export("llama", dtype) / MODEL_FILE
    folded = prefill_logits(path, ort_session.UNPACK_SESSION)
    per_call = prefill_logits(path, ort_session.UNPACK_CALL)
    tolerance = 1e-5 if dtype == "fp32" else 4e-3
    np.testing.assert_allclose(per_call.astype(np.float32), folded.astype(np.float32), atol=tolerance, rtol=tolerance)


def test_call_mode_greedy_tokens_equal_session_mode(tiny_export: Callable[[str, str], Path]) -> None:
    path = tiny_export("llama", "fp32") / MODEL_FILE
    folded = OnnxGenerator(path).greedy(PROMPT, 8)
    per_call = OnnxGenerator(path, unpack=ort_session.UNPACK_CALL).greedy(PROMPT, 8)
    assert per_call.new_ids == folded.new_ids


def test_call_mode_is_logged(tiny_export: Callable[[str, str], Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sqz_export.ort_session"):
        ort_session.create_session(tiny_export("llama", "fp32") / MODEL_FILE, unpack=ort_session.UNPACK_CALL)
    assert "constant folding off" in caplog.text


def test_unknown_mode_is_refused(tiny_export: Callable[[str, str], Path]) -> None:
    with pytest.raises(ValueError, match="expected one of"):
        ort_session.create_session(tiny_export("llama", "fp32") / MODEL_FILE, unpack="never")


def test_warns_when_folding_will_not_fit(
    tiny_export: Callable[[str, str], Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort_session, "available_memory", lambda: 1024)
    with caplog.at_level(logging.WARNING, logger="sqz_export.ort_session"):
        ort_session.create_session(tiny_export("llama", "fp32") / MODEL_FILE, unpack=ort_session.UNPACK_SESSION)
    assert "--unpack stream" in caplog.text and "--unpack call" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sqz_export.ort_session"):
        ort_session.create_session(tiny_export("llama", "fp32") / MODEL_FILE)  # stream: no folding peak to warn of
    assert caplog.text == ""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sqz_export.ort_session"):
        ort_session.create_session(tiny_export("llama", "fp32") / BASELINE_FILE, unpack=ort_session.UNPACK_SESSION)  # nothing to fold
    assert caplog.text == ""


def test_available_memory_reads_meminfo() -> None:
    free = ort_session.available_memory()
    if Path("/proc/meminfo").is_file():
        assert free is not None and free > 0
    else:
        assert free is None


def test_cli_generate_every_unpack_mode(tiny_export: Callable[[str, str], Path], tmp_path: Path) -> None:
    folder = tiny_export("llama", "fp32")
    outputs = {}
    for unpack in ort_session.UNPACK_MODES:
        summary = tmp_path / f"{unpack}.json"
        args = ["generate", "--onnx", str(folder), "--prompt", "The quick", "--max-new-tokens", "5"]
        assert main([*args, "--unpack", unpack, "--json", str(summary)]) == 0
        outputs[unpack] = json.loads(summary.read_text())["new_ids"]
    assert outputs["call"] == outputs["session"] == outputs["stream"]
