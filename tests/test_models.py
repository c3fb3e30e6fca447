"""Model discovery: which linears get quantized, and clear errors for unusable specs."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import make_tiny_model, save_tiny_model

from sqz_export.errors import UserError
from sqz_export.models import load_model, quantizable_linears


@pytest.mark.parametrize(("arch", "per_layer"), [("llama", 7), ("opt", 6)])
def test_quantizable_linears_are_the_decoder_linears_only(arch: str, per_layer: int) -> None:
    layers = quantizable_linears(make_tiny_model(arch))
    assert len(layers) == 2 * per_layer
    assert not any("lm_head" in name or "embed" in name for name in layers)


def test_load_model_from_a_folder(tmp_path: Path) -> None:
    loaded = load_model(str(save_tiny_model(tmp_path / "tiny", "opt")))
    assert type(loaded.model).__name__ == "OPTForCausalLM"
    assert loaded.source == str((tmp_path / "tiny").resolve())


def test_missing_paths_are_reported_as_such(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist; expected a model folder, a .gguf file, or a hub id"):
        load_model(str(tmp_path / "missing.gguf"))
