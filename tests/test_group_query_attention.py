"""The attention fusion of CPU sessions (graph_passes/group_query_attention.py): which graphs it
rewrites, and that the fused graph computes what the exported one does, padding and cache included."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tolerances import tolerance

from graph_passes import CleanupPass, GroupQueryAttentionPass
from graph_passes.group_query_attention import AttentionShape
from sqz_export import ort_session
from sqz_export.export.signature import DecoderSignature
from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE

LAYERS = 2
"""Decoder layers of the tiny models (tiny_models.make_tiny_model)."""
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def fused_graph(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path), load_external_data=False)
    shape = ort_session.attention_shape(path)
    assert shape is not None
    result = GroupQueryAttentionPass(shape).run(model)
    assert result.count == LAYERS, result.refusals
    CleanupPass(infer_shapes=False).run(model)
    return model


def feed(signature: DecoderSignature, batch: int, new: int, past: int, padding: int, seed: int) -> dict[str, np.ndarray]:
    """A step of ``new`` tokens after a random cache of ``past``, every sequence but the first
    left-padded by ``padding`` positions (masked, and positions counted from the first real token,
    as transformers does)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + new), np.int64)
    mask[1:, :padding] = 0
    kv_heads, head_dim = signature.past_shape
    values = {
        "input_ids": rng.integers(3, 100, (batch, new)).astype(np.int64),
        "attention_mask": mask,
        "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:],
    }
    for name in signature.past_names:
        values[name] = (rng.standard_normal((batch, kv_heads, past, head_dim)) * 0.5).astype(signature.float_dtype)
    return values


@pytest.mark.parametrize("graph", [BASELINE_FILE, MODEL_FILE])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_each_layer_becomes_rotary_and_group_query_attention(
    tiny_export: Callable[[str, str], Path], graph: str, dtype: str
) -> None:
    model = fused_graph(tiny_export("llama", dtype) / graph)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("GroupQueryAttention") == LAYERS and ops.count("RotaryEmbedding") == 2 * LAYERS
    assert "Softmax" not in ops and "Neg" not in ops  # the exported attention and rotate_half are gone
    (attention, *_) = [node for node in model.graph.node if node.op_type == "GroupQueryAttention"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute}
    assert attributes["num_heads"] == 4 and attributes["kv_num_heads"] == 2 and attributes["causal"] == 0
    assert attributes["scale"] == pytest.approx(16**-0.5)
    assert list(attention.output[1:]) == ["present.0.key", "present.0.value"]


# (batch, new tokens, past, left padding of all sequences but the first)
STEPS = {
    "prefill": (1, 7, 0, 0),
    "decode": (1, 1, 9, 0),
    "padded-prefill": (2, 5, 0, 2),
    "padded-decode": (2, 1, 6, 3),
    "chunk-after-cache": (1, 3, 4, 0),
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("graph", [BASELINE_FILE, MODEL_FILE])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_fused_session_computes_what_the_exported_graph_does(
    tiny_export: Callable[[str, str], Path], graph: str, dtype: str, step: str
) -> None:
    """Logits and every present k/v, padded and fully masked positions included."""
    path = tiny_export("llama", dtype) / graph
    signature = DecoderSignature.from_onnx(path)
    values = feed(signature, *STEPS[step], seed=len(step))
    exported = ort_session.create_session(path, fuse_attention=False)
    fused = ort_session.create_session(path)
    assert "GroupQueryAttention" in _session_ops(path)  # the default fuses
    names = [output.name for output in exported.get_outputs()]
    for name, got, expected in zip(names, fused.run(names, values), exported.run(names, values), strict=True):
        torch.testing.assert_close(
            torch.from_numpy(got).float(), torch.from_numpy(expected).float(), **tolerance("fused_attention", DTYPES[dtype]), msg=name
        )


def _session_ops(path: Path) -> list[str]:
    """Op types of the graph create_session hands onnxruntime for ``path`` (CPU, no library)."""
    source, _ = ort_session._cpu_graph(path, onnx.load(str(path), load_external_data=False), ort.SessionOptions(), ort_session.attention_shape(path), with_library=False)
    model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)
    return [node.op_type for node in model.graph.node]


