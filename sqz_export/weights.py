"""A model held one decoder block at a time: a skeleton on the meta device, weights read on demand.

SqueezeLLM's users quantize 7B-70B models, whose fp32 copy does not fit in memory (LLaMA-70B: 280 GB).
The quantizer only ever needs one decoder block's weights at once (plus the embedding for the first
step and the head for the loss), so the model is built on the meta device (shapes only), and
:class:`BlockedModel` reads a block's tensors from the checkpoint when the block is loaded and drops
them when it is unloaded. The weights stay in the checkpoint's own dtype on disk (bf16/fp16 safetensors
shards, or a GGUF file, memory-mapped); only the block being computed is converted to fp32, the
quantizer's working precision, so the results equal those of a model loaded whole in fp32.

A model given in memory (a hub id or a ``pytorch_model.bin`` folder, which cannot be read tensor by
tensor, or a model object passed to the Python API) uses the same interface with every block resident.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from sqz_export.errors import UserError
from sqz_export.models import LoadedModel, ModelFiles, decoder_layers, load_weights

logger = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.float32
"""Every loaded block is converted to this: the statistics and k-means want full precision."""


class WeightSource(Protocol):
    """Tensors by their name in the model's state_dict, read one at a time."""

    def keys(self) -> set[str]: ...

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``key`` in ``dtype`` (default: as stored), never a view of a file's memory map."""
        ...


INDEX_FILE = "model.safetensors.index.json"


def holds_safetensors(folder: Path) -> bool:
    """Whether ``folder`` is a folder of safetensors weights (an index, or ``*.safetensors`` files)."""
    return folder.is_dir() and ((folder / INDEX_FILE).is_file() or any(folder.glob("*.safetensors")))


