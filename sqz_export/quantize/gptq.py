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

GPTQ_BLOCK = 128
"""Columns per lazy update block (GPTQ's default)."""
GPTQ_DAMP = 0.01
"""Damping added to H's diagonal, relative to its mean (GPTQ's default percdamp)."""


def _nearest_level(values: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's ascending LUT for one column of values [N] -> int64 [N]."""
    return (values[:, None] - lut).abs().argmin(dim=1)


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
    w = weight.to(torch.float32).clone()
    n, k = w.shape
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0  # an input that never fires: its column gets no feedback and no influence
    torch.diagonal(h).add_(damp * float(torch.diagonal(h).mean()))
    chol = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    indices = torch.empty(n, k, dtype=torch.int64, device=w.device)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        w_block = w[:, b0:b1].clone()
        err_block = torch.zeros_like(w_block)
        for jj in range(b1 - b0):
            j = b0 + jj
            column = w_block[:, jj]
            index = _nearest_level(column, lut)
            quantized = torch.gather(lut, 1, index[:, None]).squeeze(1)
            if exact is not None:
                quantized = torch.where(exact[:, j], column, quantized)
            indices[:, j] = index
            err = (column - quantized) / chol[j, j]
            w_block[:, jj:] -= err[:, None] * chol[j, b0 + jj : b1][None, :]
            w_block[:, jj] = quantized
            err_block[:, jj] = err
        w[:, b0:b1] = w_block
        w[:, b1:] -= err_block @ chol[b0:b1, b1:]
    return indices, w
