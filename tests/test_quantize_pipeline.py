"""quantize_model / quantize_weight: options, errors, RTN grid, LNQ guarantees, end-to-end logits on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import TINY_VOCAB, make_tiny_model

from sqz_export.errors import UserError
from sqz_export.models import quantizable_linears
from sqz_export.quantize import QuantizeOptions, quantize_model, quantize_weight
from sqz_export.quantize.calibration import CalibrationStats, StatisticsRequest, collect_statistics, row_groups
from sqz_export.quantize.lnq import RowStack, damp_hessians, objective
from sqz_export.runtime import replace_linears

# Relative L2 error bounds of the logits of a 2-layer model with random weights. Uniform b-bit
# quantization of a Gaussian row over its +-3.5 sigma range has error std range / (2**b * sqrt(12)),
# i.e. about 0.25 sigma at 3 bits and 0.13 at 4 bits; errors of the two blocks add up roughly
# linearly into the logits. Measured (seed 0), 3-bit / 4-bit: squeezellm 0.16 / 0.08 (llama),
# 0.17 / 0.08 (opt); rtn 0.20 / 0.10 (llama), 0.22 / 0.12 (opt).
LOGITS_RELATIVE_BOUND = {3: 0.35, 4: 0.15}
METHODS = ("lnq", "squeezellm", "gptq", "rtn")
PHASES = {
    "lnq": {"sparse_split", "kmeans", "lnq", "sparse_select", "pack", "quantize_wall"},
    "squeezellm": {"sparse_split", "kmeans", "pack", "quantize_wall"},
    "gptq": {"sparse_split", "gptq", "pack", "quantize_wall"},
    "rtn": {"sparse_split", "kmeans", "pack", "quantize_wall"},
}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module", params=["llama", "opt"])
def calibrated(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, CalibrationStats]:
    model = make_tiny_model(request.param, seed=0)
    windows = torch.randint(0, TINY_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    everything = StatisticsRequest(fisher=True, guided_groups=2, xtx=True)
    return model, collect_statistics(model, windows, quantizable_linears(model), everything, autocast_dtype=None, progress=False)


def quantized_logits(model: torch.nn.Module, packed: dict, tokens: torch.Tensor) -> torch.Tensor:
    copy_ = copy.deepcopy(model)
    assert replace_linears(copy_, packed) == len(packed)
    with torch.no_grad():
        return copy_(tokens).logits


def test_logits_close_to_fp_and_better_with_more_bits(calibrated) -> None:
    model, fisher = calibrated
    layers = quantizable_linears(model)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    tokens = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens).logits
    errors = {}
    for method in METHODS:
        for bits in (3, 4):
            options = QuantizeOptions(method=method, bits=bits, hessian_groups=2)
            result = quantize_model(model, fisher if method != "rtn" else None, options, layers, progress=False)
            assert set(result.packed) == set(layers)
            assert set(result.timings) == PHASES[method]
            for name, packed in result.packed.items():
                packed.validate(name)
                assert packed.bits == bits and (packed.sparse is not None or method == "lnq")
                if layers[name].bias is not None:
                    assert packed.bias.dtype == torch.float16
                    torch.testing.assert_close(packed.bias, layers[name].bias.detach().half())
            errors[method, bits] = relative_error(quantized_logits(model, result.packed, tokens), reference)
            assert errors[method, bits] < LOGITS_RELATIVE_BOUND[bits], (method, bits, errors[method, bits])
    for method in METHODS:
        assert errors[method, 4] < errors[method, 3]
    for bits in (3, 4):
        assert errors["squeezellm", bits] < errors["rtn", bits]
        assert errors["gptq", bits] < errors["rtn", bits]
        assert errors["lnq", bits] < errors["rtn", bits]
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # the model was not modified


@pytest.mark.parametrize("method", ["squeezellm", "lnq", "gptq"])
def test_parallel_workers_and_reruns_give_identical_results(calibrated, method: str) -> None:
    model, stats = calibrated
    layers = quantizable_linears(model)
    runs = [quantize_model(model, stats, QuantizeOptions(method=method, bits=3, workers=workers, hessian_groups=2), layers, progress=False) for workers in (1, 2, 2)]
    for name in layers:
        for other in runs[1:]:
            assert torch.equal(runs[0].packed[name].qweight, other.packed[name].qweight)
            assert torch.equal(runs[0].packed[name].lut, other.packed[name].lut)
            assert (runs[0].packed[name].sparse is None) == (other.packed[name].sparse is None)
            if other.packed[name].sparse is not None:
                assert torch.equal(runs[0].packed[name].sparse.col, other.packed[name].sparse.col)
                assert torch.equal(runs[0].packed[name].sparse.val, other.packed[name].sparse.val)


def layer_objective(stats: CalibrationStats, name: str, weight: torch.Tensor, packed, groups: int, damp: float) -> torch.Tensor:  # noqa: ANN001
    """Per-row LNQ objective (Hessians damped as lnq damps them) of a packed layer (exact positions carry no error)."""
    exact = None
    if packed.sparse is not None:  # positions from the CSR structure: a stored residual may be 0
        exact = torch.zeros_like(weight, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(packed.out_features), packed.sparse.row_ptr.diff().long())
        exact[rows, packed.sparse.col.long()] = True
    stack = RowStack(weight.detach().float(), exact, damp_hessians(stats.guided[name], damp), row_groups(weight.shape[0], groups))
    return objective(stack, packed.lut.float(), packed.indices().long())


@pytest.mark.parametrize("sparsity", [0.0, 0.02])
def test_lnq_is_never_worse_than_its_squeezellm_start(calibrated, sparsity: float) -> None:
    """With the paper's exact positions, every row's objective is at most the SqueezeLLM solution's."""
    model, stats = calibrated
    layers = quantizable_linears(model)
    common = {"bits": 3, "sparsity": sparsity, "sensitive_fraction": min(0.0005, sparsity), "hessian_groups": 2}
    start = quantize_model(model, stats, QuantizeOptions(method="squeezellm", **common), layers, progress=False)
    options = QuantizeOptions(method="lnq", sparse_selection="paper", **common)
    assert options.damp > 0  # the default: the guarantee is about the damped objective lnq minimizes
    refined = quantize_model(model, stats, options, layers, progress=False)
    total_start = total_refined = 0.0
    for name, layer in layers.items():
        before = layer_objective(stats, name, layer.weight, start.packed[name], 2, options.damp)
        after = layer_objective(stats, name, layer.weight, refined.packed[name], 2, options.damp)
        assert bool((after <= before * (1 + 1e-5) + 1e-12).all()), name
        total_start, total_refined = total_start + float(before.sum()), total_refined + float(after.sum())
    assert total_refined < 0.9 * total_start
    for history in refined.objective.values():
        assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:])), history


