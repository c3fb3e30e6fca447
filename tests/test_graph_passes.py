"""Graph passes: structure (op types, counts) and numerics (onnxruntime before/after) plus negative cases."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tiny_models import make_tiny_model, random_packed, tiny_packed
from tolerances import tolerance

from graph_passes import CleanupPass, DenseLinearPass, ShapeSharingPass, SqzLinearPass, run_passes
from graph_passes.cleanup import topological_sort
from sqz_export.errors import UserError
from sqz_export.export.baseline import export_decoder, tensor_bytes
from sqz_export.export.placeholders import replace_with_placeholders
from sqz_export.export.signature import DecoderSignature
from sqz_export.export.sqz_model import dense_graph, quantize_graph
from sqz_export.formats import FormatError
from sqz_export.runtime import replace_linears

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Traced:
    model: torch.nn.Module
    """The FP model (untouched)."""
    packed: dict
    linears: dict[str, torch.nn.Linear]
    """The model's linears by module name (what the placeholders stand for)."""
    graph: onnx.ModelProto
    """Graph traced with every linear as a placeholder."""

    def fp_weight(self, name: str) -> torch.Tensor:
        return self.linears[name].weight

    def reconstructed_weight(self, name: str) -> torch.Tensor:
        """W = LUT[idx] + S for quantized layers, the FP weight for the others."""
        return self.packed[name].weight() if name in self.packed else self.linears[name].weight


@pytest.fixture(scope="module")
def traced() -> dict[tuple[str, str], Traced]:
    cache = {}
    for arch in ("llama", "opt"):
        model = make_tiny_model(arch)
        packed = tiny_packed(model)
        skeleton = copy.deepcopy(model)
        linears = replace_with_placeholders(skeleton)
        for name, dtype in DTYPES.items():
            cache[(arch, name)] = Traced(model, packed, linears, export_decoder(skeleton, dtype))
    return cache


def run_logits(graph: onnx.ModelProto, token_ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], DecoderSignature.from_model(graph).feed(token_ids))[0]


def test_placeholder_graph_holds_no_linear_weight(traced: dict) -> None:
    case = traced[("llama", "fp32")]
    other_bytes = sum(
        p.numel() * 4 for name, p in case.model.named_parameters() if name.removesuffix(".weight") not in case.linears
    )
    assert tensor_bytes(case.graph) <= other_bytes + 1024  # at most embeddings, norms and placeholder tags
    assert len(list(DenseLinearPass(case.fp_weight, torch.float32).pattern(case.graph))) == len(case.linears)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_sqz_linear_pass_rewrites_every_quantized_linear(arch: str, dtype: str, traced: dict) -> None:
    case = traced[(arch, dtype)]
    packed = case.packed
    graph = copy.deepcopy(case.graph)
    sqz_pass = SqzLinearPass(packed)
    rewrite, dense, cleanup = run_passes(
        graph, [sqz_pass, DenseLinearPass(case.fp_weight, DTYPES[dtype]), CleanupPass()]
    )

    assert rewrite.count == len(packed)
    assert sqz_pass.unmatched() == []
    # The one refusal is lm_head, the linear that is not quantized; the dense pass takes it.
    assert [(r.node.split("'")[1], r.reason) for r in rewrite.refusals] == [
        ("lm_head", "not a quantized layer of the checkpoint (left for the dense pass)")
    ]
    assert dense.count == 1 and dense.refusals == []
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
    # Every placeholder chain is gone (MatMul's Expand, CastLike and the tag initializer).
    assert cleanup.count >= 3 * (len(packed) + 1)
    assert not [n for n in graph.graph.node if n.op_type == "Expand" and n.input[0].endswith("_placeholder")]
    onnx.checker.check_model(graph, full_check=True)

    # Numerics: the rewritten graph computes what the FP graph of the reconstructed weights computes,
    # and what the torch SqzLinear reference computes.
    reconstructed = copy.deepcopy(case.graph)
    dense_graph(reconstructed, case.reconstructed_weight, DTYPES[dtype])
    token_ids = np.arange(5, 30, dtype=np.int64)[None]
    before, after = run_logits(reconstructed, token_ids), run_logits(graph, token_ids)
    torch_dtype = DTYPES[dtype]
    torch.testing.assert_close(
        torch.from_numpy(after).float(), torch.from_numpy(before).float(), **tolerance("model_logits", torch_dtype)
    )
    reference = copy.deepcopy(case.model)
    replace_linears(reference, packed)
    with torch.no_grad():
        expected = reference(torch.from_numpy(token_ids)).logits
    torch.testing.assert_close(torch.from_numpy(after).float(), expected, **tolerance("model_logits", torch_dtype))


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_dense_pass_rebuilds_the_fp_model(dtype: str, traced: dict) -> None:
    """The baseline path: every placeholder gets its FP weight; the graph computes the FP model."""
    case = traced[("llama", dtype)]
    graph = copy.deepcopy(case.graph)
    dense, _, _ = dense_graph(graph, case.fp_weight, DTYPES[dtype])
    assert dense.count == len(case.linears)
    assert Counter(n.op_type for n in graph.graph.node)["MatMul"] >= len(case.linears)
    onnx.checker.check_model(graph, full_check=True)
    token_ids = np.arange(5, 30, dtype=np.int64)[None]
    with torch.no_grad():
        expected = case.model(torch.from_numpy(token_ids)).logits
    torch.testing.assert_close(
        torch.from_numpy(run_logits(graph, token_ids)).float(), expected, **tolerance("model_logits", DTYPES[dtype])
    )


