"""Gradient-guided refinement of per-row LUTs and indices (GuidedQuant's LNQ) in SqueezeLLM's format.

The format is fixed: one ascending fp16 LUT of ``C = 2**bits`` entries per output row, an index per
weight, exact (sparse) positions. SqueezeLLM fits each row's LUT by k-means weighted by the diagonal
Fisher, which ignores how errors of different inputs of a row interact. GuidedQuant (Kim et al., ICML
2025, arXiv 2505.07004) minimizes the full quadratic model of the loss instead,

    f_n(q) = (w_n - q_n)^T H_g (w_n - q_n),   H_g = X^T diag(s_g) X   (calibration.py)

for row n of row group g, by alternating two exact block-coordinate steps, each of which can only
lower f (so the objective is monotone; a step that would raise a row's f is discarded for that row):

* LUT refit: for fixed indices, f is a quadratic in the row's C LUT entries with the closed-form
  minimizer ``c = (P^T H P)^-1 P^T H w`` (P the [K, C] one-hot of the indices). It is rounded to fp16
  and sorted (indices renumbered), which keeps the packed LUT ascending.
* Index update: first a GPTQ sweep (``gptq_sweep``: error feedback through H^-1 with the row's LUT as
  the grid), then coordinate descent over the columns. With e = w - q and r = H e, moving entry j from
  its level to level c changes e_j by d = (w_j - c) - e_j and f by ``d (2 r_j + H_jj d)``; each row
  takes the best level (d = 0, no change, is a candidate, hence monotone), then r is updated. Columns
  are processed in blocks: inside a block only the block's part of r is updated per column, the rest
  with one matrix product per block (GPTQ's lazy batch update), so the sweep runs at GEMM speed.

Exact positions carry no error in either step: their e is 0, they take no part in a LUT's fit, and
their index is the nearest level (which keeps the stored fp16 residual small).

``exactness_gain`` is the decrease of f that making one entry exact buys, the score by which
``pipeline`` chooses the sparse positions of the whole model (SpQR's idea, applied to this objective).

On CPUs the column loops of both sweeps and the refit's normal equations run in C++ (lnq_ext.cpp,
built by the setup step): the sweeps give the torch loops' bits, the normal equations the same systems
summed more accurately; other devices run the torch code.

All functions take a *stack* of rows of several matrices with equal in_features: ``segments[p]`` is the
[start, end) range of rows that share ``hessians[p]`` (one layer's row group), so one Python loop over
columns serves many layers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CD_BLOCK = 64
"""Columns per lazy block of the coordinate-descent sweep (inner updates touch [rows, CD_BLOCK])."""
REFIT_CHUNK = 1 << 23
"""Most one-hot floats (rows * K * C) built at once by the LUT refit (32 MB)."""
RIDGE = 1e-7
"""Relative ridge of the refit's C x C systems: keeps a cluster whose inputs never fire solvable."""


@dataclasses.dataclass
class RowStack:
    """Rows of one or more matrices with equal in_features, and the Hessian each row's objective uses."""

    weight: torch.Tensor  # fp32 [R, K]
    exact: torch.Tensor | None  # bool [R, K], positions kept exact (None = dense)
    hessians: torch.Tensor  # fp32 [P, K, K]
    segments: list[tuple[int, int]]  # P row ranges, contiguous and covering [0, R)

    def __post_init__(self) -> None:
        """Dense row-major tensors, as the C++ loops read them (a no-op for the usual torch.cat results)."""
        self.weight = self.weight.contiguous()
        self.exact = self.exact.contiguous() if self.exact is not None else None
        self.hessians = self.hessians.contiguous()

    def group_index(self) -> torch.Tensor:
        """int64 [R]: the Hessian of every row."""
        index = torch.empty(self.weight.shape[0], dtype=torch.int64, device=self.weight.device)
        for p, (start, end) in enumerate(self.segments):
            index[start:end] = p
        return index