def test_objective_sparse_selection_fills_the_model_budget_exactly(calibrated) -> None:
    model, stats = calibrated
    layers = quantizable_linears(model)
    total = sum(layer.weight.numel() for layer in layers.values())
    for sparsity in (0.001, 0.0045, 0.03):
        result = quantize_model(model, stats, QuantizeOptions(method="lnq", bits=3, sparsity=sparsity, sensitive_fraction=0.0, hessian_groups=2), layers, progress=False)
        nnz = sum(p.sparse.nnz for p in result.packed.values() if p.sparse is not None)
        assert nnz == round(sparsity * total)


def test_rtn_lut_is_gptqs_asymmetric_grid_of_each_row() -> None:
    """GPTQ's Quantizer (per channel, asymmetric): range [min, max] widened to hold 0, integer zero point."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 80, generator=gen)
    weight[3] = 0.25  # a constant row decodes exactly
    weight[5] = 0.0  # so does an all-zero row
    weight[7] = weight[7].abs() + 0.1  # an all-positive row: its range still starts at 0
    for bits in (2, 3, 4, 8):
        packed = quantize_weight(weight, None, QuantizeOptions(method="rtn", bits=bits, sparsity=0.0, sensitive_fraction=0.0))
        max_level = (1 << bits) - 1
        lo = weight.amin(dim=1, keepdim=True).clamp(max=0)
        hi = weight.amax(dim=1, keepdim=True).clamp(min=0)
        lo[5], hi[5] = -1.0, 1.0
        scale = (hi - lo) / max_level
        zero = torch.round(-lo / scale)
        torch.testing.assert_close(packed.lut, (scale * (torch.arange(max_level + 1) - zero)).half(), rtol=0.0, atol=0.0)
        assert bool((packed.lut.float() == 0).any(dim=1).all()), "0 must be a level of every row"
        # nearest level (GPTQ's round()), up to the fp16 rounding of the levels
        tolerance = 2.0**-11 * weight.abs().amax(dim=1, keepdim=True) + 1e-6
        assert bool(((packed.weight() - weight).abs() <= scale / 2 + tolerance).all())
        assert torch.equal(packed.weight()[3], weight[3])
        assert torch.equal(packed.weight()[5], weight[5])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "awq"}, "method 'awq'"),
        ({"hessian_groups": 0}, "hessian_groups"),
        ({"lnq_iterations": -1}, "lnq_iterations"),
        ({"hessian_damp": -0.1}, "hessian_damp"),
        ({"hessian_damp": float("nan")}, "hessian_damp"),
        ({"sparse_selection": "random"}, "sparse_selection 'random'"),
        ({"method": "squeezellm", "sparse_selection": "objective"}, "needs the LNQ objective"),
        ({"bits": 5}, "bits=5"),
        ({"sparsity": 0.2}, "sparsity=0.2"),
        ({"sparsity": -0.01}, "sparsity=-0.01"),
        ({"sparsity": 0.001, "sensitive_fraction": 0.002}, "sensitive_fraction=0.002"),
        ({"kmeans_max_iter": 0}, "kmeans_max_iter"),
        ({"chunk_nnz": 0}, "chunk_nnz"),
        ({"workers": 0}, "workers"),
        ({"device": "nonsense"}, "device 'nonsense'"),
    ],
)
def test_invalid_options_raise_user_error(changes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        QuantizeOptions(**changes).validate()


def test_methods_need_their_statistics_rtn_none() -> None:
    model = make_tiny_model("llama")
    layers = quantizable_linears(model)
    for method, needed in (("squeezellm", "Fisher"), ("lnq", "Fisher"), ("gptq", "X\\^T X")):
        with pytest.raises(UserError, match=needed):
            quantize_model(model, None, QuantizeOptions(method=method), layers, progress=False)
    partial = {name: torch.ones_like(layer.weight) for name, layer in list(layers.items())[1:]}
    with pytest.raises(UserError, match=f"first {next(iter(layers))!r}"):
        quantize_model(model, partial, QuantizeOptions(method="squeezellm"), layers, progress=False)
    with pytest.raises(UserError, match="gradient-weighted Hessians"):
        quantize_model(model, {name: torch.ones_like(layer.weight) for name, layer in layers.items()}, QuantizeOptions(method="lnq"), layers, progress=False)
    result = quantize_model(model, None, QuantizeOptions(method="rtn", bits=4), layers, progress=False)
    assert len(result.packed) == len(layers)


def test_weight_errors_name_the_layer() -> None:
    weight = torch.randn(8, 32)
    with pytest.raises(UserError, match="layer.x: Fisher information has shape"):
        quantize_weight(weight, torch.ones(8, 31), QuantizeOptions(method="squeezellm"), name="layer.x")
    with pytest.raises(UserError, match="layer.h: Hessian has shape"):
        quantize_weight(weight, torch.ones(8, 32), QuantizeOptions(method="lnq"), hessian=torch.eye(31), name="layer.h")
    weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="layer.y: weight contains NaN"):
        quantize_weight(weight, torch.ones(8, 32), QuantizeOptions(method="squeezellm"), name="layer.y")
