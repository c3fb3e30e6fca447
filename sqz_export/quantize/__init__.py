"""Quantization into SqueezeLLM's format: calibration statistics, codebooks, refinement, packing.

Stages, one module each: ``calibration`` (Fisher, gradient-weighted Hessians and X^T X from one
forward/backward pass per window), ``sparse`` (which weights stay exact, the paper's rule), ``kmeans``
(per-row Fisher-weighted codebooks), ``lnq`` (GuidedQuant's LUT refit and index updates), ``gptq`` and
``rtn`` (the uniform baselines in the same format), ``pipeline`` (options, per-layer and per-model
drivers).
"""

from __future__ import annotations

from sqz_export.quantize.pipeline import QuantizeOptions, QuantizeResult, quantize_model, quantize_weight

__all__ = ["QuantizeOptions", "QuantizeResult", "quantize_model", "quantize_weight"]
