"""Calibration statistics of the linear weights, all from one forward/backward pass per window.

Three statistics, each the quadratic model of the loss that one quantizer minimizes:

* ``fisher`` [N, K]: SqueezeLLM's diagonal Fisher, the squared gradient of each window's loss summed
  over windows (one window = one sample, as in the seed's gradient tool). Sample weights of the
  k-means start and the sensitivity score of the paper's sparse split.
* ``guided`` [G, K, K]: GuidedQuant's gradient-weighted Hessian per group g of output rows,
  ``H_g = sum_t s_g[t] x_t x_t^T``, with x_t the layer's input at token t and ``s_g[t]`` the squared
  gradient of the loss with respect to the layer's outputs at token t, averaged over the rows of group g
  (Kim et al., "GuidedQuant", ICML 2025). ``(w - q)^T H_g (w - q)`` approximates the loss increase of
  quantizing row w of group g to q, so it is comparable across rows and layers; its diagonal is a
  per-token form of the Fisher above. Plain ``X^T X`` (not weighted by gradients) can be worse than
  SqueezeLLM: the weighting is the point.
* ``xtx`` [1, K, K]: GPTQ's layer-output Hessian ``sum_t x_t x_t^T``, for the GPTQ baseline.

Memory stays bounded by one window's activations plus the accumulators: the inputs of a window's
linears are referenced (not copied: q/k/v share one tensor) until their output gradient arrives in the
backward pass, then folded into the fp32 accumulators and dropped; each weight gradient is squared into
its accumulator by a post-accumulate hook and freed at once. The accumulators cost ``N*K`` (Fisher) plus
``G*K*K`` (guided) floats per layer: for LLaMA-7B (K = 4096, 11008 for down_proj) about 27 GB of fp32
Fisher and 28 GB per group of guided Hessians over its 224 linears. Streaming them block by block is
the quantizer's scale work, not done here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sqz_export.atomic import open_for_write
from sqz_export.caches import reusable_cache
from sqz_export.errors import UserError
from sqz_export.progress import track
from sqz_export.tensorfile import write_safetensors

if TYPE_CHECKING:
    from sqz_export.data import TokenWindows

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Version of the statistics cache layout (tensors named ``{statistic}/{layer}``)."""
STATISTICS_KEY_FIELD = "sqz_statistics_key"
"""safetensors metadata field of a statistics cache that records what it was computed for."""


@dataclasses.dataclass(frozen=True)
class StatisticsRequest:
    """Which statistics one quantization run needs (the cache key records it too)."""

    fisher: bool = True
    guided_groups: int = 0
    """Row groups of the gradient-weighted Hessian; 0 = do not collect it."""
    xtx: bool = False

    def validate(self) -> None:
        if self.guided_groups < 0:
            raise UserError(f"guided Hessian groups must be >= 0, got {self.guided_groups}")
        if not (self.fisher or self.guided_groups or self.xtx):
            raise UserError("no calibration statistic requested")

    def names(self) -> list[str]:
        return [name for name, wanted in (("fisher", self.fisher), ("guided", self.guided_groups > 0), ("xtx", self.xtx)) if wanted]


@dataclasses.dataclass
class CalibrationStats:
    """Per-layer statistics, fp32, keyed by module name (a statistic not requested is an empty dict)."""

    fisher: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # [N, K]
    guided: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # [G, K, K]
    xtx: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # [1, K, K]

    def get(self, statistic: str) -> dict[str, torch.Tensor]:
        return getattr(self, statistic)


