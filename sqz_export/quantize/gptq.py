"""GPTQ baseline (Frantar et al., 2023) written in SqueezeLLM's format: a uniform LUT per row.

GPTQ is what users would pick instead of SqueezeLLM, so sqz-export measures against it on the same
data. Per output row the grid is RTN's (GPTQ's own asymmetric per-channel ``Quantizer``, rtn.py), and
columns are quantized left to right, each one's error fed back into the columns not yet quantized
through the Cholesky factor of ``H^-1`` (``H = X^T X`` from calibration, damped by 1% of its mean
diagonal), with GPTQ's lazy blocks of 128 columns. The grid itself is fixed from the original weights,
as in GPTQ without grouping.

Exact (sparse) positions take the value the feedback gives them, exactly (the CSR residual stores it),
so they carry no error and absorb updates like SpQR's outliers; they are chosen by magnitude and do not
stretch the grid.
"""

from __future__ import annotations

import torch

from sqz_export.quantize.lnq import RowStack, gptq_sweep

GPTQ_BLOCK = 128
"""Columns per lazy update block (GPTQ's default)."""
GPTQ_DAMP = 0.01
"""Damping added to H's diagonal, relative to its mean (GPTQ's default percdamp)."""


def gptq_quantize(
    weight: torch.Tensor, lut: torch.Tensor, hessian: torch.Tensor, exact: torch.Tensor | None = None, block: int = GPTQ_BLOCK, damp: float = GPTQ_DAMP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``weight`` onto the fixed per-row ``lut`` with GPTQ's error feedback.

    Args:
        weight: fp32 [N, K] (not modified).
        lut: fp32 [N, C], ascending per row.
        hessian: fp32 [K, K], X^T X of the layer's inputs.
        exact: bool [N, K], positions kept exact (they take their fed-back value).
        block: lazy-update block width.
        damp: relative diagonal damping.

    Returns:
        (indices int64 [N, K], values fp32 [N, K]): the values are the weights after feedback, which is
        what the exact positions must reproduce; elsewhere they are LUT[idx].
    """
    stack = RowStack(weight=weight.to(torch.float32), exact=exact, hessians=hessian[None], segments=[(0, weight.shape[0])])
    return gptq_sweep(stack, lut, damp=damp, block=block, exact_takes_feedback=True)
