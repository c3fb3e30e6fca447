"""Round-to-nearest baseline: GPTQ's per-channel asymmetric uniform grid, written as a codebook.

RTN is the reference point SqueezeLLM is compared against. The definition is GPTQ's ``Quantizer``
(per output row, asymmetric, no clipping search: what ``--nearest`` runs and SqueezeLLM's evaluation
inherits): the range is the row's [min, max] widened to include 0, scale = range / (2**bits - 1), and
the zero point is *rounded* to an integer, so 0 is exactly a grid level. That rounding matters: on the
embedded SmolLM2 a plain min-max grid (0 generally between two levels) scored 51.6 / 15,704 perplexity
at 4 / 3 bits, this grid 35.1 / 435 (benchmarks/quality.py), against the seed's published 35.6 / 441.

Writing the grid as the LUT row of each channel (level j = scale * (j - zero)) puts it in the same
packed format as the k-means codebooks, so checkpoints, ONNX export and kernels need no second code path.
"""

from __future__ import annotations

import torch


def rtn_codebook(weight: torch.Tensor, bits: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's asymmetric per-row grid: fp32 [N, 2**bits], ascending, with 0 on the grid.

    Args:
        weight: [N, K].
        bits: the grid has ``2**bits`` levels.
        exclude: bool [N, K]; excluded values (the sparse part) do not stretch the range. A row with every
            value excluded uses all of them.
    """
    w = weight.to(torch.float32)
    keep = torch.ones_like(w, dtype=torch.bool) if exclude is None else ~exclude
    keep = keep | ~keep.any(dim=1, keepdim=True)
    lo = w.masked_fill(~keep, torch.inf).amin(dim=1, keepdim=True).clamp(max=0.0)
    hi = w.masked_fill(~keep, -torch.inf).amax(dim=1, keepdim=True).clamp(min=0.0)
    all_zero = (lo == 0) & (hi == 0)  # an all-zero row still gets a valid grid (0 stays exact)
    lo = torch.where(all_zero, torch.full_like(lo, -1.0), lo)
    hi = torch.where(all_zero, torch.full_like(hi, 1.0), hi)
    max_level = (1 << bits) - 1
    scale = (hi - lo) / max_level
    zero = torch.round(-lo / scale)
    levels = torch.arange(1 << bits, dtype=torch.float32, device=w.device)
    return scale * (levels - zero)
