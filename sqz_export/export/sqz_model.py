"""The export driver: packed checkpoint -> folder with the SqzLinear ONNX model and the FP16 baseline.

Steps, and why in this order:

1. Build the checkpoint's model without any linear weight: the architecture on the meta device,
   every ``nn.Linear`` (quantized or not, lm_head included) replaced by a weightless placeholder
   (``export/placeholders.py``), the checkpoint's dense tensors (embeddings, norms, biases) loaded.
   Trace it once with the baseline exporter: the graph has every linear's shape and module name and
   none of its weight bytes.
2. ``SqzLinearPass`` rewrites each placeholder whose module is a checkpoint layer (by name) into
   ``sqz::SqzLinear`` reading the packed tensors; the driver insists that the count equals the number
   of quantized layers. Placeholders of non-quantized modules (lm_head) are refused by it, with that
   reason (the "1 refusals" of a LLaMA export's log), and ``DenseLinearPass`` gives them their FP
   weight from the checkpoint. Every tensor goes straight into ``model.onnx.data`` as it is made.
3. ``ShapeSharingPass`` points every Shape node at the first one of the same symbolic shape (the
   per-layer shape arithmetic onnxruntime would otherwise run 30 times), and ``CleanupPass`` drops the
   dead placeholder chains and the Shape nodes left unread.
4. The FP16 baseline is the source model recorded in the checkpoint (or ``--baseline-from``), checked
   against the checkpoint's architecture and shapes and traced the same way with its linears as
   placeholders; ``DenseLinearPass`` streams its weights into ``baseline.onnx.data``, one at a time.
   A source folder of safetensors is read tensor by tensor (``export/source_weights.py``: the model
   is built without weights, like the checkpoint's); any other source is loaded whole in the export
   dtype.

So the export holds the packed checkpoint, then (nothing of the first stage kept) the source
model's non-linear tensors, each with one layer's tensor in flight: no dense FP copy of a quantized
linear ever exists, and for a safetensors source no copy of the source model either.

Output folder (written into a temporary sibling and renamed into place)::

    model.onnx + model.onnx.data          quantized graph with sqz::SqzLinear (tensors >= 1 KiB external)
    baseline.onnx + baseline.onnx.data    FP16 graph of the original model
    config.json, tokenizer files          for generation and comparison
    manifest.json                         files with sha256, op counts, pass counts, layers, sizes
    polygraphy_inputs.json                one real prefill feed for ``polygraphy run --load-inputs``
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from graph_passes import CleanupPass, DenseLinearPass, PassResult, ShapeSharingPass, SqzLinearPass
from sqz_export import __version__
from sqz_export.atomic import check_replaceable, replace_folder
from sqz_export.checkpoint import WEIGHTS_FILE, Checkpoint
from sqz_export.errors import UserError
from sqz_export.export.baseline import DEFAULT_OPSET, export_decoder, tensor_bytes
from sqz_export.export.external_data import ExternalData, TensorStore, inline_tensor
from sqz_export.export.placeholders import PlaceholderLinear, replace_with_placeholders
from sqz_export.export.source_weights import LinearWeights, open_source
from sqz_export.formats import FormatError, PackedLinear

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
BASELINE_FILE = "baseline.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "sqz-export onnx"
POLYGRAPHY_INPUTS_FILE = "polygraphy_inputs.json"
POLYGRAPHY_PROMPT = "The capital of France is Paris. The capital of Germany is"
"""Prompt of the feed saved for `polygraphy run OUT/model.onnx --onnxrt --load-inputs OUT/polygraphy_inputs.json`."""
CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
"""Config fields a baseline must share with the checkpoint to be comparable."""


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    rewritten: int
    layers: int
    op_counts: dict[str, int]
    bytes_before: int
    """Tensor bytes of the graph with FP weights (before the rewrite)."""
    bytes_after: int
    """Tensor bytes of model.onnx (after the rewrite and cleanup)."""
    files: dict[str, dict[str, Any]]
    baseline_source: str | None


def checkpoint_skeleton(checkpoint: Checkpoint) -> tuple[nn.Module, dict[str, nn.Linear]]:
    """The checkpoint's model with placeholder linears and its dense tensors, built without
    allocating any linear weight; also the replaced linears (on the meta device) by module name.

    Raises:
        FormatError: a quantized layer is not a linear of the config's model, has another shape, or
            a non-linear tensor of the model is missing from the checkpoint.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(checkpoint.hf_config)
    linears = replace_with_placeholders(model)
    for name, layer in checkpoint.packed.items():
        linear = linears.get(name)
        if linear is None:
            raise FormatError(f"{checkpoint.path}: quantized layer {name!r} is not a linear of {type(model).__name__}")
        if (linear.out_features, linear.in_features) != (layer.out_features, layer.in_features):
            raise FormatError(
                f"{checkpoint.path}: layer {name!r} is [{layer.out_features}, {layer.in_features}], the config's "
                f"model has [{linear.out_features}, {linear.in_features}]"
            )
    modules = dict(model.named_modules())
    for name, layer in checkpoint.packed.items():
        if layer.bias is None:
            modules[name].bias = None  # a quantized layer's bias is the checkpoint's (SqzLinear's), if any
    state = dict(checkpoint.dense_state)
    state.update({f"{name}.bias": layer.bias for name, layer in checkpoint.packed.items() if layer.bias is not None})
    model.load_state_dict(state, strict=False, assign=True)
    missing = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if missing:
        raise FormatError(f"{checkpoint.path / WEIGHTS_FILE}: no tensors for {', '.join(missing[:5])}")
    return model.eval(), linears


