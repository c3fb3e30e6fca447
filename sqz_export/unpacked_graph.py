"""model.onnx with every SqzLinear unpacked into a dense weight, written one layer at a time.

onnxruntime runs ``sqz::SqzLinear`` without the custom-op library through its ONNX function, and folds
that body at session creation: the result is one dense fp32 W^T per layer, but on the way its constant
folding keeps every intermediate of every layer until the pass ends (``ort_session`` has the
measurements: about 25 bytes per quantized weight, 4-5x the FP16 baseline's session). This module
computes the same W^T outside onnxruntime, one layer at a time (one layer's indices alive at once),
and writes a graph that reaches onnxruntime in the baseline's shape: the weight stored in x's dtype
(fp16 for an fp16 export, whose every W^T value is an fp16 value: the LUT entries are fp16 and the
sparse sums are rounded to x's dtype by the function itself), a Cast to fp32 that onnxruntime folds
as it folds the baseline's, and the function's own ``Cast(x) -> MatMul -> CastLike`` tail. onnxruntime
then holds the dense fp32 weights and nothing more, and multiplies by the same fp32 constants as the
folded function, so the outputs are bit-identical to it (``tests/test_unpacked_graph.py``).

The graph is written to a temporary folder with its data (every initializer, streamed tensor by
tensor: the dense weights plus the model's other tensors, about the size of baseline.onnx) and
removed once the session is built.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sqz_export.errors import UserError
from sqz_export.export import onnx_function as fn
from sqz_export.export.external_data import ExternalData
from sqz_export.export.signature import load_graph

UNPACK_ROWS_WEIGHTS = 1 << 22
"""Weights unpacked at once (rows of a layer at a time, about bits + 12 bytes each); the layer itself
takes 10 bytes per weight (fp32 W, fp32 W^T, W^T in x's dtype)."""


def graph_float_dtype(model: onnx.ModelProto) -> np.dtype:
    """x's dtype in an exported graph: the dtype of its first floating-point output (logits)."""
    for value in model.graph.output:
        elem_type = value.type.tensor_type.elem_type
        if elem_type in (TensorProto.FLOAT16, TensorProto.FLOAT):
            return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    raise UserError("the graph has no fp16 or fp32 output; expected a decoder written by `sqz-export export`")


def dense_weight_t(
    qweight: np.ndarray,
    lut: np.ndarray,
    bits: int,
    in_features: int,
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    dtype: np.dtype,
) -> np.ndarray:
    """W^T [K, N] in ``dtype``, as the SqzLinear function body computes it before its MatMul.

    Args:
        qweight: int32 [N, words] in layout 2 (formats.LAYOUT_ROWMAJOR).
        lut: fp16 [N, 2**bits].
        bits: index width.
        in_features: K.
        sparse: (row_ptr int32 [N + 1], col int32 [nnz], val fp16 [nnz]) or None.
        dtype: x's dtype: the sparse sums LUT[idx] + S are formed in fp32 and rounded once to it.
    """
    rows, words_per_row = qweight.shape
    expected = -(-in_features // 32) * bits  # formats.packed_words, without importing torch here
    if words_per_row != expected:
        raise UserError(f"qweight has {words_per_row} words per row; {in_features} {bits}-bit indices need {expected}")
    lut_f32 = lut.astype(np.float32)
    weight = np.empty((rows, in_features), dtype=np.float32)
    step = max(1, UNPACK_ROWS_WEIGHTS // max(1, in_features))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        # Layout 2: a row's words in order are its bit stream (index j at bits j*bits .. j*bits+bits-1,
        # little-endian words), so the little-endian bits of its bytes are that stream.
        stream = np.unpackbits(np.ascontiguousarray(qweight[start:end]).view(np.uint8), axis=1, bitorder="little")
        bit_planes = stream.reshape(end - start, -1, bits)[:, :in_features]
        indices = np.zeros(bit_planes.shape[:2], dtype=np.intp)
        for t in range(bits):
            indices |= bit_planes[:, :, t].astype(np.intp) << t
        weight[start:end] = np.take_along_axis(lut_f32[start:end], indices, axis=1)
    if sparse is not None:
        row_ptr, col, val = sparse
        row_of = np.repeat(np.arange(rows), np.diff(row_ptr.astype(np.int64)))
        sums = weight[row_of, col] + val.astype(np.float32)
        weight[row_of, col] = sums.astype(dtype).astype(np.float32)
    return np.ascontiguousarray(weight.T).astype(dtype, copy=False)


def _int_attributes(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}


def write_unpacked_graph(model_path: Path, folder: Path) -> Path:
    """Writes ``model_path`` with dense SqzLinear weights into ``folder``; returns the new .onnx path.

    Raises:
        UserError: a SqzLinear node's inputs are not initializers of the graph (not an export's graph).
    """
    model = load_graph(model_path)
    base_dir = model_path.parent
    dtype = graph_float_dtype(model)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    out_path = folder / model_path.name
    replaced: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    dense: list[onnx.TensorProto] = []
    with ExternalData(out_path) as store:
        for node in graph.node:
            if node.op_type != fn.OP_TYPE or node.domain != fn.DOMAIN:
                nodes.append(node)
                continue
            packed = [name for name in node.input[1:] if name]
            missing = [name for name in packed if name not in initializers]
            if missing:
                raise UserError(f"{model_path}: SqzLinear node {node.name!r} reads {missing}, which are not initializers")
            arrays = [numpy_helper.to_array(initializers[name], base_dir=str(base_dir)) for name in packed]
            attributes = _int_attributes(node)
            sparse = (arrays[2], arrays[3], arrays[4]) if len(arrays) > 2 else None
            weight_t = dense_weight_t(arrays[0], arrays[1], attributes["bits"], attributes["in_features"], sparse, dtype)
            del arrays
            prefix = node.name or node.output[0]
            weight_name = f"{prefix}.dense_weight_t"
            dense.append(store(weight_name, weight_t))
            del weight_t
            matmul_input = weight_name
            if dtype != np.float32:
                matmul_input = f"{prefix}.dense_weight_t_f32"
                nodes.append(helper.make_node("Cast", [weight_name], [matmul_input], name=f"{prefix}.cast_weight", to=TensorProto.FLOAT))
            nodes += fn.matmul_nodes(matmul_input, x=node.input[0], y=node.output[0], scratch=f"{prefix}.")
            replaced.update(packed)
        still_read = {name for node in nodes for name in node.input}
        kept = []
        for tensor in graph.initializer:
            if tensor.name in replaced and tensor.name not in still_read:
                continue
            if tensor.data_location == TensorProto.EXTERNAL:
                tensor = store(tensor.name, numpy_helper.to_array(tensor, base_dir=str(base_dir)))
            kept.append(tensor)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + dense)
    del model.functions[:]
    kept_opsets = [opset for opset in model.opset_import if opset.domain != fn.DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept_opsets)
    onnx.save(model, str(out_path))
    return out_path


@contextlib.contextmanager
def unpacked_graph(model_path: Path) -> Iterator[Path]:
    """The path of a temporary unpacked copy of ``model_path``, removed on exit.

    The copy goes next to the model (its folder already holds an export, so it is on a disk with room
    for one, and a tmpfs /tmp would turn the file into memory), or into the system's temporary folder
    when the model's folder is not writable.
    """
    try:
        folder = Path(tempfile.mkdtemp(prefix=".sqz-unpacked-", dir=model_path.parent))
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="sqz-unpacked-"))
    try:
        try:
            written = write_unpacked_graph(model_path, folder)
        except OSError as exc:  # a full disk or a quota: say where, and what needs no copy
            raise UserError(
                f"could not write the unpacked copy of {model_path} to {folder} ({exc}); it needs about the size of "
                "baseline.onnx there. --unpack session (onnxruntime folds in memory) or --unpack call need no copy"
            ) from exc
        yield written
    finally:
        shutil.rmtree(folder, ignore_errors=True)
