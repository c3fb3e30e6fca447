"""SqueezeLLM quantization: Fisher information, dense/sparse split, weighted k-means codebooks, packing.

Stages, one module each: ``fisher`` (sum of squared gradients over calibration windows), ``sparse``
(which weights stay exact), ``kmeans`` (per-row Fisher-weighted codebooks), ``rtn`` (the uniform
baseline in the same format), ``pipeline`` (options, per-layer and per-model drivers).
"""

from __future__ import annotations

from sqz_export.quantize.pipeline import QuantizeOptions, QuantizeResult, quantize_model, quantize_weight

__all__ = ["QuantizeOptions", "QuantizeResult", "quantize_model", "quantize_weight"]
