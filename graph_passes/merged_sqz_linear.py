"""Pass (session time, onnxruntime CPU with the custom-op library): SqzLinear nodes on one x -> one node + Split.

A LLaMA layer's q/k/v projections read the same x, and so do gate/up. Each SqzLinear call in
onnxruntime costs a fixed part beside its kernel (the adapter, the hand-off to the intra-op threads,
the node's dispatch), and k/v are small (SmolLM2: 192 x 576), so a decode step of 210 calls pays it 210
times. Rows of the packed format are independent (each row has its own indices, LUT and CSR row), so
the layers' rows concatenate into one layer whose output a Split cuts back into the originals: 120 calls
a step on SmolLM2, every output row computed by the same kernel from the same bytes as before (the
outputs are bit for bit the same). Measured on a scratch copy of SmolLM2 3-bit + 0.45%: 13.15 against
13.99 ms/token (medians of six alternating processes).

The merged tensors are new arrays (the originals' bytes, concatenated), so the pass reads the weights
through ``read`` and leaves them in ``tensors``; the graph declares them as external-data initializers
of a file that does not exist (``MERGED_LOCATION``), whose buffers ``SessionOptions.add_external_initializers``
hands onnxruntime instead (``sqz_export.ort_session``): onnxruntime reads them in place, and no 2 GiB
protobuf limit applies to them. Nodes merge when they share
x, bits, in_features, layout and the sparse variant (and chunk_nnz); chunk_row is recomputed for the
concatenated CSR (``sqz_export.formats.balanced_partition``).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from graph_passes.base import GraphPass, PassResult, attributes
from sqz_export.export import onnx_function as fn
from sqz_export.formats import balanced_partition

MERGED_LOCATION = "sqz-merged-weights (in memory, never read)"
"""External-data location of the merged initializers: a name for messages only."""
WEIGHT_INPUTS = 6
"""qweight, lut, row_ptr, col, val, chunk_row: the inputs after x of a sparse node."""


@dataclasses.dataclass(frozen=True)
class SharedInput:
    indices: tuple[int, ...]
    """Positions in graph.node of the SqzLinear nodes merged, in graph order."""


class SqzLinearMergePass(GraphPass[SharedInput]):
    """Counts the merged nodes (one per group of two or more SqzLinear nodes)."""

    name = "merged-sqz-linear"

    def __init__(self, read: Callable[[str], np.ndarray]) -> None:
        self.read = read
        self.tensors: dict[str, np.ndarray] = {}
        self._replaced: dict[int, list[onnx.NodeProto]] = {}

    def pattern(self, model: onnx.ModelProto) -> Iterator[SharedInput]:
        self.tensors, self._replaced = {}, {}
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for index, node in enumerate(model.graph.node):
            if node.op_type != fn.OP_TYPE or node.domain != fn.DOMAIN:
                continue
            a = attributes(node)
            key = (node.input[0], a.get("bits"), a.get("in_features"), a.get("layout"), node.overload, len(node.input), a.get("chunk_nnz"))
            groups[key].append(index)
        for indices in groups.values():
            if len(indices) > 1:
                yield SharedInput(tuple(indices))

    def check(self, model: onnx.ModelProto, match: SharedInput) -> str | None:
        initializers = {init.name for init in model.graph.initializer}
        for index in match.indices:
            node = model.graph.node[index]
            if not all(name in initializers for name in node.input[1:]):
                return f"{node.name!r} reads a weight that is not an initializer"
        return None

    def describe(self, match: SharedInput) -> str:
        return f"SqzLinear nodes at {list(match.indices)}"

    def rewrite(self, model: onnx.ModelProto, match: SharedInput) -> None:
        nodes = [model.graph.node[index] for index in match.indices]
        first = nodes[0]
        name = f"{first.name}/merged"
        widths = [int(attributes(node)["out_features"]) for node in nodes]
        weights = [[self.read(tensor) for tensor in node.input[1:]] for node in nodes]
        merged = [np.concatenate([w[0] for w in weights]), np.concatenate([w[1] for w in weights])]
        if len(first.input) == 1 + WEIGHT_INPUTS:
            starts = np.cumsum([0] + [int(w[2][-1]) for w in weights[:-1]])
            pieces = [weights[0][2][:1]] + [w[2][1:] + start for w, start in zip(weights, starts, strict=True)]
            row_ptr = np.concatenate(pieces).astype(np.int32)
            chunk_row = balanced_partition(torch.from_numpy(row_ptr), int(attributes(first)["chunk_nnz"])).numpy()
            merged += [row_ptr, np.concatenate([w[3] for w in weights]), np.concatenate([w[4] for w in weights]), chunk_row]
        suffixes = ("qweight", "lut", "row_ptr", "col", "val", "chunk_row")
        inputs = [first.input[0]]
        for suffix, array in zip(suffixes, merged, strict=False):
            tensor = f"{name}.{suffix}"
            self.tensors[tensor] = np.ascontiguousarray(array)
            declared = onnx.TensorProto(name=tensor, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
            declared.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", MERGED_LOCATION), ("offset", "0"), ("length", str(array.nbytes))):
                entry = declared.external_data.add()
                entry.key, entry.value = key, value
            model.graph.initializer.append(declared)
            inputs.append(tensor)
        merged_attributes = dict(attributes(first), out_features=sum(widths))
        fused = helper.make_node(fn.OP_TYPE, inputs, [f"{name}.y"], name=name, domain=fn.DOMAIN, **merged_attributes)
        fused.overload = first.overload
        split = f"{name}.split"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(widths, np.int64), split))
        cut = helper.make_node("Split", [f"{name}.y", split], [node.output[0] for node in nodes], name=f"{name}/split", axis=-1)
        self._replaced[match.indices[0]] = [fused, cut]
        for index in match.indices[1:]:
            self._replaced[index] = []

    def finish(self, model: onnx.ModelProto, result: PassResult) -> None:
        if not self._replaced:
            return
        graph = model.graph
        kept: list[onnx.NodeProto] = []
        for index, node in enumerate(graph.node):
            kept.extend(self._replaced.get(index, [node]))
        del graph.node[:]
        graph.node.extend(kept)
