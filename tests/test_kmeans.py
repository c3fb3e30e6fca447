"""Fisher-weighted per-row k-means: quality against scikit-learn, exactness, determinism, robustness."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sqz_export.quantize.kmeans import assign_indices, weighted_kmeans, weighted_objective

QUALITY_RATIO = 1.005
"""Acceptance: mean objective over the rows at most 0.5% above scikit-learn's on the same rows."""


def laplace_rows(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM-like rows (Laplace weights) with heavy-tailed positive Fisher-like sample weights."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=gen, dtype=torch.float64) - 0.5
    weights = -0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())
    fisher = torch.exp(1.5 * torch.randn(rows, cols, generator=gen, dtype=torch.float64)) * 1e-7
    return weights.float(), fisher.float()


@pytest.mark.parametrize("bits", [3, 4])
def test_objective_not_worse_than_sklearn(bits: int) -> None:
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    weights, fisher = laplace_rows(64, 128, seed=bits)
    ours = weighted_kmeans(weights, fisher, bits, seed=0)
    reference = []
    for row in range(weights.shape[0]):
        # The seed's exact call: k-means++ start, n_init="auto" (one start), max_iter=50, random_state=0.
        km = sklearn_cluster.KMeans(n_clusters=1 << bits, random_state=0, n_init="auto", max_iter=50)
        km.fit(weights[row].double().numpy().reshape(-1, 1), sample_weight=fisher[row].double().numpy())
        centers = torch.from_numpy(np.sort(km.cluster_centers_.reshape(-1))).unsqueeze(0)
        reference.append(weighted_objective(weights[row : row + 1], fisher[row : row + 1], centers))
    reference = torch.cat(reference)
    ours_objective = weighted_objective(weights, fisher, ours.centroids)
    torch.testing.assert_close(ours_objective, ours.objective, rtol=1e-9, atol=0.0)
    assert ours_objective.mean() <= QUALITY_RATIO * reference.mean()


def test_rows_with_few_distinct_values_are_exact() -> None:
    bits = 3
    gen = torch.Generator().manual_seed(0)
    rows = []
    for distinct in (1, 2, 5, 8):  # up to 2**bits distinct values, with many repeats
        levels = torch.randn(distinct, generator=gen) * 0.1
        rows.append(levels[torch.randint(0, distinct, (200,), generator=gen)])
    weights = torch.stack(rows)
    fisher = torch.rand(weights.shape, generator=gen)
    result = weighted_kmeans(weights, fisher, bits)
    assert torch.equal(result.objective, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(torch.gather(result.centroids, 1, result.indices), weights)


def test_centroids_ascending_and_indices_nearest() -> None:
    weights, fisher = laplace_rows(32, 96, seed=5)
    result = weighted_kmeans(weights, fisher, 4)
    assert result.centroids.shape == (32, 16) and result.indices.shape == (32, 96)
    assert bool((result.centroids[:, 1:] >= result.centroids[:, :-1]).all())
    distance = (weights.unsqueeze(-1) - result.centroids.unsqueeze(1)).abs()  # [N, K, C] brute force
    chosen = torch.gather(distance, 2, result.indices.unsqueeze(-1))[..., 0]
    assert torch.equal(chosen, distance.amin(dim=-1))
    torch.testing.assert_close(assign_indices(weights, result.centroids), result.indices)


def test_deterministic_for_a_seed() -> None:
    weights, fisher = laplace_rows(16, 200, seed=1)
    first = weighted_kmeans(weights, fisher, 3, seed=7)
    second = weighted_kmeans(weights.clone(), fisher.clone(), 3, seed=7)
    assert torch.equal(first.centroids, second.centroids)
    assert torch.equal(first.indices, second.indices)


def test_merge_and_split_moves_improve_on_plain_lloyd() -> None:
    weights, fisher = laplace_rows(48, 128, seed=3)
    plain = weighted_kmeans(weights, fisher, 3, n_init=0, max_jumps=0)
    moved = weighted_kmeans(weights, fisher, 3, n_init=0)
    assert bool((moved.objective <= plain.objective * (1 + 1e-9)).all())
    assert moved.objective.sum() < plain.objective.sum()


def test_bad_sample_weights_are_sanitized(caplog: pytest.LogCaptureFixture) -> None:
    weights, fisher = laplace_rows(4, 64, seed=2)
    bad = fisher.clone()
    bad[0, :5] = -1.0
    bad[1, 3] = float("nan")
    bad[1, 4] = float("inf")
    bad[2] = 0.0  # all-zero row: falls back to uniform weights
    with caplog.at_level(logging.WARNING, logger="sqz_export.quantize.kmeans"):
        result = weighted_kmeans(weights, bad, 3)
    assert result.sanitized == 7
    assert "7 sample weights" in caplog.text
    assert bool(torch.isfinite(result.centroids).all()) and bool(torch.isfinite(result.objective).all())
    uniform = fisher.clone()
    uniform[:2] = bad[:2].nan_to_num(nan=0.0, posinf=0.0).clamp(min=0.0)
    uniform[2] = 1.0
    expected = weighted_kmeans(weights, uniform, 3)
    assert torch.equal(result.centroids, expected.centroids)


def test_excluded_values_do_not_move_centroids() -> None:
    weights, fisher = laplace_rows(8, 64, seed=4)
    exclude = torch.zeros_like(weights, dtype=torch.bool)
    exclude[:, :3] = True
    base = weighted_kmeans(weights, fisher, 3, exclude=exclude)
    changed = weights.clone()
    changed[:, :3] = 10.0  # huge outliers at the excluded positions
    other = weighted_kmeans(changed, fisher, 3, exclude=exclude)
    assert torch.equal(base.centroids, other.centroids)
    assert torch.equal(base.objective, other.objective)


def test_rejects_non_finite_values() -> None:
    weights = torch.zeros(2, 8)
    weights[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        weighted_kmeans(weights, None, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_objective() -> None:
    weights, fisher = laplace_rows(64, 256, seed=6)
    cpu = weighted_kmeans(weights, fisher, 3)
    gpu = weighted_kmeans(weights.cuda(), fisher.cuda(), 3)
    torch.testing.assert_close(gpu.objective.cpu().sum(), cpu.objective.sum(), rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("bits", [3, 4])
def test_chunks_with_their_random_window_give_the_whole_call(bits: int) -> None:
    """The quantizer clusters large matrices in row chunks (memory); each chunk gets the random starts its
    rows get in one call on all rows, so chunking changes no centroid and no index."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 190, generator=gen) * 0.02
    f = torch.rand(300, 190, generator=gen) ** 4
    exclude = torch.rand(300, 190, generator=gen) < 0.01
    whole = weighted_kmeans(w, f, bits, exclude=exclude, n_init=2, seed=3)
    chunks = [
        weighted_kmeans(w[a:b], f[a:b], bits, exclude=exclude[a:b], n_init=2, seed=3, random_window=(a, 300))
        for a, b in [(0, 77), (77, 200), (200, 300)]
    ]
    assert torch.equal(whole.centroids, torch.cat([c.centroids for c in chunks]))
    assert torch.equal(whole.indices, torch.cat([c.indices for c in chunks]))
