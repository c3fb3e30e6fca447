"""Greedy generation with onnxruntime and the KV cache against the torch reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gc

import numpy as np
import pytest
import torch

from sqz_export.checkpoint import load_quantized_model
from sqz_export.cli import main
from sqz_export.export.sqz_model import MODEL_FILE
from sqz_export.generate import OnnxGenerator, greedy_token

STEPS = 16
PROMPT = [5, 17, 42, 9, 33, 71]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_greedy_tokens_match_torch_reference(
    arch: str, tiny_export: Callable[[str, str], Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    model, _ = load_quantized_model(tiny_checkpoint(arch))
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0
        )
    expected_new = expected[0, len(PROMPT) :].tolist()
    # The scaled lm_head (tiny_models.LM_HEAD_SCALE) keeps argmax margins far above fp32 noise, so
    # equality is the right assertion; different tokens mean a cache or position bug.
    result = OnnxGenerator(tiny_export(arch, "fp32") / MODEL_FILE).greedy(PROMPT, STEPS)
    assert result.new_ids == expected_new
    assert len(result.new_ids) == STEPS


def test_cached_steps_equal_full_recompute(tiny_export: Callable[[str, str], Path]) -> None:
    """Logits of the last token after prefill + cached steps equal a single pass over all tokens."""
    generator = OnnxGenerator(tiny_export("llama", "fp32") / MODEL_FILE)
    tokens = PROMPT + [11, 12, 13]
    logits, past = generator.step(torch.tensor([PROMPT]).numpy(), None)
    for token in tokens[len(PROMPT) :]:
        logits, past = generator.step(torch.tensor([[token]]).numpy(), past)
    full, _ = generator.step(torch.tensor([tokens]).numpy(), None)
    torch.testing.assert_close(torch.from_numpy(logits[0, -1]), torch.from_numpy(full[0, -1]), atol=1e-4, rtol=1e-4)


def test_cli_generate(
    tiny_export: Callable[[str, str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    summary = tmp_path / "gen.json"
    folder = tiny_export("llama", "fp16")
    assert (
        main(
            [
                "generate",
                "--onnx",
                str(folder),
                "--prompt",
                "The quick",
                "--max-new-tokens",
                "5",
                "--json",
                str(summary),
            ]
        )
        == 0
    )
    result = json.loads(summary.read_text())
    assert 1 <= len(result["new_ids"]) <= 5
    assert any(line.startswith("The quick") for line in capsys.readouterr().out.splitlines())


def test_cli_generate_rejects_a_non_export_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--onnx", str(tmp_path), "--prompt", "x"]) == 2
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_greedy_token_is_numpys_argmax_first_index_on_ties(dtype: type) -> None:
    logits = np.random.default_rng(0).standard_normal(49152).astype(dtype)
    assert greedy_token(logits) == int(np.argmax(logits))
    logits[[7, 300]] = logits.max() + 1  # a tie: the first index wins, as np.argmax's
    assert greedy_token(logits) == 7


def test_greedy_decoding_restores_the_garbage_collector(tiny_export: Callable[[str, str], Path]) -> None:
    """The loop pauses Python's cyclic collector and gives it back as it was, on or off."""
    generator = OnnxGenerator(tiny_export("llama", "fp32") / MODEL_FILE)
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            generator.greedy([5, 17, 42], 3)
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
