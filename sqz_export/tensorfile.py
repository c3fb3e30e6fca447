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

import json
import struct
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


def write_safetensors(handle: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` (CPU or not; made contiguous) to an open binary file, deterministically.

    The caller chooses how the file is made atomic (``atomic.open_for_write``, or a temporary folder
    that is renamed as a whole).

    Raises:
        ValueError: a tensor has a dtype safetensors cannot store.
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
        tensor = tensors[name].detach().cpu().contiguous()
        handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
