"""ONNX external data written tensor by tensor, so no stage holds a whole model's bytes at once.

An exported graph keeps its small tensors inline and puts every tensor of at least ``MIN_BYTES``
into one data file next to it (``model.onnx`` -> ``model.onnx.data``), the way optimum writes models
over protobuf's 2 GiB limit. Tensors start at 4 KiB-aligned offsets so onnxruntime can map them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import numpy as np
import onnx
from onnx import numpy_helper

TensorStore = Callable[[str, np.ndarray], onnx.TensorProto]
"""Turns (initializer name, array) into the TensorProto a graph pass adds to the graph."""
MIN_BYTES = 1024
"""Tensors smaller than this stay inline in the .onnx file."""
ALIGNMENT = 4096


def inline_tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    """The TensorStore that keeps the data in the graph (for in-memory graphs and tests)."""
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


class ExternalData:
    """Appends tensors to ``<onnx path>.data`` and returns initializers that point into it.

    Use as a context manager around the passes that add tensors; ``path`` is the .onnx file the
    graph will be saved as (the data file's location is stored relative to it).
    """

    def __init__(self, onnx_path: Path) -> None:
        self.path = onnx_path.with_name(onnx_path.name + ".data")
        self._file = self.path.open("wb")
        self.bytes_written = 0

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._file.close()

    def __call__(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < MIN_BYTES:
            return inline_tensor(name, array)
        tensor = onnx.TensorProto(
            name=name, dims=array.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        self._append(tensor, memoryview(array.reshape(-1).view(np.uint8)))
        return tensor

    def externalize(self, model: onnx.ModelProto) -> None:
        """Moves the large inline initializers of ``model`` (those the exporter wrote) to the data file."""
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.HasField("raw_data"):
                if len(tensor.raw_data) >= MIN_BYTES:
                    self._append(tensor, memoryview(tensor.raw_data))
                    tensor.ClearField("raw_data")

    def _append(self, tensor: onnx.TensorProto, data: memoryview) -> None:
        offset = -self.bytes_written % ALIGNMENT + self.bytes_written
        self._file.write(b"\0" * (offset - self.bytes_written))
        self._file.write(data)
        self.bytes_written = offset + len(data)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
