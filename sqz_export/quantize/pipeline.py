"""Quantize a model's linear layers into packed ``PackedLinear`` layers, one method at a time.

Every method writes the same format (a per-row fp16 LUT, packed indices, a CSR residual):

* ``squeezellm`` (the paper): dense/sparse split (magnitude outliers + Fisher-sensitive values, per
  matrix) -> Fisher-weighted k-means LUT per row -> nearest indices.
* ``lnq`` (default): the same start, then GuidedQuant's LNQ rounds (lnq.py) on the gradient-weighted
  Hessians, then the sparse positions of the whole model re-chosen by the exact objective decrease they
  buy, and one more round on those positions.
* ``gptq``: RTN's uniform grid per row with GPTQ's error feedback (gptq.py); ``rtn``: the grid alone.

One layer at a time (``quantize_weight``), or the model's layers in batches of equal in_features run in
parallel on CPU (``quantize_model``). The model is never modified: the result is a dict of packed
layers that ``runtime.replace_linears`` or ``checkpoint.save_checkpoint`` consume.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from sqz_export.defaults import DEFAULT_HESSIAN_GROUPS, DEFAULT_LNQ_ITERATIONS, DEFAULT_METHOD, METHODS, default_hessian_damp
from sqz_export.errors import UserError
from sqz_export.formats import DEFAULT_CHUNK_NNZ, SUPPORTED_BITS, PackedLinear, pack_indices
from sqz_export.progress import Progress
from sqz_export.quantize.calibration import CalibrationStats, StatisticsRequest, row_groups
from sqz_export.quantize.distributed import SINGLE, Group
from sqz_export.quantize.gptq import GPTQ_ACT_ORDER, GPTQ_BLOCK, GPTQ_DAMP, gptq_quantize
from sqz_export.quantize.kmeans import DEFAULT_MAX_ITER, DEFAULT_N_INIT, assign_indices, weighted_kmeans
from sqz_export.quantize.lnq import RowStack, damp_hessians, exactness_gain, load_native_loops, refine
from sqz_export.quantize.rtn import rtn_codebook
from sqz_export.quantize.sparse import build_sparse_part, select_sparse

logger = logging.getLogger(__name__)

SPARSE_SELECTIONS = ("objective", "paper")
"""objective: global ranking by the exact decrease of the LNQ objective (lnq only); paper: per matrix,
magnitude outliers + most Fisher-sensitive values (magnitude only without Fisher: gptq, rtn)."""
MAX_SPARSITY = 0.2
"""Upper bound (exclusive) on the exact fraction: beyond it a sparse part stops paying for itself."""
MAX_CPU_WORKERS = 4
"""Batches quantized at once on CPU; each holds a few fp64 copies of its matrices, so memory caps this."""
BATCH_WEIGHTS = 1 << 22
"""Weights per start batch when stacking layers (4M: a SmolLM2 block's q..up), and per group of rows
that share one draw of k-means' random starts."""
KMEANS_CHUNK_WEIGHTS = 1 << 20
"""Weights k-means clusters at once: its working state is about ten fp64/int64 copies of its rows, so a
chunk bounds it by the chunk instead of the layer (LLaMA-7B's MLP layers have 45M weights)."""
PHASES = ("sparse_split", "kmeans", "gptq", "lnq", "sparse_select", "pack")


@dataclasses.dataclass
class QuantizeOptions:
    """Settings of one quantization run (recorded in the checkpoint's quantization_config)."""

    method: str = DEFAULT_METHOD
    bits: int = 3
    sparsity: float = 0.0045
    """Fraction of the weights kept exact (0 = dense only): per matrix with the paper's selection, over
    the whole model with the objective's."""
    sensitive_fraction: float = 0.0005
    """Part of ``sparsity`` chosen by Fisher sensitivity; the rest (sparsity - this) are magnitude outliers.
    With lnq's objective selection this only shapes the SqueezeLLM start."""
    kmeans_max_iter: int = DEFAULT_MAX_ITER
    kmeans_n_init: int = DEFAULT_N_INIT
    seed: int = 0
    chunk_nnz: int = DEFAULT_CHUNK_NNZ
    device: str = "cpu"
    workers: int | None = None
    """Layers quantized in parallel; None = min(torch threads, 4) on CPU, 1 on an accelerator."""
    hessian_groups: int = DEFAULT_HESSIAN_GROUPS
    """lnq: groups of output rows sharing one gradient-weighted Hessian (GuidedQuant's g)."""
    lnq_iterations: int = DEFAULT_LNQ_ITERATIONS
    """lnq: rounds of (LUT refit, index coordinate descent) from the SqueezeLLM start."""
    hessian_damp: float | None = None
    """lnq: the objective uses H + hessian_damp * diag(H) (lnq.damp_hessians); None = the default for
    ``bits`` (defaults.default_hessian_damp)."""
    sparse_selection: str | None = None
    """How exact positions are chosen; None = the method's own: objective for lnq, paper otherwise."""

    @property
    def damp(self) -> float:
        """The Hessian damping lnq uses: the explicit one, else the measured default for these bits."""
        return default_hessian_damp(self.bits) if self.hessian_damp is None else self.hessian_damp

    @property
    def selection(self) -> str:
        return self.sparse_selection or ("objective" if self.method == "lnq" else "paper")

    def statistics(self) -> StatisticsRequest | None:
        """The calibration statistics this method needs (None: no calibration)."""
        if self.method == "rtn":
            return None
        if self.method == "gptq":
            return StatisticsRequest(fisher=False, xtx=True)
        return StatisticsRequest(fisher=True, guided_groups=self.hessian_groups if self.method == "lnq" else 0)

    def settings(self) -> dict[str, object]:
        """The method-specific settings a checkpoint records (with method, bits and sparsity)."""
        settings: dict[str, object] = {"sparse_selection": self.selection if self.sparsity > 0 else None}
        if self.method in ("lnq", "squeezellm"):
            settings.update(kmeans_max_iter=self.kmeans_max_iter, kmeans_n_init=self.kmeans_n_init, seed=self.seed)
        if self.method == "lnq":
            settings.update(hessian_groups=self.hessian_groups, lnq_iterations=self.lnq_iterations, hessian_damp=self.damp)
        if self.method == "gptq":
            settings.update(block=GPTQ_BLOCK, damp=GPTQ_DAMP, act_order=GPTQ_ACT_ORDER)
        return settings

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
        if self.hessian_groups < 1:
            raise UserError(f"hessian_groups={self.hessian_groups} must be at least 1")
        if self.lnq_iterations < 0:
            raise UserError(f"lnq_iterations={self.lnq_iterations} must be >= 0")
        if self.hessian_damp is not None and not (0.0 <= self.hessian_damp < float("inf")):
            raise UserError(f"hessian_damp={self.hessian_damp} must be a finite number >= 0 (e.g. 0.03)")
        if self.sparse_selection is not None and self.sparse_selection not in SPARSE_SELECTIONS:
            raise UserError(f"sparse_selection {self.sparse_selection!r} is not supported; expected one of {', '.join(SPARSE_SELECTIONS)}")
        if self.selection == "objective" and self.method != "lnq":
            raise UserError(f"sparse_selection 'objective' needs the LNQ objective (method 'lnq'), not method {self.method!r}")
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
    """Seconds per phase (``PHASES``) summed over batches, plus "quantize_wall" (wall clock of the whole
    call; smaller than the sum when batches run in parallel)."""
    objective: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """lnq: the summed objective of each refinement batch, before and after every step (non-increasing)."""


@dataclasses.dataclass
class _Matrix:
    """One layer's validated inputs on the compute device, its exact positions and its solution so far."""

    name: str
    weight: torch.Tensor  # fp32 [N, K]
    fisher: torch.Tensor | None  # fp32 [N, K]
    hessian: torch.Tensor | None  # fp32 [G, K, K]: lnq's guided Hessians, or gptq's X^T X (G = 1)
    bias: torch.Tensor | None
    mask: torch.Tensor | None  # bool [N, K], the sparse part's positions
    lut: torch.Tensor | None = None  # fp32 [N, C] of fp16 values, ascending
    indices: torch.Tensor | None = None  # uint8 [N, K] between phases (C <= 256)
    values: torch.Tensor | None = None  # fp32 [N, K], what exact positions reproduce (gptq); None = weight


def _prepare(name: str, weight: torch.Tensor, stats: CalibrationStats, bias: torch.Tensor | None, options: QuantizeOptions) -> _Matrix:
    """Validates one layer's inputs (errors name the layer) and selects its sparse positions (paper's rule)."""
    if weight.dim() != 2:
        raise UserError(f"{name}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    device = torch.device(options.device)
    w = weight.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise UserError(f"{name}: weight contains NaN or infinite values")
    # gptq chooses its exact weights by magnitude (gptq.py); rtn uses a Fisher when one is given
    fisher = stats.fisher.get(name) if options.method != "gptq" else None
    if fisher is not None and fisher.shape != w.shape:
        raise UserError(f"{name}: Fisher information has shape {tuple(fisher.shape)}, expected the weight's {tuple(w.shape)}")
    hessian = {"lnq": stats.guided, "gptq": stats.xtx}.get(options.method, {}).get(name)
    if hessian is not None and (hessian.dim() != 3 or hessian.shape[1:] != (w.shape[1], w.shape[1])):
        raise UserError(f"{name}: Hessian has shape {tuple(hessian.shape)}, expected [groups, {w.shape[1]}, {w.shape[1]}]")
    f = fisher.detach().to(device=device, dtype=torch.float32) if fisher is not None else None
    h = hessian.detach().to(device=device, dtype=torch.float32) if hessian is not None else None
    mask = select_sparse(w, f, options.sparsity, options.sensitive_fraction).mask if options.sparsity > 0 else None
    return _Matrix(name=name, weight=w, fisher=f, hessian=h, bias=bias, mask=mask)


def _rows_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked by rows; a single one as it is (no copy: LLaMA's MLP layers are batches alone)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _nearest_indices(weight: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] nearest LUT entries, KMEANS_CHUNK_WEIGHTS at a time (the search holds an fp64 copy
    and an int64 result per chunk, 16 bytes a weight: 0.7 GB at once for a LLaMA-7B MLP layer)."""
    indices = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    step = max(1, KMEANS_CHUNK_WEIGHTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        indices[start : start + step] = assign_indices(weight[start : start + step], lut[start : start + step])
    return indices


def _start(matrices: list[_Matrix], options: QuantizeOptions) -> None:
    """Per-row codebooks (k-means or RTN grid) of matrices with equal in_features, in one call, and indices.

    Rows are clustered independently, so stacking the rows of several matrices changes no result (with
    extra random starts, only which random levels a row draws). It issues fewer, larger torch ops: about
    the same speed on one thread (measured), but less Python dispatch under the GIL that the parallel
    workers share. Indices are the nearest entries of the fp16 codebook actually stored; gptq then
    replaces them by its error-feedback sweep.
    """
    w = _rows_of([m.weight for m in matrices])
    mask = None if matrices[0].mask is None else _rows_of([m.mask for m in matrices])
    if options.method in ("rtn", "gptq"):
        centroids = rtn_codebook(w, options.bits, mask)
    else:
        f = _rows_of([m.fisher for m in matrices])
        # k-means holds about ten fp64/int64 copies of its rows, so rows are clustered KMEANS_CHUNK_WEIGHTS
        # at a time. Random starts are drawn per batch-sized group of rows (a layer larger than a batch,
        # LLaMA's MLP, has several), and each chunk gets its rows' draws: chunking changes no result.
        group_rows = max(1, BATCH_WEIGHTS // w.shape[1])
        chunk_rows = max(1, KMEANS_CHUNK_WEIGHTS // w.shape[1])
        parts, sanitized = [], 0
        for group in range(0, w.shape[0], group_rows):
            group_end = min(w.shape[0], group + group_rows)
            for start in range(group, group_end, chunk_rows):
                end = min(group_end, start + chunk_rows)
                result = weighted_kmeans(
                    w[start:end], f[start:end], options.bits, exclude=None if mask is None else mask[start:end],
                    max_iter=options.kmeans_max_iter, n_init=options.kmeans_n_init, seed=options.seed,
                    random_window=(start - group, group_end - group),
                )
                parts.append(result.centroids)
                sanitized += result.sanitized
        if sanitized:
            names = ", ".join(m.name for m in matrices)
            logger.warning("%s: %d Fisher values were negative, NaN or infinite and were treated as 0", names, sanitized)
        centroids = torch.cat(parts)
    for matrix, lut in zip(matrices, torch.split(centroids, [m.weight.shape[0] for m in matrices])):
        lut = lut.to(torch.float16)  # rounding is monotone: rows stay ascending
        if not bool(torch.isfinite(lut).all()):
            raise UserError(f"{matrix.name}: a codebook value does not fit in fp16 (|w| > 65504)")
        matrix.lut = lut.to(torch.float32)
        if options.method == "gptq":
            indices, matrix.values = gptq_quantize(matrix.weight, matrix.lut, matrix.hessian[0], matrix.mask)
            matrix.indices = indices.to(torch.uint8)
        else:
            matrix.indices = _nearest_indices(matrix.weight, matrix.lut)


def _stack(matrices: list[_Matrix], damp: float) -> tuple[RowStack, torch.Tensor, torch.Tensor]:
    """The rows of matrices with equal in_features as one LNQ problem (Hessians damped by ``damp``,
    so the refinement and the exactness gains minimize the same objective), with LUTs and indices."""
    segments: list[tuple[int, int]] = []
    offset = 0
    for m in matrices:
        segments += [(offset + start, offset + end) for start, end in row_groups(m.weight.shape[0], m.hessian.shape[0])]
        offset += m.weight.shape[0]
    masks = [m.mask if m.mask is not None else torch.zeros_like(m.weight, dtype=torch.bool) for m in matrices]
    stack = RowStack(
        weight=torch.cat([m.weight for m in matrices]),
        exact=torch.cat(masks) if any(m.mask is not None for m in matrices) else None,
        hessians=damp_hessians(torch.cat([m.hessian for m in matrices]), damp),
        segments=segments,
    )
    return stack, torch.cat([m.lut for m in matrices]), torch.cat([m.indices for m in matrices]).to(torch.int64)


def _refine(matrices: list[_Matrix], iterations: int, damp: float) -> tuple[list[float], RowStack, torch.Tensor, torch.Tensor]:
    """LNQ rounds on the stacked rows; stores each matrix's new LUT and indices.

    Returns:
        (objective history, the stack with its refined LUTs and indices), so gains are scored on it
        without stacking the batch again.
    """
    stack, lut, indices = _stack(matrices, damp)
    lut, indices, history = refine(stack, lut, indices, iterations)
    sizes = [m.weight.shape[0] for m in matrices]
    for m, part_lut, part_indices in zip(matrices, torch.split(lut, sizes), torch.split(indices, sizes)):
        m.lut, m.indices = part_lut.contiguous(), part_indices.to(torch.uint8)
    return history, stack, lut, indices


def _top_gains(
    matrices: list[_Matrix], stack: RowStack, lut: torch.Tensor, indices: torch.Tensor, budget: int
) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The ``budget`` largest exactness gains of a batch: (values [<=budget], per matrix its flat positions)."""
    gains = exactness_gain(stack, lut, indices).reshape(-1)
    values, flat = torch.topk(gains, min(budget, gains.numel()), sorted=False)
    flat, order = torch.sort(flat)  # matrix by matrix, so each matrix's values are one contiguous run
    return values[order], _split_positions(matrices, flat)


def _split_positions(matrices: list[_Matrix], flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Sorted flat positions in a stack of ``matrices`` -> (name, its positions within that matrix) per matrix."""
    out = []
    offset = 0
    for m in matrices:
        size = m.weight.numel()
        inside = (flat >= offset) & (flat < offset + size)
        out.append((m.name, flat[inside] - offset))
        offset += size
    return out


def _pack(matrix: _Matrix, options: QuantizeOptions) -> PackedLinear:
    """fp16 LUT, packed indices, sparse residuals (exact positions reproduce ``values``), validated."""
    lut = matrix.lut.to(torch.float16)
    sparse = None
    if matrix.mask is not None:
        target = matrix.values if matrix.values is not None else matrix.weight
        sparse = build_sparse_part(target, matrix.lut, matrix.indices, matrix.mask, options.chunk_nnz)
    packed = PackedLinear(
        bits=options.bits,
        in_features=matrix.weight.shape[1],
        out_features=matrix.weight.shape[0],
        qweight=pack_indices(matrix.indices.cpu(), options.bits),
        lut=lut.cpu().contiguous(),
        sparse=sparse,
        bias=matrix.bias.detach().to(device="cpu", dtype=torch.float16).clone() if matrix.bias is not None else None,
    )
    packed.validate(matrix.name)
    return packed


def _batches(shapes: Mapping[str, tuple[int, int]], max_weights: int, by_width: bool = False) -> list[list[str]]:
    """Layer names with equal in_features, up to ``max_weights`` weights per batch.

    Consecutive layers only (the k-means start: a block's q/k/v/o/gate/up), or, ``by_width``, all layers
    of a width in model order (LNQ, whose column loop then serves every down_proj of several blocks).
    """
    names = list(shapes)
    if by_width:
        names.sort(key=lambda name: shapes[name][1])  # stable: model order within a width
    batches: list[list[str]] = []
    size = 0
    for name in names:
        n, k = shapes[name]
        if batches and shapes[batches[-1][0]][1] == k and size + n * k <= max_weights:
            batches[-1].append(name)
            size += n * k
        else:
            batches.append([name])
            size = n * k
    return batches


def as_statistics(statistics: CalibrationStats | Mapping[str, torch.Tensor] | None) -> CalibrationStats:
    """Calibration statistics; a plain mapping is SqueezeLLM's Fisher alone (the API before LNQ)."""
    if statistics is None:
        return CalibrationStats()
    if isinstance(statistics, CalibrationStats):
        return statistics
    return CalibrationStats(fisher=dict(statistics))


def _check_statistics(names: list[str], stats: CalibrationStats, options: QuantizeOptions) -> None:
    request = options.statistics()
    if request is None:
        return
    labels = {"fisher": "Fisher information", "guided": "gradient-weighted Hessians", "xtx": "input Hessians (X^T X)"}
    for statistic in request.names():
        available = stats.get(statistic)
        missing = [name for name in names if name not in available]
        if len(missing) == len(names):
            raise UserError(f"method {options.method!r} needs {labels[statistic]} from calibration data; pass them, or use method 'rtn'")
        if missing:
            raise UserError(f"{labels[statistic]} lack {len(missing)} layer(s), first {missing[0]!r}; recompute them for this model")


REFINE_BATCH_WEIGHTS = 1 << 20
"""Weights per LNQ refinement job. Rows refine independently, so a start batch is split into jobs of
about this size (whole layers): a block's jobs then weigh about the same, which keeps workers and
ranks evenly busy (a SmolLM2 block: [q, k, v, o], gate, up, down, 0.9M weights each)."""
FINAL_SUFFIX = " (final positions)"
MAX_PENDING_BLOCKS = 1
"""Blocks whose quantization may run behind the calibration pass with ``overlap`` (each holds its weights
and statistics): one keeps both going (the pass computes block i-1 while block i is quantized) with two
blocks in memory."""


class _WeightBudget:
    """Jobs hold weights while they run (several fp64/int64 working copies each): jobs start only while the
    weights in flight stay within ``limit``, so a layer larger than a batch (LLaMA's MLP: 11-45M weights)
    runs alone instead of beside another, and memory follows the batch size, not the worker count."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def hold(self, weights: int) -> Iterator[None]:
        weights = min(weights, self.limit)
        with self._free:
            self._free.wait_for(lambda: self.used + weights <= self.limit)
            self.used += weights
        try:
            yield
        finally:
            with self._free:
                self.used -= weights
                self._free.notify_all()


class ModelQuantizer:
    """Quantizes a model block by block, as each block's statistics become final.

    Every method runs per start batch (layers of one block with equal in_features): the paper's split
    and k-means (or RTN/GPTQ), then, for lnq, the LNQ rounds on jobs of about
    :data:`REFINE_BATCH_WEIGHTS`, and the candidates for the model-wide sparse choice. Jobs run in a
    thread pool; with ``overlap`` behind the caller (the calibration pass goes on with the next block
    meanwhile, at most :data:`MAX_PENDING_BLOCKS` blocks behind), else :meth:`add` returns once the
    block is quantized, so one block's weights and statistics are in memory instead of two. With
    lnq's objective-chosen sparse part, a block's refined matrices wait in ``store`` until
    :meth:`finish` knows the whole model's exact positions, then get one more round on them and are
    packed.

    Batches run in ``options.workers`` threads with one torch thread each (torch ops release the GIL):
    k-means and the LNQ column loop are many small ops, which scale better across layers than across
    intra-op threads. With several ranks, each block's start batches are dealt to the ranks with the
    least work so far (the same choice on every rank), and rank 0 receives the packed layers.
    """

    def __init__(
        self,
        options: QuantizeOptions,
        total_weights: int,
        total_blocks: int,
        store: LayerStore,
        *,
        group: Group = SINGLE,
        progress: bool = True,
        overlap: bool = True,
    ) -> None:
        options.validate()
        self.options, self.store, self.group = options, store, group
        self._behind = MAX_PENDING_BLOCKS if overlap else 0
        device = torch.device(options.device)
        self.workers = options.workers or (1 if device.type != "cpu" else min(torch.get_num_threads(), MAX_CPU_WORKERS))
        self.timings = dict.fromkeys(PHASES, 0.0)
        self.objective: dict[str, list[float]] = {}
        self.lnq = options.method == "lnq"
        self.global_sparse = self.lnq and options.selection == "objective" and options.sparsity > 0
        self.budget = round(options.sparsity * total_weights)
        self.selected = _GlobalTopK(self.budget)
        self.finished: set[str] = set()
        """Blocks packed by an earlier, interrupted run (their final round is not repeated)."""
        self._load = [0] * group.world
        if options.method in ("lnq", "gptq") and device.type == "cpu":
            load_native_loops()  # once, here: workers loading it on first use would race
        # One torch thread per worker (torch's thread count is per thread): the caller's calibration pass
        # keeps its own intra-op threads while the workers run behind it.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.workers, initializer=torch.set_num_threads if self.workers > 1 else None, initargs=(1,) if self.workers > 1 else ()
        )
        self._budget = _WeightBudget(2 * BATCH_WEIGHTS)
        self._pending: list[tuple[str, list[concurrent.futures.Future]]] = []
        self._started = time.perf_counter()
        desc = f"{options.method} {options.bits}-bit" + (" (each block refined, then finished on the final positions)" if self.global_sparse else "")
        self._bar = Progress(total_blocks * (2 if self.global_sparse else 1), desc, "block passes", enabled=progress)

    def add(self, block: str, items: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]], statistics: CalibrationStats) -> None:
        """Queues one block's layers ((weight, bias) by module name, snapshotted now: the caller may unload them)."""
        _check_statistics(list(items), statistics, self.options)
        items = {name: (weight.detach(), bias.detach() if bias is not None else None) for name, (weight, bias) in items.items()}
        shapes = {name: tuple(weight.shape) if weight.dim() == 2 else (0, 0) for name, (weight, _) in items.items()}
        self._drain(max(0, self._behind - 1))  # before queueing: at most self._behind behind, this one included
        futures = []
        for names in _batches(shapes, BATCH_WEIGHTS):
            rank = min(range(self.group.world), key=lambda r: (self._load[r], r))
            self._load[rank] += sum(shapes[name][0] * shapes[name][1] for name in names)
            if rank == self.group.rank:
                batch = {name: items[name] for name in names}
                futures.append(self._submit(sum(weight.numel() for weight, _ in batch.values()), self._solve, batch, _subset_of(statistics, names)))
        self._pending.append((block, futures))
        self._drain(self._behind)

    def __enter__(self) -> ModelQuantizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stops the workers; after a failure or Ctrl-C, blocks not yet collected are dropped, never stored
        half done (a resumed run computes them again)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._bar.close()

    def finish(self) -> dict[str, float]:
        """Waits for every block; with the model-wide sparse choice, re-runs each refined block on its final
        positions and packs it. Returns seconds per phase plus "quantize_wall". Use the quantizer as a
        context manager around add() and finish(), so its workers stop however the run ends."""
        self._drain(0)
        if self.global_sparse:
            gathered = self.group.gather(self.selected.candidates())
            if self.group.leader:
                merged = _GlobalTopK(self.budget)
                for values, positions in gathered:
                    merged.add(values, positions)
                selection = merged.selection()
            else:
                selection = None
            selection = self.group.broadcast(selection)
            logger.info("sparse part: %d exact weights chosen by objective gain, %d layers hold some", sum(len(v) for v in selection.values()), len(selection))
            for key in self.store.refined_keys():
                if key in self.finished:
                    continue
                # Calibration is over, so its memory is free: one block may wait while another finishes.
                self._drain(MAX_PENDING_BLOCKS)
                matrices = self.store.take_refined(key)
                by_name = {m.name: m for m in matrices}
                jobs = [[by_name[name] for name in names] for names in _batches({m.name: tuple(m.weight.shape) for m in matrices}, REFINE_BATCH_WEIGHTS)]
                futures = [self._submit(sum(m.weight.numel() for m in job), self._finalize, job, selection) for job in jobs]
                self._pending.append((key + FINAL_SUFFIX, futures))
            self._drain(0)
        timings = {key: value for key, value in self.timings.items() if value > 0 or key in ("sparse_split", "pack")}
        timings["quantize_wall"] = time.perf_counter() - self._started
        logger.info("quantized in %.1fs (%s)", timings["quantize_wall"], ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        return timings

    def _drain(self, keep: int) -> None:
        """Collects finished blocks, oldest first, until at most ``keep`` are pending (deterministic order)."""
        while len(self._pending) > keep:
            block, futures = self._pending.pop(0)
            results = [future.result() for future in futures]
            packed: dict[str, PackedLinear] = {}
            refined: list[_Matrix] = []
            values: list[torch.Tensor] = []
            positions: list[tuple[str, torch.Tensor]] = []
            for result in results:
                for phase, seconds in result.spent.items():
                    self.timings[phase] += seconds
                self.objective.update(result.objective)
                packed.update(result.packed)
                refined += result.refined
                if result.candidates is not None:
                    self.selected.add(*result.candidates)
                    values.append(result.candidates[0])
                    positions += result.candidates[1]
            if self.global_sparse and not block.endswith(FINAL_SUFFIX):
                # every rank, even without matrices: the same keys everywhere; the candidates let a resumed run re-merge
                candidates = (torch.cat(values), positions) if values else None
                self.store.put_refined(block, refined, candidates)
            parts = self.group.gather(packed)
            merged = {name: layer for part in parts or [] for name, layer in part.items()}
            if merged:  # a stored block counts as finished: never store one that waits for its final round
                self.store.put_packed(block.removesuffix(FINAL_SUFFIX), merged)
            self._bar.update()

    def _submit(self, weights: int, job: Callable[..., _BatchResult], *args: object) -> concurrent.futures.Future:
        """Queues ``job`` in the pool; it starts once its ``weights`` fit the budget (:class:`_WeightBudget`)."""

        def held() -> _BatchResult:
            with self._budget.hold(weights):
                return job(*args)

        return self._pool.submit(held)

    def _solve(self, items: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]], statistics: CalibrationStats) -> _BatchResult:
        """One start batch: split, start (k-means/RTN/GPTQ), and for lnq the refinement jobs and sparse candidates."""
        options, result = self.options, _BatchResult()
        clock = time.perf_counter()
        batch = [_prepare(name, weight, statistics, bias, options) for name, (weight, bias) in items.items()]
        clock = result.timed("sparse_split", clock)
        _start(batch, options)
        clock = result.timed("gptq" if options.method == "gptq" else "kmeans", clock)
        if self.lnq:
            shapes = {m.name: tuple(m.weight.shape) for m in batch}
            by_name = {m.name: m for m in batch}
            candidates: list[tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]] = []
            for names in _batches(shapes, REFINE_BATCH_WEIGHTS):
                job = [by_name[name] for name in names]
                history, *solution = _refine(job, options.lnq_iterations, options.damp)
                result.objective[",".join(names)] = history
                clock = result.timed("lnq", clock)
                if self.global_sparse:
                    candidates.append(_top_gains(job, *solution, self.budget))
                    clock = result.timed("sparse_select", clock)
            if self.global_sparse:  # packed by _finalize, once the model's exact positions are known
                for m in batch:
                    m.fisher = None  # the start's sample weights: not needed any more
                result.refined = batch
                values = torch.cat([c[0] for c in candidates]) if candidates else torch.empty(0)
                result.candidates = (values, [position for c in candidates for position in c[1]])
                return result
        result.packed = {m.name: _pack(m, options) for m in batch}
        result.timed("pack", clock)
        return result

    def _finalize(self, matrices: list[_Matrix], selection: dict[str, torch.Tensor]) -> _BatchResult:
        """One more LNQ round of one refine batch on the model-wide exact positions, then pack."""
        result = _BatchResult()
        clock = time.perf_counter()
        for m in matrices:
            flat = selection.get(m.name)
            m.mask = None
            if flat is not None and flat.numel():
                mask = torch.zeros(m.weight.numel(), dtype=torch.bool, device=m.weight.device)
                mask[flat.to(mask.device)] = True
                m.mask = mask.view_as(m.weight)
        result.objective[",".join(m.name for m in matrices) + FINAL_SUFFIX] = _refine(matrices, 1, self.options.damp)[0]
        clock = result.timed("lnq", clock)
        result.packed = {m.name: _pack(m, self.options) for m in matrices}
        result.timed("pack", clock)
        return result


@dataclasses.dataclass
class _BatchResult:
    """What one job hands back to the collecting thread."""

    packed: dict[str, PackedLinear] = dataclasses.field(default_factory=dict)
    refined: list[_Matrix] = dataclasses.field(default_factory=list)
    candidates: tuple[torch.Tensor, list[tuple[str, torch.Tensor]]] | None = None
    objective: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    spent: dict[str, float] = dataclasses.field(default_factory=dict)

    def timed(self, phase: str, started: float) -> float:
        now = time.perf_counter()
        self.spent[phase] = self.spent.get(phase, 0.0) + now - started
        return now


class LayerStore:
    """Packed layers and refined matrices waiting for the sparse choice, in memory.

    :class:`sqz_export.quantize.rundir.RunDir` keeps them in a run folder instead (same methods), so
    memory holds none of them and an interrupted run resumes.
    """

    def __init__(self) -> None:
        self.packed: dict[str, PackedLinear] = {}
        self._refined: dict[str, list[_Matrix]] = {}

    def put_packed(self, block: str, layers: dict[str, PackedLinear]) -> None:
        self.packed.update(layers)

    def put_refined(self, key: str, matrices: list[_Matrix], candidates: object = None) -> None:
        self._refined[key] = matrices

    def refined_keys(self) -> list[str]:
        return list(self._refined)

    def take_refined(self, key: str) -> list[_Matrix]:
        return self._refined.pop(key)


def _subset_of(statistics: CalibrationStats, names: list[str]) -> CalibrationStats:
    return CalibrationStats(**{s: {n: statistics.get(s)[n] for n in names if n in statistics.get(s)} for s in ("fisher", "guided", "xtx")})


def _block_of(name: str) -> str:
    """The decoder block a layer belongs to (``model.layers.3``), or the name itself outside blocks."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return name


def _quantize(
    items: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]], statistics: CalibrationStats, options: QuantizeOptions, progress: bool
) -> QuantizeResult:
    """(weight, bias) per layer name -> packed layers, block by block, all in memory."""
    options.validate()
    _check_statistics(list(items), statistics, options)
    shapes = {name: tuple(weight.shape) if weight.dim() == 2 else (0, 0) for name, (weight, _) in items.items()}
    blocks: dict[str, list[str]] = {}
    for name in items:
        blocks.setdefault(_block_of(name), []).append(name)
    store = LayerStore()
    quantizer = ModelQuantizer(options, sum(n * k for n, k in shapes.values()), len(blocks), store, progress=progress)
    with quantizer:
        for block, names in blocks.items():
            quantizer.add(block, {name: items[name] for name in names}, _subset_of(statistics, names))
        timings = quantizer.finish()
    return QuantizeResult(packed={name: store.packed[name] for name in items}, timings=timings, objective=quantizer.objective)


class _GlobalTopK:
    """The model-wide ``budget`` largest exactness gains, merged batch by batch (memory O(budget)).

    Gains of all layers are in the same units (an estimate of the loss increase), so one ranking over
    the model gives the budget to the layers where exactness buys most. Ties at the threshold are
    broken by topk, so the count is exact.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.names: list[str] = []
        self.values = torch.empty(0)
        self.owner = torch.empty(0, dtype=torch.int64)
        self.flat = torch.empty(0, dtype=torch.int64)

    def add(self, values: torch.Tensor, positions: list[tuple[str, torch.Tensor]]) -> None:
        """Merges a batch's candidates: ``positions`` lists per matrix the flat positions of ``values``, in order."""
        owners = []
        for name, flat in positions:
            owners.append(torch.full((flat.numel(),), len(self.names), dtype=torch.int64))
            self.names.append(name)
        self.values = torch.cat([self.values, values.cpu()])
        self.owner = torch.cat([self.owner, *owners])
        self.flat = torch.cat([self.flat, *(flat.cpu() for _, flat in positions)])
        if self.values.numel() > self.budget:
            keep = torch.topk(self.values, self.budget, sorted=False).indices
            self.values, self.owner, self.flat = self.values[keep], self.owner[keep], self.flat[keep]

    def candidates(self) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        """The kept (values, per matrix its flat positions) in the form :meth:`add` takes: ranks merge theirs."""
        order = torch.sort(self.owner, stable=True).indices
        values, owner, flat = self.values[order], self.owner[order], self.flat[order]
        return values, [(self.names[o], flat[owner == o]) for o in torch.unique(owner).tolist()]

    def selection(self) -> dict[str, torch.Tensor]:
        """The chosen flat positions (int64, sorted) of each matrix that holds some."""
        chosen: dict[str, list[torch.Tensor]] = {}
        for owner, name in enumerate(self.names):
            flat = self.flat[self.owner == owner]
            if flat.numel():
                chosen.setdefault(name, []).append(flat)
        return {name: torch.sort(torch.cat(parts)).values for name, parts in chosen.items()}


def quantize_weight(
    weight: torch.Tensor,
    fisher: torch.Tensor | None,
    options: QuantizeOptions,
    *,
    hessian: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    name: str = "weight",
    timings: dict[str, float] | None = None,
) -> PackedLinear:
    """Quantizes one weight matrix [out_features, in_features] into a validated ``PackedLinear``.

    Args:
        weight: the FP weight [N, K] (not modified).
        fisher: Fisher information of the same shape (sample weights of k-means and the sensitivity
            score of the sparse split); required by squeezellm and lnq.
        options: validated here.
        hessian: lnq: the gradient-weighted Hessians [G, K, K]; gptq: X^T X as [1, K, K] or [K, K].
        bias: optional bias [N], stored as fp16.
        name: layer name used in error messages.
        timings: if given, seconds per phase are added to it.
    """
    stats = CalibrationStats(fisher={name: fisher} if fisher is not None else {})
    if hessian is not None:
        hessian = hessian if hessian.dim() == 3 else hessian[None]
        (stats.xtx if options.method == "gptq" else stats.guided)[name] = hessian
    result = _quantize({name: (weight, bias)}, stats, options, progress=False)
    if timings is not None:
        for phase, seconds in result.timings.items():
            timings[phase] = timings.get(phase, 0.0) + seconds
    return result.packed[name]


def quantize_model(
    model: nn.Module,
    statistics: CalibrationStats | Mapping[str, torch.Tensor] | None,
    options: QuantizeOptions,
    layers: Mapping[str, nn.Linear] | None = None,
    progress: bool = True,
) -> QuantizeResult:
    """Quantizes every layer in ``layers`` (default: the decoder's linears); the model is not modified.

    Args:
        model: the FP model.
        statistics: calibration statistics (``calibration.collect_statistics`` with
            ``options.statistics()``); a plain name -> tensor mapping is the Fisher alone. None for rtn.
        options: validated here.
        layers: the linears to quantize, keyed by module name.
        progress: show progress per phase.

    Raises:
        UserError: invalid options, or a statistic the method needs is missing for some layer.
    """
    if layers is None:
        from sqz_export.models import quantizable_linears

        layers = quantizable_linears(model)
    items = {name: (layer.weight, layer.bias) for name, layer in layers.items()}
    return _quantize(items, as_statistics(statistics), options, progress)
