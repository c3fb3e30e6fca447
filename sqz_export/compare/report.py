"""The comparison report: per-pair error statistics, top-1 agreement, latency; table, JSON, plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class PairStats:
    """Errors of ``runner`` against ``reference`` on one output, over all compared windows."""

    reference: str
    runner: str
    output: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    top1_agreement: float
    """Fraction of positions where both runners' argmax token is the same (logits only)."""
    positions: int
    passed: bool | None
    """Polygraphy's verdict at the given tolerances; None for pairs that measure quantization error."""


@dataclasses.dataclass
class Latency:
    runner: str
    prefill_ms: float
    """Median over iterations of one forward over a whole window."""
    decode_ms: float | None
    """Median of one-token steps after a window-long KV cache; None for runners without a cache."""
    iterations: int


@dataclasses.dataclass
class CompareReport:
    folder: str
    reference: str
    windows: int
    seq_len: int
    atol: float
    rtol: float
    check_stat: str
    pairs: list[PairStats]
    latency: list[Latency]
    ort_ops: str | None = None
    """The custom-op library model.onnx's SqzLinear nodes ran with; None: their ONNX function."""
    fused_attention: bool = True
    """Whether the onnxruntime sessions ran the attention as GroupQueryAttention (CPU provider)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """Terminal table: one row per compared pair, then one per runner's latency."""
        lines = [
            f"reference: {self.reference}; {self.windows} window(s) x {self.seq_len} tokens; pass/fail: {self.check_stat} error within atol={self.atol:g} or rtol={self.rtol:g}",
            f"SqzLinear in onnxruntime: {f'custom-op library {self.ort_ops}' if self.ort_ops else 'ONNX function (no --ort-ops)'}; "
            f"attention: {'GroupQueryAttention (CPU)' if self.fused_attention else 'as exported'}",
            f"{'runner':<22} {'vs':<22} {'max abs':>10} {'mean abs':>10} {'max rel':>10} {'mean rel':>10} {'top-1':>8}  verdict",
        ]
        for pair in self.pairs:
            verdict = {True: "PASS", False: "FAIL", None: "(quantization error)"}[pair.passed]
            lines.append(
                f"{pair.runner:<22} {pair.reference:<22} {pair.max_abs:>10.4g} {pair.mean_abs:>10.4g} {pair.max_rel:>10.4g} "
                f"{pair.mean_rel:>10.4g} {pair.top1_agreement:>8.2%}  {verdict}"
            )
        lines.append(
            f"{'runner':<22} {'prefill ms':>12} {'decode ms':>12}  (median of {self.latency[0].iterations if self.latency else 0} after warm-up)"
        )
        for entry in self.latency:
            decode = f"{entry.decode_ms:>12.3f}" if entry.decode_ms is not None else f"{'-':>12}"
            lines.append(f"{entry.runner:<22} {entry.prefill_ms:>12.3f} {decode}")
        return "\n".join(lines)


def top1_agreement(logits: list[np.ndarray], reference: list[np.ndarray]) -> tuple[float, int]:
    """(fraction of positions with equal argmax, number of positions) over all iterations."""
    same = total = 0
    for ours, theirs in zip(logits, reference, strict=True):
        a, b = ours.argmax(-1), theirs.argmax(-1)
        same += int((a == b).sum())
        total += a.size
    return (same / total if total else 0.0), total


def write_plot(path: Path, errors: dict[str, np.ndarray]) -> None:
    """Histogram of absolute logit errors per pair (log-scaled x axis), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for label, values in errors.items():
        positive = values[values > 0]
        if positive.size == 0:
            continue
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()) + 1e-9, 60)
        axis.hist(positive, bins=bins, histtype="step", label=f"{label} ({values.size} values)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("|logit difference|")
    axis.set_ylabel("count")
    axis.set_title("Logit errors against the reference")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
