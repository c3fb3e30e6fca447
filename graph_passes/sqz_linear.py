"""Pass: MatMul/Gemm with a quantized layer's weight -> ``sqz::SqzLinear`` with the packed tensors.

Matching is by content, never by exporter-generated names: the graph was exported from a model whose
quantized linears hold their reconstructed weight W = LUT[idx] + S, so each such MatMul's constant
operand equals one layer's W exactly (in the graph's dtype, in either orientation). The pass hashes
every layer's W once, looks each candidate weight up by the hash of its bytes, and confirms a hit with
an exact comparison. The rewritten node reads the packed tensors as initializers named after the
checkpoint layer; the FP weight becomes dead and ``CleanupPass`` removes it.

Patterns (W is the [N, K] weight of y = x @ W^T)::

    MatMul(x, B)                      B initializer [K, N] = W^T
    MatMul(x, Transpose(B, [1, 0]))   B initializer [N, K] = W
    Gemm(x, B[, C]) transB=0|1        B = W^T or W; a bias C becomes Add(SqzLinear(...), C)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_passes.base import GraphPass, PassResult
from sqz_export.export import onnx_function as fn
from sqz_export.formats import LAYOUT_ROWMAJOR, PackedLinear, to_rowmajor

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclasses.dataclass
class LinearMatch:
    node: onnx.NodeProto
    x: str
    weight: str
    """Name of the initializer that holds the weight."""
    weight_is_nk: bool
    """True when the initializer is laid out [N, K] (W itself), False for [K, N] (W^T)."""
    bias: str | None = None
    """Gemm's C input, re-applied as an Add after the op."""
    layer: str | None = None
    """The quantized layer whose weight this is; set by ``check`` when it accepts the match."""


