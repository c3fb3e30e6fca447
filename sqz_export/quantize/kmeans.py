"""Fisher-weighted 1-D k-means per output row, vectorized over all rows of a matrix.

SqueezeLLM gives every output row of a weight matrix its own codebook of ``2**bits`` values, chosen by
k-means on that row's weights with the Fisher information as sample weights. The seed ran
scikit-learn's ``KMeans`` once per row (tens of thousands of Python-level calls). Here all rows of a
matrix are clustered at once with a sorted-value formulation of exact Lloyd's algorithm:

* In 1-D the clusters of ascending centroids are contiguous runs of the sorted values, split at the
  midpoints between neighbouring centroids. So each row is sorted once (O(K log K)); an assignment
  step is a binary search of the ``C - 1`` midpoints in the sorted row (O(C log K)).
* The weighted sums of a run come from prefix sums of ``w``, ``w x`` and ``w x^2``, so an update step
  costs O(C) per row instead of O(K). Prefix sums are fp64: a run's cost ``sum w x^2 - (sum w x)^2 /
  sum w`` cancels badly in fp32.
* A row whose run boundaries did not move is at a fixed point and leaves the active set, so the work is
  proportional to each row's own iteration count, not the slowest row's.

Lloyd only finds a local optimum. Two things make the result better than scikit-learn's (whose
k-means++ start the seed used with ``n_init="auto"``, i.e. one start, ``max_iter=50``):

* merge-and-split moves (:meth:`_SortedRows.jump`): merge the cheapest adjacent pair of clusters and
  split the run that gains most, when that lowers the objective, then Lloyd again; this pulls
  centroids out of crowded regions into sparse, heavily weighted tails, which Lloyd never does;
* optionally more starts (weighted quantiles plus ``n_init`` seeded random quantile levels), keeping
  the best per row.

Rows with at most ``2**bits`` distinct (positive-weight) values get each distinct value as its own
centroid, so their objective is exactly zero.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from sqz_export.defaults import DEFAULT_N_INIT

logger = logging.getLogger(__name__)

DEFAULT_MAX_ITER = 300
"""Lloyd iterations cap per run; rows leave the iteration as soon as their boundaries stop moving."""
_WINDOW = 4
"""Half-width of the window in which a Lloyd step first looks for a moved split (see ``bounds``)."""


@dataclasses.dataclass
class KMeansResult:
    """Per-row codebooks and assignments of one matrix."""

    centroids: torch.Tensor  # fp32 [N, C], ascending in every row
    indices: torch.Tensor  # int64 [N, K], nearest centroid of every value (excluded ones too)
    objective: torch.Tensor  # fp64 [N], sum of w * (x - c[idx])**2 over non-excluded values, sanitized w
    iterations: int  # Lloyd iterations of the slowest row and start
    sanitized: int  # sample weights that were negative, NaN or infinite and were replaced by 0


def sanitize_sample_weight(sample_weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Makes sample weights usable: NaN, +-inf and negatives -> 0; returns (fp32 weights, how many changed).

    Fisher values are sums of squares, so negative or non-finite ones can only come from a corrupt cache
    or an overflow; they carry no usable sensitivity, and zero (ignore the sample) is the safe reading.
    """
    w = sample_weight.to(torch.float32)
    bad = ~torch.isfinite(w) | (w < 0)
    count = int(bad.sum())
    if count:
        w = w.masked_fill(bad, 0.0)
    return w, count


