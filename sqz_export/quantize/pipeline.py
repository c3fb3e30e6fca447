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
from sqz_export.progress import Progress
from sqz_export.quantize.kmeans import DEFAULT_MAX_ITER, DEFAULT_N_INIT, assign_indices, weighted_kmeans
from sqz_export.quantize.rtn import rtn_codebook
from sqz_export.quantize.sparse import build_sparse_part, select_sparse

logger = logging.getLogger(__name__)

METHODS = ("squeezellm", "rtn")
MAX_SPARSITY = 0.2
"""Upper bound (exclusive) on the exact fraction: beyond it a sparse part stops paying for itself."""
MAX_CPU_WORKERS = 4
"""Batches quantized at once on CPU; each holds a few fp64 copies of its matrices, so memory caps this."""
BATCH_WEIGHTS = 1 << 22
"""Weights per k-means call when stacking layers (4M: a SmolLM2 block's q..up; ~130 MB of fp64 state)."""
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
    """Seconds per phase ("sparse_split", "kmeans", "pack") summed over batches, plus "quantize_wall"
    (wall clock of the whole call; smaller than the sum when batches run in parallel)."""


@dataclasses.dataclass
class _Matrix:
    """One layer's validated inputs on the compute device, and its exact positions."""

    name: str
    weight: torch.Tensor  # fp32 [N, K]
    fisher: torch.Tensor | None  # fp32 [N, K]
    bias: torch.Tensor | None
    mask: torch.Tensor | None  # bool [N, K], the sparse part's positions


def _prepare(name: str, weight: torch.Tensor, fisher: torch.Tensor | None, bias: torch.Tensor | None, options: QuantizeOptions) -> _Matrix:
    """Validates one layer's inputs (errors name the layer) and selects its sparse positions."""
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
    mask = select_sparse(w, f, options.sparsity, options.sensitive_fraction).mask if options.sparsity > 0 else None
    return _Matrix(name=name, weight=w, fisher=f, bias=bias, mask=mask)


def _codebooks(matrices: list[_Matrix], options: QuantizeOptions) -> list[torch.Tensor]:
    """Per-row codebooks (fp32 [N_i, 2**bits]) of matrices with equal in_features, in one k-means call.

    Rows are clustered independently, so stacking the rows of several matrices changes no result (with
    extra random starts, only which random levels a row draws). It issues fewer, larger torch ops: about
    the same speed on one thread (measured), but less Python dispatch under the GIL that the parallel
    workers share.
    """
    w = torch.cat([m.weight for m in matrices])
    mask = None if matrices[0].mask is None else torch.cat([m.mask for m in matrices])
    if options.method == "rtn":
        centroids = rtn_codebook(w, options.bits, mask)
    else:
        f = torch.cat([m.fisher for m in matrices])
        result = weighted_kmeans(
            w, f, options.bits, exclude=mask, max_iter=options.kmeans_max_iter, n_init=options.kmeans_n_init, seed=options.seed
        )
        if result.sanitized:
            names = ", ".join(m.name for m in matrices)
            logger.warning("%s: %d Fisher values were negative, NaN or infinite and were treated as 0", names, result.sanitized)
        centroids = result.centroids
    return list(torch.split(centroids, [m.weight.shape[0] for m in matrices]))


def _pack(matrix: _Matrix, centroids: torch.Tensor, options: QuantizeOptions) -> PackedLinear:
    """fp16 LUT, nearest-entry indices, sparse residuals, packed and validated."""
    w = matrix.weight
    lut = centroids.to(torch.float16)  # rounding is monotone: rows stay ascending
    if not bool(torch.isfinite(lut).all()):
        raise UserError(f"{matrix.name}: a codebook value does not fit in fp16 (|w| > 65504)")
    lut32 = lut.to(torch.float32)
    indices = assign_indices(w, lut32)  # nearest entry of the fp16 codebook actually stored
    sparse = None
    if matrix.mask is not None:
        sparse = build_sparse_part(w, torch.gather(lut32, 1, indices), matrix.mask, options.chunk_nnz)
    packed = PackedLinear(
        bits=options.bits,
        in_features=w.shape[1],
        out_features=w.shape[0],
        qweight=pack_indices(indices.cpu(), options.bits),
        lut=lut.cpu().contiguous(),
        sparse=sparse,
        bias=matrix.bias.detach().to(device="cpu", dtype=torch.float16).clone() if matrix.bias is not None else None,
    )
    packed.validate(matrix.name)
    return packed