def test_several_new_tokens_after_a_cache_in_a_batch_fail_loudly(tiny_export: Callable[[str, str], Path]) -> None:
    """What onnxruntime's GroupQueryAttention does not take errors out (never a wrong answer);
    fuse_attention=False runs it."""
    path = tiny_export("llama", "fp16") / BASELINE_FILE
    values = feed(DecoderSignature.from_onnx(path), 2, 3, 4, 1, seed=0)
    with pytest.raises(Exception, match="batch_size must be 1"):
        ort_session.create_session(path).run(["logits"], values)
    assert np.isfinite(ort_session.create_session(path, fuse_attention=False).run(["logits"], values)[0]).all()


def test_graphs_without_rotary_attention_are_left_alone(tiny_export: Callable[[str, str], Path]) -> None:
    """OPT (learned positions, no rotary): every softmax refused, with the reason."""
    path = tiny_export("opt", "fp16") / BASELINE_FILE
    model = onnx.load(str(path), load_external_data=False)
    before = model.SerializeToString()
    shape = ort_session.attention_shape(path)
    assert shape is not None
    result = GroupQueryAttentionPass(shape).run(model)
    assert result.count == 0 and len(result.refusals) == LAYERS
    assert {refusal.reason for refusal in result.refusals} == {"rotated k comes from Transpose, not Add"}
    assert model.SerializeToString() == before
    assert "GroupQueryAttention" not in _session_ops(path)


def test_a_structure_it_does_not_know_is_refused(tiny_export: Callable[[str, str], Path]) -> None:
    """A softmax over another axis than the keys' is not attention as the pass knows it."""
    path = tiny_export("llama", "fp32") / BASELINE_FILE
    model = onnx.load(str(path), load_external_data=False)
    (softmax, *_) = [node for node in model.graph.node if node.op_type == "Softmax"]
    softmax.attribute[0].i = 2
    result = GroupQueryAttentionPass(ort_session.attention_shape(path)).run(model)
    assert result.count == LAYERS - 1
    assert [refusal.reason for refusal in result.refusals] == ["softmax over axis 2, not the key axis"]


def test_head_counts_must_match_the_cache(tiny_export: Callable[[str, str], Path]) -> None:
    path = tiny_export("llama", "fp32") / BASELINE_FILE
    model = onnx.load(str(path), load_external_data=False)
    result = GroupQueryAttentionPass(AttentionShape(num_heads=4, kv_num_heads=4, max_positions=256)).run(model)
    assert result.count == 0
    assert "past key shape has 2 heads of size 16; the config says 4 heads" in result.refusals[0].reason


def test_no_config_no_fusion(tiny_export: Callable[[str, str], Path], tmp_path: Path) -> None:
    folder = tiny_export("llama", "fp32")
    for file in (BASELINE_FILE, f"{BASELINE_FILE}.data"):
        shutil.copy(folder / file, tmp_path / file)
    assert ort_session.attention_shape(tmp_path / BASELINE_FILE) is None
    (tmp_path / "config.json").write_text('{"num_attention_heads": 4}')
    assert ort_session.attention_shape(tmp_path / BASELINE_FILE) is None  # no max_position_embeddings
    assert "GroupQueryAttention" not in _session_ops(tmp_path / BASELINE_FILE)


def test_positions_past_the_rotary_tables_fail_loudly(tiny_export: Callable[[str, str], Path]) -> None:
    """The tables cover the config's max_position_embeddings (256 for the tiny models); the exported
    graph extrapolates past them, the fused one refuses."""
    path = tiny_export("llama", "fp32") / BASELINE_FILE
    signature = DecoderSignature.from_onnx(path)
    kv_heads, head_dim = signature.past_shape
    past = {name: np.zeros((1, kv_heads, 300, head_dim), np.float32) for name in signature.past_names}
    values = signature.feed(np.array([[5, 6, 7]]), past)
    with pytest.raises(Exception, match="position_ids value 300 .* out of range"):
        ort_session.create_session(path).run(["logits"], values)
    assert np.isfinite(ort_session.create_session(path, fuse_attention=False).run(["logits"], values)[0]).all()
