"""Pattern / check / rewrite: the shape every graph pass of sqz-export takes.

A pass finds candidate matches (``pattern``), accepts or refuses each with a reason (``check``), and
rewrites the accepted ones (``rewrite``). Refusals are logged at debug level with their reason, and
``run`` returns a :class:`PassResult` whose ``count`` tests compare with what must have happened
(for the SqzLinear pass: the number of quantized linears).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

import onnx

logger = logging.getLogger(__name__)

MatchT = TypeVar("MatchT")


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A candidate the pass looked at and left alone, and why."""

    node: str
    reason: str


@dataclasses.dataclass
class PassResult:
    name: str
    count: int
    """Rewrites (or removals, for cleanup) the pass made."""
    refusals: list[Refusal] = dataclasses.field(default_factory=list)


class GraphPass(abc.ABC, Generic[MatchT]):
    """Base class: subclasses define ``pattern``, ``check`` and ``rewrite``; ``run`` drives them."""

    name: str = "pass"

    @abc.abstractmethod
    def pattern(self, model: onnx.ModelProto) -> Iterable[MatchT]:
        """Candidate matches, found structurally (op types, connectivity)."""

    @abc.abstractmethod
    def check(self, model: onnx.ModelProto, match: MatchT) -> str | None:
        """None to accept the match, else the reason it is refused."""

    @abc.abstractmethod
    def rewrite(self, model: onnx.ModelProto, match: MatchT) -> None:
        """Applies one accepted match to ``model`` in place."""

    def describe(self, match: MatchT) -> str:
        """How a match is named in refusals and logs."""
        return str(match)

    def finish(self, model: onnx.ModelProto, result: PassResult) -> None:
        """Hook after all rewrites (e.g. adding functions once); the default does nothing."""

    def run(self, model: onnx.ModelProto) -> PassResult:
        result = PassResult(self.name, 0)
        # Matches are collected first so a rewrite never changes what later candidates see.
        for match in list(self.pattern(model)):
            reason = self.check(model, match)
            if reason is not None:
                logger.debug("%s: refused %s: %s", self.name, self.describe(match), reason)
                result.refusals.append(Refusal(self.describe(match), reason))
                continue
            self.rewrite(model, match)
            result.count += 1
        self.finish(model, result)
        logger.info("%s: %d rewrites, %d refusals", self.name, result.count, len(result.refusals))
        return result


def run_passes(model: onnx.ModelProto, passes: Sequence[GraphPass]) -> list[PassResult]:
    """Runs passes in order on one model; returns each pass's result."""
    return [graph_pass.run(model) for graph_pass in passes]


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> nodes that read it (top-level graph and subgraphs' outer references)."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node_inputs(node):
            users.setdefault(name, []).append(node)
    return users


def node_inputs(node: onnx.NodeProto) -> set[str]:
    """Inputs of a node including names its subgraphs read from the enclosing scope."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for subgraph in graphs:
            produced = {value.name for value in subgraph.input} | {init.name for init in subgraph.initializer}
            for inner in subgraph.node:
                produced.update(inner.output)
            for inner in subgraph.node:
                names.update(name for name in node_inputs(inner) if name not in produced)
    return names


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes by name, as Python values."""
    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors by value name."""
    values = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    return values


def ensure_opset(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    """Imports ``domain`` into ``model`` unless it is imported already (for nodes a pass adds)."""
    if not any(opset.domain == domain for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
