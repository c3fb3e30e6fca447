"""The pattern both linear passes match: a MatMul on a weightless placeholder, named by its module.

The exporter traces the decoder with every ``nn.Linear`` replaced by a placeholder
(``sqz_export/export/placeholders.py``), which leaves, per linear::

    MatMul(x, CastLike(Expand(TAG, SHAPE), x))    TAG initializer "<module>.weight_placeholder", SHAPE = [K, N]

:class:`LinearPlaceholderPass` finds these, names each by its module (the TAG's name), and rewrites
an accepted one by replacing the MatMul with what the subclass builds; the placeholder chain becomes
dead and ``CleanupPass`` removes it. Matching by module name means no pass ever needs a weight's
content, so no FP copy of a quantized layer exists at any point of the export.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator

import onnx
from onnx import numpy_helper

from graph_passes.base import GraphPass, constant_tensors
from sqz_export.export.external_data import TensorStore, inline_tensor
from sqz_export.export.placeholders import SUFFIX


@dataclasses.dataclass
class LinearMatch:
    node: onnx.NodeProto
    """The MatMul of y = x @ W^T."""
    x: str
    module: str
    """Module name of the linear (the checkpoint's layer name for a quantized one)."""
    in_features: int
    out_features: int


class LinearPlaceholderPass(GraphPass[LinearMatch], abc.ABC):
    """Base of the passes that give placeholder linears their operand.

    Args:
        store: where the new tensors' bytes go (external data of the file being written, or inline).
    """

    def __init__(self, store: TensorStore = inline_tensor) -> None:
        self.store = store
        self.rewritten: dict[str, str] = {}
        """Module name -> name of the node it replaced."""

    def pattern(self, model: onnx.ModelProto) -> Iterator[LinearMatch]:
        producers = {out: node for node in model.graph.node for out in node.output}
        constants = constant_tensors(model.graph)
        for node in model.graph.node:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            cast = producers.get(node.input[1])
            expand = producers.get(cast.input[0]) if cast is not None and cast.op_type == "CastLike" else None
            if expand is None or expand.op_type != "Expand" or not expand.input[0].endswith(SUFFIX):
                continue
            shape = constants.get(expand.input[1])
            if shape is None:
                continue
            in_features, out_features = (int(v) for v in numpy_helper.to_array(shape))
            yield LinearMatch(node, node.input[0], expand.input[0].removesuffix(SUFFIX), in_features, out_features)

    def describe(self, match: LinearMatch) -> str:
        return f"linear {match.module!r} ({match.node.name or match.node.output[0]})"

    def check(self, model: onnx.ModelProto, match: LinearMatch) -> str | None:
        if match.module in self.rewritten:
            return f"module {match.module!r} was already rewritten at {self.rewritten[match.module]!r} (one module, two nodes)"
        return self.check_layer(match)

    @abc.abstractmethod
    def check_layer(self, match: LinearMatch) -> str | None:
        """None when this pass has the layer and its shape is [out_features, in_features], else why not."""

    @abc.abstractmethod
    def replacement(self, match: LinearMatch) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """The nodes computing the MatMul's output from ``match.x``, and the initializers they read."""

    def rewrite(self, model: onnx.ModelProto, match: LinearMatch) -> None:
        nodes, tensors = self.replacement(match)
        position = list(model.graph.node).index(match.node)
        del model.graph.node[position]
        for offset, new in enumerate(nodes):
            model.graph.node.insert(position + offset, new)
        model.graph.initializer.extend(tensors)
        self.rewritten[match.module] = match.node.name or match.node.output[0]
