"""The packed checkpoint: safetensors + config.json ``quantization_config`` + a checksummed manifest.

Folder layout::

    config.json            the model's Hugging Face config plus "quantization_config" (below)
    model.safetensors      non-quantized tensors (fp16) and, per quantized linear NAME:
                             NAME.qweight (int32, layout 1), NAME.lut (fp16), optional NAME.bias,
                             optional NAME.sparse_row_ptr / sparse_col / sparse_val / sparse_chunk_row
    sqz_manifest.json      format version, sha256 and size of every file, shape of every quantized layer
    tokenizer files        as saved by the tokenizer

The manifest is what makes loading safe: a truncated or edited file fails its checksum before any
tensor is trusted, and shapes are checked against the model built from config.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sqz_export import __version__
from sqz_export.atomic import replace_folder
from sqz_export.errors import UserError
from sqz_export.formats import FORMAT_VERSION, LAYOUT_KMAJOR, FormatError, PackedLinear, SparsePart
from sqz_export.tensorfile import LazyTensor, write_safetensors

logger = logging.getLogger(__name__)

FORMAT_NAME = "squeezellm"
"""``quantization_config.quant_method`` of every checkpoint sqz-export writes."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "sqz_manifest.json"
SPARSE_TENSORS = ("sparse_row_ptr", "sparse_col", "sparse_val", "sparse_chunk_row")


