"""Pass: placeholder linear -> ``MatMul(x, W^T)`` with the module's FP weight as an initializer.

Builds baseline.onnx (every linear) and the non-quantized linears of model.onnx (lm_head). Weights
come from ``weights`` by module name, one tensor at a time: each is cast to the graph's dtype,
transposed to [K, N] and handed to the store (external data) before the next is touched, so the pass
holds one layer's weight beyond what its source holds. The initializer is ``<module>.weight_t``.

A module in ``shared`` (a tied lm_head) reads an initializer the graph already has, its [N, K]
input embedding, through a Transpose, so the file holds that matrix once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import onnx
import torch
from onnx import helper

from graph_passes.placeholder import LinearMatch, LinearPlaceholderPass
from sqz_export.export.external_data import TensorStore, inline_tensor


class DenseLinearPass(LinearPlaceholderPass):
    """Gives every placeholder linear whose module ``weights`` knows its FP weight.

    Args:
        weights: module name -> weight [N, K] (any float dtype), or None when the module is not this
            pass's (e.g. a quantized layer; it is refused with that reason).
        dtype: dtype of the graph's floating tensors (torch.float16 or torch.float32).
        store: where the weights' bytes go.
        shared: module name -> name of an [N, K] initializer of the graph that is its weight (tied).
    """

    name = "dense_linear"

    def __init__(
        self,
        weights: Callable[[str], torch.Tensor | None],
        dtype: torch.dtype,
        store: TensorStore = inline_tensor,
        shared: dict[str, str] | None = None,
    ) -> None:
        super().__init__(store)
        self.weights = weights
        self.dtype = dtype
        self.shared = shared or {}
        self._initializers: dict[str, onnx.TensorProto] = {}

    def pattern(self, model: onnx.ModelProto) -> Iterator[LinearMatch]:
        self._initializers = {init.name: init for init in model.graph.initializer}
        return super().pattern(model)

    def check_layer(self, match: LinearMatch) -> str | None:
        if match.module in self.shared:
            tied = self._initializers.get(self.shared[match.module])
            if tied is None or list(tied.dims) != [match.out_features, match.in_features]:
                return f"tied weight {self.shared[match.module]!r} is not an initializer of [{match.out_features}, {match.in_features}]"
            return None
        weight = self.weights(match.module)
        if weight is None:
            return "no FP weight for this module (a quantized layer, or not in the weight source)"
        if tuple(weight.shape) != (match.out_features, match.in_features):
            return f"weight is {list(weight.shape)}, the graph linear is [{match.out_features}, {match.in_features}]"
        return None

    def replacement(self, match: LinearMatch) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        if match.module in self.shared:
            transposed = f"{match.module}.weight_t"
            nodes = [
                helper.make_node("Transpose", [self.shared[match.module]], [transposed], perm=[1, 0]),
                helper.make_node("MatMul", [match.x, transposed], [match.node.output[0]], name=match.node.name),
            ]
            return nodes, []
        weight = self.weights(match.module)
        assert weight is not None, "replacement() called on a match check_layer() refused"
        name = f"{match.module}.weight_t"
        tensor = self.store(name, weight.detach().to(self.dtype).t().contiguous().numpy())  # [K, N]
        node = helper.make_node("MatMul", [match.x, name], [match.node.output[0]], name=match.node.name)
        return [node], [tensor]
