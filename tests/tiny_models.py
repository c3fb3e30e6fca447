"""Tiny random-weight causal LMs built in code, so tests never download anything."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedModel

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
