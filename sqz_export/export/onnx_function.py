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

Body, in words: unpack the b-bit indices from the 32-bit words (index j starts at stream bit b*j;
gathering the word and its successor handles indices that straddle a word), look them up in the LUT
in fp32, add the sparse values at (row, col) in fp32, round W once to x's dtype, y = x @ W^T. Rows of
the sparse values come from row_ptr without a search: scatter-add a 1 at every row end
``row_ptr[1:]`` into a zero vector of nnz + 1 slots, and the inclusive cumulative sum at position s
is the number of rows that end at or before s, which is the row of non-zero s.

onnxruntime constant-folds the body on initializer inputs at session creation, so at run time it
multiplies by a dense W; the file on disk stays packed.
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


def _unpack_nodes() -> list[onnx.NodeProto]:
    """idx int64 [N, K] from layout-2 words, then W_dense fp32 [N, K] = LUT[idx]."""
    return [
        _const_from_attr("bits_i", "bits"),
        _const_from_attr("k_i", "in_features"),
        _const_i64("zero_i", 0),
        _const_i64("one_i", 1),
        _const_i64("c32_i", 32),
        _const_i64("mask32_i", 0xFFFFFFFF),
        # uint64 twins for the index mask (BitShift is defined on unsigned types only).
        helper.make_node("Constant", [], ["one_u"], value=helper.make_tensor("one", TensorProto.UINT64, [], [1])),
        helper.make_node("Cast", ["bits_i"], ["bits_u"], to=TensorProto.UINT64),
        # Per column j of W: word index and bit offset of index j's first bit.
        helper.make_node("Range", ["zero_i", "k_i", "one_i"], ["j"]),  # [K]
        helper.make_node("Mul", ["j", "bits_i"], ["start"]),  # [K] stream bit of index j
        helper.make_node("Div", ["start", "c32_i"], ["word_lo"]),  # [K]
        helper.make_node("Mod", ["start", "c32_i"], ["shift_lo"]),  # [K] in [0, 32)
        helper.make_node("Shape", ["qweight"], ["words_per_row"], start=1, end=2),  # [1]
        helper.make_node("Sub", ["words_per_row", "one_i"], ["last_word"]),
        helper.make_node("Add", ["word_lo", "one_i"], ["word_hi_raw"]),
        helper.make_node("Min", ["word_hi_raw", "last_word"], ["word_hi"]),  # [K] successor word, clamped
        helper.make_node("Sub", ["c32_i", "shift_lo"], ["shift_hi"]),  # [K] in (0, 32]
        helper.make_node("Cast", ["shift_lo"], ["shift_lo_u"], to=TensorProto.UINT64),
        helper.make_node("Cast", ["shift_hi"], ["shift_hi_u"], to=TensorProto.UINT64),
        # Words as unsigned 32-bit values held in uint64 (int32 -> int64 sign-extends; mask it off).
        helper.make_node("Cast", ["qweight"], ["words_i64"], to=TensorProto.INT64),
        helper.make_node("BitwiseAnd", ["words_i64", "mask32_i"], ["words_masked"]),
        helper.make_node("Cast", ["words_masked"], ["words"], to=TensorProto.UINT64),  # [N, W]
        helper.make_node("Gather", ["words", "word_lo"], ["lo_words"], axis=1),  # [N, K]
        helper.make_node("Gather", ["words", "word_hi"], ["hi_words"], axis=1),  # [N, K]
        helper.make_node("BitShift", ["lo_words", "shift_lo_u"], ["lo_bits"], direction="RIGHT"),
        # The successor's bits land at positions >= 32 - shift; when the index fits in its word they
        # sit above the mask and vanish, so no select is needed.
        helper.make_node("BitShift", ["hi_words", "shift_hi_u"], ["hi_bits"], direction="LEFT"),
        helper.make_node("BitwiseOr", ["lo_bits", "hi_bits"], ["stream"]),
        helper.make_node("BitShift", ["one_u", "bits_u"], ["levels"], direction="LEFT"),
        helper.make_node("Sub", ["levels", "one_u"], ["index_mask"]),
        helper.make_node("BitwiseAnd", ["stream", "index_mask"], ["idx_u"]),
        helper.make_node("Cast", ["idx_u"], ["idx"], to=TensorProto.INT64),  # [N, K] in [0, 2**bits)
        helper.make_node("Cast", ["lut"], ["lut_f32"], to=TensorProto.FLOAT),
        helper.make_node("GatherElements", ["lut_f32", "idx"], ["w_dense"], axis=1),  # [N, K] fp32
    ]


def _sparse_nodes() -> list[onnx.NodeProto]:
    """W fp32 [N, K] = W_dense + S, with S scattered from the CSR at (row, col)."""
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
        helper.make_node("Concat", ["row_of2", "col2"], ["coords"], axis=1),  # [nnz, 2]
        helper.make_node("Cast", ["val"], ["val_f32"], to=TensorProto.FLOAT),
        helper.make_node("ScatterND", ["w_dense", "coords", "val_f32"], ["w_f32"], reduction="add"),
    ]


def _matmul_nodes(weight: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("CastLike", [weight, "x"], ["w"]),  # round W once to x's dtype
        helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),  # [K, N]
        helper.make_node("MatMul", ["x", "w_t"], ["y"]),  # [..., N]
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
        DOMAIN, OP_TYPE, list(DENSE_INPUTS), ["y"], _unpack_nodes() + _matmul_nodes("w_dense"), opsets, list(ATTRIBUTES)
    )
    sparse = helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(DENSE_INPUTS + SPARSE_INPUTS),
        ["y"],
        _unpack_nodes() + _sparse_nodes() + _matmul_nodes("w_f32"),
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