@dataclasses.dataclass
class QuantizationConfig:
    """What config.json records under ``quantization_config``."""

    quant_method: str
    """The format, "squeezellm", for every method (what transformers dispatches from_pretrained on; a
    name it owns, such as "gptq", would send the folder to another loader). Checkpoints before the
    ``method`` field said "rtn" here for RTN."""
    bits: int
    sparsity: float  # target fraction of exact weights (0 = dense only)
    sensitive_fraction: float
    modules: list[str]
    source_model: str
    calibration: dict[str, Any] | None = None
    chunk_nnz: int = 0
    layout: int = LAYOUT_KMAJOR
    format_version: int = FORMAT_VERSION
    created_by: str = f"sqz-export {__version__}"
    method: str = ""
    """The algorithm that produced the weights (quantize.pipeline METHODS: lnq, squeezellm, gptq, rtn);
    empty in older checkpoints, where ``quant_method`` names it (see :attr:`algorithm`)."""
    method_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The method's own settings (quantize.pipeline.QuantizeOptions.settings); empty in older checkpoints."""

    @property
    def algorithm(self) -> str:
        return self.method or self.quant_method

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> QuantizationConfig:
        names = {field.name for field in dataclasses.fields(cls)}
        required = {field.name for field in dataclasses.fields(cls) if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise FormatError(f"{where}: quantization_config lacks {', '.join(missing)}")
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclasses.dataclass
class Checkpoint:
    path: Path
    qconfig: QuantizationConfig
    packed: dict[str, PackedLinear]
    hf_config: Any  # transformers.PretrainedConfig
    dense_state: dict[str, torch.Tensor]
    """Non-quantized tensors (embeddings, norms, lm_head, biases of FP layers)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` of every file in ``folder``: the "files" entry of the manifests
    that checkpoints and ONNX folders carry, so a reader can tell a truncated or edited file."""
    return {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(folder.iterdir())
        if path.is_file()
    }


def _packed_tensors(name: str, layer: PackedLinear) -> dict[str, torch.Tensor]:
    tensors = {f"{name}.qweight": layer.qweight, f"{name}.lut": layer.lut}
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias
    if layer.sparse is not None:
        sparse = layer.sparse
        tensors.update({
            f"{name}.sparse_row_ptr": sparse.row_ptr,
            f"{name}.sparse_col": sparse.col,
            f"{name}.sparse_val": sparse.val,
            f"{name}.sparse_chunk_row": sparse.chunk_row,
        })
    return {key: value.contiguous() for key, value in tensors.items()}


def _dense_state(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Non-quantized parameters and persistent buffers, fp16, with tied copies dropped."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if module_name in quantized:
            continue
        if tensor.data_ptr() in seen:  # tied weights (lm_head = embed_tokens): saved once, re-tied on load
            continue
        seen.add(tensor.data_ptr())
        state[key] = (tensor.to(torch.float16) if tensor.is_floating_point() else tensor).contiguous().cpu()
    return state


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Saves a tokenizer in its compact form.

    A fast tokenizer loaded from a GGUF file names the whole GGUF (weights included) as its slow
    "vocab file"; the legacy format would copy those ~100 MB next to every checkpoint and export.
    tokenizer.json alone reloads the same fast tokenizer.
    """
    tokenizer.save_pretrained(str(folder), legacy_format=False if getattr(tokenizer, "is_fast", False) else None)


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    packed: dict[str, PackedLinear],
    qconfig: QuantizationConfig,
    tokenizer: object | None = None,
) -> Path:
    """Writes a checkpoint folder atomically (a temp folder renamed into place).

    Args:
        out_dir: destination folder; replaced if it exists and holds a previous checkpoint.
        model: the FP model the layers were quantized from (config and non-quantized tensors).
        packed: quantized layers keyed by module name.
        qconfig: what to record as quantization_config.
        tokenizer: saved alongside so the folder is self-contained.
    """
    for name, layer in packed.items():
        layer.validate(name)
    tensors: dict[str, torch.Tensor | LazyTensor] = dict(_dense_state(model, set(packed)))
    for name, layer in packed.items():
        tensors.update(_packed_tensors(name, layer))
    return write_checkpoint(out_dir, model.config, tensors, {name: layer.describe() for name, layer in packed.items()}, qconfig, tokenizer)


def write_checkpoint(
    out_dir: str | os.PathLike[str],
    hf_config: Any,
    tensors: Mapping[str, torch.Tensor | LazyTensor],
    modules: Mapping[str, dict[str, Any]],
    qconfig: QuantizationConfig,
    tokenizer: object | None = None,
) -> Path:
    """Writes a checkpoint folder atomically from its tensors, which may be lazy (read one at a time).

    The streamed quantizer passes lazy tensors read from its run folder and the source model, so a
    checkpoint of any size is written holding one tensor in memory.

    Args:
        out_dir: destination folder; replaced if it exists and holds a previous checkpoint.
        hf_config: the model's transformers config.
        tensors: dense (fp16) and packed tensors by state-dict key.
        modules: ``PackedLinear.describe()`` of every quantized module.
        qconfig: what to record as quantization_config.
        tokenizer: saved alongside so the folder is self-contained.
    """
    with replace_folder(out_dir, MANIFEST_FILE, "checkpoint") as tmp:
        # "format": "pt" is what transformers' from_pretrained requires of a safetensors file (sqz_export.hf_quantizer).
        metadata = {"format": "pt", "sqz_format": "sqz-export", "format_version": str(FORMAT_VERSION)}
        with (tmp / WEIGHTS_FILE).open("wb") as handle:
            write_safetensors(handle, tensors, metadata=metadata)
        config = hf_config.to_dict()
        config["quantization_config"] = dataclasses.asdict(qconfig)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        manifest = {
            "format": "sqz-export checkpoint",
            "format_version": FORMAT_VERSION,
            "files": file_checksums(tmp),
            "modules": dict(modules),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    out = Path(out_dir).resolve()
    logger.info("wrote checkpoint %s", out)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FormatError(f"{path.parent}: missing {path.name}; is this an sqz-export checkpoint folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def verify_files(folder: Path, manifest: dict[str, Any], manifest_name: str = MANIFEST_FILE) -> None:
    """Checks every file the manifest lists (as written by :func:`file_checksums`) by size and sha256."""
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise FormatError(f"{path}: listed in {manifest_name} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise FormatError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced?)")
        if sha256_file(path) != entry["sha256"]:
            raise FormatError(f"{path}: sha256 does not match the manifest (the file is corrupt or was edited)")


def read_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Checkpoint:
    """Reads and validates a checkpoint folder without building a model.

    Raises:
        FormatError: missing files, checksum mismatch, unsupported version, or tensors that do not
            match the recorded shapes; the message names the file or tensor.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"checkpoint {folder} is not a folder")
    manifest = _read_json(folder / MANIFEST_FILE)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{folder / MANIFEST_FILE}: format_version {version!r}; this sqz-export ({__version__}) reads version {FORMAT_VERSION}"
        )
    if verify:
        verify_files(folder, manifest)
    config = _read_json(folder / CONFIG_FILE)
    if "quantization_config" not in config:
        raise FormatError(f"{folder / CONFIG_FILE}: no quantization_config; not a quantized checkpoint")
    qconfig = QuantizationConfig.from_dict(config.pop("quantization_config"), str(folder / CONFIG_FILE))
    if qconfig.format_version != FORMAT_VERSION or qconfig.layout != LAYOUT_KMAJOR:
        raise FormatError(f"{folder / CONFIG_FILE}: format_version {qconfig.format_version}, layout {qconfig.layout}; expected {FORMAT_VERSION}, {LAYOUT_KMAJOR}")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{folder / WEIGHTS_FILE}: cannot be read as safetensors ({exc})") from exc

    shapes = manifest.get("modules", {})
    packed: dict[str, PackedLinear] = {}
    for name in qconfig.modules:
        if name not in shapes:
            raise FormatError(f"{folder / MANIFEST_FILE}: no shape recorded for quantized module {name!r}")
        info = shapes[name]
        needed = [f"{name}.qweight", f"{name}.lut"] + ([f"{name}.{t}" for t in SPARSE_TENSORS] if info["nnz"] else [])
        missing = [key for key in needed if key not in tensors]
        if missing:
            raise FormatError(f"{folder / WEIGHTS_FILE}: missing tensors {', '.join(missing)}")
        sparse = None
        if info["nnz"]:
            sparse = SparsePart(
                row_ptr=tensors.pop(f"{name}.sparse_row_ptr"),
                col=tensors.pop(f"{name}.sparse_col"),
                val=tensors.pop(f"{name}.sparse_val"),
                chunk_row=tensors.pop(f"{name}.sparse_chunk_row"),
                chunk_nnz=qconfig.chunk_nnz,
            )
        layer = PackedLinear(
            bits=info["bits"],
            in_features=info["in_features"],
            out_features=info["out_features"],
            qweight=tensors.pop(f"{name}.qweight"),
            lut=tensors.pop(f"{name}.lut"),
            sparse=sparse,
            bias=tensors.pop(f"{name}.bias", None),
        )
        if layer.bits != qconfig.bits:
            raise FormatError(f"{folder}: module {name!r} has bits={layer.bits}, quantization_config says {qconfig.bits}")
        layer.validate(f"{folder.name}:{name}")
        packed[name] = layer
    hf_config = AutoConfig.for_model(**config)
    return Checkpoint(path=folder, qconfig=qconfig, packed=packed, hf_config=hf_config, dense_state=tensors)


