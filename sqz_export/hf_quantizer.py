"""transformers integration: ``AutoModelForCausalLM.from_pretrained(checkpoint)`` returns packed SqzLinear layers.

Importing :mod:`sqz_export` registers (through :mod:`sqz_export._hf_hook`), for every ``quant_method`` an sqz-export checkpoint can carry
(:data:`QUANT_METHODS`), a ``QuantizationConfigMixin`` (:class:`SqzQuantizationConfig`) and an
``HfQuantizer`` (:class:`SqzHfQuantizer`). transformers then loads a checkpoint folder like this:

1. before the weights: each module listed in ``quantization_config.modules`` is swapped for an
   empty :meth:`SqzLinear.shell <sqz_export.runtime.SqzLinear.shell>` (its buffers are named like
   the checkpoint's tensors); the folder's ``sqz_manifest.json`` checksums are verified when present;
2. every tensor of such a module goes through :meth:`SqzHfQuantizer.create_quantized_param`, which
   puts it in the shell as stored (fp16 LUT and values, the layout-1 ``qweight`` turned into the
   kernels' layout 2), so no dense weight is ever built;
3. after the weights: each layer is validated by the checkpoint's own rules
   (:meth:`PackedLinear.validate <sqz_export.formats.PackedLinear.validate>`).

``save_pretrained`` writes the same tensor names with ``qweight`` back in layout 1, so the folder
reloads either way. Folders saved so have no ``sqz_manifest.json`` (transformers does not write
one): ``from_pretrained`` loads them, the ``sqz-export`` commands want a folder from
:func:`sqz_export.checkpoint.save_checkpoint`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from sqz_export.checkpoint import MANIFEST_FILE, QuantizationConfig, _read_json, verify_files
from sqz_export.formats import FormatError, to_kmajor, to_rowmajor
from sqz_export.runtime import SqzLinear

logger = logging.getLogger(__name__)

QUANT_METHODS = ("squeezellm", "rtn")
"""``quantization_config.quant_method`` values that transformers hands to :class:`SqzHfQuantizer`:
"squeezellm", the format every checkpoint is written in (whatever its ``method``: lnq, squeezellm,
gptq, rtn), and "rtn", which older RTN checkpoints carry. A name transformers already owns ("gptq",
"awq", ...) cannot be one: transformers would hand the folder to its own quantizer (register() says
so instead of taking the name over)."""


class SqzQuantizationConfig(QuantizationConfigMixin):
    """The checkpoint's ``quantization_config`` as transformers holds it: every key kept as given, so
    ``save_pretrained`` writes it back unchanged; :attr:`sqz` is the parsed, validated copy."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)
        self.sqz = QuantizationConfig.from_dict(dict(kwargs), "config.json")

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "sqz"}


class SqzHfQuantizer(HfQuantizer):
    """Loads sqz-export checkpoints into packed SqzLinear layers (see the module docstring)."""

    requires_calibration = True  # loads quantized checkpoints only; never quantizes an FP model
    requires_parameters_quantization = True  # every tensor of a quantized module comes through create_quantized_param
    required_packages = ["safetensors"]

    def __init__(self, quantization_config: SqzQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("sqz-export layers are made by `sqz-export quantize`; from_pretrained only loads them")

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return torch.float32 if dtype is None else dtype  # as checkpoint.load_quantized_model

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        qconfig = self.quantization_config.sqz
        folder = Path(getattr(model.config, "_name_or_path", ""))
        if (folder / MANIFEST_FILE).is_file():
            verify_files(folder, _read_json(folder / MANIFEST_FILE))
        modules = dict(model.named_modules())
        for name in qconfig.modules:
            old = modules.get(name)
            if not isinstance(old, torch.nn.Linear):
                raise FormatError(
                    f"{folder}: quantized module {name!r} is {type(old).__name__ if old is not None else 'missing'} "
                    f"in {type(model).__name__}, expected nn.Linear"
                )
            parent_name, _, child = name.rpartition(".")
            shell = SqzLinear.shell(old.in_features, old.out_features, qconfig.bits, qconfig.chunk_nnz, old.bias is not None)
            setattr(modules[parent_name] if parent_name else model, child, shell)
        model.config.quantization_config = self.quantization_config

    def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs: Any) -> bool:
        module, _ = get_module_from_name(model, param_name)
        return isinstance(module, SqzLinear)

    def create_quantized_param(
        self, model: torch.nn.Module, param_value: torch.Tensor, param_name: str, target_device: Any, **kwargs: Any
    ) -> None:
        module, tensor_name = get_module_from_name(model, param_name)
        value = param_value
        if tensor_name == "qweight":
            value = to_rowmajor(value)
        elif tensor_name in ("lut", "sparse_val"):
            value = value.to(torch.float16)  # stored fp16; transformers cast it to the model dtype (exact round trip)
        module._buffers[tensor_name] = value.to(target_device)

    def update_missing_keys(self, model: torch.nn.Module, missing_keys: list[str], prefix: str) -> list[str]:
        """A dense layer has no sparse tensors on disk, and a layer may have no bias: they are not missing."""
        quantized = {name for name, module in model.named_modules() if isinstance(module, SqzLinear)}
        return [key for key in missing_keys if key.rpartition(".")[0] not in quantized]

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        for name, module in model.named_modules():
            if not isinstance(module, SqzLinear):
                continue
            if module.sparse_col is not None and module.sparse_row_ptr.numel() == 0:  # a dense layer
                for buffer in ("sparse_row_ptr", "sparse_col", "sparse_val", "sparse_chunk_row"):
                    module._buffers[buffer] = None
                module.chunk_nnz = 0
            if module.bias is not None and module.bias.numel() == 0:  # the checkpoint keeps no bias for it
                module._buffers["bias"] = None
            if module.qweight.numel() == 0 or module.lut.numel() == 0:
                raise FormatError(f"{model.config._name_or_path}: no qweight/lut tensors for quantized module {name!r}")
            module.to_packed().validate(name)

    def get_state_dict_and_metadata(self, model: torch.nn.Module, safe_serialization: bool = False):
        """The checkpoint's tensors: SqzLinear buffers as they are, except qweight back in layout 1."""
        state = model.state_dict()
        for name, module in model.named_modules():
            if isinstance(module, SqzLinear):
                state[f"{name}.qweight"] = to_kmajor(module.qweight)
        return state, {"sqz_format": "sqz-export"}

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Registers the config and quantizer under every name in :data:`QUANT_METHODS` (once)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    for method in QUANT_METHODS:
        if AUTO_QUANTIZER_MAPPING.get(method) is SqzHfQuantizer:
            continue
        if method in AUTO_QUANTIZATION_CONFIG_MAPPING or method in AUTO_QUANTIZER_MAPPING:
            logger.warning("transformers already has a quantizer named %r; sqz-export checkpoints with it will not load", method)
            continue
        register_quantization_config(method)(SqzQuantizationConfig)
        register_quantizer(method)(SqzHfQuantizer)
