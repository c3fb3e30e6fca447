"""Pass (session time, onnxruntime CPU with the custom-op library): the library's nodes on fp16
activations -> the same nodes on fp32 activations, with Casts at their edges.

onnxruntime's CPU provider has few fp16 kernels: it runs most of an fp16 graph (norms, adds, the
MLP's activation, the baseline's MatMuls) in fp32 between Casts it inserts, and drops each
fp32 -> fp16 -> fp32 pair that meets between two such nodes. ``sqz::SqzLinear`` and
``sqz::DenseLinear`` take fp16 as well as fp32, so onnxruntime kept them on fp16: every call sat between
two of its Casts (and converted x and y once more inside, since the kernels compute in fp32), and the
Splits of merged nodes (``merged_sqz_linear.py``) ran on fp16 between Casts of their own. SmolLM2
3-bit + 0.45%: 520 Casts a decode step, against the FP16 baseline's 430.

This pass gives each such node an fp32 x (``Cast(x)``) and casts its output back to x's type; when the
output's only reader is a Split, the Casts go after the Split's outputs instead, so the Split runs on
fp32. onnxruntime then drops the pairs that meet its own Casts, as it does around the baseline's
MatMuls: 430 Casts a step, the baseline's count. Values that reach a node as fp32 are no longer
rounded to fp16 first (a node fed by a Cast of an fp32 value reads that value), the same as
onnxruntime does for the baseline's MatMuls. Nodes whose x is fp32 already, or whose x's type the graph
does not record, are left as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import onnx
from onnx import TensorProto, helper

from graph_passes.base import GraphPass, consumers

DOMAIN = "sqz"
OP_TYPES = ("SqzLinear", "DenseLinear")
NARROW_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
"""Activation types the pass widens to fp32."""


@dataclasses.dataclass(frozen=True)
class NarrowNode:
    index: int
    """Position of the sqz node in graph.node (the rewrite only appends nodes)."""
    name: str
    elem_type: int
    """x's element type, which the node's output had and its readers keep."""


def _value_types(graph: onnx.GraphProto) -> dict[str, int]:
    values = [*graph.input, *graph.value_info, *graph.output]
    types = {value.name: value.type.tensor_type.elem_type for value in values if value.type.HasField("tensor_type")}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


class Fp32IoPass(GraphPass[NarrowNode]):
    """Counts the nodes moved to fp32. The Casts are appended at the end of the node list: run
    ``CleanupPass`` after it, which sorts."""

    name = "fp32-io"

    def __init__(self) -> None:
        self._readers: dict[str, list[onnx.NodeProto]] = {}
        self._graph_outputs: set[str] = set()

    def pattern(self, model: onnx.ModelProto) -> Iterator[NarrowNode]:
        types = _value_types(model.graph)
        # Read before any rewrite: a rewrite renames only its own node's (or its Split's) values.
        self._readers = consumers(model.graph)
        self._graph_outputs = {output.name for output in model.graph.output}
        for index, node in enumerate(model.graph.node):
            if node.domain == DOMAIN and node.op_type in OP_TYPES:
                yield NarrowNode(index, node.name, types.get(node.input[0], TensorProto.UNDEFINED))

    def check(self, model: onnx.ModelProto, match: NarrowNode) -> str | None:
        if match.elem_type == TensorProto.FLOAT:
            return "x is fp32 already"
        if match.elem_type not in NARROW_TYPES:
            return f"x's element type is {TensorProto.DataType.Name(match.elem_type)} (fp16 or bf16 expected)"
        return None

    def describe(self, match: NarrowNode) -> str:
        return f"{match.name!r}"

    def rewrite(self, model: onnx.ModelProto, match: NarrowNode) -> None:
        graph = model.graph
        node = graph.node[match.index]
        wide_x = f"{node.input[0]}/fp32_for/{node.name}"
        graph.node.append(helper.make_node("Cast", [node.input[0]], [wide_x], name=f"{wide_x}/cast", to=TensorProto.FLOAT))
        node.input[0] = wide_x
        readers = self._readers.get(node.output[0], [])
        is_split = len(readers) == 1 and readers[0].op_type == "Split" and readers[0].domain in ("", "ai.onnx")
        if is_split and node.output[0] not in self._graph_outputs:
            split = readers[0]  # runs on fp32 too; its outputs are cast back
            node.output[0] = split.input[0] = f"{node.output[0]}/fp32"
            self._narrow_outputs(graph, split, match.elem_type)
        else:
            self._narrow_outputs(graph, node, match.elem_type)

    @staticmethod
    def _narrow_outputs(graph: onnx.GraphProto, node: onnx.NodeProto, elem_type: int) -> None:
        """Renames node's outputs to fp32 values and casts each back to its old name and type."""
        for position, name in enumerate(list(node.output)):
            node.output[position] = f"{name}/fp32"
            graph.node.append(helper.make_node("Cast", [f"{name}/fp32"], [name], name=f"{name}/cast_back", to=elem_type))
