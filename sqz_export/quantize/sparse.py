"""Dense-and-sparse split: which weights stay exact, and the CSR part that holds them.

SqueezeLLM keeps a small fraction of each matrix out of the codebook: magnitude outliers (they would
stretch the codebook's range and waste its levels) and the most Fisher-sensitive values (their error
costs the most loss). Both choices are global per matrix (top-k over all of W, the paper's "percentage
per layer"), not per row: outliers concentrate in a few channels, and the balanced CSR partition
(``formats.balanced_partition``) already evens out rows with many non-zeros, so a per-row quota would
only spend the budget on rows that do not need it.

The selected positions are excluded from k-means (zero sample weight, no influence on centroids).
After k-means, the sparse part stores the residual ``W - LUT[idx]`` at those positions, so the
reconstruction ``W = LUT[idx] + S`` (``formats``) is exact there up to the fp16 rounding of S.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from sqz_export.formats import DEFAULT_CHUNK_NNZ, SparsePart, balanced_partition

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SparseSelection:
    """Positions kept exact in one matrix and why they were chosen."""

    mask: torch.Tensor  # bool [N, K]
    outliers: int  # chosen by |W|
    sensitive: int  # chosen by Fisher among the rest

    @property
    def nnz(self) -> int:
        return self.outliers + self.sensitive


def sparse_counts(numel: int, sparsity: float, sensitive_fraction: float) -> tuple[int, int]:
    """(outliers, sensitive) counts for a matrix of ``numel`` weights; the total is round(sparsity * numel).

    Rounding the total once keeps the achieved fraction within 0.5 / numel of the target.
    """
    total = round(sparsity * numel)
    sensitive = min(round(sensitive_fraction * numel), total)
    return total - sensitive, sensitive


def select_sparse(weight: torch.Tensor, fisher: torch.Tensor | None, sparsity: float, sensitive_fraction: float) -> SparseSelection:
    """Chooses the exact positions of ``weight`` [N, K]: top |W| outliers, then top Fisher among the rest.

    Without Fisher information (the RTN baseline) the whole budget goes to magnitude outliers. Fisher
    values that are negative or not finite count as zero sensitivity.
    """
    n, k = weight.shape
    outliers, sensitive = sparse_counts(n * k, sparsity, sensitive_fraction)
    if fisher is None:
        outliers, sensitive = outliers + sensitive, 0
    flat_mask = torch.zeros(n * k, dtype=torch.bool, device=weight.device)
    if outliers:
        flat_mask[torch.topk(weight.reshape(-1).abs().float(), outliers, sorted=False).indices] = True
    if sensitive:
        score = fisher.reshape(-1).to(device=weight.device, dtype=torch.float32)
        score = torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
        score.masked_fill_(flat_mask, -1.0)  # below every valid score: never picked twice (a copy: nan_to_num's)
        flat_mask[torch.topk(score, sensitive, sorted=False).indices] = True
    return SparseSelection(mask=flat_mask.view(n, k), outliers=outliers, sensitive=sensitive)


def build_sparse_part(
    weight: torch.Tensor, lut: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, chunk_nnz: int = DEFAULT_CHUNK_NNZ
) -> SparsePart | None:
    """CSR of the residual ``weight - LUT[idx]`` at ``mask`` (None when nothing is selected).

    Every selected position is stored, even where the residual happens to be zero, so the part's nnz
    is exactly the selection's size. The reconstruction is read at the selected positions only (the
    dense one would be a full fp32 copy of the layer).

    Args:
        weight: original weights [N, K].
        lut: the codebook [N, C] (fp32 of the fp16 LUT).
        indices: integer [N, K], each weight's codebook entry.
        mask: bool [N, K], the positions to keep exact.
        chunk_nnz: non-zeros per balanced SpMV work item.
    """
    if not bool(mask.any()):
        return None
    n = weight.shape[0]
    rows, cols = torch.nonzero(mask, as_tuple=True)  # row-major: sorted by row, then column
    dense = lut[rows, indices[rows, cols].long()]
    values = (weight[rows, cols].to(torch.float32) - dense.to(torch.float32)).to(torch.float16).cpu()
    rows, cols = rows.cpu(), cols.cpu()
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return SparsePart(
        row_ptr=row_ptr.to(torch.int32),
        col=cols.to(torch.int32),
        val=values,
        chunk_row=balanced_partition(row_ptr, chunk_nnz),
        chunk_nnz=chunk_nnz,
    )