def test_nothing_to_rewrite_leaves_graph_unchanged(traced: dict) -> None:
    original = traced[("llama", "fp32")].graph
    graph = copy.deepcopy(original)
    result = SqzLinearPass({}).run(graph)
    assert result.count == 0
    assert result.refusals and all("not a quantized layer" in r.reason for r in result.refusals)
    assert graph.SerializeToString() == original.SerializeToString()


def test_layer_of_another_shape_is_refused(traced: dict) -> None:
    case = traced[("llama", "fp32")]
    name, layer = next(iter(case.packed.items()))
    other = {name: random_packed(layer.out_features + 1, layer.in_features, layer.bits, 0.0)}
    graph = copy.deepcopy(case.graph)
    result = SqzLinearPass(other).run(graph)
    assert result.count == 0
    reason = next(r.reason for r in result.refusals if f"'{name}'" in r.node)
    assert f"checkpoint layer is [{layer.out_features + 1}, {layer.in_features}]" in reason
    assert graph.SerializeToString() == case.graph.SerializeToString()


def test_wrong_bits_fails_before_touching_the_graph(traced: dict) -> None:
    case = traced[("llama", "fp32")]
    broken = dict(case.packed)
    name = next(iter(broken))
    broken[name] = copy.copy(broken[name])
    broken[name].bits = 5
    graph = copy.deepcopy(case.graph)
    with pytest.raises(FormatError, match="bits=5"):
        SqzLinearPass(broken).run(graph)
    assert graph.SerializeToString() == case.graph.SerializeToString()


def test_checkpoint_layer_without_a_node_is_a_loud_error(traced: dict) -> None:
    case = traced[("llama", "fp32")]
    extra = dict(case.packed)
    extra["model.layers.7.mlp.up_proj"] = random_packed(96, 64, 3, 0.0)  # no such module in the graph
    with pytest.raises(UserError, match="no node matched: model.layers.7.mlp.up_proj"):
        quantize_graph(copy.deepcopy(case.graph), extra, case.fp_weight, torch.float32)


def test_linear_without_a_weight_is_a_loud_error(traced: dict) -> None:
    """A placeholder no pass fills would compute with zeros: the export refuses instead."""
    case = traced[("llama", "fp32")]
    with pytest.raises(UserError, match="1 linears of the graph got no weight: linear 'lm_head'"):
        quantize_graph(copy.deepcopy(case.graph), case.packed, lambda name: None, torch.float32)


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


