"""Pass: remove dead nodes and initializers, drop unused functions, sort topologically, infer shapes.

After the SqzLinear rewrite the FP weights (and the Transposes that fed them) are no longer read;
removing them is what makes the file as small as the packed checkpoint. Liveness is computed
backwards from the graph outputs, so chains of dead nodes go in one run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import onnx

from graph_passes.base import GraphPass, PassResult, node_inputs

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
"""Protobuf's 2 GiB message limit: in-memory shape inference is skipped above it."""


@dataclasses.dataclass(frozen=True)
class DeadItem:
    kind: str  # "node" or "initializer"
    name: str
    index: int
    """Position in graph.node (for nodes); names of nodes may be empty or repeated."""


class CleanupPass(GraphPass[DeadItem]):
    """Counts the removed nodes and initializers."""

    name = "cleanup"

    def __init__(self, infer_shapes: bool = True) -> None:
        self.infer_shapes = infer_shapes
        self._dead_nodes: set[int] = set()
        self._dead_inits: set[int] = set()

    def pattern(self, model: onnx.ModelProto) -> Iterator[DeadItem]:
        self._dead_nodes, self._dead_inits = set(), set()
        graph = model.graph
        live = {output.name for output in graph.output}
        live_nodes: set[int] = set()
        changed = True
        while changed:  # backward closure; graph order is not trusted here
            changed = False
            for index, node in enumerate(graph.node):
                if index not in live_nodes and any(out in live for out in node.output):
                    live_nodes.add(index)
                    live.update(node_inputs(node))
                    changed = True
        for index, node in enumerate(graph.node):
            if index not in live_nodes:
                yield DeadItem("node", node.name or node.output[0], index)
        for index, init in enumerate(graph.initializer):
            if init.name not in live:
                yield DeadItem("initializer", init.name, index)

    def check(self, model: onnx.ModelProto, match: DeadItem) -> str | None:
        return None  # ONNX ops have no side effects: whatever no output depends on can go

    def describe(self, match: DeadItem) -> str:
        return f"{match.kind} {match.name!r}"

    def rewrite(self, model: onnx.ModelProto, match: DeadItem) -> None:
        # Indices stay valid while matches are collected; the removal itself happens in finish().
        (self._dead_nodes if match.kind == "node" else self._dead_inits).add(match.index)

    def finish(self, model: onnx.ModelProto, result: PassResult) -> None:
        graph = model.graph
        kept_nodes = [node for index, node in enumerate(graph.node) if index not in self._dead_nodes]
        kept_inits = [init for index, init in enumerate(graph.initializer) if index not in self._dead_inits]
        del graph.node[:]
        graph.node.extend(topological_sort(graph, kept_nodes))
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
        _drop_unused_functions(model)
        produced = {out for node in graph.node for out in node.output}
        stale = [value for value in graph.value_info if value.name not in produced]
        for value in stale:
            graph.value_info.remove(value)
        if self.infer_shapes:
            if model.ByteSize() < PROTOBUF_LIMIT:
                inferred = onnx.shape_inference.infer_shapes(model)
                del graph.value_info[:]
                graph.value_info.extend(inferred.graph.value_info)
            else:
                logger.info("cleanup: model is over 2 GiB; skipping in-memory shape inference")


def topological_sort(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, stable with respect to the given order.

    Raises:
        ValueError: a node reads a value that nothing produces (the graph is broken or cyclic).
    """
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        remaining = []
        for node in pending:
            if node_inputs(node) <= available:
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted(node_inputs(remaining[0]) - available)
            raise ValueError(
                f"node {remaining[0].name or remaining[0].output[0]!r} reads {missing}, which no node produces (cycle or dangling input)"
            )
        pending = remaining
    return ordered


def _drop_unused_functions(model: onnx.ModelProto) -> None:
    nodes = list(model.graph.node) + [node for function in model.functions for node in function.node]
    used = {(node.domain, node.op_type, node.overload) for node in nodes}
    for function in list(model.functions):
        if (function.domain, function.name, function.overload) not in used:
            model.functions.remove(function)
