"""Calibration statistics: each equals its brute-force definition, the pass leaves the model as it was,
and the cache is reused only for the same model, calibration and statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import TINY_VOCAB, make_tiny_model
from tolerances import tolerance

from sqz_export.data import TokenWindows
from sqz_export.errors import UserError
from sqz_export.models import quantizable_linears
from sqz_export.quantize.calibration import (
    StatisticsRequest,
    collect_statistics,
    compute_fisher,
    load_or_collect_statistics,
    row_groups,
)

BF16_AGGREGATE_BOUND = 0.1
"""bf16 gradients carry ~3 significant digits; their squares agree with fp32 to a few percent in norm."""


def brute_force_fisher(model: torch.nn.Module, windows: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Plain autograd, all parameters trainable, one window at a time, grad**2 summed in fp32."""
    modules = dict(model.named_modules())
    total = {name: torch.zeros_like(modules[name].weight) for name in names}
    for window in windows:
        model.zero_grad(set_to_none=True)
        ids = window.unsqueeze(0)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for name in names:
            total[name] += modules[name].weight.grad ** 2
    model.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_matches_brute_force(arch: str) -> None:
    model = make_tiny_model(arch, seed=1)
    windows = torch.randint(0, TINY_VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    layers = quantizable_linears(model)
    fisher = compute_fisher(model, windows, layers, autocast_dtype=None, progress=False)
    expected = brute_force_fisher(model, windows, list(layers))
    assert set(fisher) == set(layers)
    for name in layers:
        assert fisher[name].dtype == torch.float32 and fisher[name].shape == layers[name].weight.shape
        # Same forward/backward ops, so the same weight gradients; only the fp32 accumulation may differ.
        torch.testing.assert_close(fisher[name], expected[name], **tolerance("fisher", torch.float32))
        assert bool((fisher[name] > 0).any())


def test_restores_model_state() -> None:
    model = make_tiny_model("llama")
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    layers = quantizable_linears(model)
    compute_fisher(model, torch.randint(0, TINY_VOCAB, (2, 16)), layers, progress=False)
    assert model.training
    for name, p in model.named_parameters():
        assert p.requires_grad == flags[name] and p.grad is None
        assert torch.equal(p.detach(), before[name])


def test_bf16_autocast_close_to_fp32() -> None:
    model = make_tiny_model("llama", seed=2)
    windows = torch.randint(0, TINY_VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    layers = quantizable_linears(model)
    fp32 = compute_fisher(model, windows, layers, autocast_dtype=None, progress=False)
    bf16 = compute_fisher(model, windows, layers, autocast_dtype=torch.bfloat16, progress=False)
    for name in layers:
        relative = (bf16[name] - fp32[name]).norm() / fp32[name].norm()
        assert relative < BF16_AGGREGATE_BOUND, (name, float(relative))


@pytest.mark.parametrize("windows", [torch.zeros(4, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 8)])
def test_rejects_bad_windows(windows: torch.Tensor) -> None:
    model = make_tiny_model("llama")
    with pytest.raises(UserError, match="window"):
        compute_fisher(model, windows, quantizable_linears(model), progress=False)


def brute_force_hessians(model: torch.nn.Module, windows: torch.Tensor, names: list[str], groups: int) -> tuple[dict, dict]:
    """GuidedQuant's H_g and GPTQ's X^T X token by token from retained activations and output gradients."""
    modules = dict(model.named_modules())
    guided = {name: torch.zeros(len(row_groups(modules[name].out_features, groups)), modules[name].in_features, modules[name].in_features) for name in names}
    xtx = {name: torch.zeros(1, modules[name].in_features, modules[name].in_features) for name in names}
    for window in windows:
        inputs, outputs = {}, {}
        handles = []
        for name in names:

            def hook(module, args, output, name=name):  # noqa: ANN001, ANN202
                inputs[name] = args[0].detach()
                output.retain_grad()
                outputs[name] = output

            handles.append(modules[name].register_forward_hook(hook))
        model.zero_grad(set_to_none=True)
        ids = window.unsqueeze(0)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for handle in handles:
            handle.remove()
        for name in names:
            x = inputs[name].reshape(-1, inputs[name].shape[-1])
            g = outputs[name].grad.reshape(-1, outputs[name].shape[-1])
            for t in range(x.shape[0]):
                xtx[name][0] += torch.outer(x[t], x[t])
                for index, (start, end) in enumerate(row_groups(g.shape[1], groups)):
                    guided[name][index] += (g[t, start:end] ** 2).mean() * torch.outer(x[t], x[t])
    model.zero_grad(set_to_none=True)
    return guided, xtx


@pytest.mark.parametrize("groups", [1, 3])
def test_hessians_match_their_definitions(groups: int) -> None:
    model = make_tiny_model("llama", seed=1)
    for p in model.parameters():
        p.requires_grad_(True)
    windows = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = quantizable_linears(model)
    stats = collect_statistics(model, windows, layers, StatisticsRequest(fisher=True, guided_groups=groups, xtx=True), autocast_dtype=None, progress=False)
    guided, xtx = brute_force_hessians(model, windows, list(layers), groups)
    fisher = brute_force_fisher(model, windows, list(layers))
    for name in layers:
        torch.testing.assert_close(stats.fisher[name], fisher[name], **tolerance("fisher", torch.float32))
        torch.testing.assert_close(stats.xtx[name], xtx[name], **tolerance("hessian", torch.float32))
        torch.testing.assert_close(stats.guided[name], guided[name], **tolerance("hessian", torch.float32))
        assert stats.guided[name].shape[0] == len(row_groups(layers[name].out_features, groups))
        assert bool((stats.guided[name] != 0).any())


def test_statistics_not_requested_are_not_collected() -> None:
    model = make_tiny_model("llama", seed=1)
    layers = quantizable_linears(model)
    windows = torch.randint(0, TINY_VOCAB, (1, 8))
    stats = collect_statistics(model, windows, layers, StatisticsRequest(fisher=False, xtx=True), autocast_dtype=None, progress=False)
    assert not stats.fisher and not stats.guided and set(stats.xtx) == set(layers)
    assert all(layer.weight.grad is None for layer in layers.values())
    with pytest.raises(UserError, match="no calibration statistic"):
        collect_statistics(model, windows, layers, StatisticsRequest(fisher=False), progress=False)


@pytest.mark.parametrize(("rows", "groups"), [(10, 1), (10, 3), (10, 4), (3, 8), (64, 4)])
def test_row_groups_cover_the_rows_evenly(rows: int, groups: int) -> None:
    bounds = row_groups(rows, groups)
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and len(bounds) == min(rows, groups)


def test_cache_is_reused_only_for_the_same_model_calibration_and_statistics(tmp_path: Path) -> None:
    model = make_tiny_model("llama", seed=2)
    layers = quantizable_linears(model)
    tokens = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    calibration = TokenWindows(tokens, "text.txt", "start", 0, 1000)
    cache = tmp_path / "stats.safetensors"
    common = {"cache": cache, "autocast_dtype": None, "progress": False}
    both = StatisticsRequest(fisher=True, guided_groups=2)
    first, computed = load_or_collect_statistics(model, calibration, layers, both, source="tiny", **common)
    assert computed and cache.is_file()
    again, computed = load_or_collect_statistics(model, calibration, layers, both, source="tiny", **common)
    assert not computed
    for name in layers:
        assert torch.equal(again.fisher[name], first.fisher[name]) and torch.equal(again.guided[name], first.guided[name])
    subset, computed = load_or_collect_statistics(model, calibration, layers, StatisticsRequest(), source="tiny", **common)
    assert not computed and set(subset.fisher) == set(layers)  # a cache holding more serves a subset
    regrouped, computed = load_or_collect_statistics(model, calibration, layers, StatisticsRequest(guided_groups=3), source="tiny", **common)
    assert computed  # other row groups: different Hessians
    assert all(regrouped.guided[name].shape[0] == 3 for name in layers)
    _, computed = load_or_collect_statistics(model, calibration, layers, StatisticsRequest(xtx=True), source="tiny", **common)
    assert computed  # a statistic the cache lacks is added...
    union, computed = load_or_collect_statistics(model, calibration, layers, StatisticsRequest(guided_groups=3, xtx=True), source="tiny", **common)
    assert not computed  # ...beside what it held
    for name in layers:
        assert torch.equal(union.fisher[name], first.fisher[name]) and torch.equal(union.guided[name], regrouped.guided[name])
    written = cache.read_bytes()
    # A cache made for another source or other windows is never trusted, nor silently replaced.
    with pytest.raises(UserError, match=r"made for other settings \(source: 'tiny' -> 'another model'\).*--overwrite-cache"):
        load_or_collect_statistics(model, calibration, layers, StatisticsRequest(), source="another model", **common)
    longer = TokenWindows(torch.cat([tokens, tokens]), "text.txt", "start", 0, 1000)
    with pytest.raises(UserError, match=r"calibration.num_windows: 2 -> 4"):
        load_or_collect_statistics(model, longer, layers, StatisticsRequest(), source="tiny", **common)
    assert cache.read_bytes() == written
    _, computed = load_or_collect_statistics(model, longer, layers, StatisticsRequest(), source="tiny", overwrite=True, **common)
    assert computed  # replaced only when asked
    _, computed = load_or_collect_statistics(model, longer, layers, StatisticsRequest(), source="tiny", **common)
    assert not computed


def test_a_file_that_is_no_cache_is_refused_and_kept(tmp_path: Path) -> None:
    model = make_tiny_model("llama", seed=2)
    layers = quantizable_linears(model)
    cache = tmp_path / "notes.safetensors"
    cache.write_bytes(b"my notes, not a cache")
    calibration = TokenWindows(torch.zeros(1, 8, dtype=torch.int64), "text.txt", "start", 0, 100)
    with pytest.raises(UserError, match=r"notes.safetensors is not a safetensors cache"):
        load_or_collect_statistics(model, calibration, layers, StatisticsRequest(), cache=cache, source="tiny", autocast_dtype=None, progress=False)
    assert cache.read_bytes() == b"my notes, not a cache"  # the user's file is left alone
