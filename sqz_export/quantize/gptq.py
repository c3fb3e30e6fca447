"""GPTQ baseline (Frantar et al., 2023) written in SqueezeLLM's format: a uniform LUT per row.

GPTQ is what users would pick instead of SqueezeLLM, so sqz-export measures against it on the same
data. Per output row the grid is RTN's (GPTQ's own asymmetric per-channel ``Quantizer``, rtn.py), and
columns are quantized one at a time (in act-order, below), each one's error fed back into the columns
not yet quantized through the Cholesky factor of ``H^-1`` (``H = X^T X`` from calibration, damped by
1% of its mean diagonal), with GPTQ's lazy blocks of 128 columns. The grid itself is fixed from the original weights,
as in GPTQ without grouping.

Columns are visited in GPTQ's "act-order" (descending ``H_jj``, AutoGPTQ's ``desc_act``): with one
grid per row and no groups the order costs nothing at run time (the packed indices go back to the
original column order). In the natural order GPTQ loses to RTN on SmolLM2-135M (4-bit dense, 20
Wikipedia windows: 47.6 against RTN's 40.3; act-order 37.5). The cause is the attention sink: the
first token of a window is 0.1% or less of ``X^T X``'s mass in the middle blocks, so the natural-order
sweep trades its q/k/v error freely (1.6-11.5x RTN's at that token, measured on held-out windows) while
every later query attends to it; quantizing only v_proj by RTN instead recovers most of the loss.
Act-order quantizes the large-activation columns first, while the most columns are left to absorb
their error (same 20 windows: 37.5; 33.4 with v_proj by RTN, so the sink still costs it something).

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
GPTQ_ACT_ORDER = True
"""Columns in descending order of H's diagonal (see the module docstring)."""


def gptq_quantize(
    weight: torch.Tensor,
    lut: torch.Tensor,
    hessian: torch.Tensor,
    exact: torch.Tensor | None = None,
    block: int = GPTQ_BLOCK,
    damp: float = GPTQ_DAMP,
    act_order: bool = GPTQ_ACT_ORDER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``weight`` onto the fixed per-row ``lut`` with GPTQ's error feedback.

    Args:
        weight: fp32 [N, K] (not modified).
        lut: fp32 [N, C], ascending per row.
        hessian: fp32 [K, K], X^T X of the layer's inputs.
        exact: bool [N, K], positions kept exact (they take their fed-back value).
        block: lazy-update block width.
        damp: relative diagonal damping.
        act_order: visit columns in descending order of ``hessian``'s diagonal.

    Returns:
        (indices int64 [N, K], values fp32 [N, K]): the values are the weights after feedback, which is
        what the exact positions must reproduce; elsewhere they are LUT[idx].
    """
    w = weight.to(torch.float32)
    if not act_order:
        stack = RowStack(weight=w, exact=exact, hessians=hessian[None], segments=[(0, w.shape[0])])
        return gptq_sweep(stack, lut, damp=damp, block=block, exact_takes_feedback=True)
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    stack = RowStack(
        weight=w[:, order],
        exact=None if exact is None else exact[:, order],
        hessians=hessian[order][:, order][None],
        segments=[(0, w.shape[0])],
    )
    indices, values = gptq_sweep(stack, lut, damp=damp, block=block, exact_takes_feedback=True)
    restore = torch.argsort(order)
    return indices[:, restore], values[:, restore]