def prepare_row_weights(
    sample_weight: torch.Tensor | None, shape: torch.Size, exclude: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Sanitized, row-normalized fp32 weights [N, K], zero where excluded; returns (weights, sanitized count).

    A row whose non-excluded weights are all zero falls back to uniform weights over its non-excluded
    values (as the seed does), so it is still clustered, by plain k-means. Normalizing each row to sum
    1 keeps tiny Fisher values (1e-12 and below) far from underflow.
    """
    if sample_weight is None:
        w, count = torch.ones(shape, dtype=torch.float32, device=device), 0
    else:
        if sample_weight.shape != shape:
            raise ValueError(f"sample_weight shape {tuple(sample_weight.shape)} differs from values shape {tuple(shape)}")
        w, count = sanitize_sample_weight(sample_weight.to(device))
    keep = torch.ones(shape, dtype=torch.bool, device=device) if exclude is None else ~exclude.to(device)
    keep = keep | ~keep.any(dim=1, keepdim=True)  # a fully excluded row clusters all its values
    w = w * keep
    total = w.sum(dim=1, keepdim=True)
    uniform = keep / keep.sum(dim=1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), uniform), count


def assign_indices(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value: int64 [N, K] from values [N, K], centroids [N, C].

    Centroids must be ascending per row (duplicates allowed). Counting the midpoints below x is exact
    nearest-centroid assignment in 1-D.
    """
    c = centroids.to(torch.float64)
    mids = (c[:, 1:] + c[:, :-1]) * 0.5  # [N, C-1]
    return torch.searchsorted(mids.contiguous(), values.to(torch.float64).contiguous())


def weighted_objective(values: torch.Tensor, sample_weight: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Per-row k-means objective sum of w * (x - nearest centroid)**2 in fp64, [N]."""
    idx = assign_indices(values, centroids)
    err = values.to(torch.float64) - torch.gather(centroids.to(torch.float64), 1, idx)
    return (sample_weight.to(torch.float64) * err * err).sum(dim=1)


def _take(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``flat[index]`` for a 1-D source; index_select is several times faster than advanced indexing on CPU."""
    return flat.index_select(0, index.reshape(-1)).view(index.shape)


class _SortedRows:
    """Sorted values and fp64 prefix sums of a batch of rows: the state every Lloyd step reads.

    Methods take the rows to work on as row ids (``rows`` [A]), so converged rows drop out without
    copying the [N, K] arrays: lookups index the flattened arrays directly.
    """

    def __init__(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        n, self.k = values.shape
        positive = weights > 0
        # Zero-weight values must not split runs: give them the row's largest weighted value so they sort
        # to the end and carry no mass (their final assignment is done afterwards, on the real values).
        row_max = values.masked_fill(~positive, -torch.inf).amax(dim=1, keepdim=True)
        xs, order = torch.sort(torch.where(positive, values, row_max), dim=1)  # fp32 sort: half the bytes
        xs = xs.to(torch.float64)  # [N, K]
        ws = torch.gather(weights, 1, order).to(torch.float64)
        zeros = torch.zeros(n, 1, dtype=torch.float64, device=values.device)
        self.xs = xs.reshape(-1)  # flat [N * K]
        self.p0 = torch.cat([zeros, torch.cumsum(ws, 1)], 1).reshape(-1)  # flat [N * (K+1)]
        wx = ws.mul_(xs)
        self.p1 = torch.cat([zeros, torch.cumsum(wx, 1)], 1).reshape(-1)
        self.p2 = torch.cat([zeros, torch.cumsum(wx.mul_(xs), 1)], 1).reshape(-1)
        self.all_rows = torch.arange(n, device=values.device)
        self._offsets = torch.arange(2 * _WINDOW, device=values.device)

    def _lift(self, flat: torch.Tensor, length: int, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Count of entries below ``v`` [A, M] in the ascending rows ``rows`` of a flat [N * length] array.

        Binary lifting: take a step of 2**s whenever the entry at the step's end is still below v. A step
        past the row reads its last entry; accepting it means every entry is below v, so the final
        clamp is exact.
        """
        base = (rows * length - 1).unsqueeze(1)
        lo = torch.zeros(v.shape, dtype=torch.int64, device=v.device)
        step = 1 << (length.bit_length() - 1)
        while step:
            cand = lo + step
            lo = torch.where(_take(flat, base + torch.clamp(cand, max=length)) < v, cand, lo)
            step >>= 1
        return torch.clamp(lo, max=length)

    def count_less(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Number of sorted values below ``v`` [A, M] in each of ``rows`` [A] (a batched searchsorted)."""
        return self._lift(self.xs, self.k, rows, v)

    def bounds(self, rows: torch.Tensor, centroids: torch.Tensor, near: torch.Tensor | None = None) -> torch.Tensor:
        """Run boundaries [A, C+1] (0, splits..., K) of ascending centroids [A, C].

        ``near`` [A, C+1] are boundaries known to be close (the previous Lloyd step): then each split is
        first looked up in a window of ``2 * _WINDOW`` sorted values around its old position, one
        cache-friendly gather instead of a log2(K)-step binary search; only splits that left their
        window are searched in full.
        """
        mids = (centroids[:, 1:] + centroids[:, :-1]) * 0.5  # a value exactly at a midpoint goes up
        if near is None:
            inner = self.count_less(rows, mids)
        else:
            start = near[:, 1:-1] - _WINDOW  # [A, C-1]
            pos = start.unsqueeze(-1) + self._offsets  # [A, C-1, 2W]
            vals = _take(self.xs, (rows * self.k).view(-1, 1, 1) + pos.clamp(0, self.k - 1))
            # outside the row, positions read as -inf (left) and +inf (right): the count stays exact
            less = ((vals < mids.unsqueeze(-1)) & (pos < self.k)) | (pos < 0)
            hits = less.sum(dim=-1)
            inner = start + hits
            lost = (hits == 0) | (hits == 2 * _WINDOW)  # the split moved past the window: search in full
            if bool(lost.any()):
                which = torch.nonzero(lost)
                inner[lost] = self.count_less(rows[which[:, 0]], mids[lost].unsqueeze(1))[:, 0]
        first = torch.zeros(rows.shape[0], 1, dtype=inner.dtype, device=inner.device)
        return torch.cat([first, inner, first + self.k], 1)

    def run_sums(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, moments: int = 3) -> list[torch.Tensor]:
        """Sums of w, w x (and w x^2) over sorted positions [lo, hi) of ``rows``, each shaped like lo."""
        base = (rows * (self.k + 1)).unsqueeze(1)
        lo, hi = base + lo, base + hi
        return [_take(p, hi) - _take(p, lo) for p in (self.p0, self.p1, self.p2)[:moments]]

    @staticmethod
    def run_costs(s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """Weighted squared error of each run around its own mean (>= 0 up to rounding)."""
        safe = torch.where(s0 > 0, s0, torch.ones_like(s0))
        return torch.clamp(s2 - s1 * s1 / safe, min=0.0) * (s0 > 0)

    def total_cost(self, centroids: torch.Tensor) -> torch.Tensor:
        """k-means objective [N] of ascending centroids [N, C] (normalized weights)."""
        b = self.bounds(self.all_rows, centroids)
        return self.run_costs(*self.run_sums(self.all_rows, b[:, :-1], b[:, 1:])).sum(dim=1)

    def distinct_centroids(self, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(centroids [N, C], mask [N]): every distinct value as a centroid, valid for rows with <= C of them."""
        xs = self.xs.view(-1, self.k)
        new_value = torch.ones_like(xs, dtype=torch.bool)
        new_value[:, 1:] = xs[:, 1:] != xs[:, :-1]
        rank = torch.cumsum(new_value, 1) - 1  # rank of each sorted value among the distinct ones
        few = rank[:, -1] < num_clusters
        cent = torch.full((xs.shape[0], num_clusters), -torch.inf, dtype=torch.float64, device=xs.device)
        cent.scatter_reduce_(1, torch.clamp(rank, max=num_clusters - 1), xs, reduce="amax")
        return torch.cummax(cent, dim=1).values, few  # unused slots repeat the largest value

    def quantile_init(self, num_clusters: int, generator: torch.Generator | None = None, window: tuple[int, int] | None = None) -> torch.Tensor:
        """Centroids [N, C] at weighted quantiles of each row: levels (j + 1/2) / C, or seeded random levels
        (``window``: the levels rows [offset, offset + N) of a ``total``-row draw get)."""
        rows = self.all_rows
        n = rows.shape[0]
        if generator is None:
            q = ((torch.arange(num_clusters, dtype=torch.float64) + 0.5) / num_clusters).expand(n, num_clusters)
        else:
            offset, total = window if window is not None else (0, n)
            draw = torch.rand(total, num_clusters, dtype=torch.float64, generator=generator)[offset : offset + n]
            q = torch.sort(draw, dim=1).values
        totals = self.p0.view(n, self.k + 1)[:, -1:]
        # first sorted position whose inclusive prefix weight reaches the level: count of p0[1..K] below it
        inclusive = self.p0.view(n, self.k + 1)[:, 1:].reshape(-1)
        pos = self._lift(inclusive, self.k, rows, q.to(totals.device) * totals)
        return _take(self.xs, (rows * self.k).unsqueeze(1) + torch.clamp(pos, max=self.k - 1))

    def lloyd(self, centroids: torch.Tensor, rows: torch.Tensor, max_iter: int) -> int:
        """Lloyd iterations in place on ``centroids[rows]`` until their boundaries stop moving.

        A row whose boundaries did not change since its previous step is at a fixed point and leaves the
        active set. Empty clusters keep their centroid; :meth:`jump` moves them where they help.
        Returns the number of iterations of the slowest row.
        """
        prev = None
        iterations = 0
        for iterations in range(1, max_iter + 1):
            b = self.bounds(rows, centroids[rows], prev)
            if prev is not None:
                moving = (b != prev).any(dim=1)
                rows, b = rows[moving], b[moving]
                if rows.numel() == 0:
                    break
            s0, s1 = self.run_sums(rows, b[:, :-1], b[:, 1:], moments=2)
            nonempty = s0 > 0
            if bool(nonempty.all()):
                centroids[rows] = s1 / s0  # means of consecutive runs are ascending
            else:  # an empty cluster keeps its centroid, which may then be out of order
                c = torch.where(nonempty, s1 / torch.where(nonempty, s0, torch.ones_like(s0)), centroids[rows])
                centroids[rows] = torch.sort(c, dim=1).values
            prev = b
        return iterations

    def jump(self, centroids: torch.Tensor, rows: torch.Tensor, rel_tol: float = 1e-9) -> torch.Tensor:
        """One merge-and-split move per row, in place on ``centroids[rows]``; returns the rows that moved.

        Lloyd stops in local optima where, typically, two centroids share a dense region while a sparse,
        heavily weighted tail is served by one centroid. The move merges the adjacent pair whose merge
        costs least and splits the run that gains most from being cut in two (the cut found by a few
        2-means steps inside the run), when the gain exceeds the loss. Both are exact from the prefix
        sums, O(C^2) per row, and the Lloyd run that follows can only lower the objective further, so
        every accepted move strictly decreases it. An empty cluster merges at zero cost, so this also
        relocates empty clusters.
        """
        c = centroids[rows]
        n, num_clusters = c.shape
        b = self.bounds(rows, c)
        lo, hi = b[:, :-1], b[:, 1:]  # run r is the sorted positions [lo_r, hi_r)
        s0, s1, s2 = self.run_sums(rows, lo, hi)
        cost = self.run_costs(s0, s1, s2)  # [A, C]
        merged = self.run_costs(s0[:, :-1] + s0[:, 1:], s1[:, :-1] + s1[:, 1:], s2[:, :-1] + s2[:, 1:])
        merge_loss = merged - cost[:, :-1] - cost[:, 1:]  # [A, C-1], pair (j, j+1)

        cut = s1 / torch.where(s0 > 0, s0, torch.ones_like(s0))  # 2-means inside each run, from its mean
        first, last = lo + 1, torch.clamp(hi - 1, min=0)
        for _ in range(3):
            split = torch.minimum(torch.maximum(self.count_less(rows, cut), first), last)
            l0, l1 = self.run_sums(rows, lo, split, moments=2)
            r0, r1 = self.run_sums(rows, split, hi, moments=2)
            ok = (l0 > 0) & (r0 > 0)
            cut = torch.where(ok, (l1 / torch.where(ok, l0, 1.0) + r1 / torch.where(ok, r0, 1.0)) * 0.5, cut)
        split = torch.minimum(torch.maximum(self.count_less(rows, cut), first), last)
        left = self.run_sums(rows, lo, split)
        right = self.run_sums(rows, split, hi)
        split_gain = cost - self.run_costs(*left) - self.run_costs(*right)
        valid = ((hi - lo) >= 2) & (left[0] > 0) & (right[0] > 0)
        split_gain = split_gain.masked_fill(~valid, -torch.inf)

        # Best merge for each split run r among pairs (j, j+1) not touching r, i.e. j not in {r-1, r}:
        # two pairs at most are excluded, so the three cheapest pairs always contain the answer.
        k3 = min(3, num_clusters - 1)
        cheap = torch.topk(merge_loss, k3, dim=1, largest=False)  # [A, k3]
        r_idx = torch.arange(num_clusters, device=c.device).view(1, -1, 1)
        touching = (cheap.indices.unsqueeze(1) == r_idx) | (cheap.indices.unsqueeze(1) == r_idx - 1)  # [A, C, k3]
        loss = cheap.values.unsqueeze(1).expand(-1, num_clusters, -1).masked_fill(touching, torch.inf)
        best_loss, pick = loss.min(dim=2)  # [A, C]
        best_gain, r_best = (split_gain - best_loss).max(dim=1)  # [A]
        sel = torch.nonzero(best_gain > rel_tol * cost.sum(dim=1))[:, 0]
        if sel.numel() == 0:
            return rows[sel]
        r = r_best[sel]
        j = cheap.indices[sel, pick[sel, r]]
        new = c[sel]
        ar = torch.arange(sel.shape[0], device=c.device)
        m0 = s0[sel, j] + s0[sel, j + 1]
        new[ar, j] = (s1[sel, j] + s1[sel, j + 1]) / torch.where(m0 > 0, m0, torch.ones_like(m0))
        new[ar, j + 1] = left[1][sel, r] / left[0][sel, r]  # valid split: both halves carry weight
        new[ar, r] = right[1][sel, r] / right[0][sel, r]
        centroids[rows[sel]] = torch.sort(new, dim=1).values
        return rows[sel]

    def optimize(self, centroids: torch.Tensor, max_iter: int, max_jumps: int) -> int:
        """Lloyd, then merge-and-split moves each followed by Lloyd while they improve (in place); returns iterations."""
        iterations = self.lloyd(centroids, self.all_rows, max_iter)
        active = self.all_rows
        for _ in range(max_jumps):
            active = self.jump(centroids, active)
            if active.numel() == 0:
                break
            iterations += self.lloyd(centroids, active, max_iter)
        return iterations


def weighted_kmeans(
    values: torch.Tensor,
    sample_weight: torch.Tensor | None,
    bits: int,
    *,
    exclude: torch.Tensor | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    n_init: int = DEFAULT_N_INIT,
    max_jumps: int | None = None,
    seed: int = 0,
    random_window: tuple[int, int] | None = None,
) -> KMeansResult:
    """Fisher-weighted k-means with ``2**bits`` centroids for every row of ``values``, all rows at once.

    Args:
        values: weights [N, K] (any float dtype; computed in fp32/fp64 on their device).
        sample_weight: non-negative weights [N, K] (the Fisher information), or None for plain k-means.
            Negative, NaN and infinite entries become 0 (counted in ``sanitized`` and logged).
        bits: codebook size is ``2**bits``.
        exclude: bool [N, K]; True marks values that must not influence the centroids (the sparse part).
            They still get an index (their nearest centroid), which the sparse residual then corrects.
        max_iter: Lloyd iteration cap per run.
        n_init: seeded random-quantile starts in addition to the weighted-quantile start.
        max_jumps: cap on merge-and-split rounds per start (default ``2 * 2**bits``; 0 = plain Lloyd).
        seed: seed of the random starts; equal inputs and seed give bit-identical results.
        random_window: (offset, total): these rows are rows [offset, offset + N) of a call on ``total``
            rows, and their random starts are the ones they would get there. Rows are clustered
            independently, so a caller can cluster a large matrix in chunks (less memory) with the
            results of one call.

    Returns:
        KMeansResult with fp32 ascending centroids [N, 2**bits], int64 indices [N, K] and the per-row
        objective under the sanitized (un-normalized) sample weights of the non-excluded values.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [rows, K], got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("values contain NaN or infinite entries; k-means needs finite weights")
    num_clusters = 1 << bits
    device = values.device
    x = values.to(torch.float32)
    w, sanitized = prepare_row_weights(sample_weight, x.shape, exclude, device)
    if sanitized:
        logger.warning("k-means: %d sample weights were negative, NaN or infinite and were set to 0", sanitized)

    rows = _SortedRows(x, w)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    best_c, best_cost, iterations = None, None, 0
    for start in range(n_init + 1):
        c = rows.quantile_init(num_clusters, generator if start else None, random_window)
        iterations = max(iterations, rows.optimize(c, max_iter, 2 * num_clusters if max_jumps is None else max_jumps))
        cost = rows.total_cost(c)
        if best_c is None:
            best_c, best_cost = c, cost
        else:
            better = cost < best_cost
            best_c = torch.where(better.unsqueeze(1), c, best_c)
            best_cost = torch.minimum(cost, best_cost)
    distinct_c, few = rows.distinct_centroids(num_clusters)
    centroids = torch.where(few.unsqueeze(1), distinct_c, best_c).to(torch.float32)

    indices = assign_indices(x, centroids)
    raw_w = torch.ones_like(x) if sample_weight is None else sanitize_sample_weight(sample_weight.to(device))[0]
    if exclude is not None:
        raw_w = raw_w * ~exclude.to(device)
    err = x.to(torch.float64) - torch.gather(centroids.to(torch.float64), 1, indices)
    objective = (raw_w.to(torch.float64) * err * err).sum(dim=1)
    return KMeansResult(centroids=centroids, indices=indices, objective=objective, iterations=iterations, sanitized=sanitized)
