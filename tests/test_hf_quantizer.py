"""transformers' from_pretrained on sqz-export checkpoints (sqz_export.hf_quantizer): packed layers,
the same logits as checkpoint.load_quantized_model, generate, and a save_pretrained round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_checkpoint
from transformers import AutoModelForCausalLM

import sqz_export  # noqa: F401  (registers the quantizer)
from sqz_export.checkpoint import WEIGHTS_FILE, load_quantized_model
from sqz_export.errors import UserError
from sqz_export.runtime import SqzLinear

IDS = torch.tensor([[1, 5, 9, 20, 30, 41]])


@pytest.fixture(scope="module", params=["llama", "opt"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf"), request.param)


def packed_layers(model: torch.nn.Module) -> dict[str, SqzLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SqzLinear)}


def test_from_pretrained_gives_packed_layers_with_the_reference_logits(checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    reference, _ = load_quantized_model(checkpoint)
    layers, expected = packed_layers(model), packed_layers(reference)
    assert sorted(layers) == sorted(expected) and layers
    for name, layer in layers.items():
        assert layer.qweight.dtype == torch.int32 and torch.equal(layer.qweight, expected[name].qweight), name
        assert layer.lut.dtype == torch.float16 and layer.has_sparse == expected[name].has_sparse, name
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


def test_generate_and_save_pretrained_round_trip(checkpoint: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    reference, _ = load_quantized_model(checkpoint)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(IDS), "pad_token_id": 0}
    tokens = model.generate(IDS, **kwargs)
    assert tokens.shape == (1, IDS.shape[1] + 6)
    assert torch.equal(tokens, reference.generate(IDS, **kwargs))
    model.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert sorted(packed_layers(again)) == sorted(packed_layers(model))
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_a_corrupt_checkpoint_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    with (broken / WEIGHTS_FILE).open("r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x00" * 8)
    with pytest.raises(UserError, match="sha256"):
        AutoModelForCausalLM.from_pretrained(broken)