def _quantize_batch(
    items: list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]], options: QuantizeOptions
) -> tuple[list[tuple[str, PackedLinear]], dict[str, float]]:
    """(name, weight, fisher, bias) of matrices with equal in_features -> packed layers and seconds per phase."""
    spent = dict.fromkeys(PHASES, 0.0)
    start = time.perf_counter()
    matrices = [_prepare(name, weight, fisher, bias, options) for name, weight, fisher, bias in items]
    spent["sparse_split"] = time.perf_counter() - start
    start = time.perf_counter()
    codebooks = _codebooks(matrices, options)
    spent["kmeans"] = time.perf_counter() - start
    start = time.perf_counter()
    packed = [(m.name, _pack(m, c, options)) for m, c in zip(matrices, codebooks)]
    spent["pack"] = time.perf_counter() - start
    return packed, spent


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
        options: validated here.
        bias: optional bias [N], stored as fp16.
        name: layer name used in error messages.
        timings: if given, seconds per phase are added to it.
    """
    options.validate()
    [(_, packed)], spent = _quantize_batch([(name, weight, fisher, bias)], options)
    if timings is not None:
        for phase, seconds in spent.items():
            timings[phase] = timings.get(phase, 0.0) + seconds
    return packed


def _batches(layers: Mapping[str, nn.Linear], max_weights: int) -> list[list[str]]:
    """Consecutive layer names with equal in_features, up to ``max_weights`` weights per batch."""
    batches: list[list[str]] = []
    size = 0
    for name, layer in layers.items():
        numel = layer.weight.numel()
        if batches and layers[batches[-1][0]].in_features == layer.in_features and size + numel <= max_weights:
            batches[-1].append(name)
            size += numel
        else:
            batches.append([name])
            size = numel
    return batches


def quantize_model(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    options: QuantizeOptions,
    layers: Mapping[str, nn.Linear] | None = None,
    progress: bool = True,
) -> QuantizeResult:
    """Quantizes every layer in ``layers`` (default: the decoder's linears); the model is not modified.

    Consecutive layers with equal in_features (e.g. a block's q/k/v/o/gate/up) are clustered in one
    k-means call of up to ``BATCH_WEIGHTS`` weights. On CPU, ``options.workers`` such batches run in
    parallel threads with one torch thread each (torch ops release the GIL): k-means is many small ops,
    which scale better across layers than across intra-op threads, whose synchronization costs most of
    the gain on such ops, and far more on a busy machine.

    Raises:
        UserError: invalid options, squeezellm without Fisher information, or a layer missing from it.
    """
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

    def run(names: list[str]) -> tuple[list[tuple[str, PackedLinear]], dict[str, float]]:
        items = [(name, layers[name].weight, fisher.get(name) if fisher is not None else None, layers[name].bias) for name in names]
        return _quantize_batch(items, options)

    start = time.perf_counter()
    threads = torch.get_num_threads()
    bar = Progress(len(layers), f"{options.method} {options.bits}-bit", "layers", enabled=progress)
    try:
        if workers > 1:
            torch.set_num_threads(1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for results, spent in pool.map(run, _batches(layers, BATCH_WEIGHTS)):
                for name, layer in results:
                    packed[name] = layer
                for phase, seconds in spent.items():
                    timings[phase] += seconds
                bar.update(len(results))
    finally:
        bar.close()
        torch.set_num_threads(threads)
    timings["quantize_wall"] = time.perf_counter() - start
    logger.info("quantized %d layers in %.1fs (%s)", len(packed), timings["quantize_wall"], ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return QuantizeResult(packed=packed, timings=timings)
