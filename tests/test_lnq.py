"""LNQ refinement: monotone objective, optimal LUT refit, coordinate-wise optimal indices, exact gains."""

from __future__ import annotations

import pytest
import torch

from sqz_export.quantize.kmeans import assign_indices, weighted_kmeans
from sqz_export.quantize.lnq import (
    RowStack,
    coordinate_descent,
    damp_hessians,
    exactness_gain,
    gptq_sweep,
    objective,
    refine,
    refit_luts,
    solve_luts,
    sort_lut,
)

OBJECTIVE_RTOL = 1e-6
"""fp32 products summed in fp64: a step that "does not increase" f may show this much noise."""


def correlated_hessian(k: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """X^T diag(s) X of activations with a few shared directions, as real layer inputs have."""
    basis = torch.randn(4, k, generator=generator)
    x = torch.randn(tokens, 4, generator=generator) @ basis + 0.3 * torch.randn(tokens, k, generator=generator)
    s = torch.rand(tokens, 1, generator=generator) ** 2
    return (x * s).T @ x


def problem(rows: int = 24, k: int = 48, bits: int = 3, groups: int = 2, density: float = 0.02, seed: int = 0) -> tuple[RowStack, torch.Tensor, torch.Tensor]:
    """A stack of rows in ``groups`` Hessian segments, with a k-means start (fp16 LUT, nearest indices)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, k, generator=gen) * 0.05
    hessians = torch.stack([correlated_hessian(k, 4 * k, gen) for _ in range(groups)])
    bounds = [round(g * rows / groups) for g in range(groups + 1)]
    segments = list(zip(bounds[:-1], bounds[1:]))
    exact = torch.rand(rows, k, generator=gen) < density if density else None
    stack = RowStack(weight=weight, exact=exact, hessians=hessians, segments=segments)
    fisher = torch.diagonal(hessians, dim1=1, dim2=2)[stack.group_index()]
    lut = weighted_kmeans(weight, fisher, bits, exclude=exact, n_init=0).centroids.half().float()
    return stack, lut, assign_indices(weight, lut)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("density", [0.0, 0.03])
def test_objective_never_increases_over_iterations(bits: int, density: float) -> None:
    stack, lut, indices = problem(bits=bits, density=density, seed=bits)
    start = objective(stack, lut, indices)
    new_lut, new_indices, history = refine(stack, lut, indices, iterations=3)
    for before, after in zip(history, history[1:]):
        assert after <= before * (1 + OBJECTIVE_RTOL), history
    assert history[-1] < 0.95 * history[0]  # the refinement does real work on correlated inputs
    final = objective(stack, new_lut, new_indices)
    assert bool((final <= start * (1 + OBJECTIVE_RTOL) + 1e-12).all())  # per row, not only in total
    assert bool((new_lut[:, 1:] >= new_lut[:, :-1]).all())  # ascending
    assert torch.equal(new_lut, new_lut.half().float())  # fp16 values


def test_lut_solve_is_optimal_against_random_perturbations() -> None:
    stack, lut, indices = problem(seed=3)
    solved = solve_luts(stack, lut, indices)
    best = objective(stack, solved, indices)
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-4, 1e-3, 1e-2):
        for _ in range(20):
            perturbed = solved + scale * torch.randn(solved.shape, generator=gen)
            assert bool((objective(stack, perturbed, indices) >= best * (1 - 1e-7) - 1e-12).all())


def test_refit_keeps_rows_it_would_not_improve() -> None:
    stack, lut, indices = problem(seed=4)
    solved = solve_luts(stack, lut, indices).half().float()
    solved, renumbered = sort_lut(solved, indices)
    refit, refit_indices, _ = refit_luts(stack, solved, renumbered)
    assert torch.equal(refit, solved) and torch.equal(refit_indices, renumbered)  # already optimal (fp16)


def test_coordinate_descent_result_is_coordinate_wise_optimal() -> None:
    stack, lut, indices = problem(rows=6, k=40, seed=5)
    result = coordinate_descent(stack, lut, indices)
    for _ in range(3):  # a sweep from the result changes nothing only at a fixed point; check by brute force
        result = coordinate_descent(stack, lut, result)
    base = objective(stack, lut, result)
    free = ~stack.exact
    for row in range(stack.weight.shape[0]):
        for col in range(0, stack.weight.shape[1], 7):
            if not free[row, col]:
                continue
            for level in range(lut.shape[1]):
                trial = result.clone()
                trial[row, col] = level
                assert float(objective(stack, lut, trial)[row]) >= float(base[row]) * (1 - 1e-6) - 1e-12


def test_exact_positions_carry_no_error_and_keep_the_nearest_index() -> None:
    stack, lut, indices = problem(density=0.1, seed=6)
    new_lut, new_indices, _ = refine(stack, lut, indices, iterations=2)
    nearest = assign_indices(stack.weight, new_lut)
    assert torch.equal(new_indices[stack.exact], nearest[stack.exact])
    dense_stack = RowStack(weight=stack.weight, exact=None, hessians=stack.hessians, segments=stack.segments)
    assert float(objective(stack, new_lut, new_indices).sum()) < float(objective(dense_stack, new_lut, new_indices).sum())


def test_exactness_gain_is_the_objective_difference() -> None:
    stack, lut, indices = problem(rows=8, k=32, density=0.05, seed=7)
    gains = exactness_gain(stack, lut, indices)
    base = objective(stack, lut, indices)
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        row, col = int(torch.randint(0, 8, (1,), generator=gen)), int(torch.randint(0, 32, (1,), generator=gen))
        flipped = stack.exact.clone()
        flipped[row, col] = ~flipped[row, col]
        other = objective(RowStack(stack.weight, flipped, stack.hessians, stack.segments), lut, indices)
        free_minus_exact = (base - other)[row] if not stack.exact[row, col] else (other - base)[row]
        # f itself is an fp32 sum: the difference of two of them is exact to ~1e-6 of f, not of the gain
        torch.testing.assert_close(gains[row, col].double(), free_minus_exact, atol=1e-5 * float(base[row]), rtol=1e-4)


def test_identity_hessian_reduces_to_plain_nearest_rounding() -> None:
    """With H = I the objective is the squared error: CD from any start gives nearest-level indices."""
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(5, 33, generator=gen)
    lut = torch.sort(torch.randn(5, 8, generator=gen), dim=1).values.half().float()
    stack = RowStack(weight=weight, exact=None, hessians=torch.eye(33)[None], segments=[(0, 5)])
    start = torch.randint(0, 8, (5, 33), generator=gen)
    assert torch.equal(coordinate_descent(stack, lut, start), assign_indices(weight, lut))


def test_damped_objective_adds_the_diagonal_weighted_error() -> None:
    """f with H + a diag(H) is f plus a * sum_j H_jj e_j^2 (a shrinkage toward the diagonal objective)."""
    stack, lut, indices = problem(density=0.05, seed=9)
    original = stack.hessians.clone()
    damped = RowStack(stack.weight, stack.exact, damp_hessians(stack.hessians, 0.1), stack.segments)
    assert torch.equal(stack.hessians, original)  # the input is not modified
    assert damp_hessians(stack.hessians, 0.0) is stack.hessians
    e = stack.weight - torch.gather(lut, 1, indices)
    e = e.masked_fill(stack.exact, 0.0).double()
    diagonal = torch.diagonal(original, dim1=1, dim2=2)[stack.group_index()].double()
    expected = objective(stack, lut, indices) + 0.1 * (diagonal * e * e).sum(dim=1)
    torch.testing.assert_close(objective(damped, lut, indices), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("density", [0.0, 0.05])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bits", [3, 4])
def test_native_column_loops_give_the_torch_loops_bits(density: float, groups: int, bits: int) -> None:
    """The C++ sweeps (lnq_ext.cpp, built by the setup step) compute what the torch loops do, bit for bit,
    over several lazy blocks, a ragged last block and exact positions."""
    from sqz_export.kernels.build import lnq_extension

    lnq_extension()  # fails here, not silently in the quantizer, when the setup did not build it
    stack, lut, indices = problem(rows=37, k=150, bits=bits, groups=groups, density=density, seed=11)
    indices = (indices + torch.randint(0, 2, indices.shape, generator=torch.Generator().manual_seed(1))).clamp(max=2**bits - 1)
    assert torch.equal(coordinate_descent(stack, lut, indices, native=True), coordinate_descent(stack, lut, indices, native=False))
    for feedback in (False, True):
        native = gptq_sweep(stack, lut, exact_takes_feedback=feedback, native=True)
        reference = gptq_sweep(stack, lut, exact_takes_feedback=feedback, native=False)
        assert torch.equal(native[0], reference[0]) and torch.equal(native[1], reference[1])


@pytest.mark.parametrize("density", [0.0, 0.05])
def test_native_refit_solves_the_same_systems(density: float) -> None:
    """The C++ normal equations sum H's rows per level (not a dense product with the one-hot): the
    solved LUTs equal the torch ones to the systems' rounding, and their error against fp64 is smaller."""
    stack, lut, indices = problem(rows=40, k=200, bits=3, groups=2, density=density, seed=12)
    native = solve_luts(stack, lut, indices, native=True)
    reference = solve_luts(stack, lut, indices, native=False)
    exact64 = RowStack(stack.weight.double(), stack.exact, stack.hessians.double(), stack.segments)
    truth = solve_luts(exact64, lut.double(), indices, native=False)  # the torch path in fp64
    torch.testing.assert_close(native, reference, rtol=1e-3, atol=1e-5)  # LUT values are about 0.05
    assert float((native.double() - truth).abs().max()) <= float((reference.double() - truth).abs().max()) * 1.01 + 1e-9