def checkpoint_dense_weights(checkpoint: Checkpoint) -> Callable[[str], torch.Tensor | None]:
    """Module name -> FP weight of a non-quantized linear of the checkpoint, for ``DenseLinearPass``."""

    def weight(name: str) -> torch.Tensor | None:
        return None if name in checkpoint.packed else checkpoint.dense_state.get(f"{name}.weight")

    return weight


def tied_weights(model: nn.Module) -> dict[str, str]:
    """{lm_head module: input embedding weight} when the model ties them (the graph's Gather already
    holds that matrix; ``DenseLinearPass`` reads it instead of storing a transposed copy)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    modules = {module: name for name, module in model.named_modules()}
    output = modules.get(model.get_output_embeddings())
    return {output: f"{modules[model.get_input_embeddings()]}.weight"} if output is not None else {}


def quantize_graph(
    graph: onnx.ModelProto,
    packed: dict[str, PackedLinear],
    dense_weights: Callable[[str], torch.Tensor | None],
    dtype: torch.dtype,
    store: TensorStore = inline_tensor,
    shared: dict[str, str] | None = None,
) -> list[PassResult]:
    """Runs the SqzLinear rewrite, the dense rewrite of the other linears and cleanup on a placeholder
    graph, in place.

    Raises:
        UserError: the rewrite count differs from the number of quantized layers (the message lists
            the layers no node matched), or a placeholder is left that no pass could give a weight.
    """
    sqz_pass = SqzLinearPass(packed, store)
    rewrite = sqz_pass.run(graph)
    if rewrite.count != len(packed):
        unmatched = sqz_pass.unmatched()
        refused = "; ".join(f"{r.node}: {r.reason}" for r in rewrite.refusals[:5])
        raise UserError(
            f"rewrote {rewrite.count} linears to SqzLinear but the checkpoint has {len(packed)} quantized "
            f"layers; no node matched: {', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''} "
            f"(first refusals: {refused})"
        )
    return [rewrite, *dense_graph(graph, dense_weights, dtype, store, shared)]


def dense_graph(
    graph: onnx.ModelProto,
    weights: Callable[[str], torch.Tensor | None],
    dtype: torch.dtype,
    store: TensorStore = inline_tensor,
    shared: dict[str, str] | None = None,
) -> list[PassResult]:
    """Gives every placeholder left in ``graph`` its FP weight (``shared``: tied ones), lets equal
    Shape nodes share one output, then cleans up, in place.

    Raises:
        UserError: a placeholder has no weight of its shape (the graph would compute with zeros).
    """
    dense = DenseLinearPass(weights, dtype, store, shared).run(graph)
    if dense.refusals:
        refused = "; ".join(f"{r.node}: {r.reason}" for r in dense.refusals[:5])
        raise UserError(f"{len(dense.refusals)} linears of the graph got no weight: {refused}")
    return [dense, ShapeSharingPass().run(graph), CleanupPass().run(graph)]


def linear_bytes(linears: dict[str, nn.Linear], dtype: torch.dtype) -> int:
    """Bytes the linears' weights take in ``dtype`` (what a dense graph of them would hold)."""
    return sum(linear.in_features * linear.out_features for linear in linears.values()) * dtype.itemsize


