"""The model-local ONNX function sqz::SqzLinear against the torch reference, on a one-node graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tiny_models import random_packed
from tolerances import tolerance

from graph_passes import sqz_linear_node
from sqz_export.export import onnx_function
from sqz_export.formats import PackedLinear
from sqz_export.runtime import SqzLinear

ELEM_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


def one_node_model(layer: PackedLinear, dtype: torch.dtype) -> onnx.ModelProto:
    node, tensors = sqz_linear_node("layer", layer, "x", "y")
    graph = helper.make_graph(
        [node],
        "sqz_linear",
        [helper.make_tensor_value_info("x", ELEM_TYPES[dtype], ["batch", "tokens", layer.in_features])],
        [helper.make_tensor_value_info("y", ELEM_TYPES[dtype], ["batch", "tokens", layer.out_features])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_function.MIN_ONNX_OPSET)])
    onnx_function.add_function(model)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("density", [0.0, 0.03])
@pytest.mark.parametrize("shape", [(5, 33), (64, 96), (17, 1), (40, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_function_matches_reference(bits: int, density: float, shape: tuple[int, int], dtype: torch.dtype) -> None:
    layer = random_packed(*shape, bits, density, seed=bits * 7 + shape[0])
    model = one_node_model(layer, dtype)
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(2, 3, shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
    y = run(model, x.numpy())
    assert y.dtype == x.numpy().dtype and y.shape == (2, 3, shape[0])
    with torch.no_grad():
        expected = SqzLinear(layer)(x)
    torch.testing.assert_close(torch.from_numpy(y), expected, **tolerance("sqz_linear", dtype))


@pytest.mark.parametrize("density", [0.0, 0.05])
def test_identity_input_gives_exact_weight(density: float) -> None:
    """x = I makes y = W^T: the function's dequantization must be exact, not just close."""
    layer = random_packed(24, 70, 3, density, seed=5)
    y = run(one_node_model(layer, torch.float32), np.eye(70, dtype=np.float32)[None])
    assert np.array_equal(y[0], layer.weight().numpy().T)


def dense_matmul_model(layer: PackedLinear, dtype: torch.dtype) -> onnx.ModelProto:
    """The layer as a plain MatMul on W^T rounded to ``dtype``: what the previous function body (and
    baseline.onnx) made onnxruntime run, so the function's outputs must equal this one's exactly."""
    weight_t = numpy_helper.from_array(layer.weight().to(dtype).numpy().T.copy(), "w_t")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_t"], ["y"])],
        "dense",
        [helper.make_tensor_value_info("x", ELEM_TYPES[dtype], ["batch", "tokens", layer.in_features])],
        [helper.make_tensor_value_info("y", ELEM_TYPES[dtype], ["batch", "tokens", layer.out_features])],
        [weight_t],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_function.MIN_ONNX_OPSET)])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("density", [0.0, 0.03])
@pytest.mark.parametrize("shape", [(40, 128), (7, 2049), (33, 310)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_function_equals_dense_matmul_exactly(
    bits: int, density: float, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    """Bit-identical to a MatMul on the reconstructed weight rounded to x's dtype, for K that is not a
    multiple of 32 or of any chunk size (in the sparse case the rounding of LUT + S matters)."""
    layer = random_packed(*shape, bits, density, seed=bits + shape[1])
    x = torch.randn(2, 5, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype).numpy()
    assert np.array_equal(run(one_node_model(layer, dtype), x), run(dense_matmul_model(layer, dtype), x))


def test_node_contract() -> None:
    dense, _ = sqz_linear_node("d", random_packed(8, 32, 4, 0.0), "x", "y")
    sparse, tensors = sqz_linear_node("s", random_packed(8, 32, 4, 0.2), "x", "y")
    assert (dense.domain, dense.op_type, len(dense.input), dense.overload) == ("sqz", "SqzLinear", 3, "")
    assert (sparse.domain, sparse.op_type, len(sparse.input), sparse.overload) == ("sqz", "SqzLinear", 7, "sparse")
    assert [t.data_type for t in tensors] == [
        TensorProto.INT32,
        TensorProto.FLOAT16,
        TensorProto.INT32,
        TensorProto.INT32,
        TensorProto.FLOAT16,
        TensorProto.INT32,
    ]
    attrs = {a.name: helper.get_attribute_value(a) for a in sparse.attribute}
    assert attrs == {
        "bits": 4,
        "in_features": 32,
        "out_features": 8,
        "layout": 2,
        "chunk_nnz": 4,
        "plugin_namespace": b"sqz",
        "plugin_version": b"1",
    }
    assert "chunk_nnz" not in {a.name for a in dense.attribute}


def test_add_function_is_idempotent_and_sets_ir_version() -> None:
    model = one_node_model(random_packed(8, 32, 3, 0.0), torch.float32)
    onnx_function.add_function(model)
    assert sorted((f.name, f.overload) for f in model.functions) == [("SqzLinear", ""), ("SqzLinear", "sparse")]
    assert [o.version for o in model.opset_import if o.domain == "sqz"] == [1]
    assert model.ir_version >= onnx_function.MIN_IR_VERSION


def test_function_needs_opset_18() -> None:
    with pytest.raises(ValueError, match="opset >= 18"):
        onnx_function.make_functions(17)


def test_onnxruntime_folds_the_unpack_into_a_constant(tmp_path) -> None:
    """With initializer inputs the whole body is constant: ORT's optimizer folds it at session creation,
    so ORT pays the unpack once, not per call (the file on disk stays packed)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(
        one_node_model(random_packed(16, 64, 3, 0.05), torch.float32).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("MatMul") == 1 and set(ops) == {"MatMul", "Cast"}  # Casts of x and y only (no-ops in fp32)
