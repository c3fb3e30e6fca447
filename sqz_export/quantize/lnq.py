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

All functions take a *stack* of rows of several matrices with equal in_features: ``segments[p]`` is the
[start, end) range of rows that share ``hessians[p]`` (one layer's row group), so one Python loop over
columns serves many layers.
"""

from __future__ import annotations

import dataclasses

import torch

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


def solve_luts(stack: RowStack, lut: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The minimizer over each row's LUT of f for fixed indices, ``(P^T H P)^-1 P^T H w``; fp32 [R, C].

    A level that no free entry uses keeps its current value (its column of P is zero). The C x C
    systems are solved in fp64 with a tiny relative ridge, so inputs that never fire (zero rows of H)
    do not make them singular.
    """
    rows, k = stack.weight.shape
    c = lut.shape[1]
    target = stack.weight if stack.exact is None else stack.weight.masked_fill(stack.exact, 0.0)
    solved = torch.empty_like(lut)
    levels = torch.arange(c, device=lut.device)
    for p, (start, end) in enumerate(stack.segments):
        hessian = stack.hessians[p]
        step = max(1, REFIT_CHUNK // (k * c))
        for lo in range(start, end, step):
            hi = min(end, lo + step)
            n = hi - lo
            onehot = (indices[lo:hi, :, None] == levels).to(torch.float32)  # P  [n, K, C]
            if stack.exact is not None:
                onehot.masked_fill_(stack.exact[lo:hi, :, None], 0.0)
            h_onehot = torch.mm(hessian, onehot.permute(1, 0, 2).reshape(k, n * c)).reshape(k, n, c).permute(1, 0, 2)  # H P
            gram = torch.bmm(onehot.transpose(1, 2), h_onehot).double()  # P^T H P  [n, C, C]
            rhs = torch.bmm(target[lo:hi, None, :], h_onehot).squeeze(1).double()  # w^T H P  [n, C]
            diag = torch.diagonal(gram, dim1=1, dim2=2)
            empty = onehot.sum(dim=1) == 0  # [n, C]
            scale = diag.clamp(min=0).mean(dim=1, keepdim=True).clamp(min=1e-30)
            diag += RIDGE * scale + empty * scale
            rhs = torch.where(empty, lut[lo:hi].double() * scale, rhs)
            solved[lo:hi] = torch.linalg.solve(gram, rhs).float()
    return solved


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


def coordinate_descent(stack: RowStack, lut: torch.Tensor, indices: torch.Tensor, block: int = CD_BLOCK) -> torch.Tensor:
    """One sweep over the columns: each free entry takes the level that lowers its row's f most.

    Args:
        stack: rows, exact positions and Hessians.
        lut: fp32 [R, C], fixed during the sweep.
        indices: int64 [R, K], the starting indices (not modified).

    Returns:
        int64 [R, K], indices whose objective is at most the starting one in every row.
    """
    rows, k = stack.weight.shape
    indices = indices.clone()
    e = errors(stack, lut, indices)
    r = _times_hessian(stack, e)
    group = stack.group_index()
    diag = torch.diagonal(stack.hessians, dim1=1, dim2=2)[group]  # [R, K]
    free = None if stack.exact is None else ~stack.exact
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        e_before = e[:, b0:b1].clone()
        r_block = r[:, b0:b1].clone()  # kept current inside the block
        h_rows = stack.hessians[:, b0:b1, b0:b1]  # [P, B, B]
        for j in range(b0, b1):
            jj = j - b0
            d = (stack.weight[:, j, None] - lut) - e[:, j, None]  # [R, C], change of e_j per level
            gain = d * (2.0 * r_block[:, jj, None] + diag[:, j, None] * d)
            best = gain.argmin(dim=1)
            delta = torch.gather(d, 1, best[:, None]).squeeze(1)
            if free is not None:
                keep = free[:, j]
                delta = delta * keep
                best = torch.where(keep, best, indices[:, j])
            indices[:, j] = best
            e[:, j] += delta
            r_block[:, jj:] += delta[:, None] * h_rows[group, jj, jj:]
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


def gptq_sweep(
    stack: RowStack, lut: torch.Tensor, damp: float = 0.01, block: int = CD_BLOCK, exact_takes_feedback: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices for fixed LUTs by GPTQ's error feedback on each row's own Hessian.

    Columns left to right: each free entry takes the level nearest to its current (fed-back) value;
    an exact entry keeps its original weight (LNQ: exact entries carry no error), or, with
    ``exact_takes_feedback``, its fed-back value (GPTQ/SpQR: it absorbs the updates, stored exactly).
    The error, scaled by the Cholesky factor of ``H^-1`` (damped by ``damp`` times the mean diagonal),
    is subtracted from the columns not yet visited, lazily per block of columns. The same factor serves
    every row of a segment, as in GPTQ.

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
    diag = torch.diagonal(chol, dim1=1, dim2=2)[group]  # [R, K]
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        w_block = w[:, b0:b1].clone()
        err_block = torch.zeros_like(w_block)
        c_block = chol[:, b0:b1, b0:b1]
        for jj in range(b1 - b0):
            j = b0 + jj
            column = w_block[:, jj].clone()
            index = (column[:, None] - lut).abs().argmin(dim=1)
            quantized = torch.gather(lut, 1, index[:, None]).squeeze(1)
            if stack.exact is not None:
                quantized = torch.where(stack.exact[:, j], column if exact_takes_feedback else stack.weight[:, j], quantized)
            indices[:, j] = index
            err = (column - quantized) / diag[:, j]
            w_block[:, jj:] -= err[:, None] * c_block[group, jj, jj:]
            w_block[:, jj] = quantized
            err_block[:, jj] = err
        w[:, b0:b1] = w_block
        for p, (start, end) in enumerate(stack.segments):
            w[start:end, b1:] -= err_block[start:end] @ chol[p, b0:b1, b1:]
    return indices, w
