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

The pass streams the model (:func:`stream_statistics`): one decoder block is loaded at a time, so
memory holds one block's weights and accumulators, the inputs of every block for the calibration
windows (``StreamSettings.activation_memory`` of them in memory, the rest on disk) and one window's
activations inside the block. Inside a block, the inputs of its linears are referenced (not copied)
until their output gradient arrives, then folded into fp32 accumulators and dropped. A block's
accumulators cost ``N*K`` (Fisher) plus ``G*K*K`` (guided) floats per linear: for a LLaMA-7B block
(K = 4096, 11008 for down_proj) 0.8 GB of Fisher and 0.9 GB per group of guided Hessians; the whole
model's would be 27 GB and 28 GB per group, which is why the quantizer consumes each block's
statistics as soon as they are final.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sqz_export.atomic import open_for_write
from sqz_export.caches import reusable_cache
from sqz_export.errors import UserError
from sqz_export.progress import Progress
from sqz_export.quantize.distributed import SINGLE, Group
from sqz_export.tensorfile import write_safetensors
from sqz_export.weights import COMPUTE_DTYPE, BlockedModel, blocked_from_model

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


class _StopForward(Exception):
    """Raised by :class:`_Capture` once the first block's inputs are recorded: nothing after it runs."""


class _Capture(nn.Module):
    """Stands in for the first decoder block: records what the model passes it, then stops the forward.

    What a block receives besides the hidden state (rotary tables, masks, positions) differs between
    architectures and transformers versions; recording the real call keeps the streamed recompute
    exactly the model's own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def forward(self, hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls.append((hidden, args, kwargs))
        raise _StopForward


class _Inject(nn.Module):
    """Stands in for the decoder blocks in the head pass: the first returns a given last hidden state
    (in the block's output format), the others pass it through, so the model's own head and loss run."""

    def __init__(self, first: bool, box: dict[str, torch.Tensor], returns_tuple: bool) -> None:
        super().__init__()
        self.first, self.box, self.returns_tuple = first, box, returns_tuple

    def forward(self, hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor | tuple[torch.Tensor]:
        out = self.box["hidden"] if self.first else hidden
        return (out,) if self.returns_tuple else out


class _ZeroEmbedding(nn.Module):
    """Stands in for the input embedding in the head pass (its output is replaced anyway), so the
    embedding matrix need not be loaded twice."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.width, dtype=torch.float32, device=ids.device)


@contextlib.contextmanager
def _replaced(parent: nn.Module, name: str, stand_in: nn.Module) -> Iterator[None]:
    original = getattr(parent, name)
    setattr(parent, name, stand_in)
    try:
        yield
    finally:
        setattr(parent, name, original)


@contextlib.contextmanager
def _blocks_replaced(blocks: nn.ModuleList, stand_ins: list[nn.Module]) -> Iterator[None]:
    originals = list(blocks)
    for index, stand_in in enumerate(stand_ins):
        blocks[index] = stand_in
    try:
        yield
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block


class ActivationStore:
    """Each block's input hidden state per calibration window: in memory up to a budget, then on disk.

    The backward walk needs every block's inputs, so they are kept from the forward walk: L x windows x
    seq_len x hidden fp32 values (SmolLM2 with 32 x 512 windows: 1.1 GB; LLaMA-7B: 8.6 GB). Past
    ``budget`` bytes they go to raw files in ``folder`` and are read back once, in reverse order.
    """

    def __init__(self, budget: int, folder: Path | None) -> None:
        self.budget, self.folder = budget, folder
        self.in_memory = 0
        self.spilled = 0
        self._tensors: dict[tuple[int, int], torch.Tensor] = {}
        self._files: dict[tuple[int, int], tuple[Path, torch.Size]] = {}

    def put(self, block: int, window: int, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.folder is None or self.in_memory + size <= self.budget:
            self._tensors[block, window] = tensor.detach()
            self.in_memory += size
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"block{block}-window{window}.f32"
        tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tofile(path)
        self._files[block, window] = (path, tensor.shape)
        self.spilled += size

    def pop(self, block: int, window: int, device: torch.device) -> torch.Tensor:
        if (block, window) in self._tensors:
            tensor = self._tensors.pop((block, window))
            self.in_memory -= tensor.numel() * tensor.element_size()
            return tensor
        import numpy as np

        path, shape = self._files.pop((block, window))
        tensor = torch.from_numpy(np.fromfile(path, dtype=np.float32)).reshape(shape).to(device)
        path.unlink()
        return tensor

    def clear(self) -> None:
        self._tensors.clear()
        for path, _ in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()
        self.in_memory = 0


@dataclasses.dataclass
class StreamSettings:
    """How the streamed pass runs (none of it changes the statistics beyond fp32 summation order)."""

    autocast_dtype: torch.dtype | None = torch.bfloat16
    """Forward/backward under autocast in this dtype (bf16 halves the time on CPUs with bf16 matmuls);
    None runs in fp32. Accumulation is always fp32."""
    activation_memory: int = 1 << 30
    """Bytes of block inputs kept in memory before the rest go to ``spill_folder``."""
    spill_folder: Path | None = None
    """Where block inputs past ``activation_memory`` go (None: all stay in memory)."""
    progress: bool = True
    group: Group = SINGLE
    """The ranks sharing the windows (their statistics are summed block by block)."""


def _new_accumulators(linears: Mapping[str, nn.Linear], request: StatisticsRequest) -> CalibrationStats:
    stats = CalibrationStats()
    for name, layer in linears.items():
        n, k = layer.weight.shape
        device = layer.weight.device
        if request.fisher:
            stats.fisher[name] = torch.zeros(n, k, dtype=torch.float32, device=device)
        if request.guided_groups:
            stats.guided[name] = torch.zeros(len(row_groups(n, request.guided_groups)), k, k, dtype=torch.float32, device=device)
        if request.xtx:
            stats.xtx[name] = torch.zeros(1, k, k, dtype=torch.float32, device=device)
    return stats


@contextlib.contextmanager
def _accumulating(linears: Mapping[str, nn.Linear], request: StatisticsRequest, stats: CalibrationStats) -> Iterator[None]:
    """Hooks that fold every forward/backward of ``linears`` into ``stats``; weights require grad meanwhile.

    The inputs of a window's linears are referenced (not copied: q/k/v share one tensor) until their
    output gradient arrives, then folded into the fp32 accumulators and dropped; each weight gradient is
    squared into the Fisher by a post-accumulate hook and freed at once.
    """
    by_param = {id(linears[name].weight): tensor for name, tensor in stats.fisher.items()}

    def accumulate_fisher(param: torch.Tensor) -> None:
        grad = param.grad.float()
        by_param[id(param)].addcmul_(grad, grad)
        param.grad = None  # at most one layer's gradient is alive at a time

    def input_hook(name: str):  # noqa: ANN202 - a forward hook factory
        groups = row_groups(linears[name].out_features, request.guided_groups) if request.guided_groups else []

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

    handles = []
    try:
        for name, layer in linears.items():
            layer.weight.requires_grad_(request.fisher or request.guided_groups > 0)
            if request.fisher:
                handles.append(layer.weight.register_post_accumulate_grad_hook(accumulate_fisher))
            if request.guided_groups or request.xtx:
                handles.append(layer.register_forward_hook(input_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in linears.values():
            layer.weight.requires_grad_(False)
            layer.weight.grad = None


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def stream_statistics(
    blocked: BlockedModel,
    windows: torch.Tensor,
    request: StatisticsRequest,
    settings: StreamSettings = StreamSettings(),
    *,
    skip: Callable[[int], bool] = lambda index: False,
) -> Iterator[tuple[int, CalibrationStats]]:
    """The requested statistics of every decoder block's linears, one block at a time, with one block loaded.

    The gradients are those of the whole model's loss (the mean next-token loss of each window), computed
    the way llm-compressor's sequential pipeline onloads a model: a forward walk loads block after block,
    runs every window through it and keeps each block's inputs (:class:`ActivationStore`); the head
    computes each window's loss and its gradient at the last hidden state; the backward walk loads the
    blocks in reverse, recomputes each one's forward from its kept inputs, backpropagates the gradient
    arriving from above, and accumulates the block's statistics, which are then final. X^T X alone needs
    no gradients: the forward walk collects it and blocks are final in forward order.

    Yields:
        (block index, the block's statistics), while the block is still loaded (its linears' weights are
        real), so a caller can quantize it before the next one is loaded. The order is the backward
        walk's (last block first) when gradients are needed, else the forward walk's.

    Args:
        blocked: the model (streamed from disk or resident).
        windows: int64 token ids [num_windows, seq_len]; with several ranks each takes its share.
        request: which statistics.
        settings: precision, activation memory, progress, ranks.
        skip: blocks whose statistics are not needed (a resumed run's finished blocks); they are still
            walked (their activations are needed), but nothing is accumulated or yielded for them.

    The model's parameters, requires_grad flags and train/eval mode are restored afterwards.
    """
    request.validate()
    if windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
        raise UserError(f"calibration windows must be integer token ids [num_windows, seq_len], got {windows.dtype} {tuple(windows.shape)}")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise UserError(f"calibration needs at least one window of 2+ tokens, got shape {tuple(windows.shape)}")
    model, blocks, device, group = blocked.model, blocked.blocks, blocked.device, settings.group
    mine = list(group.windows(windows.shape[0]))
    backward = request.fisher or request.guided_groups > 0
    autocast = (
        torch.autocast(device_type=device.type, dtype=settings.autocast_dtype) if settings.autocast_dtype is not None else contextlib.nullcontext()
    )
    store = ActivationStore(settings.activation_memory, settings.spill_folder)
    was_training = model.training
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    outside = _modules_outside(blocked)
    try:
        model.eval()  # no dropout: the statistics of the deployed (eval) model
        for p in model.parameters():
            p.requires_grad_(False)
        # Inputs of block 0: the model's own embedding and position code, stopped at the first block.
        embedding = model.get_input_embeddings()
        head_only = [m for m in outside if m is not embedding]
        for module in [m for m in outside if m is not model.get_output_embeddings()]:  # the head waits for the loss step
            blocked.load(module)
        capture = _Capture()
        hidden: dict[int, torch.Tensor] = {}
        calls: dict[int, tuple[tuple, dict]] = {}
        with _blocks_replaced(blocks, [capture]), torch.no_grad(), autocast:
            for window in mine:
                ids = windows[window : window + 1].to(device=device, dtype=torch.int64)
                with contextlib.suppress(_StopForward):
                    model(input_ids=ids, use_cache=False)
                hidden[window], args, kwargs = capture.calls.pop()
                calls[window] = (args, kwargs)
        if not blocked.resident:
            blocked.unload(embedding)
        returns_tuple = False
        total = len(blocks) * (2 if backward else 1)
        with Progress(total, "calibration", "block passes", enabled=settings.progress) as bar:
            for index in range(len(blocks)):
                block = blocked.load_block(index)
                stats = _new_accumulators(blocked.block_linears(index), request) if not backward and not skip(index) else None
                with _accumulating(blocked.block_linears(index), request, stats) if stats is not None else contextlib.nullcontext():
                    with torch.no_grad(), autocast:
                        for window in mine:
                            if backward:
                                store.put(index, window, hidden[window])
                            out = block(hidden[window], *calls[window][0], **calls[window][1])
                            returns_tuple = isinstance(out, tuple)
                            hidden[window] = _first(out)
                bar.update()
                if stats is not None:
                    group.sum_(_tensors_of(stats))
                    yield index, stats
                blocked.unload_block(index)
            if not backward:
                return
            # The loss of each window and its gradient at the last hidden state, by the model's own head.
            # Under autocast the output embedding is read in the autocast dtype: autocast would cast an
            # fp32 copy to exactly that before every product, so the results are the same, and the
            # largest matrix of most models (vocabulary x hidden) takes half the memory and no cast copy.
            head = model.get_output_embeddings()
            for module in head_only:
                blocked.load(module, settings.autocast_dtype if module is head and settings.autocast_dtype is not None else COMPUTE_DTYPE)
            box: dict[str, torch.Tensor] = {}
            stand_ins = [_Inject(i == 0, box, returns_tuple) for i in range(len(blocks))]
            parent, attribute = _parent_of(model, embedding)
            grads: dict[int, torch.Tensor] = {}
            with _blocks_replaced(blocks, stand_ins), _replaced(parent, attribute, _ZeroEmbedding(embedding.weight.shape[-1])):
                for window in mine:
                    last = hidden.pop(window).detach().requires_grad_(True)
                    box["hidden"] = last
                    ids = windows[window : window + 1].to(device=device, dtype=torch.int64)
                    with autocast:
                        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    if not torch.isfinite(loss):
                        raise UserError(f"calibration window {window} gives a non-finite loss ({loss.item()}); check the model and data")
                    loss.backward()
                    grads[window] = last.grad
            if not blocked.resident:
                for module in head_only:
                    blocked.unload(module)
            for index in reversed(range(len(blocks))):
                if all(skip(below) for below in range(index + 1)):
                    break  # nothing below needs a gradient
                block = blocked.load_block(index)
                linears = blocked.block_linears(index)
                stats = None if skip(index) else _new_accumulators(linears, request)
                with _accumulating(linears, request, stats) if stats is not None else contextlib.nullcontext():
                    for window in mine:
                        x = store.pop(index, window, device).requires_grad_(index > 0)
                        with autocast:
                            out = _first(block(x, *calls[window][0], **calls[window][1]))
                        out.backward(grads[window])  # outside autocast, as the whole-model pass did
                        if index > 0:
                            grads[window] = x.grad
                bar.update()
                if stats is not None:
                    group.sum_(_tensors_of(stats))
                    yield index, stats
                blocked.unload_block(index)
    finally:
        store.clear()
        for name, p in model.named_parameters():
            if name in requires:
                p.requires_grad_(requires[name])
            p.grad = None
        model.train(was_training)


def _tensors_of(stats: CalibrationStats) -> list[torch.Tensor]:
    return [stats.get(statistic)[name] for statistic in ("fisher", "guided", "xtx") for name in sorted(stats.get(statistic))]


def _modules_outside(blocked: BlockedModel) -> list[nn.Module]:
    """Modules holding parameters of their own outside the decoder blocks (embeddings, norms, head)."""
    inside = {id(module) for module in blocked.blocks.modules()}
    return [
        module
        for module in blocked.model.modules()
        if id(module) not in inside and any(True for _ in module.parameters(recurse=False))
    ]


def _parent_of(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name, candidate in module.named_children():
            if candidate is child:
                return module, name
    raise ValueError("module is not part of the model")


def collect_statistics(
    model: nn.Module | BlockedModel,
    windows: torch.Tensor,
    layers: Mapping[str, nn.Linear] | None = None,
    request: StatisticsRequest = StatisticsRequest(),
    *,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = True,
    settings: StreamSettings | None = None,
) -> CalibrationStats:
    """The statistics of the whole model, gathered from :func:`stream_statistics` (memory: all of them).

    Args:
        model: a causal LM taking ``input_ids`` and ``labels``, in memory or streamed.
        windows: int64 token ids [num_windows, seq_len].
        layers: keep only these linears' statistics (default: every linear of the decoder blocks).
        request: which statistics.
        autocast_dtype: forward/backward precision (ignored when ``settings`` is given).
        progress: show progress (ignored when ``settings`` is given).
        settings: how the streamed pass runs.
    """
    blocked = model if isinstance(model, BlockedModel) else blocked_from_model(model, next(model.parameters()).device)
    settings = settings or StreamSettings(autocast_dtype=autocast_dtype, progress=progress)
    if layers is not None and not layers:
        raise UserError("no layers to collect calibration statistics for")
    return _gathered(stream_statistics(blocked, windows, request, settings), request, layers)


def _gathered(blocks: Iterable[tuple[int, CalibrationStats]], request: StatisticsRequest, layers: Mapping[str, nn.Linear] | None) -> CalibrationStats:
    """The blocks' statistics in one CalibrationStats, only ``layers``' (default all)."""
    wanted = set(layers) if layers is not None else None
    stats = CalibrationStats()
    for _, block_stats in blocks:
        for statistic in request.names():
            stats.get(statistic).update({name: t for name, t in block_stats.get(statistic).items() if wanted is None or name in wanted})
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


def load_or_collect_statistics(
    model: nn.Module | BlockedModel,
    calibration: TokenWindows,
    layers: Mapping[str, nn.Linear] | None,
    request: StatisticsRequest,
    *,
    cache: Path | None,
    source: str,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    overwrite: bool = False,
) -> tuple[CalibrationStats, bool]:
    """The whole model's calibration statistics, reused from ``cache`` when computed for this model and
    calibration (the cache policy of :class:`BlockStatistics`, whose blocks this gathers).

    The calibration pass is the slowest step on a CPU, and it does not depend on bits or sparsity, so a
    sweep over settings (benchmarks/quality.py) computes it once and holds every layer's statistics.

    Returns:
        (statistics of ``layers``, default every decoder linear; whether any was computed now rather
        than read from the cache), so callers report a computation time only for a real computation.
    """
    import tempfile

    blocked = model if isinstance(model, BlockedModel) else blocked_from_model(model, next(model.parameters()).device)
    settings = StreamSettings(autocast_dtype=autocast_dtype, progress=progress)
    with tempfile.TemporaryDirectory(prefix="sqz-stats-") as spill:
        blocks = BlockStatistics(blocked, calibration, request, settings, cache=cache, source=source, overwrite=overwrite, spill_folder=Path(spill))
        stats = _gathered(blocks, request, layers)
    return stats, blocks.computed


@dataclasses.dataclass
class BlockStatistics:
    """Each block's statistics, with the block loaded: read from a matching ``cache``, else computed.

    The cache policy: a cache made for other settings is refused unless ``overwrite``; statistics a
    matching cache lacks are computed alone and added, so a sweep over methods computes each statistic
    once. A cache to be (re)written is assembled at the end from per-block files in ``spill_folder``
    (one block's statistics in memory at a time); a resumed run whose earlier part left no such files
    leaves the cache as it was and says so.

    Iterating yields (block index, its statistics), skipping blocks for which ``skip`` is true;
    ``computed`` then tells whether any statistic was computed rather than read.
    """

    blocked: BlockedModel
    calibration: TokenWindows
    request: StatisticsRequest
    settings: StreamSettings
    cache: Path | None
    source: str
    overwrite: bool = False
    skip: Callable[[int], bool] = lambda index: False
    spill_folder: Path | None = None
    computed: bool = False

    def __iter__(self) -> Iterator[tuple[int, CalibrationStats]]:
        blocked, calibration, request, settings = self.blocked, self.calibration, self.request, self.settings
        cache, source, overwrite, skip, spill_folder = self.cache, self.source, self.overwrite, self.skip, self.spill_folder
        from safetensors import safe_open

        key = statistics_key(source, calibration, settings.autocast_dtype)
        reuse = reusable_cache(cache, key, STATISTICS_KEY_FIELD, "--stats", overwrite=overwrite)
        present: set[str] = set()
        cached_groups = 0
        if reuse:
            all_layers = [name for index in range(blocked.num_blocks) for name in _linear_names(blocked, index)]
            with safe_open(str(cache), framework="pt") as handle:
                names = set(handle.keys())
                cached_groups = int((handle.metadata() or {}).get("guided_groups", 0))
            present = {statistic for statistic in request.names() if all(f"{statistic}/{layer}" in names for layer in all_layers)}
            if "guided" in present and cached_groups != request.guided_groups:
                present.discard("guided")
        missing = StatisticsRequest(
            fisher=request.fisher and "fisher" not in present,
            guided_groups=request.guided_groups if "guided" not in present else 0,
            xtx=request.xtx and "xtx" not in present,
        )

        def cached_part(index: int) -> CalibrationStats:
            stats = CalibrationStats()
            if present:
                with safe_open(str(cache), framework="pt") as handle:
                    for statistic in present:
                        stats.get(statistic).update({layer: handle.get_tensor(f"{statistic}/{layer}") for layer in _linear_names(blocked, index)})
            return stats

        if not missing.names():
            logger.info("reusing calibration statistics from %s", cache)
            for index in range(blocked.num_blocks):
                if skip(index):
                    continue
                blocked.load_block(index)
                yield index, cached_part(index)
                blocked.unload_block(index)
            return
        if reuse:
            logger.warning("statistics cache %s lacks %s; computing and adding it", cache, ", ".join(missing.names()))
        self.computed = True
        write_cache = cache is not None and settings.group.leader and spill_folder is not None
        for index, fresh in stream_statistics(blocked, calibration.tokens, missing, settings, skip=skip):
            if write_cache:
                with open_for_write(spill_folder / f"{index}.safetensors") as handle:
                    write_safetensors(handle, {f"{s}/{layer}": t for s in missing.names() for layer, t in fresh.get(s).items()})
            merged = cached_part(index)
            for statistic in missing.names():
                merged.get(statistic).update(fresh.get(statistic))
            yield index, merged
        if write_cache:
            _write_cache_from_blocks(cache, key, blocked, missing, request.guided_groups or cached_groups, spill_folder, reuse)


def _linear_names(blocked: BlockedModel, index: int) -> list[str]:
    return list(blocked.block_linears(index))


def _write_cache_from_blocks(
    cache: Path, key: dict[str, object], blocked: BlockedModel, computed: StatisticsRequest, groups: int, spill_folder: Path, reuse: bool
) -> None:
    """The cache file = the old cache's other statistics + the computed ones, streamed tensor by tensor."""
    from sqz_export.tensorfile import LazyTensor, lazy_tensors

    files = [spill_folder / f"{index}.safetensors" for index in range(blocked.num_blocks)]
    absent = [path.name for path in files if not path.is_file()]
    if absent:
        logger.warning("statistics cache %s not written: this run resumed and computed only part of the blocks' statistics", cache)
        return
    tensors: dict[str, LazyTensor] = {}
    if reuse:  # the old cache's other statistics stay; those computed now replace theirs
        tensors.update({name: t for name, t in lazy_tensors(cache).items() if name.partition("/")[0] not in computed.names()})
    for path in files:
        tensors.update(lazy_tensors(path))
    metadata = {STATISTICS_KEY_FIELD: json.dumps(key, sort_keys=True), "guided_groups": str(groups)}
    with open_for_write(cache) as handle:
        write_safetensors(handle, tensors, metadata=metadata)
    logger.info("wrote calibration statistics cache %s", cache)