def sqz_linear_node(
    layer_name: str, layer: PackedLinear, x: str, y: str
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The SqzLinear node for one packed layer and the initializers it reads (layout 2).

    The input count carries the variant: 3 for a dense-only layer, 7 (overload ``"sparse"``) when the
    layer has a non-empty sparse part. Bias is not an input: it stays a separate Add in the graph.
    """
    tensors = [
        numpy_helper.from_array(to_rowmajor(layer.qweight).numpy(), f"{layer_name}.qweight"),
        numpy_helper.from_array(layer.lut.numpy(), f"{layer_name}.lut"),
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
            numpy_helper.from_array(sparse.row_ptr.numpy(), f"{layer_name}.sparse_row_ptr"),
            numpy_helper.from_array(sparse.col.numpy(), f"{layer_name}.sparse_col"),
            numpy_helper.from_array(sparse.val.numpy(), f"{layer_name}.sparse_val"),
            numpy_helper.from_array(sparse.chunk_row.numpy(), f"{layer_name}.sparse_chunk_row"),
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


def _digest(array: np.ndarray) -> str:
    """sha256 of the values; adding +0 turns -0.0 into +0.0, which an exporter may flip (same value)."""
    return hashlib.sha256(np.ascontiguousarray(array + array.dtype.type(0)).tobytes()).hexdigest()


class SqzLinearPass(GraphPass[LinearMatch]):
    """Rewrites every MatMul/Gemm whose weight is a quantized layer's reconstructed weight.

    Args:
        packed: quantized layers keyed by checkpoint module name (validated here, so a bad layer fails
            before the graph is touched).
    """

    name = "sqz_linear"

    def __init__(self, packed: dict[str, PackedLinear]) -> None:
        for layer_name, layer in packed.items():
            layer.validate(layer_name)
        self.packed = packed
        self.rewritten: dict[str, str] = {}
        """Layer name -> name of the node it replaced."""
        self._index: dict[int, dict[str, list[str]]] = {}
        self._initializers: dict[str, onnx.TensorProto] = {}

    def _candidate_weights(self, layer_name: str, elem_type: int) -> list[np.ndarray]:
        """W in the graph's dtype; for fp32 graphs also W rounded through fp16 (an fp16 model whose
        exporter upcast one MatMul to fp32 holds that)."""
        weight = self.packed[layer_name].weight().numpy()
        dtype = _FLOAT_TYPES[elem_type]
        if dtype == np.float32:
            return [weight, weight.astype(np.float16).astype(np.float32)]
        return [weight.astype(dtype)]

    def _weights_by_digest(self, elem_type: int) -> dict[str, list[str]]:
        """sha256 of each layer's candidate W [N, K] -> layer names (built once per dtype)."""
        if elem_type not in self._index:
            index: dict[str, list[str]] = {}
            for layer_name in self.packed:
                for weight in self._candidate_weights(layer_name, elem_type):
                    index.setdefault(_digest(weight), []).append(layer_name)
            self._index[elem_type] = index
        return self._index[elem_type]

    def pattern(self, model: onnx.ModelProto) -> Iterator[LinearMatch]:
        self._initializers = {init.name: init for init in model.graph.initializer}
        producers = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                operand = node.input[1]
                transpose = producers.get(operand)
                if operand in self._initializers:
                    yield LinearMatch(node, node.input[0], operand, weight_is_nk=False)
                elif (
                    transpose is not None
                    and transpose.op_type == "Transpose"
                    and transpose.input[0] in self._initializers
                ):
                    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
                    if perm == [1, 0]:
                        yield LinearMatch(node, node.input[0], transpose.input[0], weight_is_nk=True)
            elif node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and node.input[1] in self._initializers:
                trans_b = helper.get_node_attr_value(node, "transB") if _has_attr(node, "transB") else 0
                bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
                yield LinearMatch(node, node.input[0], node.input[1], weight_is_nk=bool(trans_b), bias=bias)

    def describe(self, match: LinearMatch) -> str:
        return f"{match.node.op_type} {match.node.name or match.node.output[0]!r} (weight {match.weight!r})"

    def _layer_for(self, match: LinearMatch) -> str | None:
        init = self._initializers[match.weight]
        array = numpy_helper.to_array(init)
        weight = array if match.weight_is_nk else array.T
        for layer_name in dict.fromkeys(self._weights_by_digest(init.data_type).get(_digest(weight), [])):
            if any(
                np.array_equal(candidate, weight) for candidate in self._candidate_weights(layer_name, init.data_type)
            ):
                return layer_name
        return None

    def check(self, model: onnx.ModelProto, match: LinearMatch) -> str | None:
        init = self._initializers[match.weight]
        if init.data_type not in _FLOAT_TYPES:
            return f"weight is {TensorProto.DataType.Name(init.data_type)}, expected FLOAT or FLOAT16"
        if len(init.dims) != 2:
            return f"weight has rank {len(init.dims)}, expected 2"
        if match.node.op_type == "Gemm":
            for attribute, default in (("alpha", 1.0), ("beta", 1.0), ("transA", 0)):
                if _has_attr(match.node, attribute) and helper.get_node_attr_value(match.node, attribute) != default:
                    return f"Gemm {attribute}={helper.get_node_attr_value(match.node, attribute)}, only {default} is supported"
        layer_name = self._layer_for(match)
        if layer_name is None:
            return f"weight {list(init.dims)} equals no quantized layer's reconstructed weight"
        if layer_name in self.rewritten:
            return f"layer {layer_name!r} was already rewritten at {self.rewritten[layer_name]!r} (weight shared by two nodes)"
        match.layer = layer_name
        return None

    def rewrite(self, model: onnx.ModelProto, match: LinearMatch) -> None:
        layer_name = match.layer
        assert layer_name is not None, "rewrite() called on a match check() did not accept"
        layer = self.packed[layer_name]
        output = match.node.output[0]
        y = f"{output}/sqz_linear" if match.bias else output
        node, tensors = sqz_linear_node(layer_name, layer, match.x, y)
        replacement = [node]
        if match.bias:
            replacement.append(helper.make_node("Add", [y, match.bias], [output], name=f"/{layer_name}/bias_add"))
        position = list(model.graph.node).index(match.node)
        del model.graph.node[position]
        for offset, new in enumerate(replacement):
            model.graph.node.insert(position + offset, new)
        model.graph.initializer.extend(tensors)
        self.rewritten[layer_name] = match.node.name or output
        logger.debug(
            "%s: %s -> SqzLinear of %r (%d inputs)", self.name, self.describe(match), layer_name, len(node.input)
        )

    def finish(self, model: onnx.ModelProto, result: PassResult) -> None:
        if result.count:
            fn.add_function(model)

    def unmatched(self) -> list[str]:
        """Quantized layers that no node was rewritten for (after ``run``)."""
        return [name for name in self.packed if name not in self.rewritten]


def _has_attr(node: onnx.NodeProto, name: str) -> bool:
    return any(attribute.name == name for attribute in node.attribute)
