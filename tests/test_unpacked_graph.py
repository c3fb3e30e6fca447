"""--unpack stream: sqz-export's layer-by-layer unpack gives onnxruntime's folded weights, bit for bit."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from sqz_export import ort_session, unpacked_graph
from sqz_export.export import onnx_function as fn
from sqz_export.export.signature import DecoderSignature, load_graph
from sqz_export.export.sqz_model import MODEL_FILE
from sqz_export.generate import OnnxGenerator

PROMPT = [5, 17, 42, 9, 33, 71]


def prefill_logits(path: Path, unpack: str) -> np.ndarray:
    signature = DecoderSignature.from_onnx(path)
    session = ort_session.create_session(path, unpack=unpack)
    return session.run(["logits"], signature.feed(np.asarray([PROMPT])))[0]


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_stream_gives_the_folded_sessions_logits_bit_for_bit(tiny_export: Callable[[str, str], Path], arch: str, dtype: str) -> None:
    folder = tiny_export(arch, dtype)
    before = folder_digest(folder)
    path = folder / MODEL_FILE
    streamed = prefill_logits(path, ort_session.UNPACK_STREAM)
    folded = prefill_logits(path, ort_session.UNPACK_SESSION)
    assert streamed.dtype == folded.dtype
    np.testing.assert_array_equal(streamed, folded)
    assert folder_digest(folder) == before  # the export is untouched and the temporary copy is gone
    assert not any(p.name.startswith(".sqz-unpacked-") for p in folder.iterdir())


def test_stream_is_the_default_and_greedy_tokens_match(tiny_export: Callable[[str, str], Path]) -> None:
    path = tiny_export("llama", "fp16") / MODEL_FILE
    assert OnnxGenerator(path).greedy(PROMPT, 8).new_ids == OnnxGenerator(path, unpack=ort_session.UNPACK_SESSION).greedy(PROMPT, 8).new_ids


def test_unpacked_graph_has_no_sqz_linear_and_passes_the_checker(tiny_export: Callable[[str, str], Path], tmp_path: Path) -> None:
    path = tiny_export("llama", "fp16") / MODEL_FILE
    sqz_nodes = sum(node.op_type == fn.OP_TYPE for node in load_graph(path).graph.node)
    assert sqz_nodes > 0
    written = unpacked_graph.write_unpacked_graph(path, tmp_path)
    dense = onnx.load(str(written))
    assert not any(node.domain == fn.DOMAIN for node in dense.graph.node)
    assert not dense.functions and all(opset.domain != fn.DOMAIN for opset in dense.opset_import)
    weights = [t for t in dense.graph.initializer if t.name.endswith(".dense_weight_t")]
    assert len(weights) == sqz_nodes and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    onnx.checker.check_model(str(written))


def test_dense_weight_matches_the_packed_layer(tiny_checkpoint: Callable[[str], Path]) -> None:
    """The numpy unpack against the checkpoint's own dense weight, with the sparse sums rounded to fp16."""
    from sqz_export import formats
    from sqz_export.checkpoint import read_checkpoint

    packed = next(layer for layer in read_checkpoint(tiny_checkpoint("llama")).packed.values() if layer.sparse is not None)
    sparse = packed.sparse
    weight_t = unpacked_graph.dense_weight_t(
        formats.to_rowmajor(packed.qweight).numpy(), packed.lut.numpy(), packed.bits, packed.in_features,
        (sparse.row_ptr.numpy(), sparse.col.numpy(), sparse.val.numpy()), np.dtype(np.float16),
    )
    np.testing.assert_array_equal(weight_t, packed.weight().half().numpy().T)


def test_unwritable_model_folder_falls_back_to_the_temporary_folder(
    tiny_export: Callable[[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_export("llama", "fp32") / MODEL_FILE
    real_mkdtemp, used = tempfile.mkdtemp, []

    def mkdtemp(prefix: str = "", dir: str | Path | None = None) -> str:  # noqa: A002 - tempfile's name
        if dir is not None:
            raise PermissionError(f"{dir} is read-only")
        used.append(real_mkdtemp(prefix=prefix))
        return used[-1]

    monkeypatch.setattr(unpacked_graph.tempfile, "mkdtemp", mkdtemp)
    np.testing.assert_array_equal(prefill_logits(path, ort_session.UNPACK_STREAM), prefill_logits(path, ort_session.UNPACK_SESSION))
    assert used and not Path(used[0]).exists()


def test_a_failed_copy_is_a_clear_error_and_leaves_nothing(tiny_export: Callable[[str, str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from sqz_export.errors import UserError

    folder = tiny_export("llama", "fp32")

    def full_disk(model_path: Path, out: Path) -> Path:
        (out / "partial.onnx.data").write_bytes(b"0" * 16)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(unpacked_graph, "write_unpacked_graph", full_disk)
    with pytest.raises(UserError, match="No space left on device.*--unpack session"):
        ort_session.create_session(folder / MODEL_FILE)
    assert not any(p.name.startswith(".sqz-unpacked-") for p in folder.iterdir())
