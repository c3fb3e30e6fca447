"""Fisher information: equals a brute-force per-window grad**2 sum, leaves the model as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import TINY_VOCAB, make_tiny_model
from tolerances import tolerance

from sqz_export.data import TokenWindows
from sqz_export.errors import UserError
from sqz_export.models import quantizable_linears
from sqz_export.quantize.fisher import compute_fisher, load_or_compute_fisher

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


def test_cache_is_reused_only_for_the_same_model_and_calibration(tmp_path: Path) -> None:
    model = make_tiny_model("llama", seed=2)
    layers = quantizable_linears(model)
    tokens = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    calibration = TokenWindows(tokens, "text.txt", "start", 0, 1000)
    cache = tmp_path / "fisher.safetensors"
    common = {"cache": cache, "autocast_dtype": None, "progress": False}
    first, computed = load_or_compute_fisher(model, calibration, layers, source="tiny", **common)
    assert computed and cache.is_file()
    again, computed = load_or_compute_fisher(model, calibration, layers, source="tiny", **common)
    assert not computed
    for name in layers:
        assert torch.equal(again[name], first[name])
    written = cache.read_bytes()
    # A cache made for another source or other windows is never trusted, nor silently replaced.
    with pytest.raises(UserError, match=r"made for other settings \(source: 'tiny' -> 'another model'\).*--overwrite-cache"):
        load_or_compute_fisher(model, calibration, layers, source="another model", **common)
    longer = TokenWindows(torch.cat([tokens, tokens]), "text.txt", "start", 0, 1000)
    with pytest.raises(UserError, match=r"calibration.num_windows: 2 -> 4"):
        load_or_compute_fisher(model, longer, layers, source="tiny", **common)
    assert cache.read_bytes() == written
    _, computed = load_or_compute_fisher(model, longer, layers, source="tiny", overwrite=True, **common)
    assert computed  # replaced only when asked
    _, computed = load_or_compute_fisher(model, longer, layers, source="tiny", **common)
    assert not computed


def test_a_file_that_is_no_cache_is_refused_and_kept(tmp_path: Path) -> None:
    model = make_tiny_model("llama")
    calibration = TokenWindows(torch.zeros(1, 8, dtype=torch.int64), "text.txt", "start", 0, 100)
    cache = tmp_path / "notes.safetensors"
    cache.write_text("my notes, not a cache")
    with pytest.raises(UserError, match=r"notes.safetensors is not a safetensors cache"):
        load_or_compute_fisher(model, calibration, quantizable_linears(model), cache=cache, source="tiny", autocast_dtype=None, progress=False)
    assert cache.read_text() == "my notes, not a cache"
