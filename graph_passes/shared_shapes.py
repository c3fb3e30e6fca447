"""Pass: a Shape node whose input has the same symbolic shape as an earlier Shape's reads that one's output.

Why: torch traces every ``view``/``reshape`` on a dynamic size as its own ``Shape -> Gather ->
Unsqueeze -> Concat`` chain over that layer's activations. The values are the same in every decoder
layer (each hidden state is ``[batch, seq, hidden]``), but nothing in the graph says so, so
onnxruntime computes them again in each layer: on SmolLM2 (30 layers) 3,672 nodes ran per decode step,
about 120 per layer, most of them shape arithmetic on a few int64s, each costing its dispatch. Once
the duplicates read one Shape output, onnxruntime's common-subexpression elimination merges the chains
below them at session creation (2,085 nodes per step), and TensorRT's builder has less to analyse.
The pass changes no value any node computes: tests check every output bit for bit with onnxruntime
running the nodes as written (its optimizer may then fuse the two graphs differently, within a last bit).

Symbolic shapes come from onnxruntime's symbolic shape inference (``onnxruntime.tools``) without its
auto-merge, which may equate two dims a broadcast only relates (one of them may be 1 at run time);
without it, a dim the inference cannot derive from the graph inputs' named dims stays unknown, and a
Shape of a tensor with an unknown dim is refused. Only the graph structure is inferred: weights
(external data or not) are handed to the inference as typed inputs, never read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import onnx

from graph_passes.base import GraphPass, PassResult

logger = logging.getLogger(__name__)

SymbolicShape = tuple[int | str, ...]
SHAPE_CONSTANT_ELEMENTS = 1024
"""Integer initializers up to this size stay values in the inference copy (they may hold shapes, axes,
starts); bigger or floating ones become typed inputs whose data the inference never needs."""


@dataclasses.dataclass(frozen=True)
class ShapeNode:
    index: int
    """Position in graph.node."""
    output: str
    shared: str | None
    """Output of the first Shape node of the same symbolic shape and attributes; None: not inferred."""


def _dims(value: onnx.ValueInfoProto) -> SymbolicShape | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims: list[int | str] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            return None
    return tuple(dims)


def _structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its weights as typed graph inputs: what shape inference needs, none of the bytes."""
    graph = model.graph
    kept, as_inputs = [], []
    for init in graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        integer = init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        external = init.data_location == onnx.TensorProto.EXTERNAL
        if integer and not external and count <= SHAPE_CONSTANT_ELEMENTS:
            kept.append(init)
        else:
            as_inputs.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    skeleton = onnx.helper.make_graph(
        list(graph.node), graph.name, list(graph.input) + as_inputs, list(graph.output), kept
    )
    return onnx.helper.make_model(
        skeleton, opset_imports=list(model.opset_import), functions=list(model.functions), ir_version=model.ir_version
    )


def symbolic_shapes(model: onnx.ModelProto) -> dict[str, SymbolicShape]:
    """Value name -> fully known symbolic shape; empty where the inference fails on this graph."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(_structure_only(model), auto_merge=False, guess_output_rank=False)
    except Exception as exc:  # noqa: BLE001  the tool raises assorted types on graphs it cannot follow
        logger.info("shared-shapes: symbolic shape inference failed (%s: %s); Shape nodes left as they are", type(exc).__name__, exc)
        return {}
    graph = inferred.graph
    shapes: dict[str, SymbolicShape] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = _dims(value)
        if dims is not None:
            shapes[value.name] = dims
    return shapes


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Points every read of a renamed value, in subgraphs too (ONNX forbids shadowing outer names)."""
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in renames:
                node.input[position] = renames[name]
        for attribute in node.attribute:
            for subgraph in list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else []):
                _rename_inputs(subgraph, renames)


class ShapeSharingPass(GraphPass[ShapeNode]):
    """Counts the Shape nodes that now read an earlier one's output (and are removed)."""

    name = "shared-shapes"

    def __init__(self) -> None:
        self._renames: dict[str, str] = {}
        self._removed: set[int] = set()

    def pattern(self, model: onnx.ModelProto) -> Iterator[ShapeNode]:
        self._renames, self._removed = {}, set()
        shapes = symbolic_shapes(model)
        if not shapes:
            return
        first: dict[tuple[SymbolicShape, tuple[tuple[str, int], ...]], str] = {}
        for index, node in enumerate(model.graph.node):
            if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
                continue
            dims = shapes.get(node.input[0])
            if dims is None:
                yield ShapeNode(index, node.output[0], None)
                continue
            key = (dims, tuple(sorted((a.name, a.i) for a in node.attribute)))
            if key in first:
                yield ShapeNode(index, node.output[0], first[key])
            else:
                first[key] = node.output[0]

    def check(self, model: onnx.ModelProto, match: ShapeNode) -> str | None:
        if match.shared is None:
            return "input shape not fully inferred"
        if match.output in {output.name for output in model.graph.output}:
            return "its output is a graph output"
        return None

    def describe(self, match: ShapeNode) -> str:
        return f"Shape {match.output!r}"

    def rewrite(self, model: onnx.ModelProto, match: ShapeNode) -> None:
        # The node list is edited once, in finish(), so the indices of later matches stay valid.
        assert match.shared is not None
        self._renames[match.output] = match.shared
        self._removed.add(match.index)

    def finish(self, model: onnx.ModelProto, result: PassResult) -> None:
        if not self._removed:
            return
        graph = model.graph
        kept = [node for index, node in enumerate(graph.node) if index not in self._removed]
        del graph.node[:]
        graph.node.extend(kept)
        _rename_inputs(graph, self._renames)
        for value in [value for value in graph.value_info if value.name in self._renames]:
            graph.value_info.remove(value)
