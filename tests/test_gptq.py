"""GPTQ baseline: RTN when inputs are uncorrelated, a lower layer-output error than RTN when they are not."""

from __future__ import annotations

import torch

from sqz_export.quantize import QuantizeOptions, quantize_weight
from sqz_export.quantize.gptq import gptq_quantize
from sqz_export.quantize.kmeans import assign_indices
from sqz_export.quantize.rtn import rtn_codebook


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T): the squared error of the layer's outputs summed over the calibration tokens."""
    e = (weight - quantized).double()
    return float(((e @ hessian.double()) * e).sum())


def correlated_inputs(k: int, tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 6, generator=gen) @ torch.randn(6, k, generator=gen) + 0.2 * torch.randn(tokens, k, generator=gen)


def test_uncorrelated_inputs_give_round_to_nearest() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 70, generator=gen)
    lut = rtn_codebook(weight, 3).half().float()
    indices, values = gptq_quantize(weight, lut, torch.eye(70) * 3.0, damp=0.0)
    assert torch.equal(indices, assign_indices(weight, lut))
    assert torch.equal(values, torch.gather(lut, 1, indices))


def test_error_feedback_beats_rtn_on_correlated_inputs() -> None:
    x = correlated_inputs(96, 512, seed=1)
    hessian = x.T @ x
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(2)) * 0.1
    for bits in (3, 4):
        lut = rtn_codebook(weight, bits).half().float()
        indices, values = gptq_quantize(weight, lut, hessian)
        assert torch.equal(values, torch.gather(lut, 1, indices))
        rtn = torch.gather(lut, 1, assign_indices(weight, lut))
        assert output_error(weight, values, hessian) < 0.7 * output_error(weight, rtn, hessian)


def test_exact_positions_take_their_fed_back_values_and_dead_inputs_are_harmless() -> None:
    x = correlated_inputs(64, 256, seed=3)
    x[:, 5] = 0.0  # an input that never fires
    hessian = x.T @ x
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(4)) * 0.1
    options = QuantizeOptions(method="gptq", bits=3, sparsity=0.02, sensitive_fraction=0.0, chunk_nnz=8)
    packed = quantize_weight(weight, None, options, hessian=hessian)
    packed.validate("gptq")
    assert packed.sparse.nnz == round(0.02 * weight.numel())
    dense_only = QuantizeOptions(method="gptq", bits=3, sparsity=0.0, sensitive_fraction=0.0)
    assert output_error(weight, packed.weight().float(), hessian) < output_error(weight, quantize_weight(weight, None, dense_only, hessian=hessian).weight().float(), hessian)
    assert bool(torch.isfinite(packed.weight()).all())


def test_act_order_is_the_natural_sweep_on_columns_sorted_by_hessian_diagonal() -> None:
    x = correlated_inputs(80, 400, seed=5) * torch.linspace(0.2, 3.0, 80)  # distinct diagonal entries
    hessian = x.T @ x
    weight = torch.randn(20, 80, generator=torch.Generator().manual_seed(6)) * 0.1
    exact = torch.rand(20, 80, generator=torch.Generator().manual_seed(7)) < 0.05
    lut = rtn_codebook(weight, 3).half().float()
    order = torch.argsort(torch.diagonal(hessian), descending=True)
    assert not torch.equal(order, torch.arange(80))  # the test needs a real permutation
    indices, values = gptq_quantize(weight, lut, hessian, exact, act_order=True)
    sorted_indices, sorted_values = gptq_quantize(weight[:, order], lut, hessian[order][:, order], exact[:, order], act_order=False)
    assert torch.equal(indices[:, order], sorted_indices)
    assert torch.equal(values[:, order], sorted_values)
    assert torch.equal(values[~exact], torch.gather(lut, 1, indices)[~exact])
    natural, _ = gptq_quantize(weight, lut, hessian, exact, act_order=False)
    assert not torch.equal(indices, natural)
