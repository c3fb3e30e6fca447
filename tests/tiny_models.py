"""Tiny test artifacts built in code, so tests never download anything: random-weight causal LMs, a
character tokenizer, random packed layers, and tiny quantized checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from sqz_export.checkpoint import QuantizationConfig, save_checkpoint
from sqz_export.export.signature import DecoderSignature
from sqz_export.formats import PackedLinear
from sqz_export.kernels import benchutil
from sqz_export.models import load_model, quantizable_linears

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


def random_packed(out_features: int, in_features: int, bits: int, density: float, seed: int = 0) -> PackedLinear:
    """benchutil.random_packed with the tiny checkpoints' chunk size (several chunks per small layer)."""
    return benchutil.random_packed(out_features, in_features, bits, density, seed, chunk_nnz=CHUNK_NNZ)


BITS = 3
DENSITY = 0.03
CHUNK_NNZ = 4
"""What random_packed uses for its sparse parts."""
LM_HEAD_SCALE = 8.0
"""The tiny models' lm_head is scaled up so greedy argmax has clear winners (no fp ties)."""


def tiny_packed(model: torch.nn.Module, bits: int = BITS) -> dict[str, PackedLinear]:
    """Random packed layers for every quantizable linear; every other layer has a sparse part, so
    both SqzLinear variants (3 and 7 inputs) appear."""
    return {
        name: random_packed(linear.out_features, linear.in_features, bits, DENSITY if index % 2 else 0.0, seed=index)
        for index, (name, linear) in enumerate(quantizable_linears(model).items())
    }


def make_checkpoint(root: Path, arch: str) -> Path:
    """A tiny source model folder and a checkpoint of random packed layers quantized 'from' it."""
    source = save_tiny_model(root / f"{arch}-source", arch)
    loaded = load_model(str(source))
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(LM_HEAD_SCALE)
    loaded.model.save_pretrained(source)
    packed = tiny_packed(loaded.model)
    qconfig = QuantizationConfig("squeezellm", BITS, DENSITY, 0.0, list(packed), str(source), chunk_nnz=CHUNK_NNZ)
    return save_checkpoint(root / f"{arch}-ckpt", loaded.model, packed, qconfig, loaded.tokenizer)


def run_prefill(path: Path, token_ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    signature = DecoderSignature.from_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], signature.feed(token_ids))[0]
