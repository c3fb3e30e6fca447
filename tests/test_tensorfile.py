"""The deterministic safetensors writer: safetensors reads it back, and its bytes depend only on the tensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sqz_export.tensorfile import write_safetensors

TENSORS = {
    "b.weight": torch.randn(3, 5),
    "a.qweight": torch.randint(0, 9, (7, 2), dtype=torch.int32),
    "lut": torch.randn(4).half(),
    "bf": torch.randn(2).bfloat16(),
    "empty": torch.zeros(0, 4),
    "flags": torch.tensor([True, False]),
    "ids": torch.arange(3),
}
METADATA = {"z": "1", "format": "sqz-export", "a": "2"}


def write(path: Path, tensors: dict[str, torch.Tensor]) -> bytes:
    with path.open("wb") as handle:
        write_safetensors(handle, tensors, METADATA)
    return path.read_bytes()


def test_round_trip_through_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write(path, TENSORS)
    loaded = load_file(str(path))
    assert loaded.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == METADATA


def test_bytes_do_not_depend_on_insertion_order(tmp_path: Path) -> None:
    first = write(tmp_path / "1.safetensors", TENSORS)
    second = write(tmp_path / "2.safetensors", dict(reversed(list(TENSORS.items()))))
    assert first == second
    length = struct.unpack("<Q", first[:8])[0]
    assert length % 8 == 0
    header = json.loads(first[8 : 8 + length])
    assert list(header["__metadata__"]) == sorted(METADATA)
    offsets = [header[name]["data_offsets"][0] for name in header if name != "__metadata__"]
    sizes = [TENSORS[name].element_size() for name in header if name != "__metadata__"]
    assert all(offset % size == 0 for offset, size in zip(offsets, sizes))  # every tensor aligned to its element size