def errors(stack: RowStack, lut: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """e = w - LUT[idx], zero at exact positions; fp32 [R, K]."""
    e = stack.weight - torch.gather(lut, 1, indices)
    return e.masked_fill(stack.exact, 0.0) if stack.exact is not None else e


def _times_hessian(stack: RowStack, e: torch.Tensor) -> torch.Tensor:
    """r = e H per row (H symmetric), fp32 [R, K]."""
    r = torch.empty_like(e)
    for p, (start, end) in enumerate(stack.segments):
        torch.mm(e[start:end], stack.hessians[p], out=r[start:end])
    return r


def objective(stack: RowStack, lut: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """f_n = e_n^T H e_n of every row, fp64 [R]."""
    e = errors(stack, lut, indices)
    return (_times_hessian(stack, e).double() * e.double()).sum(dim=1)


def sort_lut(lut: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending LUT rows with the indices renumbered to the same values."""
    order = torch.argsort(lut, dim=1, stable=True)
    rank = torch.argsort(order, dim=1)
    return torch.gather(lut, 1, order), torch.gather(rank, 1, indices)


def _normal_equations(stack: RowStack, target: torch.Tensor, indices: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P^T H P [R, C, C], target^T H P [R, C]) in fp64, by dense products with the one-hot P in chunks.

    The torch version of lnq_ext.cpp's ``normal_equations`` (which sums H's rows per level instead).
    """
    rows, k = stack.weight.shape
    gram = torch.empty(rows, levels, levels, dtype=torch.float64, device=target.device)
    rhs = torch.empty(rows, levels, dtype=torch.float64, device=target.device)
    values = torch.arange(levels, device=target.device)
    step = max(1, REFIT_CHUNK // (k * levels))
    for p, (start, end) in enumerate(stack.segments):
        for lo in range(start, end, step):
            hi = min(end, lo + step)
            n = hi - lo
            onehot = (indices[lo:hi, :, None] == values).to(stack.hessians.dtype)  # P  [n, K, C]
            if stack.exact is not None:
                onehot.masked_fill_(stack.exact[lo:hi, :, None], 0.0)
            h_onehot = torch.mm(stack.hessians[p], onehot.permute(1, 0, 2).reshape(k, n * levels)).reshape(k, n, levels).permute(1, 0, 2)
            gram[lo:hi] = torch.bmm(onehot.transpose(1, 2), h_onehot)
            rhs[lo:hi] = torch.bmm(target[lo:hi, None, :], h_onehot).squeeze(1)
    return gram, rhs


def solve_luts(stack: RowStack, lut: torch.Tensor, indices: torch.Tensor, native: bool = True) -> torch.Tensor:
    """The minimizer over each row's LUT of f for fixed indices, ``(P^T H P)^-1 P^T H w``; fp32 [R, C].

    A level that no free entry uses keeps its current value (its column of P is zero). The C x C
    systems are solved in fp64 with a tiny relative ridge, so inputs that never fire (zero rows of H)
    do not make them singular. ``native``: the C++ normal equations on CPU (same systems, summed in
    another order), as in :func:`coordinate_descent`.
    """
    c = lut.shape[1]
    target = stack.weight if stack.exact is None else stack.weight.masked_fill(stack.exact, 0.0)
    loops = _native_loops(stack, native)
    if loops is not None:
        gram, rhs = loops.normal_equations(target, indices.contiguous(), stack.exact, stack.hessians, stack.group_index(), c)
    else:
        gram, rhs = _normal_equations(stack, target, indices, c)
    free = torch.ones_like(indices) if stack.exact is None else (~stack.exact).long()
    uses = torch.zeros(indices.shape[0], c, dtype=torch.int64, device=indices.device).scatter_add_(1, indices, free)
    empty = uses == 0  # [R, C]: levels no free entry uses
    diag = torch.diagonal(gram, dim1=1, dim2=2)
    scale = diag.clamp(min=0).mean(dim=1, keepdim=True).clamp(min=1e-30)
    diag += RIDGE * scale + empty * scale
    rhs = torch.where(empty, lut.double() * scale, rhs)
    return torch.linalg.solve(gram, rhs).float()


def refit_luts(
    stack: RowStack, lut: torch.Tensor, indices: torch.Tensor, current: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``solve_luts`` rounded to fp16 and sorted (indices renumbered); rows it would worsen keep theirs.

    Args:
        stack: rows, exact positions and Hessians.
        lut: fp32 [R, C], the current (fp16-representable) LUTs.
        indices: int64 [R, K].
        current: the rows' objective for (lut, indices) when the caller has it (saves a product).

    Returns:
        (lut, indices, objective): fp32 [R, C] of fp16 values, ascending, the renumbered indices, and
        the per-row objective of the result.
    """
    if current is None:
        current = objective(stack, lut, indices)
    new = solve_luts(stack, lut, indices).nan_to_num(nan=0.0).clamp(-65504.0, 65504.0).half().float()
    new, renumbered = sort_lut(new, indices)
    after = objective(stack, new, renumbered)
    better = after <= current
    return torch.where(better[:, None], new, lut), torch.where(better[:, None], renumbered, indices), torch.minimum(after, current)


@functools.cache
def load_native_loops() -> ModuleType | None:
    """The compiled column loops, loaded once (a warning and None when they cannot be built)."""
    try:
        from sqz_export.kernels.build import lnq_extension

        return lnq_extension()
    except (OSError, RuntimeError) as exc:
        logger.warning(
            "the LNQ column loops (C++) could not be built or loaded, so the torch loops run instead: the same "
            "results, several times slower. scripts/setup.sh builds them (python -m sqz_export.kernels.build). %s",
            exc,
        )
        return None


def _native_loops(stack: RowStack, native: bool) -> ModuleType | None:
    """The C++ column loops (sqz_export/quantize/lnq_ext.cpp) for a CPU stack, else None (torch loops).

    They give the torch loops' bits (same fp32 operations per element, no FMA contraction): on CPUs
    the torch loops cost about a dozen small ops per column, which made them the largest part of an
    lnq run's time. Other devices run the torch loops, whose ops are large there.
    """
    return load_native_loops() if native and stack.weight.device.type == "cpu" else None


def _coordinate_descent_block(
    weight: torch.Tensor, lut: torch.Tensor, e: torch.Tensor, r_block: torch.Tensor, indices: torch.Tensor,
    exact: torch.Tensor | None, hessians: torch.Tensor, group: torch.Tensor, b0: int, b1: int,
) -> None:
    """Coordinate descent over columns [b0, b1): updates e, indices and r_block (r's block part) in place.

    The torch version of lnq_ext.cpp's ``coordinate_descent_block`` (same arguments, same bits).
    """
    h_rows = hessians[:, b0:b1, b0:b1]  # [P, B, B]
    for j in range(b0, b1):
        jj = j - b0
        d = (weight[:, j, None] - lut) - e[:, j, None]  # [R, C], change of e_j per level
        gain = d * (2.0 * r_block[:, jj, None] + hessians[group, j, j][:, None] * d)
        best = gain.argmin(dim=1)
        delta = torch.gather(d, 1, best[:, None]).squeeze(1)
        if exact is not None:
            keep = ~exact[:, j]
            delta = delta * keep
            best = torch.where(keep, best, indices[:, j])
        indices[:, j] = best
        e[:, j] += delta
        r_block[:, jj:] += delta[:, None] * h_rows[group, jj, jj:]


def coordinate_descent(stack: RowStack, lut: torch.Tensor, indices: torch.Tensor, block: int = CD_BLOCK, native: bool = True) -> torch.Tensor:
    """One sweep over the columns: each free entry takes the level that lowers its row's f most.

    Args:
        stack: rows, exact positions and Hessians.
        lut: fp32 [R, C], fixed during the sweep.
        indices: int64 [R, K], the starting indices (not modified).
        block: columns per lazy block.
        native: use the C++ loops on CPU when they load (False: the torch loops, for tests).

    Returns:
        int64 [R, K], indices whose objective is at most the starting one in every row.
    """
    k = stack.weight.shape[1]
    indices = indices.clone()
    e = errors(stack, lut, indices)
    r = _times_hessian(stack, e)
    group = stack.group_index()
    loops = _native_loops(stack, native)
    sweep = loops.coordinate_descent_block if loops is not None else _coordinate_descent_block
    lut = lut.contiguous()
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        e_before = e[:, b0:b1].clone()
        r_block = r[:, b0:b1].clone()  # kept current inside the block
        sweep(stack.weight, lut, e, r_block, indices, stack.exact, stack.hessians, group, b0, b1)
        if b1 < k:
            change = e[:, b0:b1] - e_before
            for p, (start, end) in enumerate(stack.segments):
                r[start:end, b1:].addmm_(change[start:end], stack.hessians[p, b0:b1, b1:])
    return indices


def nearest_at_exact(stack: RowStack, lut: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Indices with every exact position pointing at its nearest level (smallest stored residual)."""
    if stack.exact is None:
        return indices
    from sqz_export.quantize.kmeans import assign_indices

    return torch.where(stack.exact, assign_indices(stack.weight, lut), indices)


def damp_hessians(hessians: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * diag(H)`` for every Hessian [P, K, K]: shrinks the off-diagonal part toward 0.

    H_g is estimated from a few thousand tokens whose weights s_g are heavy-tailed, so its
    off-diagonal part is noisy, and minimizing the raw objective harder fits that noise (on SmolLM2,
    5 rounds at 3 bits gave a lower objective but worse perplexity than 2). Raising the diagonal (the
    well-estimated, Fisher-like part) by a fraction of itself is a shrinkage toward SqueezeLLM's
    diagonal objective; ``damp = 0`` is the raw objective. The input is not modified.
    """
    if damp <= 0:
        return hessians
    out = hessians.clone()
    torch.diagonal(out, dim1=1, dim2=2).mul_(1.0 + damp)
    return out


def refine(stack: RowStack, lut: torch.Tensor, indices: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """A GPTQ sweep, then ``iterations`` rounds of (LUT refit, coordinate descent), from a start.

    The GPTQ sweep (error feedback through each row's own Hessian, for the start's LUTs) moves all of a
    row's indices at once, which coordinate descent, one entry at a time, cannot: on SmolLM2 block 3
    it alone reached 0.43x the k-means start's objective, two refine rounds without it 0.44x, and both
    together 0.37x. A row keeps its start where the sweep does not lower its objective, so every step
    stays monotone.

    Returns:
        (lut fp32 [R, C] of ascending fp16 values, indices int64 [R, K], total objective before the
        sweep and after each step), the history being non-increasing.
    """
    current = objective(stack, lut, indices)
    history = [float(current.sum())]
    swept, _ = gptq_sweep(stack, lut)
    after = objective(stack, lut, swept)
    indices = torch.where((after < current)[:, None], swept, indices)
    current = torch.minimum(after, current)
    history.append(float(current.sum()))
    for _ in range(iterations):
        lut, indices, current = refit_luts(stack, lut, indices, current)
        history.append(float(current.sum()))
        indices = coordinate_descent(stack, lut, indices)
        current = objective(stack, lut, indices)
        history.append(float(current.sum()))
    return lut, nearest_at_exact(stack, lut, indices), history


def exactness_gain(stack: RowStack, lut: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Decrease of its row's f that making each entry exact buys, others fixed; fp32 [R, K].

    With d = w_j - LUT[idx_j] and r = H e (e zero at exact entries): a free entry's error d goes to 0,
    which lowers f by ``2 d r_j - H_jj d^2``; an entry already exact would add ``2 d r_j + H_jj d^2``
    if freed. Both are the same quantity, f(free) - f(exact), so entries of all layers rank together.
    """
    e = errors(stack, lut, indices)
    r = _times_hessian(stack, e)
    diag = torch.diagonal(stack.hessians, dim1=1, dim2=2)[stack.group_index()]
    d = stack.weight - torch.gather(lut, 1, indices)
    sign = -1.0 if stack.exact is None else torch.where(stack.exact, 1.0, -1.0)
    return 2.0 * d * r + sign * diag * d * d


def _gptq_block(
    weight: torch.Tensor, lut: torch.Tensor, w: torch.Tensor, indices: torch.Tensor, exact: torch.Tensor | None,
    chol: torch.Tensor, group: torch.Tensor, b0: int, b1: int, exact_takes_feedback: bool,
) -> torch.Tensor:
    """GPTQ's sweep over columns [b0, b1) of the fed-back weights ``w`` (updated in place; the block ends
    as the reconstruction), writing the block's indices; returns its scaled errors [R, b1 - b0].

    The torch version of lnq_ext.cpp's ``gptq_block`` (same arguments, same bits).
    """
    w_block = w[:, b0:b1].clone()
    err_block = torch.zeros_like(w_block)
    c_block = chol[:, b0:b1, b0:b1]
    for jj in range(b1 - b0):
        j = b0 + jj
        column = w_block[:, jj].clone()
        index = (column[:, None] - lut).abs().argmin(dim=1)
        quantized = torch.gather(lut, 1, index[:, None]).squeeze(1)
        if exact is not None:
            quantized = torch.where(exact[:, j], column if exact_takes_feedback else weight[:, j], quantized)
        indices[:, j] = index
        err = (column - quantized) / chol[group, j, j]
        w_block[:, jj:] -= err[:, None] * c_block[group, jj, jj:]
        w_block[:, jj] = quantized
        err_block[:, jj] = err
    w[:, b0:b1] = w_block
    return err_block


def gptq_sweep(
    stack: RowStack, lut: torch.Tensor, damp: float = 0.01, block: int = CD_BLOCK, exact_takes_feedback: bool = False, native: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices for fixed LUTs by GPTQ's error feedback on each row's own Hessian.

    Columns left to right: each free entry takes the level nearest to its current (fed-back) value;
    an exact entry keeps its original weight (LNQ: exact entries carry no error), or, with
    ``exact_takes_feedback``, its fed-back value (GPTQ/SpQR: it absorbs the updates, stored exactly).
    The error, scaled by the Cholesky factor of ``H^-1`` (damped by ``damp`` times the mean diagonal),
    is subtracted from the columns not yet visited, lazily per block of columns. The same factor serves
    every row of a segment, as in GPTQ. ``native``: as in :func:`coordinate_descent`.

    Returns:
        (indices int64 [R, K], values fp32 [R, K]): the reconstruction, LUT[idx] at free entries and
        what the exact entries must reproduce.
    """
    rows, k = stack.weight.shape
    factors = []
    for p in range(len(stack.segments)):
        h = stack.hessians[p].double().clone()
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1.0  # an input that never fires: its column gets no feedback and no influence
        torch.diagonal(h).add_(damp * float(torch.diagonal(h).mean()))
        factors.append(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float())
    chol = torch.stack(factors)  # [P, K, K]
    group = stack.group_index()
    w = stack.weight.clone()
    indices = torch.empty(rows, k, dtype=torch.int64, device=w.device)
    loops = _native_loops(stack, native)
    sweep = loops.gptq_block if loops is not None else _gptq_block
    lut = lut.contiguous()
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        err_block = sweep(stack.weight, lut, w, indices, stack.exact, chol, group, b0, b1, exact_takes_feedback)
        for p, (start, end) in enumerate(stack.segments):
            w[start:end, b1:] -= err_block[start:end] @ chol[p, b0:b1, b1:]
    return indices, w
