"""onnxruntime sessions over exported graphs, and when the SqzLinear function fallback unpacks.

Without a SqzLinear kernel, onnxruntime runs ``sqz::SqzLinear`` through its model-local ONNX
function (``export/onnx_function.py``). Every input of that body except ``x`` is an initializer, so
onnxruntime's constant folding can run the whole unpack once, at session creation, and leave a dense
fp32 W^T per layer: from then on the graph runs at the FP16 baseline's speed. What that costs in
memory, measured with onnxruntime 1.32 (``benchmarks/memory.py``, and stacks of 2048 x 2048 layers):

- An initializer stored in the file (external data) is read only while the node that consumes it is
  folded, and dropped afterwards: a GatherElements from a *stored* int32 index folds at the baseline's
  peak (4.8 B per weight, with glibc's mmap threshold fixed).
- Every tensor constant folding *produces* stays in the graph until the folding pass over the whole
  graph ends (``Graph::Resolve`` then drops the unused ones): a chain of four Adds on each of eight
  weights peaks at four copies of all eight. So the peak is the sum, over all layers, of every
  intermediate of the body, not one layer's: four 4-byte [K, N] tensors (chunk, shifted, index,
  fp32 W^T), a fifth with a sparse part, and the [K/10, N] chunk tensors: 24-25 B per quantized
  weight, against 4.8 B for the baseline's fp16 -> fp32 weights (that conversion is not constant
  folding but onnxruntime's FuseFp16InitializerToFp32NodeTransformer, whose peak is about the fp32
  weights alone: with it disabled a SmolLM2-shaped baseline session is 0.10 GiB after creation).
- No body in standard ops can fold within 1.15x of the baseline: its last step is a gather whose
  int32 [K, N] index (Gather and GatherElements take no narrower index) and fp32 [K, N] result are both
  folded outputs, at least 8 B per weight before anything that computes the index.
- glibc keeps freed folding buffers of up to 32 MiB in its heap (its mmap threshold grows with
  every freed mapping), so a process's resident set stays near the folding peak after the session
  is built; ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment hands them back.

Hence three ways to run the fallback (``UNPACK_MODES``):

- ``stream`` (default): sqz-export unpacks the layers itself, one at a time, into a temporary copy of
  the graph whose SqzLinear nodes are the function's tail (Cast, MatMul, CastLike) on a dense weight
  stored in x's dtype (``sqz_export.unpacked_graph``); onnxruntime loads that copy as it loads
  baseline.onnx, so the session holds the dense fp32 weights and nothing more. Baseline speed, outputs
  bit-identical to ``session``; the copy (about the size of baseline.onnx) is written next to the
  model and removed once the session is built.
- ``session``: onnxruntime's own behaviour, constant folding of the function on. The same weights
  and outputs, peak about ``FOLD_BYTES_PER_WEIGHT`` per quantized weight (3.8-4.6x the baseline
  session at the 135M and 0.5B shapes); no temporary files. This is what any other onnxruntime user
  of model.onnx gets.
- ``call``: constant folding off for graphs with SqzLinear nodes, so the body unpacks one layer at a
  time on every run. The session holds the packed weights and one layer's intermediates (0.44-0.59x
  the baseline session's peak at the 135M-1.1B shapes), but decoding is 20-35x slower, and the
  outputs differ from ``session`` in the last bits: onnxruntime's MatMul takes another path for a
  weight that is not a constant (no prepacking).

The onnxruntime custom-op library (``--ort-ops``, :mod:`sqz_export.ort_ops`), where it is built,
runs SqzLinear's C++ kernel on the packed weights and needs neither: with it the SqzLinear nodes are
no function to fold, so ``unpack`` changes nothing for them and ``create_session`` ignores it. On the
CPU provider ``create_session`` also rewrites the graph it hands onnxruntime, in memory (the file is
untouched; its weights are read from its folder as before): MatMuls on fp16 weights (the lm_head) run as
the library's ``sqz::DenseLinear`` (``graph_passes/fp16_weight_linear.py``), and SqzLinear nodes on one x
(q/k/v, gate/up) as one merged node and a Split (``graph_passes/merged_sqz_linear.py``; the merged
weights are arrays the session is handed through ``SessionOptions.add_external_initializers`` and keeps).
On the CPU provider, with or without the library, ``create_session`` also runs each layer's attention
as onnxruntime's RotaryEmbedding + GroupQueryAttention contrib ops
(``graph_passes/group_query_attention.py``; the head counts come from the export's config.json), in
model.onnx and baseline.onnx alike: the same results, three nodes per layer instead of about fifty.
``fuse_attention=False`` (``--attention exported``) keeps the exported attention.
``create_session`` is the one session factory: generate, compare and the benchmarks all use it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    import onnxruntime as ort

    from graph_passes.group_query_attention import AttentionShape

logger = logging.getLogger(__name__)

UNPACK_STREAM = "stream"
UNPACK_SESSION = "session"
UNPACK_CALL = "call"
UNPACK_MODES = (UNPACK_STREAM, UNPACK_SESSION, UNPACK_CALL)
FOLD_BYTES_PER_WEIGHT = 25
"""Peak bytes per quantized weight while onnxruntime folds the SqzLinear bodies (3-bit + 0.45%
sparse, measured with onnxruntime 1.32); used only to warn before a session that will not fit."""


def quantized_weights(graph: onnx.ModelProto) -> int:
    """in_features x out_features summed over the graph's sqz::SqzLinear nodes (0 for other graphs)."""
    from sqz_export.export import onnx_function as fn

    total = 0
    for node in graph.graph.node:
        if node.op_type == fn.OP_TYPE and node.domain == fn.DOMAIN:
            values = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            total += values.get("in_features", 0) * values.get("out_features", 0)
    return total


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def create_session(
    onnx_path: str | os.PathLike[str],
    providers: list[str] | None = None,
    unpack: str = UNPACK_STREAM,
    ort_ops: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    fuse_attention: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime InferenceSession over an exported graph: the one factory every caller uses.

    One place decides how SqzLinear runs, so generate, compare and the benchmarks cannot disagree.

    Args:
        onnx_path: model.onnx or baseline.onnx of an export folder.
        providers: execution providers (default: CPUExecutionProvider).
        unpack: ``stream`` (sqz-export unpacks each layer before onnxruntime loads the graph),
            ``session`` (onnxruntime folds the unpack at creation) or ``call`` (unpack on every run); see
            the module docstring. Graphs without SqzLinear nodes are created the same way in every mode,
            and so is any graph when ``ort_ops`` is given (the kernel replaces the function).
        ort_ops: the custom-op library libsqz_ort_ops.so (plugins/ort); None runs the ONNX function.
        threads: onnxruntime's intra-op thread count (None: its default), which the custom op's row
            split runs on too.
        fuse_attention: on the CPU provider, run each layer's attention as onnxruntime's
            GroupQueryAttention (``graph_passes/group_query_attention.py``; needs the export's config.json).
            False keeps the exported attention, which also takes what GroupQueryAttention refuses: more
            than one new token per sequence with a cache in a batch of several.

    Raises:
        ValueError: ``unpack`` is not one of ``UNPACK_MODES``.
        UserError: onnxruntime refused ``ort_ops``, or a SqzLinear node it runs (bad attributes or
            weight shapes; the message names the node).
    """
    import onnxruntime as ort

    from sqz_export.errors import UserError
    from sqz_export.export.signature import load_graph
    from sqz_export.ort_ops import session_options
    from sqz_export.unpacked_graph import unpacked_graph

    if unpack not in UNPACK_MODES:
        raise ValueError(f"unpack={unpack!r}; expected one of {UNPACK_MODES}")
    path = Path(onnx_path)
    graph = load_graph(path)
    weights = quantized_weights(graph)
    disabled: list[str] = []
    if weights and ort_ops is not None:
        if unpack == UNPACK_CALL:
            logger.info("%s: --unpack call has no effect with --ort-ops (SqzLinear runs the library's kernel)", path)
    elif weights and unpack == UNPACK_CALL:
        disabled.append("ConstantFolding")
        logger.info("%s: SqzLinear unpacks on every run (--unpack call: constant folding off)", path)
    elif weights and unpack == UNPACK_SESSION:
        needed, free = FOLD_BYTES_PER_WEIGHT * weights, available_memory()
        if free is not None and needed > free:
            logger.warning(
                "%s: onnxruntime folds its %d quantized weights into dense ones at session creation, which takes "
                "about %.1f GiB (%.1f GiB available); --unpack stream (the default) holds about the FP16 baseline's "
                "memory, --unpack call only the packed weights (decoding 20-35x slower), --ort-ops runs them packed at speed",
                path,
                weights,
                needed / 2**30,
                free / 2**30,
            )
    options = session_options(ort_ops, threads)
    providers = providers or ["CPUExecutionProvider"]
    on_cpu = providers == ["CPUExecutionProvider"]
    attention = attention_shape(path) if fuse_attention and on_cpu else None
    if weights and ort_ops is None and unpack == UNPACK_STREAM:
        logger.info("%s: unpacking %d quantized weights layer by layer for onnxruntime (--unpack stream)", path, weights)
        with unpacked_graph(path) as dense_path:
            source, _ = _cpu_graph(dense_path, load_graph(dense_path), options, attention, with_library=False)
            return ort.InferenceSession(source, options, providers=providers)
    source: str | bytes = str(path)
    merged: list[ort.OrtValue] = []
    if on_cpu:
        source, merged = _cpu_graph(path, graph, options, attention, with_library=ort_ops is not None)
    try:
        session = ort.InferenceSession(source, options, providers=providers, disabled_optimizers=disabled or None)
        session.sqz_merged_weights = merged  # onnxruntime reads them in place for the session's lifetime
        return session
    except Exception as exc:  # onnxruntime raises its own exception types
        if ort_ops is None:
            raise
        raise UserError(
            f"onnxruntime could not create a session on {path} with the custom-op library {ort_ops}: {exc}"
        ) from exc


def attention_shape(path: Path) -> AttentionShape | None:
    """The head counts and rotary range of the model whose graph ``path`` is, from the config.json the
    export writes next to it; None (no attention fusion) where there is none or it is not a
    LLaMA-style config."""
    from graph_passes.group_query_attention import AttentionShape
    from sqz_export.errors import UserError
    from sqz_export.validate import model_config

    try:
        config = model_config(path.parent)
        heads = int(config["num_attention_heads"])
        shape = AttentionShape(heads, int(config.get("num_key_value_heads") or heads), int(config["max_position_embeddings"]))
    except (UserError, OSError, ValueError, KeyError, TypeError) as exc:
        logger.info("%s: attention stays as exported (no usable config.json: %s)", path, exc)
        return None
    return shape


EXTERNAL_DATA_FOLDER_ORT = (1, 21)
"""onnxruntime from which a model given as bytes finds its external data through the session option
``session.model_external_initializers_file_folder_path`` (microsoft/onnxruntime#23557)."""


def _cpu_graph(
    path: Path, model: onnx.ModelProto, options: ort.SessionOptions, attention: AttentionShape | None, with_library: bool
) -> tuple[str | bytes, list[ort.OrtValue]]:
    """``model`` (path's graph, without tensor data; rewritten in place) with the CPU rewrites, serialized
    (its external data read from ``path``'s folder), and the merged weights added to ``options``; or
    ``path`` itself and no weights when nothing applies or this onnxruntime cannot read external data for
    a graph given as bytes.

    The rewrites: the attention of each layer as onnxruntime's GroupQueryAttention (``attention``
    given), and with the custom-op library (``with_library``) MatMuls on fp16 weights as
    sqz::DenseLinear, SqzLinear nodes on one x merged, and the library's nodes on fp32 activations.
    """
    import onnxruntime as ort
    from onnx import numpy_helper

    from graph_passes import CleanupPass, Fp16WeightLinearPass, Fp32IoPass, GroupQueryAttentionPass, SqzLinearMergePass

    version = tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())
    if version < EXTERNAL_DATA_FOLDER_ORT:
        logger.info(
            "%s: onnxruntime %s gets the graph as it is (the CPU rewrites need onnxruntime >= %d.%d)",
            path,
            ort.__version__,
            *EXTERNAL_DATA_FOLDER_ORT,
        )
        return str(path), []
    folder = str(path.resolve().parent)
    fused = GroupQueryAttentionPass(attention).run(model).count if attention is not None else 0
    dense = merged = widened = 0
    merge_tensors: dict[str, np.ndarray] = {}
    if with_library:
        initializers = {init.name: init for init in model.graph.initializer}
        dense = Fp16WeightLinearPass().run(model).count
        merge = SqzLinearMergePass(lambda name: numpy_helper.to_array(initializers[name], folder))
        merged = merge.run(model).count
        merge_tensors = merge.tensors
        widened = Fp32IoPass().run(model).count
    if not fused and not dense and not merged and not widened:
        return str(path), []
    CleanupPass(infer_shapes=False).run(model)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in merge_tensors.values()]
    if values:
        options.add_external_initializers(list(merge_tensors), values)
    logger.info(
        "%s: %d layers' attention as GroupQueryAttention; %d MatMuls on fp16 weights run as sqz::DenseLinear (read as "
        "fp16), %d groups of SqzLinear nodes on one x merged, %d sqz nodes on fp32 activations",
        path,
        fused,
        dense,
        merged,
        widened,
    )
    return model.SerializeToString(), values
