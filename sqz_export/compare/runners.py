"""Polygraphy runners: ONNX graphs in onnxruntime, the torch reference model, and TensorRT (lazy)."""

from __future__ import annotations

import collections
import functools
import time
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata

from sqz_export.errors import UserError
from sqz_export.export.signature import DecoderSignature
from sqz_export.ort_session import UNPACK_STREAM, create_session


def onnxrt_runner(
    path: Path,
    name: str,
    providers: list[str] | None = None,
    unpack: str = UNPACK_STREAM,
    ort_ops: Path | None = None,
    fuse_attention: bool = True,
) -> OnnxrtRunner:
    """An onnxruntime runner for one exported graph (CPU unless ``providers`` says otherwise).

    The session is built by ``sqz_export.ort_session.create_session`` (``unpack``: when the SqzLinear
    function fallback unpacks; ``ort_ops``: the custom-op library of plugins/ort, whose kernel runs
    SqzLinear on the packed weights instead; ``fuse_attention``: the attention as onnxruntime's
    GroupQueryAttention on the CPU provider), on activation and dropped on deactivation, as
    Polygraphy's ``SessionFromOnnx`` does, so a comparison holds one runner's session at a time.
    """
    return OwningOnnxrtRunner(functools.partial(create_session, path, providers, unpack, ort_ops, fuse_attention=fuse_attention), name=name)


class OwningOnnxrtRunner(OnnxrtRunner):
    """Polygraphy's onnxruntime runner, returning outputs that own their memory.

    ``InferenceSession.run`` returns arrays whose buffers belong to the session, and one of them
    keeps the session's memory alive: measured on the 0.5B-shape baseline, a logits array kept after
    the session was dropped held 1.2 GiB of it. The Comparator keeps every runner's outputs until
    it ends, so without the copy the sessions of a comparison would add up instead of taking turns.
    """

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> collections.OrderedDict[str, np.ndarray]:
        start = time.time()
        outputs = self.sess.run(None, {name: np.asarray(value) for name, value in feed_dict.items()})
        self.inference_time = time.time() - start
        names = [node.name for node in self.sess.get_outputs()]
        return collections.OrderedDict((name, np.array(value, copy=True)) for name, value in zip(names, outputs, strict=True))


def trt_runner(
    engine_path: Path, plugin_library: Path | None, name: str = "tensorrt", profile: str = "prefill"
) -> BaseRunner:
    """The TensorRT runner from ``sqz_export.engine.runner`` (imported only when an engine is given).

    ``profile`` is the engine's optimization profile: "prefill" (whole windows, empty cache) for
    accuracy and prefill latency, "decode" (one token after a cache) for decode latency.
    """
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"--engine {engine_path} needs the TensorRT Python package (pip install 'sqz-export[tensorrt]' on a machine "
            "with TensorRT); compare without --engine to use onnxruntime only"
        ) from exc
    from sqz_export.engine.runner import make_trt_runner

    return make_trt_runner(engine_path, plugin_library, profile=profile, name=name)


class TorchRunner(BaseRunner):
    """The quantized torch model (SqzLinear modules, fp32 compute) as a Polygraphy runner.

    It takes the ONNX graph's feeds (so every runner sees the same data loader) and returns only
    ``logits``. Only prefill feeds (empty ``past_key_values``) are supported: the reference is run on
    whole windows. Like Polygraphy's onnxruntime runner (whose session is built on activation and
    dropped on deactivation), it loads the checkpoint only while active, so a comparison holds one
    runner's model at a time.
    """

    def __init__(self, checkpoint: Path, signature: DecoderSignature, name: str = "torch-reference") -> None:
        super().__init__(name=name)
        self.checkpoint = checkpoint
        self.signature = signature
        self.model: torch.nn.Module | None = None
        self._inference_time: float | None = None

    def activate_impl(self) -> None:
        from sqz_export.checkpoint import load_quantized_model

        self.model, _ = load_quantized_model(self.checkpoint)

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        meta.add("input_ids", np.int64, (None, None))
        meta.add("attention_mask", np.int64, (None, None))
        if self.signature.has_position_ids:
            meta.add("position_ids", np.int64, (None, None))
        heads, head_dim = self.signature.past_shape
        for name in self.signature.past_names:
            meta.add(name, self.signature.float_dtype, (None, heads, None, head_dim))
        return meta

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> collections.OrderedDict[str, np.ndarray]:
        if any(feed_dict[name].shape[2] for name in self.signature.past_names if name in feed_dict):
            raise UserError(f"{self.name}: only prefill feeds (empty past_key_values) are supported")
        input_ids = torch.from_numpy(np.ascontiguousarray(feed_dict["input_ids"]))
        attention_mask = torch.from_numpy(np.ascontiguousarray(feed_dict["attention_mask"]))
        assert self.model is not None, "infer() on an inactive runner"  # BaseRunner.infer checks activation
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        self._inference_time = time.perf_counter() - start
        return collections.OrderedDict(logits=logits.float().numpy())

    def last_inference_time(self) -> float | None:
        return self._inference_time

    def deactivate_impl(self) -> None:
        self.model = None
        self._inference_time = None
