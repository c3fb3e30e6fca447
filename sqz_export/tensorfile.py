"""safetensors files written byte for byte the same for the same tensors.

``safetensors.torch.save_file`` keeps ``__metadata__`` in a Rust HashMap, so its keys come out in a
random order per process and two runs with identical tensors give files with different checksums.
The format is simple (an 8-byte little-endian header length, a JSON header padded with spaces to a
multiple of 8, then the tensor bytes), so it is written here with sorted metadata and a fixed tensor
order: larger element sizes first (every tensor then starts at a multiple of its element size, as
safetensors' own writer arranges), by name within one size. Tensors are streamed to the file one at a
time, so no second copy of the whole state is built in memory. Files read back with
``safetensors.safe_open`` / ``load_file``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor read only when its turn to be written comes (from another file), so a file of any size
    is written holding one tensor at a time."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def numel(self) -> int:
        return math.prod(self.shape)


DTYPE_OF_NAME = {name: dtype for dtype, name in DTYPES.items()}


def write_safetensors(handle: BinaryIO, tensors: Mapping[str, torch.Tensor | LazyTensor], metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` (CPU or not; made contiguous; lazy ones read in turn) to an open binary file, deterministically.

    The caller chooses how the file is made atomic (``atomic.open_for_write``, or a temporary folder
    that is renamed as a whole).

    Raises:
        ValueError: a tensor has a dtype safetensors cannot store, or a lazy tensor loads with another
            dtype or shape than it announced.
    """
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    handle.write(struct.pack("<Q", len(encoded)))
    handle.write(encoded)
    for name in names:
        tensor = tensors[name]
        if isinstance(tensor, LazyTensor):
            announced = tensor
            tensor = tensor.load()
            if tensor.dtype != announced.dtype or tuple(tensor.shape) != tuple(announced.shape):
                raise ValueError(f"tensor {name!r} loaded as {tensor.dtype} {tuple(tensor.shape)}, announced {announced.dtype} {announced.shape}")
        tensor = tensor.detach().cpu().contiguous()
        handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def lazy_tensors(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file as a :class:`LazyTensor` (the file is read when one is loaded)."""
    from safetensors import safe_open

    def reader(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)

        return load

    with safe_open(str(path), framework="pt") as handle:
        views = {name: handle.get_slice(name) for name in handle.keys()}
        return {name: LazyTensor(DTYPE_OF_NAME[view.get_dtype()], tuple(view.get_shape()), reader(name)) for name, view in views.items()}
