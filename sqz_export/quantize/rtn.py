"""Round-to-nearest baseline: a uniform per-output-channel grid expressed as a codebook.

RTN is the reference point SqueezeLLM is compared against. Writing its grid as the LUT row of each
channel (level j = min + j * (max - min) / (2**bits - 1)) puts it in the same packed format as the
k-means codebooks, so checkpoints, ONNX export and kernels need no second code path.
"""

from __future__ import annotations

import torch


def rtn_codebook(weight: torch.Tensor, bits: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform asymmetric grid per row: fp32 [N, 2**bits], ascending, from the row's min to its max.

    Args:
        weight: [N, K].
        bits: the grid has ``2**bits`` levels.
        exclude: bool [N, K]; excluded values (the sparse part) do not stretch the range. A row with every
            value excluded uses all of them.
    """
    w = weight.to(torch.float32)
    keep = torch.ones_like(w, dtype=torch.bool) if exclude is None else ~exclude
    keep = keep | ~keep.any(dim=1, keepdim=True)
    lo = w.masked_fill(~keep, torch.inf).amin(dim=1, keepdim=True)
    hi = w.masked_fill(~keep, -torch.inf).amax(dim=1, keepdim=True)
    levels = torch.arange(1 << bits, dtype=torch.float32, device=w.device) / ((1 << bits) - 1)
    return lo + (hi - lo) * levels  # a constant row gives a constant grid: every index decodes exactly