def build_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model with SqzLinear modules and the checkpoint's dense tensors loaded."""
    from transformers import AutoModelForCausalLM

    from sqz_export.runtime import replace_linears

    model = AutoModelForCausalLM.from_config(checkpoint.hf_config, dtype=dtype)
    try:
        replace_linears(model, checkpoint.packed)
    except (KeyError, ValueError) as exc:
        raise FormatError(f"{checkpoint.path}: does not match its config.json model: {exc}") from exc
    dense = {key: value.to(dtype) if value.is_floating_point() else value for key, value in checkpoint.dense_state.items()}
    result = model.load_state_dict(dense, strict=False)
    model.tie_weights()
    quantized_buffers = {key for key in model.state_dict() if key.rpartition(".")[0] in checkpoint.packed}
    missing = [key for key in result.missing_keys if key not in quantized_buffers and not _is_tied(model, key)]
    if missing or result.unexpected_keys:
        raise FormatError(
            f"{checkpoint.path / WEIGHTS_FILE}: tensors do not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether a state-dict key is the output embedding tied to the input embedding."""
    output = model.get_output_embeddings()
    return bool(getattr(model.config, "tie_word_embeddings", False)) and output is not None and key.endswith("lm_head.weight")


def load_quantized_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model with SqzLinear layers, tokenizer or None) from a checkpoint folder."""
    from transformers import AutoTokenizer

    checkpoint = read_checkpoint(path)
    model = build_model(checkpoint, dtype)
    tokenizer = None
    if (Path(path) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
