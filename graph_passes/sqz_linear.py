"""Pass: placeholder linear of a quantized layer -> ``sqz::SqzLinear`` with the packed tensors.

Matching is by module name (see ``graph_passes/placeholder.py``): each placeholder MatMul is named
by its module, and a module that is a checkpoint layer of the same [N, K] shape is rewritten to a
SqzLinear node reading the packed tensors as initializers named after the layer. Placeholders of
modules that are not quantized (lm_head, in SqueezeLLM) are refused with that reason and left for
``DenseLinearPass``; that refusal is the "1 refusals" of a LLaMA export's log.
"""

from __future__ import annotations

import logging

import onnx
from onnx import helper

from graph_passes.base import PassResult
from graph_passes.placeholder import LinearMatch, LinearPlaceholderPass
from sqz_export.export import onnx_function as fn
from sqz_export.export.external_data import TensorStore, inline_tensor
from sqz_export.formats import LAYOUT_ROWMAJOR, PackedLinear, to_rowmajor

logger = logging.getLogger(__name__)


def sqz_linear_node(
    layer_name: str, layer: PackedLinear, x: str, y: str, store: TensorStore = inline_tensor
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The SqzLinear node for one packed layer and the initializers it reads (layout 2).

    The input count carries the variant: 3 for a dense-only layer, 7 (overload ``"sparse"``) when the
    layer has a non-empty sparse part. Bias is not an input: it stays a separate Add in the graph.
    ``store`` writes each tensor (external data of the file being written, or inline).
    """
    tensors = [
        store(f"{layer_name}.qweight", to_rowmajor(layer.qweight).numpy()),
        store(f"{layer_name}.lut", layer.lut.numpy()),
    ]
    attributes: dict[str, object] = {
        "bits": layer.bits,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "layout": LAYOUT_ROWMAJOR,
        "plugin_namespace": fn.PLUGIN_NAMESPACE,
        "plugin_version": fn.PLUGIN_VERSION,
    }
    sparse = layer.sparse
    if sparse is not None and sparse.nnz:
        tensors += [
            store(f"{layer_name}.sparse_row_ptr", sparse.row_ptr.numpy()),
            store(f"{layer_name}.sparse_col", sparse.col.numpy()),
            store(f"{layer_name}.sparse_val", sparse.val.numpy()),
            store(f"{layer_name}.sparse_chunk_row", sparse.chunk_row.numpy()),
        ]
        attributes["chunk_nnz"] = sparse.chunk_nnz
    node = helper.make_node(
        fn.OP_TYPE,
        [x] + [tensor.name for tensor in tensors],
        [y],
        name=f"/{layer_name}/{fn.OP_TYPE}",
        domain=fn.DOMAIN,
        **attributes,
    )
    if len(tensors) > 2:
        node.overload = fn.SPARSE_OVERLOAD
    return node, tensors


class SqzLinearPass(LinearPlaceholderPass):
    """Rewrites the placeholder linear of every quantized layer.

    Args:
        packed: quantized layers keyed by checkpoint module name (validated here, so a bad layer fails
            before the graph is touched).
        store: where the packed tensors' bytes go.
    """

    name = "sqz_linear"

    def __init__(self, packed: dict[str, PackedLinear], store: TensorStore = inline_tensor) -> None:
        for layer_name, layer in packed.items():
            layer.validate(layer_name)
        super().__init__(store)
        self.packed = packed

    def check_layer(self, match: LinearMatch) -> str | None:
        layer = self.packed.get(match.module)
        if layer is None:
            return "not a quantized layer of the checkpoint (left for the dense pass)"
        if (layer.out_features, layer.in_features) != (match.out_features, match.in_features):
            return (
                f"graph linear is [{match.out_features}, {match.in_features}], checkpoint layer is "
                f"[{layer.out_features}, {layer.in_features}]"
            )
        return None

    def replacement(self, match: LinearMatch) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        node, tensors = sqz_linear_node(match.module, self.packed[match.module], match.x, match.node.output[0], self.store)
        logger.debug("%s: %s -> SqzLinear (%d inputs)", self.name, self.describe(match), len(node.input))
        return [node], tensors

    def finish(self, model: onnx.ModelProto, result: PassResult) -> None:
        if result.count:
            fn.add_function(model)

    def unmatched(self) -> list[str]:
        """Quantized layers that no node was rewritten for (after ``run``)."""
        return [name for name in self.packed if name not in self.rewritten]
