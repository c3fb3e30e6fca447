"""Tiny random-weight causal LMs built in code, so tests never download anything."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

TINY_VOCAB = 128


def make_tiny_model(arch: str = "llama", seed: int = 0) -> PreTrainedModel:
    """A 2-layer fp32 model of the given family with hidden size 64.

    Sizes are chosen so every quantized linear has in_features that is not a multiple of 32 in at
    least one layer type (the OPT fc2 / LLaMA down_proj take intermediate 96), which exercises the
    packing pad path.
    """
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    elif arch == "opt":
        config = OPTConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        )
        model = OPTForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected 'llama' or 'opt'")
    return model.eval()


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (fits TINY_VOCAB), built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({char: index + 3 for index, char in enumerate(chars)})
    assert len(vocab) <= TINY_VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny model plus tokenizer saved as a Hugging Face folder, loadable by sqz_export.models.load_model."""
    make_tiny_model(arch, seed).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps each weight to one of a few values.\n"
    "SqueezeLLM keeps the most sensitive weights exact and clusters the rest with weighted k-means.\n"
) * 40
"""About 8k characters of plain text for calibration/evaluation windows in CLI tests."""
