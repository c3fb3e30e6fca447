"""Checkpoint save/load round trip, and clear errors for corrupt, truncated and mismatched folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model, random_packed

from sqz_export.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    QuantizationConfig,
    build_model,
    load_quantized_model,
    read_checkpoint,
    save_checkpoint,
)
from sqz_export.errors import UserError
from sqz_export.formats import FormatError
from sqz_export.models import quantizable_linears
from sqz_export.runtime import SqzLinear


def write_checkpoint(folder: Path, arch: str = "llama", bits: int = 3, density: float = 0.01) -> tuple[torch.nn.Module, dict]:
    model = make_tiny_model(arch)
    packed = {}
    for seed, (name, linear) in enumerate(quantizable_linears(model).items()):
        layer = random_packed(linear.out_features, linear.in_features, bits, density, seed)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().to(torch.float16)
        packed[name] = layer
    qconfig = QuantizationConfig("squeezellm", bits, 0.0045, 0.0005, sorted(packed), "tiny-test", {"num_tokens": 64}, chunk_nnz=4)
    save_checkpoint(folder, model, packed, qconfig)
    return model, packed


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_round_trip_preserves_every_tensor_and_the_forward_pass(tmp_path: Path, arch: str) -> None:
    model, packed = write_checkpoint(tmp_path / "ckpt", arch)
    checkpoint = read_checkpoint(tmp_path / "ckpt")
    assert checkpoint.qconfig.modules == sorted(packed)
    for name, layer in packed.items():
        loaded = checkpoint.packed[name]
        assert torch.equal(loaded.qweight, layer.qweight) and torch.equal(loaded.lut, layer.lut)
        assert torch.equal(loaded.sparse.col, layer.sparse.col) and torch.equal(loaded.sparse.val, layer.sparse.val)
    quantized, _ = load_quantized_model(tmp_path / "ckpt")
    assert sum(isinstance(m, SqzLinear) for m in quantized.modules()) == len(packed)
    # Non-quantized tensors are stored fp16; everything else is bit-identical, so the logits agree closely.
    reference = build_model(checkpoint)
    x = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(quantized(x).logits, reference(x).logits)
    embed = model.get_input_embeddings().weight.detach().to(torch.float16).to(torch.float32)
    assert torch.equal(quantized.get_input_embeddings().weight.detach(), embed)


def test_tied_embeddings_are_saved_once_and_retied(tmp_path: Path) -> None:
    model = make_tiny_model("opt")  # OPT ties lm_head to the input embedding
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    write_checkpoint(tmp_path / "ckpt", "opt")
    quantized, _ = load_quantized_model(tmp_path / "ckpt")
    assert quantized.lm_head.weight.data_ptr() == quantized.get_input_embeddings().weight.data_ptr()


def test_truncated_weights_fail_the_checksum(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"bytes, the manifest says \d+ \(truncated or replaced\?\)"):
        read_checkpoint(tmp_path / "ckpt")


def test_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="sha256 does not match"):
        read_checkpoint(tmp_path / "ckpt")


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt")
    manifest_path = tmp_path / "ckpt" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="format_version 99; this sqz-export .* reads version 1"):
        read_checkpoint(tmp_path / "ckpt")


def test_checkpoint_for_another_model_shape_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = 128  # the MLP linears no longer match the packed shapes
    config_path.write_text(json.dumps(config))
    checkpoint = read_checkpoint(tmp_path / "ckpt", verify=False)
    with pytest.raises(FormatError, match=r"does not match its config.json model: module .* is \[64, 128\], checkpoint layer is \[64, 96\]"):
        build_model(checkpoint)


def test_missing_folder_and_missing_manifest_are_clear(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a folder"):
        read_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="missing sqz_manifest.json; is this an sqz-export checkpoint folder"):
        read_checkpoint(tmp_path / "empty")


def test_save_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an sqz-export checkpoint; refusing to overwrite"):
        write_checkpoint(tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
