"""Dense-and-sparse split: exact budget, selection rule, exact reconstruction at the kept positions."""

from __future__ import annotations

import pytest
import torch

from sqz_export.formats import balanced_partition
from sqz_export.quantize import QuantizeOptions, quantize_weight
from sqz_export.quantize.sparse import build_sparse_part, select_sparse, sparse_counts

FRACTION_TOLERANCE = 1e-4
"""0.01 percentage points: the achieved sparse fraction must be this close to the target."""
FP16_RELATIVE = 2.0**-11
"""Half an fp16 ulp, relative: the rounding bound of a stored (normal) residual."""
FP16_SUBNORMAL_HALF_STEP = 2.0**-25
"""Absolute rounding bound of a residual below fp16's normal range (spacing 2**-24 there)."""
FP32_RELATIVE = 2.0**-24
"""Rounding of the fp32 sum LUT[idx] + S itself, relative to the weight."""


def matrix(rows: int = 256, cols: int = 384, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.02
    fisher = torch.rand(rows, cols, generator=gen) ** 3
    return weight, fisher


@pytest.mark.parametrize(("sparsity", "sensitive"), [(0.0005, 0.0005), (0.0045, 0.0005), (0.01, 0.002), (0.05, 0.0)])
def test_fraction_hits_target(sparsity: float, sensitive: float) -> None:
    weight, fisher = matrix()
    selection = select_sparse(weight, fisher, sparsity, sensitive)
    fraction = int(selection.mask.sum()) / weight.numel()
    assert abs(fraction - sparsity) <= FRACTION_TOLERANCE
    assert (selection.outliers, selection.sensitive) == sparse_counts(weight.numel(), sparsity, sensitive)
    packed = quantize_weight(weight, fisher, QuantizeOptions(method="squeezellm", bits=3, sparsity=sparsity, sensitive_fraction=sensitive))
    assert packed.sparse is not None
    assert abs(packed.sparse.nnz / weight.numel() - sparsity) <= FRACTION_TOLERANCE


def test_outliers_by_magnitude_then_sensitive_by_fisher() -> None:
    weight, fisher = matrix()
    sparsity, sensitive = 0.01, 0.003
    n_out, n_sens = sparse_counts(weight.numel(), sparsity, sensitive)
    selection = select_sparse(weight, fisher, sparsity, sensitive)
    magnitude = weight.abs().reshape(-1)
    outliers = torch.zeros(weight.numel(), dtype=torch.bool)
    outliers[torch.topk(magnitude, n_out).indices] = True
    assert bool(selection.mask.reshape(-1)[outliers].all())
    sensitive_set = selection.mask.reshape(-1) & ~outliers
    assert int(sensitive_set.sum()) == n_sens
    rest = fisher.reshape(-1)[~selection.mask.reshape(-1) & ~outliers]
    assert fisher.reshape(-1)[sensitive_set].min() >= rest.max()


def test_without_fisher_all_by_magnitude() -> None:
    weight, _ = matrix()
    selection = select_sparse(weight, None, 0.0045, 0.0005)
    assert selection.sensitive == 0 and selection.outliers == round(0.0045 * weight.numel())
    kept = weight.abs()[selection.mask]
    assert kept.min() >= weight.abs()[~selection.mask].max()


def test_zero_sparsity_gives_dense_only() -> None:
    weight, fisher = matrix(64, 96)
    packed = quantize_weight(weight, fisher, QuantizeOptions(method="squeezellm", bits=4, sparsity=0.0, sensitive_fraction=0.0))
    assert packed.sparse is None


@pytest.mark.parametrize("method", ["squeezellm", "rtn"])
def test_reconstruction_exact_at_sparse_positions(method: str) -> None:
    weight, fisher = matrix(128, 200, seed=3)  # 200 columns: not a multiple of the packing group
    options = QuantizeOptions(method=method, bits=3, sparsity=0.01, sensitive_fraction=0.002, chunk_nnz=16)
    packed = quantize_weight(weight, fisher, options)
    selection = select_sparse(weight, fisher, options.sparsity, options.sensitive_fraction)
    assert packed.sparse is not None and packed.sparse.nnz == int(selection.mask.sum())
    counts = (packed.sparse.row_ptr[1:] - packed.sparse.row_ptr[:-1]).long()
    stored = torch.zeros_like(selection.mask)
    stored[torch.repeat_interleave(torch.arange(128), counts), packed.sparse.col.long()] = True
    assert torch.equal(stored, selection.mask)  # exactly the selected positions, explicit zeros included
    residual = weight - packed.dense_weight()
    error = (packed.weight() - weight)[selection.mask].abs()
    bound = FP16_RELATIVE * residual[selection.mask].abs() + FP16_SUBNORMAL_HALF_STEP + FP32_RELATIVE * weight[selection.mask].abs()
    assert bool((error <= bound).all())
    assert torch.equal(packed.sparse.chunk_row, balanced_partition(packed.sparse.row_ptr, 16))


def test_explicit_zero_residuals_are_kept() -> None:
    weight = torch.tensor([[0.5, 1.0, -2.0], [0.25, 0.0, 3.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    lut = weight.clone()  # entry j of row n is weight[n, j] ...
    lut[0, 0] = 0.0  # ... but at [0, 0]: residual 0.5 there; the other kept positions have residual exactly 0
    indices = torch.arange(3).expand(2, 3)
    part = build_sparse_part(weight, lut, indices, mask, chunk_nnz=2)
    assert part is not None and part.nnz == 3
    assert part.row_ptr.tolist() == [0, 2, 3] and part.col.tolist() == [0, 2, 2]
    assert part.val.tolist() == [0.5, 0.0, 0.0]
    part.validate("test", 2, 3)
    assert build_sparse_part(weight, lut, indices, torch.zeros_like(mask)) is None
