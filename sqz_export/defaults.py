"""Defaults that ``sqz-export --help`` shows, in a module without heavy imports.

The CLI builds its parser from these without importing torch, so ``--help`` answers at once; the
stage modules (models, data, quantize.kmeans) import the same names, so each default has one definition.
"""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"
"""Spec of the embedded default model."""

DEFAULT_DATASET = "wikipedia"
"""The offline Wikipedia sample (see sqz_export.data)."""

DEFAULT_N_INIT = 1
"""Seeded random-quantile starts in addition to the weighted-quantile start. Measured on SmolLM2-135M
rows with real Fisher: one extra start lowers the objective by a further ~1.5-2% for ~1.6x the k-means
time, and 3-bit dense perplexity from 39.13 to 37.79 (benchmarks/quality.py); the whole model still
quantizes in well under a minute on 2 cores."""

METHODS = ("lnq", "squeezellm", "gptq", "rtn")
"""Quantization methods, all writing SqueezeLLM's format (see sqz_export.quantize.pipeline)."""

DEFAULT_METHOD = "lnq"
"""SqueezeLLM's start refined by GuidedQuant's LNQ: the lowest perplexity at every bits/sparsity setting
measured (README, benchmarks/quality.py)."""

DEFAULT_HESSIAN_GROUPS = 1
"""Output-row groups sharing one gradient-weighted Hessian per layer (GuidedQuant's g)."""

DEFAULT_LNQ_ITERATIONS = 2
"""Rounds of (LUT refit, index coordinate descent) from the SqueezeLLM start."""

DEFAULT_HESSIAN_DAMP = {3: 0.1, 4: 0.1}
"""lnq's Hessian damping per bit width: the objective uses H + damp * diag(H) (quantize.lnq.damp_hessians)."""


def default_hessian_damp(bits: int) -> float:
    """The measured default damping for ``bits`` (other widths take the 3-bit value)."""
    return DEFAULT_HESSIAN_DAMP.get(bits, DEFAULT_HESSIAN_DAMP[3])
