"""Weightless linears for tracing: the decoder graph is exported once with no FP copy of any linear.

Every ``nn.Linear`` of the model (quantized or not, lm_head included) is replaced by a
:class:`PlaceholderLinear` that keeps its bias but holds no weight. In the exported graph it reads::

    MatMul(x, CastLike(Expand(TAG, [K, N]), x))      TAG: int64 [1] initializer "<module>.weight_placeholder"

so the graph has each linear's shape and module NAME (initializers keep their state-dict names) and
none of its weight bytes. ``graph_passes`` then swap each placeholder for the real operand: the
packed ``sqz::SqzLinear`` tensors (``SqzLinearPass``) or the FP weight (``DenseLinearPass``), streamed
tensor by tensor into the ONNX file's external data. TAG holds the layer's index only so that the
exporter's de-duplication of equal initializers (which would merge every placeholder into one
name) leaves them apart; its value is never read.

During tracing the placeholder's forward returns zeros of the right shape; nothing downstream of a
linear decides control flow in the supported decoders, so the traced graph is the model's graph.
"""

from __future__ import annotations

import torch
from torch import nn

SUFFIX = ".weight_placeholder"
"""Initializer name of a placeholder = module name + SUFFIX."""


class _PlaceholderMatMul(torch.autograd.Function):
    """x @ W^T for a W that is not there: zeros when run, the placeholder pattern when exported."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, tag: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], out_features)

    @staticmethod
    def symbolic(g: object, x: object, tag: object, in_features: int, out_features: int) -> object:
        shape = g.op("Constant", value_t=torch.tensor([in_features, out_features], dtype=torch.int64))
        weight_t = g.op("CastLike", g.op("Expand", tag, shape), x)  # [K, N]
        return g.op("MatMul", x, weight_t)


class PlaceholderLinear(nn.Module):
    """An ``nn.Linear`` of the same shape and bias, without its weight (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None, index: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = bias
        self.register_buffer("weight_placeholder", torch.tensor([index], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _PlaceholderMatMul.apply(x, self.weight_placeholder, self.in_features, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def replace_with_placeholders(model: nn.Module) -> dict[str, nn.Linear]:
    """Swaps every ``nn.Linear`` of ``model`` for a :class:`PlaceholderLinear` (same bias), in place.

    Returns:
        The replaced linears by module name: their weights (real, or on the meta device for a model
        built without them) are what the graph passes stream in.
    """
    modules = dict(model.named_modules())
    linears = {name: module for name, module in modules.items() if isinstance(module, nn.Linear)}
    for index, (name, linear) in enumerate(linears.items()):
        parent_name, _, child = name.rpartition(".")
        placeholder = PlaceholderLinear(linear.in_features, linear.out_features, linear.bias, index)
        setattr(modules[parent_name] if parent_name else model, child, placeholder)
    return linears
