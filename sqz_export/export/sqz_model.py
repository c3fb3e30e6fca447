"""The export driver: packed checkpoint -> folder with the SqzLinear ONNX model and the FP16 baseline.

Steps, and why in this order:

1. Rebuild the model with each quantized linear holding its reconstructed weight W = LUT[idx] + S and
   export it with the baseline exporter. The graph is then exactly the FP graph of the quantized
   model, with no custom op the exporter would need to know about.
2. ``SqzLinearPass`` finds every MatMul/Gemm whose weight equals a layer's W (by content) and rewrites
   it to ``sqz::SqzLinear`` reading the packed tensors; the driver insists that the count equals the
   number of quantized layers and names the ones left over.
3. ``CleanupPass`` drops the FP weights, so model.onnx is about the size of the packed checkpoint.
4. The FP16 baseline is exported from the source model recorded in the checkpoint (or
   ``--baseline-from``) after checking it has the checkpoint's architecture and shapes.

Output folder (written into a temporary sibling and renamed into place)::

    model.onnx (+ model.onnx.data above 2 GiB)   quantized graph with sqz::SqzLinear
    baseline.onnx (+ .data)                      FP16 graph of the original model
    config.json, tokenizer files                 for generation and comparison
    manifest.json                                files with sha256, op counts, layers, sizes
    polygraphy_inputs.json                       one real prefill feed for ``polygraphy run --load-inputs``
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from graph_passes import CleanupPass, PassResult, SqzLinearPass
from sqz_export import __version__
from sqz_export.atomic import check_replaceable, replace_folder
from sqz_export.errors import UserError
from sqz_export.export.baseline import (
    DEFAULT_OPSET,
    export_decoder,
    save_model,
    tensor_bytes,
)
from sqz_export.formats import PackedLinear

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


def reconstructed_model(model: nn.Module, packed: dict[str, PackedLinear]) -> nn.Module:
    """A copy of ``model`` whose quantized layers are ``nn.Linear`` holding W = LUT[idx] + S (fp32).

    Works on an FP model (weights replaced) and on a model with SqzLinear modules (modules replaced).
    """
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    for name, layer in packed.items():
        if name not in modules:
            raise UserError(f"quantized layer {name!r} is not a module of {type(model).__name__}")
        old = modules[name]
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None or getattr(old, "bias", None) is not None
        )
        with torch.no_grad():
            linear.weight.copy_(layer.weight())
            bias = layer.bias if layer.bias is not None else getattr(old, "bias", None)
            if bias is not None:
                linear.bias.copy_(bias.to(torch.float32))
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else result, child, linear)
    return result.float().eval()


def quantize_graph(graph: onnx.ModelProto, packed: dict[str, PackedLinear]) -> list[PassResult]:
    """Runs the SqzLinear rewrite and cleanup on ``graph`` in place.

    Raises:
        UserError: the rewrite count differs from the number of quantized layers; the message lists
            the layers no node matched (the graph is left as the passes made it, the caller drops it).
    """
    sqz_pass = SqzLinearPass(packed)
    rewrite = sqz_pass.run(graph)
    if rewrite.count != len(packed):
        unmatched = sqz_pass.unmatched()
        refused = "; ".join(f"{r.node}: {r.reason}" for r in rewrite.refusals[:5])
        raise UserError(
            f"rewrote {rewrite.count} MatMul/Gemm nodes to SqzLinear but the checkpoint has {len(packed)} quantized "
            f"layers; no node matched: {', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''} "
            f"(first refusals: {refused})"
        )
    cleanup = CleanupPass().run(graph)
    return [rewrite, cleanup]


def op_counts(graph: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.graph.node
    )
    return dict(sorted(counts.items()))


def check_baseline_matches(baseline: nn.Module, hf_config: Any, packed: dict[str, PackedLinear], source: str) -> None:
    """Raises UserError unless ``baseline`` has the checkpoint's architecture and layer shapes."""
    problems = []
    for key in CONFIG_KEYS:
        mine, theirs = getattr(hf_config, key, None), getattr(baseline.config, key, None)
        if mine != theirs:
            problems.append(f"{key} {theirs!r} (checkpoint: {mine!r})")
    modules = dict(baseline.named_modules())
    for name, layer in packed.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            problems.append(f"no linear {name!r}")
        elif (module.out_features, module.in_features) != (layer.out_features, layer.in_features):
            problems.append(
                f"{name!r} is [{module.out_features}, {module.in_features}] (checkpoint: [{layer.out_features}, {layer.in_features}])"
            )
        if len(problems) > 8:
            break
    if problems:
        raise UserError(f"baseline model {source!r} does not match the checkpoint: {'; '.join(problems)}")


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

    from sqz_export.checkpoint import build_model, file_checksums, read_checkpoint, save_tokenizer

    out = check_replaceable(out_dir, MANIFEST_FILE, "ONNX folder")
    checkpoint = read_checkpoint(checkpoint_dir)
    packed = checkpoint.packed
    quantized = build_model(checkpoint, torch.float32)
    graph = export_decoder(reconstructed_model(quantized, packed), dtype, opset)
    bytes_before = tensor_bytes(graph)
    results = quantize_graph(graph, packed)
    bytes_after = tensor_bytes(graph)

    baseline_graph = None
    baseline_source = None
    if with_baseline:
        from sqz_export.models import load_model

        baseline_source = baseline_from or checkpoint.qconfig.source_model
        if not baseline_source:
            raise UserError(
                f"{checkpoint.path}: quantization_config has no source_model; pass --baseline-from MODEL or --no-baseline"
            )
        loaded = load_model(baseline_source, torch.float32)
        check_baseline_matches(loaded.model, checkpoint.hf_config, packed, baseline_source)
        baseline_graph = export_decoder(loaded.model, dtype, opset)

    with replace_folder(out, MANIFEST_FILE, "ONNX folder") as tmp:
        written = save_model(graph, tmp / MODEL_FILE)
        if baseline_graph is not None:
            written += save_model(baseline_graph, tmp / BASELINE_FILE)
        quantized.config.save_pretrained(str(tmp))
        if (checkpoint.path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path))
            save_tokenizer(tokenizer, tmp)
            write_polygraphy_inputs(tmp / MODEL_FILE, tokenizer, tmp / POLYGRAPHY_INPUTS_FILE)
        files = file_checksums(tmp)
        manifest = {
            "format": MANIFEST_FORMAT,
            "created_by": f"sqz-export {__version__}",
            "checkpoint": str(checkpoint.path.resolve()),
            "baseline_source": baseline_source,
            "dtype": str(dtype).removeprefix("torch."),
            "opset": opset,
            "files": files,
            "op_counts": op_counts(graph),
            "passes": {result.name: result.count for result in results},
            "tensor_bytes": {"before_rewrite": bytes_before, "after_rewrite": bytes_after},
            "layers": {name: layer.describe() for name, layer in packed.items()},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %s (%s)", out, ", ".join(path.name for path in written))
    return ExportResult(
        out_dir=out,
        rewritten=results[0].count,
        layers=len(packed),
        op_counts=op_counts(graph),
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