def _all_outputs(graph: onnx.ModelProto, feed: dict[str, np.ndarray], optimize: bool = True) -> list[np.ndarray]:
    """Every graph output; ``optimize=False`` runs the nodes as written (no fusion picks another kernel)."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _decode_feeds(graph: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Prefill at batch 1 and 2, then one and three new tokens after a real cache."""
    signature = DecoderSignature.from_model(graph)
    prompt = np.arange(5, 12, dtype=np.int64)[None]
    feeds = [signature.feed(prompt), signature.feed(np.stack([prompt[0], prompt[0][::-1]]))]
    outputs = _all_outputs(graph, feeds[0])
    past = dict(zip(signature.past_names, outputs[1:], strict=True))
    feeds.append(signature.feed(np.array([[3]], dtype=np.int64), past))
    feeds.append(signature.feed(np.array([[3, 9, 4]], dtype=np.int64), past))
    return feeds


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_shape_sharing_keeps_one_shape_per_symbolic_shape(arch: str, dtype: str, traced: dict) -> None:
    """The export's graphs hold fewer Shapes and compute exactly what they did before.

    Bit for bit as written; onnxruntime's optimizer may fuse the two graphs differently (the fp16 OPT
    graph then differs in the last bit), so optimized runs are held to the logits tolerance.
    """
    case = traced[(arch, dtype)]
    unshared = copy.deepcopy(case.graph)
    run_passes(unshared, [DenseLinearPass(case.fp_weight, DTYPES[dtype]), CleanupPass()])
    shared = copy.deepcopy(case.graph)
    _, sharing, _ = dense_graph(shared, case.fp_weight, DTYPES[dtype])

    def shape_count(graph: onnx.ModelProto) -> int:
        return Counter(n.op_type for n in graph.graph.node)["Shape"]

    assert sharing.name == "shared-shapes" and sharing.count > 0
    assert shape_count(shared) == shape_count(unshared) - sharing.count
    onnx.checker.check_model(shared, full_check=True)
    for feed in _decode_feeds(unshared):
        as_written = zip(_all_outputs(unshared, feed, optimize=False), _all_outputs(shared, feed, optimize=False), strict=True)
        for before, after in as_written:
            np.testing.assert_array_equal(after, before)
        optimized = zip(_all_outputs(unshared, feed), _all_outputs(shared, feed), strict=True)
        for before, after in optimized:
            torch.testing.assert_close(
                torch.from_numpy(after).float(), torch.from_numpy(before).float(), **tolerance("model_logits", DTYPES[dtype])
            )


def test_shared_shapes_let_onnxruntime_merge_the_layers_shape_arithmetic(traced: dict, tmp_path) -> None:  # noqa: ANN001
    """What the pass is for: onnxruntime's optimized graph has fewer nodes to run per step."""
    case = traced[("llama", "fp32")]
    counts = []
    for passes in ([DenseLinearPass(case.fp_weight, torch.float32), CleanupPass()], None):
        graph = copy.deepcopy(case.graph)
        if passes is None:
            dense_graph(graph, case.fp_weight, torch.float32)
        else:
            run_passes(graph, passes)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        counts.append(len(onnx.load(str(tmp_path / "optimized.onnx")).graph.node))
    unshared, shared = counts
    assert shared < unshared * 0.8, counts


def test_shape_sharing_rules_on_a_small_graph() -> None:
    """Same symbolic shape and attributes share; another dim, a start attribute or a graph output do not."""
    x, w, z, y = ("x", ["a", 4]), ("w", ["a", 4]), ("z", ["b", 4]), ("y", ["a", 4])
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"], name="shape_x"),
        helper.make_node("Shape", ["w"], ["sw"], name="shape_w"),  # same as x: shares
        helper.make_node("Shape", ["z"], ["sz"], name="shape_z"),  # other symbol: kept
        helper.make_node("Shape", ["x"], ["sx1"], name="shape_x_tail", start=1),  # other attribute: kept
        helper.make_node("Shape", ["y"], ["sy"], name="shape_y"),  # graph output: refused
        helper.make_node("Concat", ["sx", "sw", "sz", "sx1"], ["all"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in (x, w, z, y)],
        [helper.make_tensor_value_info("all", TensorProto.INT64, [7]), helper.make_tensor_value_info("sy", TensorProto.INT64, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feed = {name: np.ones([3 if d == "a" else 5 if d == "b" else d for d in dims], np.float32) for name, dims in (x, w, z, y)}
    before = _all_outputs(model, feed)
    result = ShapeSharingPass().run(model)
    assert result.count == 1
    assert [(r.node, r.reason) for r in result.refusals] == [("Shape 'sy'", "its output is a graph output")]
    assert [n.name for n in model.graph.node if n.op_type == "Shape"] == ["shape_x", "shape_z", "shape_x_tail", "shape_y"]
    assert list(model.graph.node[-1].input) == ["sx", "sx", "sz", "sx1"]
    onnx.checker.check_model(model, full_check=True)
    for got, expected in zip(_all_outputs(model, feed), before, strict=True):
        np.testing.assert_array_equal(got, expected)