def op_counts(graph: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.graph.node
    )
    return dict(sorted(counts.items()))


def check_baseline_matches(baseline: nn.Module, hf_config: Any, shapes: dict[str, tuple[int, int]], source: str) -> None:
    """Raises UserError unless ``baseline`` has the checkpoint's architecture and the quantized layers'
    shapes (``shapes``: module name -> (out_features, in_features); ``baseline`` may hold its linears
    as weightless placeholders)."""
    problems = []
    for key in CONFIG_KEYS:
        mine, theirs = getattr(hf_config, key, None), getattr(baseline.config, key, None)
        if mine != theirs:
            problems.append(f"{key} {theirs!r} (checkpoint: {mine!r})")
    modules = dict(baseline.named_modules())
    for name, (out_features, in_features) in shapes.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear | PlaceholderLinear):
            problems.append(f"no linear {name!r}")
        elif (module.out_features, module.in_features) != (out_features, in_features):
            problems.append(
                f"{name!r} is [{module.out_features}, {module.in_features}] (checkpoint: [{out_features}, {in_features}])"
            )
        if len(problems) > 8:
            break
    if problems:
        raise UserError(f"baseline model {source!r} does not match the checkpoint: {'; '.join(problems)}")


def export_baseline(
    source: str, hf_config: Any, shapes: dict[str, tuple[int, int]], dtype: torch.dtype, opset: int, path: Path
) -> None:
    """Writes the FP baseline of ``source`` at ``path`` (+ .data), streaming its linear weights.

    The source model is checked against the checkpoint (``shapes``: quantized module -> (out, in)),
    traced with its linears as placeholders, and each linear's weight goes to the data file in turn.
    A folder of safetensors is read tensor by tensor (``source_weights``): the stage then holds the
    model's non-linear tensors and one linear weight. Any other source is loaded whole, in the export
    dtype.
    """
    from sqz_export.models import load_model

    streamed = source_model_skeleton(source, dtype)
    if streamed is not None:
        model, weights = streamed
        check_baseline_matches(model, hf_config, shapes, source)
        shared = tied_weights(model)
    else:
        logger.info("baseline %s: not a folder of safetensors, loading it whole", source)
        loaded = load_model(source, dtype)
        check_baseline_matches(loaded.model, hf_config, shapes, source)
        model = loaded.model
        linears = replace_with_placeholders(model)
        weights = {name: linear.weight for name, linear in linears.items()}.get
        shared = tied_weights(model)
    graph = export_decoder(model, dtype, opset)
    del model
    with ExternalData(path) as store:
        dense_graph(graph, weights, dtype, store, shared)
        store.externalize(graph)
    onnx.save_model(graph, str(path))


