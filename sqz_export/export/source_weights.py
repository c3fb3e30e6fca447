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

import logging
from pathlib import Path

import torch

from sqz_export.weights import SafetensorsWeights

logger = logging.getLogger(__name__)


def open_source(source: str) -> SafetensorsWeights | None:
    """The streamed weights of ``source`` when it is a local folder of safetensors files, else None."""
    return SafetensorsWeights.open(Path(source))


class LinearWeights:
    """Module name -> its FP weight read from ``source``, for ``DenseLinearPass``.

    The pass reads a module's weight twice in a row (check, then rewrite), so the last tensor read is
    kept until the next module is asked for; no other is held.
    """

    def __init__(self, source: SafetensorsWeights, dtype: torch.dtype, modules: set[str]) -> None:
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
