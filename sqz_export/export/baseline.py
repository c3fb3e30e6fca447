"""FP16/FP32 decoder-with-KV-cache ONNX export through optimum's exporter.

The graph has the names every later stage relies on: inputs ``input_ids``, ``attention_mask``,
``position_ids`` (not for OPT) and ``past_key_values.N.key/value``; outputs ``logits`` and
``present.N.key/value``. FP16 graphs come from exporting the model in fp16 (``model.half()``): torch
exports fp16 on CPU, the LLaMA RMSNorm and the eager softmax keep their fp32 upcasts inside the graph,
and token inputs stay int64. TensorRT 11 is strongly typed, so the FP16 baseline has to be an FP16 graph like this one.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from sqz_export.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
"""ai.onnx opset of exported graphs; the SqzLinear function needs >= 18 (BitwiseAnd/Or)."""
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
TASK = "text-generation-with-past"


def export_decoder(model: nn.Module, dtype: torch.dtype = torch.float16, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Exports a causal LM with KV cache to an in-memory ONNX model (external data loaded).

    Args:
        model: a transformers causal LM (not modified; a copy is cast to ``dtype``).
        dtype: torch.float16 or torch.float32 for every floating tensor of the graph.
        opset: ai.onnx opset.
    """
    from optimum.exporters.onnx import onnx_export_from_model

    if dtype not in DTYPES.values():
        raise UserError(f"export dtype {dtype} is not supported; expected one of {', '.join(DTYPES)}")
    casted = copy.deepcopy(model).to(dtype).eval()
    # Eager attention: torch's SDPA export upcasts attention to fp32 and then runs o_proj in fp32
    # (a constant-folded fp32 copy of its weight); eager keeps every linear in the graph's dtype.
    casted.config._attn_implementation = "eager"
    with tempfile.TemporaryDirectory(prefix="sqz-export-onnx-") as tmp:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # The tracer flags every data-dependent Python branch of transformers; optimum's dynamic
                # axes and the KV-cache inputs cover the shapes the exported graph is used with.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                onnx_export_from_model(casted, tmp, task=TASK, opset=opset, do_validation=False)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"optimum could not export {type(model).__name__} as {TASK}: {exc}") from exc
        path = Path(tmp) / "model.onnx"
        if not path.is_file():
            raise UserError(
                f"optimum wrote no model.onnx for {type(model).__name__} (files: {sorted(p.name for p in Path(tmp).iterdir())})"
            )
        exported = onnx.load(str(path), load_external_data=True)
    logger.info("exported %s (%s, opset %d): %d nodes", type(model).__name__, dtype, opset, len(exported.graph.node))
    return exported


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializer data, inline or external (what the export summary reports)."""
    total = 0
    for init in model.graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        total += count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total
