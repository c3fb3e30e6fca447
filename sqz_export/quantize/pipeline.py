"""Quantize a model's linear layers: dense/sparse split -> per-row codebook -> packed ``PackedLinear``.

One layer at a time (``quantize_weight``), several layers in parallel on CPU (``quantize_model``).
The model is never modified: the result is a dict of packed layers that ``runtime.replace_linears`` or
``checkpoint.save_checkpoint`` consume.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Mapping

import torch
from torch import nn

from sqz_export.errors import UserError
from sqz_export.formats import DEFAULT_CHUNK_NNZ, SUPPORTED_BITS, PackedLinear, pack_indices
from sqz_export.quantize.kmeans import DEFAULT_MAX_ITER, DEFAULT_N_INIT, assign_indices, weighted_kmeans
from sqz_export.quantize.rtn import rtn_codebook
from sqz_export.quantize.sparse import build_sparse_part, select_sparse

logger = logging.getLogger(__name__)

METHODS = ("squeezellm", "rtn")
MAX_SPARSITY = 0.2
"""Upper bound (exclusive) on the exact fraction: beyond it a sparse part stops paying for itself."""
MAX_CPU_WORKERS = 4
"""Layers quantized at once on CPU; each holds a few fp64 copies of its matrix, so memory caps this."""
PHASES = ("sparse_split", "kmeans", "pack")


@dataclasses.dataclass
class QuantizeOptions:
    """Settings of one quantization run (recorded in the checkpoint's quantization_config)."""

    method: str = "squeezellm"
    bits: int = 3
    sparsity: float = 0.0045
    """Fraction of each matrix kept exact (0 = dense only)."""
    sensitive_fraction: float = 0.0005
    """Part of ``sparsity`` chosen by Fisher sensitivity; the rest (sparsity - this) are magnitude outliers."""
    kmeans_max_iter: int = DEFAULT_MAX_ITER
    kmeans_n_init: int = DEFAULT_N_INIT
    seed: int = 0
    chunk_nnz: int = DEFAULT_CHUNK_NNZ
    device: str = "cpu"
    workers: int | None = None
    """Layers quantized in parallel; None = min(torch threads, 4) on CPU, 1 on an accelerator."""

    def validate(self) -> None:
        """Raises UserError naming the first invalid option and what was expected."""
        if self.method not in METHODS:
            raise UserError(f"method {self.method!r} is not supported; expected one of {', '.join(METHODS)}")
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"bits={self.bits} is not supported; expected one of {SUPPORTED_BITS}")
        if not 0.0 <= self.sparsity < MAX_SPARSITY:
            raise UserError(f"sparsity={self.sparsity} must be in [0, {MAX_SPARSITY}) (e.g. 0.0045 for 0.45%)")
        if not 0.0 <= self.sensitive_fraction <= self.sparsity:
            raise UserError(
                f"sensitive_fraction={self.sensitive_fraction} must be in [0, sparsity={self.sparsity}]: "
                "the sensitive values are part of the sparse budget"
            )
        if self.kmeans_max_iter < 1:
            raise UserError(f"kmeans_max_iter={self.kmeans_max_iter} must be at least 1")
        if self.kmeans_n_init < 0:
            raise UserError(f"kmeans_n_init={self.kmeans_n_init} must be >= 0")
        if self.chunk_nnz < 1:
            raise UserError(f"chunk_nnz={self.chunk_nnz} must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"workers={self.workers} must be at least 1")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise UserError(f"device {self.device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {self.device!r} requested but torch sees no CUDA GPU; use --device cpu")


@dataclasses.dataclass
class QuantizeResult:
    packed: dict[str, PackedLinear]
    """Packed layers keyed by module name."""
    timings: dict[str, float]
    """Seconds per phase ("sparse_split", "kmeans", "pack") summed over layers, plus "quantize_wall"
    (wall clock of the whole call; smaller than the sum when layers run in parallel)."""


def quantize_weight(
    weight: torch.Tensor,
    fisher: torch.Tensor | None,
    options: QuantizeOptions,
    *,
    bias: torch.Tensor | None = None,
    name: str = "weight",
    timings: dict[str, float] | None = None,
) -> PackedLinear:
    """Quantizes one weight matrix [out_features, in_features] into a validated ``PackedLinear``.

    Args:
        weight: the FP weight [N, K] (not modified).
        fisher: Fisher information of the same shape (sample weights of k-means and the sensitivity
            score of the sparse split); required by squeezellm, optional for rtn.
        options: validated by the caller or here.
        bias: optional bias [N], stored as fp16.
        name: layer name used in error messages.
        timings: if given, seconds per phase are added to it.
    """
    options.validate()
    if weight.dim() != 2:
        raise UserError(f"{name}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if options.method == "squeezellm" and fisher is None:
        raise UserError(f"{name}: SqueezeLLM needs the Fisher information of this layer (or use method 'rtn')")
    if fisher is not None and fisher.shape != weight.shape:
        raise UserError(f"{name}: Fisher information has shape {tuple(fisher.shape)}, expected the weight's {tuple(weight.shape)}")
    device = torch.device(options.device)
    w = weight.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise UserError(f"{name}: weight contains NaN or infinite values")
    f = fisher.detach().to(device=device, dtype=torch.float32) if fisher is not None else None
    spent = dict.fromkeys(PHASES, 0.0)

    start = time.perf_counter()
    mask = select_sparse(w, f, options.sparsity, options.sensitive_fraction).mask if options.sparsity > 0 else None
    spent["sparse_split"] = time.perf_counter() - start

    start = time.perf_counter()
    if options.method == "rtn":
        centroids = rtn_codebook(w, options.bits, mask)
    else:
        result = weighted_kmeans(
            w, f, options.bits, exclude=mask, max_iter=options.kmeans_max_iter, n_init=options.kmeans_n_init, seed=options.seed
        )
        if result.sanitized:
            logger.warning("%s: %d Fisher values were negative, NaN or infinite and were treated as 0", name, result.sanitized)
        centroids = result.centroids
    spent["kmeans"] = time.perf_counter() - start

    start = time.perf_counter()
    lut = centroids.to(torch.float16)  # rounding is monotone: rows stay ascending
    if not bool(torch.isfinite(lut).all()):
        raise UserError(f"{name}: a codebook value does not fit in fp16 (|w| > 65504)")
    lut32 = lut.to(torch.float32)
    indices = assign_indices(w, lut32)  # nearest entry of the fp16 codebook actually stored
    dense = torch.gather(lut32, 1, indices)
    sparse = build_sparse_part(w, dense, mask, options.chunk_nnz) if mask is not None else None
    packed = PackedLinear(
        bits=options.bits,
        in_features=w.shape[1],
        out_features=w.shape[0],
        qweight=pack_indices(indices.cpu(), options.bits),
        lut=lut.cpu().contiguous(),
        sparse=sparse,
        bias=bias.detach().to(device="cpu", dtype=torch.float16).clone() if bias is not None else None,
    )
    packed.validate(name)
    spent["pack"] = time.perf_counter() - start
    if timings is not None:
        for phase, seconds in spent.items():
            timings[phase] = timings.get(phase, 0.0) + seconds
    return packed


def quantize_model(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    options: QuantizeOptions,
    layers: Mapping[str, nn.Linear] | None = None,
    progress: bool = True,
) -> QuantizeResult:
    """Quantizes every layer in ``layers`` (default: the decoder's linears); the model is not modified.

    On CPU, ``options.workers`` layers run in parallel threads with one torch thread each (the torch ops
    release the GIL): many small ops on one thread each scale better than intra-op threading, which
    loses much of its time to thread synchronization on such ops, and more so on a busy machine.

    Raises:
        UserError: invalid options, squeezellm without Fisher information, or a layer missing from it.
    """
    from tqdm.auto import tqdm

    options.validate()
    if layers is None:
        from sqz_export.models import quantizable_linears

        layers = quantizable_linears(model)
    if options.method == "squeezellm":
        if fisher is None:
            raise UserError("SqueezeLLM needs Fisher information from calibration data; pass it, or use method 'rtn'")
        missing = [name for name in layers if name not in fisher]
        if missing:
            raise UserError(f"Fisher information lacks {len(missing)} layer(s), first {missing[0]!r}; recompute it for this model")
    device = torch.device(options.device)
    workers = options.workers or (1 if device.type != "cpu" else min(torch.get_num_threads(), MAX_CPU_WORKERS))
    timings = dict.fromkeys(PHASES, 0.0)
    packed: dict[str, PackedLinear] = {}

    def run(name: str) -> tuple[str, PackedLinear, dict[str, float]]:
        layer = layers[name]
        spent: dict[str, float] = {}
        layer_fisher = fisher.get(name) if fisher is not None else None
        result = quantize_weight(layer.weight, layer_fisher, options, bias=layer.bias, name=name, timings=spent)
        return name, result, spent

    start = time.perf_counter()
    threads = torch.get_num_threads()
    bar = tqdm(total=len(layers), desc=f"{options.method} {options.bits}-bit", unit="layer", disable=not progress)
    try:
        if workers > 1:
            torch.set_num_threads(1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for name, result, spent in pool.map(run, list(layers)):
                packed[name] = result
                for phase, seconds in spent.items():
                    timings[phase] += seconds
                bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    timings["quantize_wall"] = time.perf_counter() - start
    logger.info("quantized %d layers in %.1fs (%s)", len(packed), timings["quantize_wall"], ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return QuantizeResult(packed=packed, timings=timings)
