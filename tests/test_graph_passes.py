"""Graph passes: structure (op types, counts) and numerics (onnxruntime before/after) plus negative cases."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tiny_models import make_tiny_model, random_packed, tiny_packed
from tolerances import tolerance

from graph_passes import CleanupPass, SqzLinearPass, run_passes
from graph_passes.cleanup import topological_sort
from sqz_export.errors import UserError
from sqz_export.export.baseline import export_decoder, tensor_bytes
from sqz_export.export.signature import DecoderSignature
from sqz_export.export.sqz_model import quantize_graph, reconstructed_model
from sqz_export.formats import FormatError
from sqz_export.runtime import replace_linears

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def exported() -> dict[tuple[str, str], tuple[torch.nn.Module, dict, onnx.ModelProto]]:
    """(arch, dtype) -> (FP model, packed layers, graph of the model with reconstructed weights)."""
    cache = {}
    for arch in ("llama", "opt"):
        model = make_tiny_model(arch)
        packed = tiny_packed(model)
        for name, dtype in DTYPES.items():
            cache[(arch, name)] = (model, packed, export_decoder(reconstructed_model(model, packed), dtype))
    return cache


def run_logits(graph: onnx.ModelProto, token_ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], DecoderSignature.from_model(graph).feed(token_ids))[0]


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_sqz_linear_pass_rewrites_every_quantized_linear(arch: str, dtype: str, exported: dict) -> None:
    model, packed, original = exported[(arch, dtype)]
    graph = copy.deepcopy(original)
    sqz_pass = SqzLinearPass(packed)
    rewrite, cleanup = run_passes(graph, [sqz_pass, CleanupPass()])

    assert rewrite.count == len(packed)
    assert sqz_pass.unmatched() == []
    ops = Counter(node.op_type for node in graph.graph.node if node.domain == "sqz")
    assert ops == {"SqzLinear": len(packed)}
    for node in graph.graph.node:
        if node.op_type == "SqzLinear":
            layer = packed[node.name.strip("/").removesuffix("/SqzLinear")]
            sparse = layer.sparse is not None and layer.sparse.nnz > 0
            assert len(node.input) == (7 if sparse else 3)
            assert node.overload == ("sparse" if sparse else "")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["bits"] == layer.bits and attrs["layout"] == 2
            assert attrs["plugin_namespace"] == b"sqz" and attrs["plugin_version"] == b"1"
            assert ("chunk_nnz" in attrs) == sparse
    # No FP copy of a quantized weight is left: the cleanup removed one initializer per layer.
    assert cleanup.count >= len(packed)
    weight_bytes = sum(layer.in_features * layer.out_features for layer in packed.values()) * (
        2 if dtype == "fp16" else 4
    )
    assert tensor_bytes(graph) <= tensor_bytes(original) - weight_bytes + sum(
        layer.nbytes() for layer in packed.values()
    )
    onnx.checker.check_model(graph, full_check=True)

    # Numerics: the rewritten graph computes what the FP graph of the reconstructed weights computes,
    # and what the torch SqzLinear reference computes.
    token_ids = np.arange(5, 30, dtype=np.int64)[None]
    before, after = run_logits(original, token_ids), run_logits(graph, token_ids)
    torch_dtype = DTYPES[dtype]
    torch.testing.assert_close(
        torch.from_numpy(after).float(), torch.from_numpy(before).float(), **tolerance("model_logits", torch_dtype)
    )
    reference = copy.deepcopy(model)
    replace_linears(reference, packed)
    with torch.no_grad():
        expected = reference(torch.from_numpy(token_ids)).logits
    torch.testing.assert_close(torch.from_numpy(after).float(), expected, **tolerance("model_logits", torch_dtype))


def test_nothing_to_rewrite_leaves_graph_unchanged(exported: dict) -> None:
    model, _, original = exported[("llama", "fp32")]
    unrelated = tiny_packed(model, bits=4)  # different random layers: no weight in the graph matches
    graph = copy.deepcopy(original)
    result = SqzLinearPass(unrelated).run(graph)
    assert result.count == 0
    assert result.refusals and all("equals no quantized layer" in r.reason for r in result.refusals)
    assert graph.SerializeToString() == original.SerializeToString()


def test_wrong_bits_fails_before_touching_the_graph(exported: dict) -> None:
    _, packed, original = exported[("llama", "fp32")]
    broken = dict(packed)
    name = next(iter(broken))
    broken[name] = copy.copy(broken[name])
    broken[name].bits = 5
    graph = copy.deepcopy(original)
    with pytest.raises(FormatError, match="bits=5"):
        SqzLinearPass(broken).run(graph)
    assert graph.SerializeToString() == original.SerializeToString()


def test_checkpoint_layer_without_a_node_is_a_loud_error(exported: dict) -> None:
    _, packed, original = exported[("llama", "fp32")]
    extra = dict(packed)
    name = next(iter(extra))
    layer = extra[name]
    extra[name] = random_packed(
        layer.out_features, layer.in_features, layer.bits, 0.0, seed=99
    )  # not what the graph holds
    with pytest.raises(UserError, match=f"no node matched: {name}"):
        quantize_graph(copy.deepcopy(original), extra)


def _linear_graph(kind: str, weight: np.ndarray, bias: np.ndarray | None) -> onnx.ModelProto:
    """y = x @ W^T (+ b) as MatMul(x, W^T), MatMul(x, Transpose(W)) or Gemm(x, W, b, transB=1)."""
    n, k = weight.shape
    inits = []
    if kind == "matmul":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), "w_t"))
        nodes = [helper.make_node("MatMul", ["x", "w_t"], ["y"], name="mm")]
    elif kind == "transpose":
        inits.append(numpy_helper.from_array(weight, "w"))
        nodes = [
            helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "w_t"], ["y"], name="mm"),
        ]
    else:
        inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("kind", ["matmul", "transpose", "gemm"])
def test_every_weight_orientation_is_matched(kind: str) -> None:
    layer = random_packed(24, 40, 3, 0.05, seed=3)
    weight = layer.weight().numpy()
    bias = np.linspace(-1, 1, 24, dtype=np.float32)
    graph = _linear_graph(kind, weight, bias)
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    before = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    results = run_passes(graph, [SqzLinearPass({"layer": layer}), CleanupPass()])
    assert results[0].count == 1
    ops = [node.op_type for node in graph.graph.node]
    assert ops == (["SqzLinear", "Add"] if kind == "gemm" else ["SqzLinear"])
    assert {init.name for init in graph.graph.initializer} >= {"layer.qweight", "layer.lut"}
    assert "w" not in {init.name for init in graph.graph.initializer} and "w_t" not in {
        init.name for init in graph.graph.initializer
    }
    after = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    torch.testing.assert_close(
        torch.from_numpy(after), torch.from_numpy(before), **tolerance("sqz_linear", torch.float32)
    )


def test_gemm_with_unsupported_attributes_is_refused() -> None:
    layer = random_packed(8, 32, 4, 0.0)
    graph = _linear_graph("gemm", layer.weight().numpy(), np.zeros(8, np.float32))
    graph.graph.node[0].attribute.append(helper.make_attribute("alpha", 2.0))
    original = graph.SerializeToString()
    result = SqzLinearPass({"layer": layer}).run(graph)
    assert result.count == 0 and "alpha" in result.refusals[0].reason
    assert graph.SerializeToString() == original


def test_cleanup_removes_dead_chains_and_sorts() -> None:
    nodes = [
        helper.make_node("Relu", ["a"], ["y"], name="live"),
        helper.make_node("Neg", ["d1"], ["d2"], name="dead2"),
        helper.make_node("Abs", ["unused"], ["d1"], name="dead1"),
        helper.make_node("Sigmoid", ["x"], ["a"], name="first"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "unused")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = CleanupPass().run(model)
    assert result.count == 3  # two dead nodes and one dead initializer
    assert [node.name for node in model.graph.node] == ["first", "live"]
    assert len(model.graph.initializer) == 0
    onnx.checker.check_model(model, full_check=True)


def test_topological_sort_reports_dangling_inputs() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["missing"], ["y"], name="r")], "g", [], [])
    with pytest.raises(ValueError, match="missing"):
        topological_sort(graph, list(graph.node))
