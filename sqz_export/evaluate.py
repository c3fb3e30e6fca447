"""Perplexity: the quality number every quantization result in this project is judged by."""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import nn
from sqz_export.progress import track
from sqz_export.runtime import materialized_weights


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    """Mean negative log-likelihood per predicted token (nats)."""
    num_windows: int
    seq_len: int
    predicted_tokens: int
    seconds: float


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """Perplexity over non-overlapping windows [num_windows, seq_len].

    Each window is scored independently (no context carried across windows), predicting tokens
    1..seq_len-1 from their prefix, as in the GPTQ/SqueezeLLM evaluation protocol. Log-probabilities are
    computed in fp32 whatever the model's dtype. Quantized layers are unpacked once for the whole run.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [num_windows, seq_len >= 2], got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    start = time.perf_counter()
    with materialized_weights(model):
        starts = range(0, windows.shape[0], batch_size)
        for begin in track(starts, len(starts), "perplexity", "batches", enabled=progress):
            batch = windows[begin : begin + batch_size].to(device)
            logits = model(input_ids=batch).logits.float()
            nll = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        num_windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        predicted_tokens=total_tokens,
        seconds=time.perf_counter() - start,
    )
