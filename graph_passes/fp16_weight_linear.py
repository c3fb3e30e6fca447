"""Pass (session time, onnxruntime CPU with the custom-op library): MatMul on an fp16 weight -> sqz::DenseLinear.

onnxruntime's CPU provider has no fp16 MatMul: it casts the activations to fp32 and folds every fp16
weight into an fp32 copy at session creation, which it then holds and reads at every decode step. On
model.onnx the weights left dense are the lm_head's (SmolLM2's tied head is 49152 x 576, a fifth of
the model; its fp32 copy is 113 MB read per token). ``sqz::DenseLinear`` of libsqz_ort_ops reads the
fp16 weight itself (plugins/kernels/sqzHalfLinearRow.h), so the session holds half the bytes and
reads half per step; measured on the dev machine, 49152 x 576 at M = 1: 2.0 ms against onnxruntime's
fp32 MatMul's 3.9 ms. No exported file holds the op: ``sqz_export.ort_session`` applies the pass to the
graph it hands onnxruntime, so a file stays runnable by any onnxruntime.

Two shapes of weight, as the exporter writes them (``graph_passes/dense_linear.py``):

- ``MatMul(x, Transpose(E))`` with E an fp16 [N, K] initializer (a tied lm_head reads the input
  embedding): DenseLinear(x, E), the Transpose dropped by the cleanup that follows;
- ``MatMul(x, W_t)`` with W_t an fp16 [K, N] initializer: DenseLinear(x, Transpose(W_t)), a Transpose
  of a constant that onnxruntime folds once at session creation (one fp16 copy in [N, K]).

The Transposes are appended at the end of the node list: run ``CleanupPass`` after it, which sorts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import onnx
from onnx import TensorProto, helper

from graph_passes.base import GraphPass, PassResult, ensure_opset

DOMAIN = "sqz"
OP_TYPE = "DenseLinear"


@dataclasses.dataclass(frozen=True)
class Fp16Weight:
    index: int
    """Position of the MatMul in graph.node."""
    weight: str
    """The fp16 initializer: [N, K] when ``transposed`` (read through a Transpose), else [K, N]."""
    transposed: bool


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None


class Fp16WeightLinearPass(GraphPass[Fp16Weight]):
    """Counts the MatMuls now run as DenseLinear."""

    name = "fp16-weight-linear"

    def __init__(self) -> None:
        self._transposed: set[str] = set()

    def pattern(self, model: onnx.ModelProto) -> Iterator[Fp16Weight]:
        self._transposed = set()
        graph = model.graph
        weights = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT16 and len(i.dims) == 2}
        transposes = {
            node.output[0]: node.input[0]
            for node in graph.node
            if node.op_type == "Transpose"
            and node.domain in ("", "ai.onnx")
            and node.input[0] in weights
            and _perm(node) in (None, [1, 0])
        }
        for index, node in enumerate(graph.node):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
                continue
            operand = node.input[1]
            if operand in transposes:
                yield Fp16Weight(index, transposes[operand], transposed=True)
            elif operand in weights:
                yield Fp16Weight(index, operand, transposed=False)

    def check(self, model: onnx.ModelProto, match: Fp16Weight) -> str | None:
        return None  # any MatMul on a 2-D fp16 constant is x W^T over x's last axis

    def describe(self, match: Fp16Weight) -> str:
        return f"MatMul on {match.weight!r}"

    def rewrite(self, model: onnx.ModelProto, match: Fp16Weight) -> None:
        graph = model.graph
        node = graph.node[match.index]
        weight = match.weight
        if not match.transposed:
            weight = f"{match.weight}/as_n_by_k"
            if weight not in self._transposed:  # one Transpose per weight, however many MatMuls read it
                self._transposed.add(weight)
                graph.node.append(helper.make_node("Transpose", [match.weight], [weight], name=weight, perm=[1, 0]))
        dense = helper.make_node(OP_TYPE, [node.input[0], weight], list(node.output), name=node.name, domain=DOMAIN)
        graph.node[match.index].CopyFrom(dense)

    def finish(self, model: onnx.ModelProto, result: PassResult) -> None:
        if result.count:
            ensure_opset(model, DOMAIN)
