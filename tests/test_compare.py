"""The Polygraphy comparison of an export folder: runners, statistics, verdicts, latency, JSON, plot."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import SAMPLE_TEXT
from tolerances import TOLERANCES

from sqz_export.cli import main
from sqz_export.compare.driver import (
    BASELINE,
    REFERENCE,
    SQZ,
    CompareOptions,
    compare_folder,
)
from sqz_export.compare.report import write_plot
from sqz_export.errors import UserError


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE_TEXT)
    return path


def test_compare_reports_reference_sqz_and_baseline(
    tiny_export: Callable[[str, str], Path], text_file: Path, tmp_path: Path
) -> None:
    atol, rtol = TOLERANCES[("model_logits", torch.float32)]
    options = CompareOptions(dataset=str(text_file), windows=2, seq_len=48, iterations=3, atol=atol, rtol=rtol)
    report, errors = compare_folder(tiny_export("llama", "fp32"), options)

    assert report.reference == REFERENCE
    pairs = {pair.runner: pair for pair in report.pairs}
    assert set(pairs) == {SQZ, BASELINE}
    sqz = pairs[SQZ]
    assert sqz.passed is True and sqz.positions == 2 * 48
    assert sqz.max_abs <= atol and sqz.top1_agreement == 1.0
    # The baseline is the unquantized model: it differs by the quantization error and gets no verdict.
    assert pairs[BASELINE].passed is None and pairs[BASELINE].max_abs > sqz.max_abs
    assert [entry.runner for entry in report.latency] == [REFERENCE, SQZ, BASELINE]
    assert all(entry.prefill_ms > 0 for entry in report.latency)
    assert report.latency[0].decode_ms is None and all(entry.decode_ms > 0 for entry in report.latency[1:])
    json.dumps(report.to_json())  # serializable as is
    assert "torch-reference" in report.table()

    plot = tmp_path / "errors.png"
    write_plot(plot, errors)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_fails_verdict_at_impossible_tolerance(
    tiny_export: Callable[[str, str], Path], text_file: Path
) -> None:
    options = CompareOptions(dataset=str(text_file), windows=1, seq_len=32, iterations=1, atol=0.0, rtol=0.0)
    report, _ = compare_folder(tiny_export("llama", "fp16"), options)
    assert next(pair for pair in report.pairs if pair.runner == SQZ).passed is False


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed; this checks the message without it"
)
def test_engine_without_tensorrt_is_a_user_error(
    tiny_export: Callable[[str, str], Path], text_file: Path, tmp_path: Path
) -> None:
    options = CompareOptions(
        dataset=str(text_file), windows=1, seq_len=16, iterations=1, engine=tmp_path / "model.engine"
    )
    with pytest.raises(UserError, match="TensorRT"):
        compare_folder(tiny_export("llama", "fp16"), options)


def test_cli_compare_writes_json_and_plot(
    tiny_export: Callable[[str, str], Path], text_file: Path, tmp_path: Path
) -> None:
    out_json, plot = tmp_path / "report.json", tmp_path / "plot.png"
    code = main(
        [
            "compare",
            str(tiny_export("opt", "fp16")),
            "--dataset",
            str(text_file),
            "--seq-len",
            "32",
            "--iterations",
            "2",
            "--json",
            str(out_json),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    report = json.loads(out_json.read_text())
    assert {pair["runner"] for pair in report["pairs"]} == {SQZ, BASELINE}
    assert plot.is_file()


def test_onnxrt_runner_outputs_own_their_memory(tiny_export: Callable[[str, str], Path]) -> None:
    """onnxruntime's own output arrays keep their session's memory alive; the runner's copies do not,
    and they hold the same values."""
    import numpy as np

    from sqz_export.compare.runners import onnxrt_runner
    from sqz_export.export.signature import DecoderSignature
    from sqz_export.export.sqz_model import MODEL_FILE
    from sqz_export.ort_session import create_session

    path = tiny_export("llama", "fp32") / MODEL_FILE
    feed = DecoderSignature.from_onnx(path).feed(np.asarray([[5, 17, 42, 9]]))
    runner = onnxrt_runner(path, "sqz")
    with runner:
        outputs = runner.infer(feed)
        assert runner.last_inference_time() is not None and runner.last_inference_time() > 0
    expected = create_session(path).run(None, feed)
    assert list(outputs) == [node.name for node in create_session(path).get_outputs()]
    for value, reference in zip(outputs.values(), expected, strict=True):
        assert value.base is None and value.flags.owndata
        assert np.array_equal(value, reference)