class SafetensorsWeights:
    """A Hugging Face folder of safetensors shards (``model.safetensors[.index.json]``), read tensor by tensor.

    Serves the streamed quantizer and the export's baseline (``export/source_weights.py``).
    """

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {key: folder / name for key, name in weight_map.items()}
        else:
            files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    files.update(dict.fromkeys(handle.keys(), path))
        if not files:
            raise UserError(f"model folder {folder} holds no safetensors weights")
        missing = sorted({str(path) for path in files.values() if not path.is_file()})
        if missing:
            raise UserError(f"safetensors shard {missing[0]} named by {index.name} is missing")
        self._files = files

    @classmethod
    def open(cls, folder: Path) -> SafetensorsWeights | None:
        """The folder's weights, or None when ``folder`` is no folder of safetensors files."""
        return cls(folder) if holds_safetensors(folder) else None

    def keys(self) -> set[str]:
        return set(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor copied out of its file: safetensors hands out views of a memory map that stay
        mapped (and resident) while they live, and over a whole model would add up to its size."""
        from safetensors import safe_open

        with safe_open(str(self._files[key]), framework="pt") as handle:
            tensor = handle.get_tensor(key)
        return tensor.to(dtype) if dtype is not None and tensor.dtype != dtype else tensor.clone()


class GGUFWeights:
    """A GGUF file's tensors, memory-mapped and dequantized one at a time, named and permuted as
    transformers' GGUF loader does (so the values equal ``from_pretrained(gguf_file=...)``'s)."""

    def __init__(self, path: Path, skeleton: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self._reader = GGUFReader(str(path))
        mapping = get_gguf_hf_weights_map(skeleton)
        self._tensors = {mapping[tensor.name]: tensor for tensor in self._reader.tensors if tensor.name in mapping}
        architecture = skeleton.config.model_type
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=skeleton.config.to_dict())

    def keys(self) -> set[str]:
        return set(self._tensors)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        tensor = self._tensors[key]
        weights = self._processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
        out = torch.from_numpy(np.array(weights, dtype=np.float32))
        mapping = getattr(self._reader.data, "_mmap", None)
        if mapping is not None:  # drop the pages just read from this process's resident set (they stay cached)
            mapping.madvise(mmap.MADV_DONTNEED)
        return out.to(dtype) if dtype is not None else out


class ModuleWeights:
    """The state_dict of a model that is already in memory (no copies: nothing here maps a file)."""

    def __init__(self, model: nn.Module) -> None:
        self._state = model.state_dict(keep_vars=True)

    def keys(self) -> set[str]:
        return set(self._state)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self._state[key].detach()
        return tensor.to(dtype) if dtype is not None else tensor


@dataclasses.dataclass
class BlockedModel:
    """A causal LM whose decoder blocks, embedding and head are loaded only while they compute.

    Attributes:
        model: the model; parameters of unloaded parts live on the meta device (resident models: all
            parameters are real and loading only moves them to ``device``).
        source: where unloaded parameters are read from.
        prefix: module name of the decoder layers (``model.layers``).
        resident: every parameter is real (an in-memory model); nothing is read or dropped.
        device: where loaded parts compute.
    """

    model: nn.Module
    source: WeightSource
    prefix: str
    resident: bool
    device: torch.device
    tokenizer: object = None
    source_name: str = ""

    @property
    def blocks(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def block_linears(self, index: int) -> dict[str, nn.Linear]:
        """The block's nn.Linear modules by full module name (valid while the block is loaded)."""
        block = self.blocks[index]
        return {f"{self.block_name(index)}.{name}": module for name, module in block.named_modules() if isinstance(module, nn.Linear)}

    def load(self, module: nn.Module, dtype: torch.dtype = COMPUTE_DTYPE) -> nn.Module:
        """Reads ``module``'s parameters (in ``dtype``, fp32 unless told, on ``device``); a resident
        module is only moved."""
        if self.resident:
            return module.to(self.device)
        prefix = self._name_of(module)
        state = {}
        for name, param in module.named_parameters():
            key = self._source_key(f"{prefix}.{name}" if prefix else name)
            tensor = self.source.get(key, dtype)
            if tuple(tensor.shape) != tuple(param.shape):
                raise UserError(f"{self.source_name}: tensor {key} has shape {tuple(tensor.shape)}, the model's config expects {tuple(param.shape)}")
            state[name] = tensor.to(self.device)
        module.load_state_dict(state, strict=False, assign=True)
        return module

    def unload(self, module: nn.Module) -> None:
        """Drops ``module``'s parameters (back to meta); a resident module goes back to the CPU."""
        module.to("cpu" if self.resident else "meta")

    def load_block(self, index: int) -> nn.Module:
        """Loads block ``index``; its linears' weights are checked (finite) before anything computes with them."""
        from sqz_export.validate import check_linears

        block = self.load(self.blocks[index])
        if not self.resident:
            check_linears(self.block_linears(index))
        return block

    def unload_block(self, index: int) -> None:
        self.unload(self.blocks[index])

    def dense_keys(self, quantized: set[str]) -> dict[str, torch.Size]:
        """State-dict keys the checkpoint keeps in floating point (all but the quantized linears),
        with tied copies dropped (the head tied to the embedding is re-tied on load), and their shapes."""
        keys: dict[str, torch.Size] = {}
        seen: set[str] = set()
        for key, tensor in self.model.state_dict(keep_vars=True).items():
            if key.rpartition(".")[0] in quantized:
                continue
            origin = self._source_key(key)
            if origin in seen:
                continue
            seen.add(origin)
            keys[key] = tensor.shape
        return keys

    def read(self, key: str) -> torch.Tensor:
        """One state-dict tensor, from the source, in its stored dtype."""
        return self.source.get(self._source_key(key))

    def _name_of(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules(remove_duplicate=False):
            if candidate is module:
                return name
        raise ValueError("module is not part of the model")

    def _source_key(self, key: str) -> str:
        if key in self._keys:
            return key
        tied = _tied_alias(self.model, key)
        if tied is not None and tied in self._keys:
            return tied
        raise UserError(f"{self.source_name}: the weights lack tensor {key!r} that the model's config needs")

    def __post_init__(self) -> None:
        self._keys = self.source.keys()


def _tied_alias(model: nn.Module, key: str) -> str | None:
    """The input embedding's key when ``key`` is the output embedding tied to it (else None)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    names = {module: name for name, module in model.named_modules(remove_duplicate=False)}
    if outputs is None or key != f"{names.get(outputs)}.weight":
        return None
    return f"{names[inputs]}.weight"


def streamable(files: ModelFiles) -> bool:
    """Whether the model's weights can be read tensor by tensor (safetensors folder or GGUF file)."""
    if "gguf_file" in files.kwargs:
        return True
    return holds_safetensors(Path(files.location))


def open_blocked_model(files: ModelFiles, device: str | torch.device = "cpu") -> BlockedModel:
    """The model of :func:`sqz_export.models.open_model`, streamed when its format allows.

    Safetensors folders and GGUF files are read block by block from a meta-device skeleton; anything
    else (a hub id, ``pytorch_model.bin``) is loaded whole in fp32, as before, with a log line saying so.
    """
    if not streamable(files):
        logger.warning("%s is not a safetensors folder or GGUF file: loading it whole in fp32 (its memory grows with the model)", files.source)
        return blocked_from_model(load_weights(files, COMPUTE_DTYPE), device)
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # rotary tables and other buffers are real
        model = AutoModelForCausalLM.from_config(files.config, dtype=COMPUTE_DTYPE)
    model.config.dtype = COMPUTE_DTYPE  # what from_pretrained(dtype=...) records in the config, as checkpoints did
    model.eval()
    location = Path(files.location)
    try:
        source: WeightSource = GGUFWeights(location / str(files.kwargs["gguf_file"]), model) if "gguf_file" in files.kwargs else SafetensorsWeights(location)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (a damaged file: name it, as models.load_weights does)
        raise UserError(f"could not load the weights of model {files.source!r} ({type(exc).__name__}: {exc})") from exc
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    blocked = BlockedModel(model=model, source=source, prefix=prefix, resident=False, device=torch.device(device), tokenizer=files.tokenizer, source_name=files.source)
    for key in model.state_dict():  # every tensor the config needs must exist: fail now, not after an hour
        blocked._source_key(key)
    logger.info("streaming %s block by block (%d blocks; weights stay on disk until used)", files.source, blocked.num_blocks)
    return blocked


def blocked_from_model(loaded: LoadedModel | nn.Module, device: str | torch.device = "cpu") -> BlockedModel:
    """A model already in memory behind the same interface (every block resident)."""
    model = loaded.model if isinstance(loaded, LoadedModel) else loaded
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return BlockedModel(
        model=model,
        source=ModuleWeights(model),
        prefix=prefix,
        resident=True,
        device=torch.device(device),
        tokenizer=loaded.tokenizer if isinstance(loaded, LoadedModel) else None,
        source_name=loaded.source if isinstance(loaded, LoadedModel) else type(model).__name__,
    )