def row_groups(out_features: int, groups: int) -> list[tuple[int, int]]:
    """[start, end) of each group of output rows: contiguous, sizes differing by at most one.

    More groups than rows gives one group per row (no empty group).
    """
    groups = max(1, min(groups, out_features))
    bounds = [round(g * out_features / groups) for g in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def collect_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    layers: Mapping[str, nn.Linear],
    request: StatisticsRequest = StatisticsRequest(),
    *,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = True,
) -> CalibrationStats:
    """One forward/backward per window; accumulates the requested statistics of every listed linear.

    Args:
        model: a causal LM taking ``input_ids`` and ``labels`` (labels = inputs, shifted inside the
            model: the standard next-token loss, mean over the window's tokens).
        windows: int64 token ids [num_windows, seq_len]; one window per forward/backward step.
        layers: the linears to collect statistics for, keyed by module name.
        request: which statistics.
        autocast_dtype: run forward/backward under autocast in this dtype (bf16 halves the time on CPUs
            with bf16 matmuls); None runs in the model's dtype. Accumulation is always fp32.
        progress: show progress over windows.

    Returns:
        The statistics, on the weights' device. The model's parameters, requires_grad flags and
        train/eval mode are restored afterwards; no gradients are left on it.
    """
    request.validate()
    if windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
        raise UserError(f"calibration windows must be integer token ids [num_windows, seq_len], got {windows.dtype} {tuple(windows.shape)}")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise UserError(f"calibration needs at least one window of 2+ tokens, got shape {tuple(windows.shape)}")
    if not layers:
        raise UserError("no layers to collect calibration statistics for")
    params = list(model.parameters())
    device = params[0].device
    stats = CalibrationStats()
    for name, layer in layers.items():
        n, k = layer.weight.shape
        if request.fisher:
            stats.fisher[name] = torch.zeros(n, k, dtype=torch.float32, device=layer.weight.device)
        if request.guided_groups:
            stats.guided[name] = torch.zeros(len(row_groups(n, request.guided_groups)), k, k, dtype=torch.float32, device=layer.weight.device)
        if request.xtx:
            stats.xtx[name] = torch.zeros(1, k, k, dtype=torch.float32, device=layer.weight.device)
    by_param = {id(layers[name].weight): tensor for name, tensor in stats.fisher.items()}

    def accumulate_fisher(param: torch.Tensor) -> None:
        grad = param.grad.float()
        by_param[id(param)].addcmul_(grad, grad)
        param.grad = None  # free it now: at most one layer's gradient is alive at a time

    def input_hook(name: str):  # noqa: ANN202 - a forward hook factory
        groups = row_groups(layers[name].out_features, request.guided_groups) if request.guided_groups else []

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, module.in_features).float()  # [T, K]; no copy when fp32
            if request.xtx:
                stats.xtx[name][0].addmm_(x.T, x)
            if groups and output.requires_grad:

                def output_grad(grad: torch.Tensor) -> None:
                    g2 = grad.detach().reshape(-1, module.out_features).float().square()  # [T, N]
                    for index, (start, end) in enumerate(groups):
                        s = g2[:, start:end].mean(dim=1, keepdim=True)  # [T, 1]
                        stats.guided[name][index].addmm_((x * s).T, x)

                output.register_hook(output_grad)

        return hook

    needs_backward = request.fisher or request.guided_groups > 0  # X^T X alone needs only the forward pass
    was_training = model.training
    requires = [p.requires_grad for p in params]
    handles = []
    try:
        model.eval()  # no dropout: the statistics of the deployed (eval) model
        for p in params:
            p.requires_grad_(False)
        for name, layer in layers.items():
            layer.weight.requires_grad_(True)  # also makes every linear's output require grad
            if request.fisher:
                handles.append(layer.weight.register_post_accumulate_grad_hook(accumulate_fisher))
            if request.guided_groups or request.xtx:
                handles.append(layer.register_forward_hook(input_hook(name)))
        autocast = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        )
        for index in track(range(windows.shape[0]), windows.shape[0], "calibration", "windows", enabled=progress):
            ids = windows[index : index + 1].to(device=device, dtype=torch.int64)
            with autocast, torch.set_grad_enabled(needs_backward):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise UserError(f"calibration window {index} gives a non-finite loss ({loss.item()}); check the model and data")
            if needs_backward:
                loss.backward()
            if not request.fisher:
                for layer in layers.values():
                    layer.weight.grad = None
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return stats