def source_model_skeleton(
    source: str, dtype: torch.dtype
) -> tuple[nn.Module, Callable[[str], torch.Tensor | None]] | None:
    """The source model with placeholder linears and its other tensors read from its safetensors,
    and a reader of its linear weights, or None when ``source`` is not a folder of safetensors or
    its files lack a tensor the model has (then it is loaded whole, which reports that clearly).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from sqz_export.models import open_model

    tensors = open_source(source)
    if tensors is None:
        return None
    files = open_model(source)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(files.config)
    linears = replace_with_placeholders(model)
    needed = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    tied = tied_weights(model)
    absent = [name for name in needed if name not in tensors]
    absent += [f"{name}.weight" for name in linears if f"{name}.weight" not in tensors and name not in tied]
    if absent:
        logger.info("baseline %s: its safetensors lack %s (other names?), loading it whole", source, ", ".join(absent[:3]))
        return None
    model.load_state_dict({name: tensors.get(name, dtype) for name in needed}, strict=False, assign=True)
    return model.eval(), LinearWeights(tensors, dtype, set(linears))


def write_polygraphy_inputs(onnx_path: Path, tokenizer: Any, target: Path) -> None:
    """Saves one prefill feed of a real prompt, so the graphs run under the Polygraphy CLI as they are
    (Polygraphy's random default data would draw invalid token ids and cache lengths)::

        polygraphy run OUT/model.onnx --onnxrt --load-inputs OUT/polygraphy_inputs.json
    """
    from polygraphy.json import to_json

    from sqz_export.export.signature import DecoderSignature

    token_ids = tokenizer(POLYGRAPHY_PROMPT)["input_ids"]
    target.write_text(to_json([DecoderSignature.from_onnx(onnx_path).feed([token_ids])]))


def export_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    baseline_from: str | None = None,
    with_baseline: bool = True,
    dtype: torch.dtype = torch.float16,
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Exports a packed checkpoint to an ONNX folder (see the module docstring).

    Args:
        checkpoint_dir: folder written by ``sqz-export quantize``.
        out_dir: destination; replaced if it holds a previous export, refused if it holds anything else.
        baseline_from: model spec of the FP baseline; default: the checkpoint's ``source_model``.
        with_baseline: False skips baseline.onnx (e.g. when the source model is not available).
        dtype: floating dtype of both graphs (fp16 for deployment, fp32 for exact comparisons).
        opset: ai.onnx opset (>= 18).
    """
    from transformers import AutoTokenizer

    from sqz_export.checkpoint import file_checksums, read_checkpoint, save_tokenizer

    out = check_replaceable(out_dir, MANIFEST_FILE, "ONNX folder")
    checkpoint = read_checkpoint(checkpoint_dir)
    packed = checkpoint.packed
    baseline_source = None
    if with_baseline:
        baseline_source = baseline_from or checkpoint.qconfig.source_model
        if not baseline_source:
            raise UserError(
                f"{checkpoint.path}: quantization_config has no source_model; pass --baseline-from MODEL or --no-baseline"
            )

    with replace_folder(out, MANIFEST_FILE, "ONNX folder") as tmp:
        skeleton, linears = checkpoint_skeleton(checkpoint)
        graph = export_decoder(skeleton, dtype, opset)
        bytes_before = tensor_bytes(graph) + linear_bytes(linears, dtype)
        with ExternalData(tmp / MODEL_FILE) as store:
            results = quantize_graph(
                graph, packed, checkpoint_dense_weights(checkpoint), dtype, store, tied_weights(skeleton)
            )
            store.externalize(graph)
        onnx.save_model(graph, str(tmp / MODEL_FILE))
        bytes_after = tensor_bytes(graph)
        counts = op_counts(graph)
        layers = {name: layer.describe() for name, layer in packed.items()}
        shapes = {name: (layer.out_features, layer.in_features) for name, layer in packed.items()}
        hf_config = checkpoint.hf_config
        # The baseline stage holds the source model's tensors: nothing of this stage stays beside them.
        del skeleton, checkpoint, packed, graph, store

        if baseline_source is not None:
            export_baseline(baseline_source, hf_config, shapes, dtype, opset, tmp / BASELINE_FILE)
        hf_config.save_pretrained(str(tmp))
        checkpoint_path = Path(checkpoint_dir)
        if (checkpoint_path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_path))
            save_tokenizer(tokenizer, tmp)
            write_polygraphy_inputs(tmp / MODEL_FILE, tokenizer, tmp / POLYGRAPHY_INPUTS_FILE)
        files = file_checksums(tmp)
        manifest = {
            "format": MANIFEST_FORMAT,
            "created_by": f"sqz-export {__version__}",
            "checkpoint": str(checkpoint_path.resolve()),
            "baseline_source": baseline_source,
            "dtype": str(dtype).removeprefix("torch."),
            "opset": opset,
            "files": files,
            "op_counts": counts,
            "passes": {result.name: result.count for result in results},
            "tensor_bytes": {"before_rewrite": bytes_before, "after_rewrite": bytes_after},
            "layers": layers,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    written = [name for name in files if name.endswith((".onnx", ".data"))]
    logger.info("wrote %s (%s)", out, ", ".join(written))
    return ExportResult(
        out_dir=out,
        rewritten=results[0].count,
        layers=len(layers),
        op_counts=counts,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        files=files,
        baseline_source=baseline_source,
    )


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an export folder; a clear error when the folder is not one."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST_FILE}; expected a folder written by `sqz-export export`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest
