"""The model-local ONNX function ``sqz::SqzLinear``: the custom op written in standard ONNX ops.

An exported model carries this FunctionProto next to its graph, so onnxruntime (any execution
provider) runs the very same file that TensorRT runs with the plugin. The function is the
executable specification of the op; ``sqz_export.runtime.SqzLinear`` is its torch twin.

Inputs (the node's actual inputs; the sparse group is either all present or all absent)::

    0 x         T      [..., K]                    activations (fp16 or fp32)
    1 qweight   int32  [N, ceil(K/32) * bits]      layout 2 (formats.LAYOUT_ROWMAJOR)
    2 lut       fp16   [N, 2**bits]                per-row codebook
    3 row_ptr   int32  [N + 1]                     CSR of the exact weights (optional)
    4 col       int32  [nnz]                                                   (optional)
    5 val       fp16   [nnz]                                                   (optional)
    6 chunk_row int32  [ceil(nnz / chunk_nnz)]     balanced partition, plugin only (optional)
    output y    T      [..., N]

A dense-only layer is a node with 3 inputs (the TensorRT plugin tells the two cases apart by the input
count). The function comes in two overloads (IR version 10 ``FunctionProto.overload``): ``""`` with 3
inputs and ``"sparse"`` with 7; a 7-input node sets ``NodeProto.overload = "sparse"``. One body with
optional trailing inputs does not work: ONNX function type inference binds a missing actual input
to an untyped value and every op that reads it (``Optional``, ``If`` branches) fails inference in
both onnx.checker and onnxruntime.

Body, in words: unpack the b-bit indices from the 32-bit words (re-cut into chunks of whole
indices, see ``_unpack_nodes``), look them up in the LUT in fp32, set the sparse positions to
LUT[idx] + S rounded once to x's dtype, and multiply in fp32: y = x @ W^T, rounded to x's dtype.
Rows of the sparse values come from row_ptr without a search: scatter-add a 1 at every row end
``row_ptr[1:]`` into a zero vector of nnz + 1 slots, and the inclusive cumulative sum at position s
is the number of rows that end at or before s, which is the row of non-zero s.

What onnxruntime holds: it constant-folds the body on initializer inputs at session creation, so at
run time it multiplies by a dense fp32 W^T (the file on disk stays packed). Its folding keeps every
tensor it produces until the pass over the whole graph ends, while a tensor stored in the file is read
only while the node consuming it is folded (measured with onnxruntime 1.32: a chain of four Adds on
each of eight stored weights peaks at four copies of all eight), so a session's peak is the sum of
the body's intermediates over all layers, not one layer's. The body is written for that: it
builds W^T directly in [K, N] order (no Transpose copy), in four 4-byte [K, N] tensors (int32
chunk, int32 shifted, int32 index, fp32 W^T; one more fp32 W^T with a sparse part) plus [K/m, N]
chunk tensors, and casts x rather than W (onnxruntime's CPU MatMul is fp32: an fp16 W^T would be
folded a second time into fp32). Measured on 8 layers of 1024 x 2048 at 3 bits, peak RSS of session
creation per weight: 22 bytes dense-only, 29 with 0.45% sparse, against 74 for the previous body
(int64/uint64 [N, K] unpack) and 6 for the same layers as fp16 MatMul initializers
(``benchmarks/memory.py`` measures whole models). No body in standard ops folds within a small
factor of the dense weights: its last step gathers from the LUT with an int32 [K, N] index (Gather
and GatherElements take no narrower one), and index and result are both folded outputs, 8 bytes per
weight before whatever computes the index. ``sqz_export.ort_session`` documents this and offers the
other choices: sqz-export unpacking each layer itself before onnxruntime loads the graph (``--unpack
stream``, the default of its sessions, ``sqz_export.unpacked_graph``), or unpacking on every run
(``--unpack call``). The outputs are bit-identical to the
previous body's on onnxruntime's CPU provider (``tests/test_onnx_function.py``).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

DOMAIN = "sqz"
OP_TYPE = "SqzLinear"
OPSET_VERSION = 1
MIN_ONNX_OPSET = 18
"""BitwiseAnd/BitwiseOr need ai.onnx opset 18 (ScatterND/ScatterElements reduction="add" need 16)."""
MIN_IR_VERSION = 10
"""Function overloads (FunctionProto.overload / NodeProto.overload) arrived with IR version 10."""
SPARSE_OVERLOAD = "sparse"
"""Overload of the 7-input (dense-and-sparse) SqzLinear; the 3-input op uses the default overload ""."""
PLUGIN_NAMESPACE = "sqz"
PLUGIN_VERSION = "1"

DENSE_INPUTS = ("x", "qweight", "lut")
SPARSE_INPUTS = ("row_ptr", "col", "val", "chunk_row")
ATTRIBUTES = ("bits", "in_features", "out_features", "layout", "chunk_nnz", "plugin_namespace", "plugin_version")


def _const_i64(name: str, value: int | list[int]) -> onnx.NodeProto:
    values = value if isinstance(value, list) else [value]
    dims = [len(values)] if isinstance(value, list) else []
    tensor = helper.make_tensor(name, TensorProto.INT64, dims, values)
    return helper.make_node("Constant", [], [name], value=tensor)


def _const_from_attr(name: str, attribute: str) -> onnx.NodeProto:
    """A scalar int64 Constant whose value is the calling node's integer attribute."""
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name=attribute, type=onnx.AttributeProto.INT))
    return node


def _const_u32(name: str, value: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.UINT32, [], [value]))


def _unpack_nodes() -> list[onnx.NodeProto]:
    """W^T fp32 [K, N] = LUT[idx]^T from layout-2 words, in four [K, N] tensors of 4 bytes each.

    1. chunks int32 [C, N], C = ceil(K / m): the row's bit stream re-cut into chunks of
       m = 31 // bits whole indices, so every index sits inside one chunk and a chunk (at most
       31 bits) is a non-negative int32. Chunk c starts at stream bit s = c * m * bits, in word
       s // 32 at offset r = s % 32: ``(lo >> r) | ((hi << 1) << (31 - r))`` masked to m * bits
       bits (two left shifts, so r = 0 never shifts by 32 and drops hi entirely).
    2. chunk_k = chunks[k // m]                          int32 [K, N]
    3. idx = (chunk_k / 2**(bits * (k % m))) mod 2**bits  int32 [K, N] (Div of a non-negative value
       by a power of two is the right shift; Mod keeps the index's bits)
    4. W^T = GatherElements(LUT^T in fp32, idx, axis 0)   fp32 [K, N]

    Chunk and column tensors ([C, N], [K]) are small: C is K / 10 at 3 bits.
    """
    return [
        _const_from_attr("bits_i", "bits"),
        _const_from_attr("k_i", "in_features"),
        _const_i64("zero_i", 0),
        _const_i64("one_i", 1),
        _const_i64("c31_i", 31),
        _const_i64("c32_i", 32),
        _const_u32("one_u", 1),
        _const_u32("c31_u", 31),
        helper.make_node("Div", ["c31_i", "bits_i"], ["m"]),  # whole indices per chunk
        helper.make_node("Mul", ["m", "bits_i"], ["chunk_bits"]),
        helper.make_node("Add", ["k_i", "m"], ["k_plus_m"]),
        helper.make_node("Sub", ["k_plus_m", "one_i"], ["k_round"]),
        helper.make_node("Div", ["k_round", "m"], ["chunk_count"]),  # C = ceil(K / m)
        # Chunk level: word and bit offset of each chunk's first stream bit.
        helper.make_node("Range", ["zero_i", "chunk_count", "one_i"], ["c"]),  # [C]
        helper.make_node("Mul", ["c", "chunk_bits"], ["chunk_start"]),
        helper.make_node("Div", ["chunk_start", "c32_i"], ["word_lo"]),  # [C]
        helper.make_node("Mod", ["chunk_start", "c32_i"], ["offset"]),  # [C] in [0, 32)
        helper.make_node("Shape", ["qweight"], ["words_per_row"], start=1, end=2),  # [1]
        helper.make_node("Sub", ["words_per_row", "one_i"], ["last_word"]),
        helper.make_node("Add", ["word_lo", "one_i"], ["word_hi_raw"]),
        # Successor word, clamped: a clamped duplicate only feeds stream bits past the row's indices.
        helper.make_node("Min", ["word_hi_raw", "last_word"], ["word_hi"]),  # [C]
        helper.make_node("Cast", ["offset"], ["offset_u"], to=TensorProto.UINT32),
        helper.make_node("Unsqueeze", ["offset_u", "one_i"], ["shift_lo"]),  # [C, 1]
        helper.make_node("Sub", ["c31_u", "shift_lo"], ["shift_hi"]),  # [C, 1] in [0, 31]
        # int32 -> uint32 keeps the bit pattern (two's complement), so shifts see the raw words.
        helper.make_node("Cast", ["qweight"], ["words_u"], to=TensorProto.UINT32),  # [N, W]
        helper.make_node("Transpose", ["words_u"], ["words_t"], perm=[1, 0]),  # [W, N]
        helper.make_node("Gather", ["words_t", "word_lo"], ["lo_words"], axis=0),  # [C, N]
        helper.make_node("Gather", ["words_t", "word_hi"], ["hi_words"], axis=0),  # [C, N]
        helper.make_node("BitShift", ["lo_words", "shift_lo"], ["lo_bits"], direction="RIGHT"),
        helper.make_node("BitShift", ["hi_words", "one_u"], ["hi_once"], direction="LEFT"),
        helper.make_node("BitShift", ["hi_once", "shift_hi"], ["hi_bits"], direction="LEFT"),
        helper.make_node("BitwiseOr", ["lo_bits", "hi_bits"], ["stream"]),  # [C, N]
        helper.make_node("Cast", ["chunk_bits"], ["chunk_bits_u"], to=TensorProto.UINT32),
        helper.make_node("BitShift", ["one_u", "chunk_bits_u"], ["chunk_levels"], direction="LEFT"),
        helper.make_node("Sub", ["chunk_levels", "one_u"], ["chunk_mask"]),
        helper.make_node("BitwiseAnd", ["stream", "chunk_mask"], ["chunks_u"]),
        helper.make_node("Cast", ["chunks_u"], ["chunks"], to=TensorProto.INT32),  # [C, N], < 2**31
        # Column level: the chunk of column k and the power of two that brings its index down.
        helper.make_node("Range", ["zero_i", "k_i", "one_i"], ["k"]),  # [K]
        helper.make_node("Div", ["k", "m"], ["chunk_of_k"]),  # [K]
        helper.make_node("Mod", ["k", "m"], ["slot"]),  # [K] in [0, m)
        helper.make_node("Mul", ["slot", "bits_i"], ["slot_shift"]),  # [K] in [0, 31)
        helper.make_node("Cast", ["slot_shift"], ["slot_shift_u"], to=TensorProto.UINT32),
        helper.make_node("BitShift", ["one_u", "slot_shift_u"], ["divisor_u"], direction="LEFT"),
        helper.make_node("Cast", ["divisor_u"], ["divisor_k"], to=TensorProto.INT32),
        helper.make_node("Unsqueeze", ["divisor_k", "one_i"], ["divisor"]),  # [K, 1]
        helper.make_node("Cast", ["bits_i"], ["bits_u"], to=TensorProto.UINT32),
        helper.make_node("BitShift", ["one_u", "bits_u"], ["levels_u"], direction="LEFT"),
        helper.make_node("Cast", ["levels_u"], ["levels"], to=TensorProto.INT32),  # 2**bits
        # The [K, N] tensors.
        helper.make_node("Gather", ["chunks", "chunk_of_k"], ["chunk_k"], axis=0),  # int32 [K, N]
        helper.make_node("Div", ["chunk_k", "divisor"], ["shifted"]),  # int32 [K, N]
        helper.make_node("Mod", ["shifted", "levels"], ["idx"]),  # int32 [K, N] in [0, 2**bits)
        helper.make_node("Cast", ["lut"], ["lut_f32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["lut_f32"], ["lut_t"], perm=[1, 0]),  # [2**bits, N]
        helper.make_node("GatherElements", ["lut_t", "idx"], ["w_dense_t"], axis=0),  # fp32 [K, N]
    ]


def _sparse_nodes() -> list[onnx.NodeProto]:
    """W^T fp32 [K, N] with the sparse positions set to LUT[idx] + S, rounded once to x's dtype.

    The sum is formed on the nnz values only and written with a plain ScatterND (no second [K, N]
    add): rounding it to x's dtype and back is what the whole W went through before the matmul.
    """
    return [
        _const_i64("axis0", 0),
        _const_i64("zero_v", [0]),
        _const_i64("one_v", [1]),
        _const_i64("big_v", [1 << 62]),
        _const_i64("axis0_v", [0]),
        _const_i64("last_v", [-1]),
        helper.make_node("Shape", ["col"], ["nnz"]),  # [1]
        helper.make_node("Add", ["nnz", "one_v"], ["slots"]),
        helper.make_node(
            "ConstantOfShape", ["slots"], ["marks_zero"], value=helper.make_tensor("z", TensorProto.INT64, [1], [0])
        ),
        helper.make_node("Slice", ["row_ptr", "one_v", "big_v", "axis0_v"], ["row_ends_i32"]),  # [N] = row_ptr[1:]
        helper.make_node("Cast", ["row_ends_i32"], ["row_ends"], to=TensorProto.INT64),
        helper.make_node("Shape", ["row_ends"], ["rows"]),
        helper.make_node(
            "ConstantOfShape", ["rows"], ["ones"], value=helper.make_tensor("o", TensorProto.INT64, [1], [1])
        ),
        helper.make_node(
            "ScatterElements", ["marks_zero", "row_ends", "ones"], ["marks"], axis=0, reduction="add"
        ),  # [nnz + 1]
        helper.make_node("CumSum", ["marks", "axis0"], ["row_of_all"]),  # [nnz + 1]
        helper.make_node("Slice", ["row_of_all", "zero_v", "nnz", "axis0_v"], ["row_of"]),  # [nnz] row of non-zero s
        helper.make_node("Cast", ["col"], ["col64"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["row_of", "last_v"], ["row_of2"]),
        helper.make_node("Unsqueeze", ["col64", "last_v"], ["col2"]),
        helper.make_node("Concat", ["col2", "row_of2"], ["coords"], axis=1),  # [nnz, 2] positions in W^T
        helper.make_node("GatherND", ["w_dense_t", "coords"], ["dense_at"]),  # [nnz] LUT[idx] there
        helper.make_node("Cast", ["val"], ["val_f32"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["dense_at", "val_f32"], ["sum_f32"]),  # [nnz] fp32
        helper.make_node("CastLike", ["sum_f32", "x"], ["sum_x"]),  # round once to x's dtype
        helper.make_node("Cast", ["sum_x"], ["sum_rounded"], to=TensorProto.FLOAT),
        helper.make_node("ScatterND", ["w_dense_t", "coords", "sum_rounded"], ["w_t"]),  # fp32 [K, N]
    ]


def matmul_nodes(weight_t: str, x: str = "x", y: str = "y", scratch: str = "") -> list[onnx.NodeProto]:
    """y = x @ W^T in fp32, rounded once to x's dtype: the body's last three nodes.

    W^T holds values of x's dtype (LUT entries are fp16; sparse sums were rounded), so for fp16 x this
    is the computation onnxruntime's CPU provider runs for an fp16 MatMul (it casts both operands to
    fp32) without an fp16 copy of W^T next to the fp32 one; for fp32 x the casts are no-ops.
    ``sqz_export.unpacked_graph`` ends each unpacked layer with these same nodes (``x``, ``y``: the
    node's tensors; ``scratch`` prefixes the two intermediate names), so it computes what the folded
    function computes.
    """
    return [
        helper.make_node("Cast", [x], [f"{scratch}x_f32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", [f"{scratch}x_f32", weight_t], [f"{scratch}y_f32"]),  # [..., N]
        helper.make_node("CastLike", [f"{scratch}y_f32", x], [y]),
    ]


def make_functions(onnx_opset: int) -> list[onnx.FunctionProto]:
    """The two overloads of ``sqz::SqzLinear`` for a model whose ai.onnx opset is ``onnx_opset``.

    Overload ``""`` is the dense-only op (3 inputs), overload ``SPARSE_OVERLOAD`` the dense-and-sparse
    op (7 inputs). ONNX resolves a node to the function with its (domain, op_type, overload), so the
    op keeps one name while each body declares exactly the inputs its nodes pass.
    """
    if onnx_opset < MIN_ONNX_OPSET:
        raise ValueError(
            f"SqzLinear's ONNX function needs ai.onnx opset >= {MIN_ONNX_OPSET}, the model uses {onnx_opset}"
        )
    opsets = [helper.make_opsetid("", onnx_opset)]
    dense = helper.make_function(
        DOMAIN, OP_TYPE, list(DENSE_INPUTS), ["y"], _unpack_nodes() + matmul_nodes("w_dense_t"), opsets, list(ATTRIBUTES)
    )
    sparse = helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(DENSE_INPUTS + SPARSE_INPUTS),
        ["y"],
        _unpack_nodes() + _sparse_nodes() + matmul_nodes("w_t"),
        opsets,
        list(ATTRIBUTES),
    )
    sparse.overload = SPARSE_OVERLOAD
    return [dense, sparse]


def add_function(model: onnx.ModelProto) -> None:
    """Adds the function and the ``sqz`` opset import to ``model`` (once; idempotent)."""
    onnx_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if onnx_opset is None:
        raise ValueError("model has no ai.onnx opset import")
    present = {(f.domain, f.name, f.overload) for f in model.functions}
    for function in make_functions(onnx_opset):
        if (function.domain, function.name, function.overload) not in present:
            model.functions.append(function)
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))