def compute_fisher(
    model: nn.Module,
    windows: torch.Tensor,
    layers: Mapping[str, nn.Linear],
    *,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum over windows of (d loss / d W)**2 for each listed linear (SqueezeLLM's Fisher), fp32."""
    return collect_statistics(model, windows, layers, StatisticsRequest(), autocast_dtype=autocast_dtype, progress=progress).fisher


def statistics_key(source: str, calibration: TokenWindows, autocast_dtype: torch.dtype | None) -> dict[str, object]:
    """What a cache must have been computed from to be reused: model, calibration windows, precision."""
    return {"source": source, "calibration": calibration.describe(), "autocast": str(autocast_dtype), "format": CACHE_FORMAT}


def _read_cache(cache: Path, layers: Mapping[str, nn.Linear], statistics: Sequence[str] = ("fisher", "guided", "xtx")) -> tuple[CalibrationStats, int]:
    """The listed statistics a matching cache holds for all ``layers``, and its guided row groups."""
    from safetensors import safe_open

    stats = CalibrationStats()
    with safe_open(str(cache), framework="pt") as handle:
        names = set(handle.keys())
        for statistic in statistics:
            wanted = [f"{statistic}/{layer}" for layer in layers]
            if all(name in names for name in wanted):
                stats.get(statistic).update({layer: handle.get_tensor(name) for layer, name in zip(layers, wanted)})
        groups = int((handle.metadata() or {}).get("guided_groups", 0))
    return stats, groups if stats.guided else 0


def load_or_collect_statistics(
    model: nn.Module,
    calibration: TokenWindows,
    layers: Mapping[str, nn.Linear],
    request: StatisticsRequest,
    *,
    cache: Path | None,
    source: str,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    overwrite: bool = False,
) -> tuple[CalibrationStats, bool]:
    """Calibration statistics, reused from ``cache`` when computed for this model and calibration.

    The calibration pass is the slowest step on a CPU, and it does not depend on bits or sparsity, so a
    sweep over settings computes it once. The cache records the model source, the calibration windows'
    description and which statistics it holds. A cache made for another source or calibration (or a
    file that is no cache) is refused unless ``overwrite`` (:func:`sqz_export.caches.reusable_cache`),
    never silently reused or replaced. A statistic a matching cache lacks (another method, other row
    groups) is computed alone and added, so a sweep over methods runs each statistic once.

    Returns:
        (statistics, whether any was computed now rather than read from the cache), so callers report
        a computation time only for a real computation.
    """
    key = statistics_key(source, calibration, autocast_dtype)
    reuse = reusable_cache(cache, key, STATISTICS_KEY_FIELD, "--stats", overwrite=overwrite)
    # Only what this run needs is read; the rest only when a missing statistic makes the cache be rewritten.
    cached, cached_groups = _read_cache(cache, layers, request.names()) if reuse else (CalibrationStats(), 0)
    missing = StatisticsRequest(
        fisher=request.fisher and not cached.fisher,
        guided_groups=request.guided_groups if request.guided_groups and cached_groups != request.guided_groups else 0,
        xtx=request.xtx and not cached.xtx,
    )
    if not missing.names():
        logger.info("reusing calibration statistics from %s", cache)
        return _subset(cached, request), False
    if reuse:
        logger.warning("statistics cache %s lacks %s; computing and adding it", cache, ", ".join(missing.names()))
    fresh = collect_statistics(model, calibration.tokens, layers, missing, autocast_dtype=autocast_dtype, progress=progress)
    if reuse:  # the rewritten cache keeps what it held beside the new statistics
        others, other_groups = _read_cache(cache, layers, [name for name in ("fisher", "guided", "xtx") if name not in request.names()])
        for statistic in ("fisher", "guided", "xtx"):
            if not cached.get(statistic):
                cached.get(statistic).update(others.get(statistic))
        cached_groups = cached_groups or other_groups
    for statistic in missing.names():
        cached.get(statistic).clear()
        cached.get(statistic).update(fresh.get(statistic))
    groups = request.guided_groups if missing.guided_groups else cached_groups
    if cache is not None:
        tensors = {f"{statistic}/{layer}": tensor.contiguous() for statistic in ("fisher", "guided", "xtx") for layer, tensor in cached.get(statistic).items()}
        metadata = {STATISTICS_KEY_FIELD: json.dumps(key, sort_keys=True), "guided_groups": str(groups)}
        with open_for_write(cache) as handle:
            write_safetensors(handle, tensors, metadata=metadata)
    return _subset(cached, request), True


def _subset(stats: CalibrationStats, request: StatisticsRequest) -> CalibrationStats:
    """Only the requested statistics (the rest would only hold memory)."""
    return CalibrationStats(**{name: stats.get(name) if name in request.names() else {} for name in ("fisher", "guided", "xtx")})
