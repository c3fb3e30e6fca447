"""The SqzLinear reference module against the dense fp32 reconstruction."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import make_tiny_model, random_packed
from tolerances import tolerance

from sqz_export.models import quantizable_linears
from sqz_export.kernels.reference import sqz_dequantize_reference
from sqz_export.runtime import SqzLinear, replace_linears


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("density", [0.0, 0.02])
@pytest.mark.parametrize("shape", [(5, 33), (64, 96), (17, 1)])
def test_sqz_linear_matches_dense_reconstruction(bits: int, density: float, shape: tuple[int, int]) -> None:
    layer = random_packed(*shape, bits, density)
    module = SqzLinear(layer)
    x = torch.randn(3, 2, shape[1])
    torch.testing.assert_close(module(x), x @ layer.weight().t(), **tolerance("sqz_linear", torch.float32))
    assert torch.equal(module.reconstruct_weight(), layer.weight())
    assert torch.equal(module.to_packed().qweight, layer.qweight)


def test_dequantize_reference_reads_layout2_words() -> None:
    layer = random_packed(7, 77, 3, 0.0)
    module = SqzLinear(layer)
    assert torch.equal(sqz_dequantize_reference(module.qweight, module.lut, 3, 77), layer.dense_weight())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_replace_linears_swaps_every_quantizable_layer(arch: str) -> None:
    model = make_tiny_model(arch)
    layers = quantizable_linears(model)
    packed = {name: random_packed(l.out_features, l.in_features, 4, 0.0, i) for i, (name, l) in enumerate(layers.items())}
    quantized = copy.deepcopy(model)
    assert replace_linears(quantized, packed) == len(layers)
    assert sum(isinstance(m, SqzLinear) for m in quantized.modules()) == len(layers)
    logits = quantized(torch.randint(0, 100, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_replace_linears_rejects_unknown_and_mismatched_layers() -> None:
    model = make_tiny_model("llama")
    with pytest.raises(KeyError, match="not a module"):
        replace_linears(model, {"model.layers.9.mlp.up_proj": random_packed(96, 64, 3, 0.0)})
    with pytest.raises(ValueError, match=r"is \[96, 64\], checkpoint layer is \[64, 64\]"):
        replace_linears(model, {"model.layers.0.mlp.up_proj": random_packed(64, 64, 3, 0.0)})
