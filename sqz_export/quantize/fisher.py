"""Fisher information of the linear weights: the sum over calibration windows of squared gradients.

SqueezeLLM weights each value's quantization error by the diagonal of the empirical Fisher, the
squared gradient of the language-model loss summed over calibration samples (one window = one
sample, as in the seed's gradient tool). Memory stays bounded by one window's activations: each
weight's gradient is squared into its fp32 accumulator by a post-accumulate hook and dropped at once,
so a full set of gradients never exists, and only the quantized weights require gradients (no
embedding, norm or lm_head weight gradients are computed).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
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


def compute_fisher(
    model: nn.Module,
    windows: torch.Tensor,
    layers: Mapping[str, nn.Linear],
    *,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum over windows of (d loss / d W)**2 for each listed linear, fp32, on the weight's device.

    Args:
        model: a causal LM taking ``input_ids`` and ``labels`` (labels = inputs, shifted inside the
            model: the standard next-token loss, mean over the window's tokens).
        windows: int64 token ids [num_windows, seq_len]; one window per forward/backward step.
        layers: the linears whose weights get Fisher information, keyed by module name.
        autocast_dtype: run forward/backward under autocast in this dtype (bf16 halves the time on CPUs
            with bf16 matmuls); None runs in the model's dtype. Accumulation is always fp32.
        progress: report progress over windows (a bar at a terminal, log lines elsewhere).

    Returns:
        name -> fp32 tensor of the weight's shape. The model's parameters, requires_grad flags and
        train/eval mode are restored afterwards; no gradients are left on it.
    """
    if windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
        raise UserError(f"calibration windows must be integer token ids [num_windows, seq_len], got {windows.dtype} {tuple(windows.shape)}")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise UserError(f"calibration needs at least one window of 2+ tokens, got shape {tuple(windows.shape)}")
    if not layers:
        raise UserError("no layers to compute Fisher information for")
    params = list(model.parameters())
    device = params[0].device
    fisher = {name: torch.zeros_like(layer.weight, dtype=torch.float32) for name, layer in layers.items()}
    by_param = {id(layer.weight): fisher[name] for name, layer in layers.items()}

    def accumulate(param: torch.Tensor) -> None:
        grad = param.grad.float()
        by_param[id(param)].addcmul_(grad, grad)
        param.grad = None  # free it now: at most one layer's gradient is alive at a time

    was_training = model.training
    requires = [p.requires_grad for p in params]
    handles = []
    try:
        model.eval()  # no dropout: the Fisher of the deployed (eval) model
        for p in params:
            p.requires_grad_(False)
        for layer in layers.values():
            layer.weight.requires_grad_(True)
            handles.append(layer.weight.register_post_accumulate_grad_hook(accumulate))
        autocast = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        )
        for index in track(range(windows.shape[0]), windows.shape[0], "Fisher", "windows", enabled=progress):
            ids = windows[index : index + 1].to(device=device, dtype=torch.int64)
            with autocast:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise UserError(f"calibration window {index} gives a non-finite loss ({loss.item()}); check the model and data")
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return fisher


FISHER_KEY_FIELD = "sqz_fisher_key"
"""safetensors metadata field of a Fisher cache that records what it was computed for."""


def fisher_cache_key(source: str, calibration: TokenWindows, autocast_dtype: torch.dtype | None) -> dict[str, object]:
    """What a Fisher cache must have been computed for to be reused."""
    return {"source": source, "calibration": calibration.describe(), "autocast": str(autocast_dtype)}


def load_or_compute_fisher(
    model: nn.Module,
    calibration: TokenWindows,
    layers: Mapping[str, nn.Linear],
    *,
    cache: Path | None,
    source: str,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    overwrite: bool = False,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Fisher information, reused from ``cache`` when it was computed for this model and calibration.

    The Fisher pass is the slowest step on a CPU, and it does not depend on bits or sparsity, so a
    sweep over settings computes it once. The cache records the model source and the calibration
    windows' description; a cache made for anything else is refused unless ``overwrite`` (see
    :func:`sqz_export.caches.reusable_cache`), rather than silently reused or replaced.

    Returns:
        (name -> fp32 Fisher tensor, whether it was computed now rather than read from the cache),
        so callers report a computation time only for a real computation.
    """
    from safetensors import safe_open

    key = fisher_cache_key(source, calibration, autocast_dtype)
    if reusable_cache(cache, key, FISHER_KEY_FIELD, "--fisher", overwrite=overwrite):
        logger.info("reusing Fisher information from %s", cache)
        with safe_open(str(cache), framework="pt") as handle:
            stored = set(handle.keys())
            return {name: handle.get_tensor(name) for name in layers if name in stored}, False
    fisher = compute_fisher(model, calibration.tokens, layers, autocast_dtype=autocast_dtype, progress=progress)
    if cache is not None:
        with open_for_write(cache) as handle:
            write_safetensors(handle, fisher, metadata={FISHER_KEY_FIELD: json.dumps(key, sort_keys=True)})
    return fisher, True
