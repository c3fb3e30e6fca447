"""The baseline's source weights read one tensor at a time from a model folder's safetensors files.

Loading the source model whole (``from_pretrained``) holds all its weights at once, and for safetensors
in the export dtype transformers keeps them as views of the memory-mapped file, so every weight the
baseline export then reads stays resident as file pages: about two bytes per parameter in the
model plus two in the page mappings at the export's peak. The baseline only needs each linear weight
long enough to append it to ``baseline.onnx.data``, so for a folder of safetensors (the usual Hugging
Face layout, sharded or not) the export builds the model without weights, as it does for the
checkpoint, and reads each tensor by its state-dict name from a file opened (and mapped) for that
tensor alone. Other sources (a GGUF file, which transformers dequantizes as a whole; a hub id;
``pytorch_model.bin``) are loaded whole, as before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsSource:
    """Tensors of a model folder's safetensors files, by state-dict name, each read on demand.

    Args:
        files: tensor name -> file holding it.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    @classmethod
    def open(cls, folder: Path) -> SafetensorsSource | None:
        """The folder's tensors (from ``model.safetensors.index.json`` or every ``*.safetensors``), or
        None when the folder holds no safetensors file."""
        from safetensors import safe_open

        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls({name: folder / file for name, file in weight_map.items()})
        files: dict[str, Path] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                files.update(dict.fromkeys(handle.keys(), path))
        return cls(files) if files else None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` in ``dtype``, copied out of its file (which is unmapped again on return)."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor.to(dtype) if tensor.dtype != dtype else tensor.clone()


def open_source(source: str) -> SafetensorsSource | None:
    """The streamed weights of ``source`` when it is a local folder of safetensors files, else None."""
    path = Path(source)
    if not path.is_dir():
        return None
    return SafetensorsSource.open(path)


class LinearWeights:
    """Module name -> its FP weight read from ``source``, for ``DenseLinearPass``.

    The pass reads a module's weight twice in a row (check, then rewrite), so the last tensor read is
    kept until the next module is asked for; no other is held.
    """

    def __init__(self, source: SafetensorsSource, dtype: torch.dtype, modules: set[str]) -> None:
        self.source = source
        self.dtype = dtype
        self.modules = modules
        self._last: tuple[str, torch.Tensor] | None = None

    def __call__(self, module: str) -> torch.Tensor | None:
        key = f"{module}.weight"
        if module not in self.modules or key not in self.source:
            return None
        if self._last is None or self._last[0] != module:
            self._last = None  # drop the previous weight before reading the next
            self._last = (module, self.source.get(key, self.dtype))
        return self._last[1]
