"""The input/output contract of an exported decoder graph, read from the ONNX file.

Generation, comparison and the Polygraphy input file all build feeds from this one description, so
the KV-cache layout (``past_key_values.N.key/value`` [batch, kv_heads, past_len, head_dim] ->
``present.N.key/value``) is interpreted in one place.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import onnx

from sqz_export.errors import UserError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph of an ONNX file without its tensor data; a UserError when the file is not ONNX."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (protobuf's DecodeError, or onnx's own error on a damaged file)
        raise UserError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc}); expected a file written by `sqz-export export`") from exc


@dataclasses.dataclass
class DecoderSignature:
    path: Path
    """Where the graph came from (for messages)."""
    past_names: list[str]
    """past_key_values.N.key/value in layer order."""
    past_shape: tuple[int, int]
    """(kv_heads, head_dim) of every past tensor."""
    float_dtype: np.dtype
    """dtype of logits and the KV cache (fp16 or fp32 graphs)."""
    has_position_ids: bool
    """LLaMA graphs take position_ids; OPT computes positions from attention_mask."""

    @classmethod
    def from_onnx(cls, path: str | os.PathLike[str]) -> DecoderSignature:
        """Reads the graph inputs of an ONNX file (no tensor data is loaded)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such ONNX file")
        return cls.from_model(load_graph(path), path)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, path: Path | None = None) -> DecoderSignature:
        """Reads the graph inputs of an in-memory model; ``path`` only names it in errors."""
        path = path or Path("<in-memory model>")
        graph = model.graph
        inputs = {value.name: value for value in graph.input}
        missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
        if missing or "logits" not in {value.name for value in graph.output}:
            raise UserError(f"{path}: not a decoder-with-past graph (missing inputs {missing} or output 'logits')")
        past = sorted((int(m.group(1)), m.group(2) == "value", name) for name in inputs if (m := _PAST.match(name)))
        if not past:
            raise UserError(
                f"{path}: no past_key_values.N.key/value inputs; export with the KV cache (task text-generation-with-past)"
            )
        first = inputs[past[0][2]].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in first.shape.dim]
        if len(dims) != 4 or dims[1] is None or dims[3] is None:
            raise UserError(
                f"{path}: {past[0][2]} has shape {dims}, expected [batch, kv_heads, past_len, head_dim] with static heads and head_dim"
            )
        return cls(
            path=path,
            past_names=[name for _, _, name in past],
            past_shape=(dims[1], dims[3]),
            float_dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(first.elem_type)),
            has_position_ids="position_ids" in inputs,
        )

    @property
    def present_names(self) -> list[str]:
        return [name.replace("past_key_values.", "present.") for name in self.past_names]

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        heads, head_dim = self.past_shape
        return {name: np.zeros((batch, heads, 0, head_dim), dtype=self.float_dtype) for name in self.past_names}

    def feed(self, input_ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Inputs for ``input_ids`` [batch, new_tokens] after ``past`` (None: an empty cache, i.e. prefill)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, new = input_ids.shape
        past = past if past is not None else self.empty_past(batch)
        past_len = next(iter(past.values())).shape[2]
        feed: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "attention_mask": np.ones((batch, past_len + new), dtype=np.int64),
        }
        if self.has_position_ids:
            feed["position_ids"] = np.broadcast_to(
                np.arange(past_len, past_len + new, dtype=np.int64), (batch, new)
            ).copy()
        feed.update(past)
        return feed
