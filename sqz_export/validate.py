"""Checks of user inputs that run before the expensive work they would otherwise spoil.

Each check names the input (file, option, tensor, node) and what was expected, and raises
``UserError``. They sit here, not in the stages, so the command line can run them first: a
sequence length right after the model's config is read, weights right after they load, an ONNX
graph's SqzLinear nodes before onnxruntime or TensorRT sees them (both fail on a bad node with a
message about their own internals, long after the cause).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqz_export.errors import UserError
from sqz_export.formats import LAYOUT_ROWMAJOR, SUPPORTED_BITS, packed_words

SQZ_NODE_ATTRIBUTES = ("bits", "in_features", "out_features", "layout", "plugin_namespace", "plugin_version")
"""Attributes every sqz::SqzLinear node carries (plugins/README.md)."""


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders ``layers.2`` before ``layers.10`` (numbers by value, the rest as text)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_seq_len(seq_len: int, max_positions: int | None, model: str) -> None:
    """Refuses windows longer than the model's position table.

    A longer window is not merely slow: positions past the table are extrapolated (RoPE) or index
    out of range (learned positions), so every number computed from it is meaningless.
    """
    if max_positions and seq_len > max_positions:
        raise UserError(
            f"--seq-len {seq_len} exceeds the {max_positions} positions of model {model} "
            f"(max_position_embeddings); use --seq-len {max_positions} or less"
        )


def check_input_file(path: Path | str, what: str) -> Path:
    """An existing regular file, or a UserError naming the option."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path}: no such file")
    if not path.is_file():
        raise UserError(f"{what} {path}: expected a file, found a folder")
    return path


def check_linears(layers: Mapping[str, Any]) -> None:
    """Every weight to quantize has rows and columns and only finite values.

    k-means and the sparse split turn one NaN into a NaN LUT for its whole row, and an empty matrix
    into a division by zero, so both are refused before any work, naming the tensor. Weights of a
    streamed model (on the meta device until their block loads) are checked for shape here and for
    values when their block is loaded (``weights.BlockedModel.load_block``), before it computes.
    """
    import torch

    for name, layer in layers.items():
        weight = layer.weight
        if weight.numel() == 0:
            raise UserError(f"{name}.weight has shape {list(weight.shape)}; a quantized linear needs at least one row and column")
        if weight.is_meta:
            continue
        bad = int((~torch.isfinite(weight)).sum())
        if bad:
            raise UserError(f"{name}.weight holds {bad} NaN or infinite values of {weight.numel()}; expected finite weights")


def _attribute_values(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def check_sqz_linear_nodes(model: Any, path: Path) -> int:
    """Checks every sqz::SqzLinear node of ``model`` against the op's contract; returns their count.

    Checked: the attributes and their allowed values, the input count (3 dense, 7 dense-and-sparse),
    and the shapes of the packed initializers against ``bits`` / ``in_features`` / ``out_features``.
    """
    from sqz_export.export import onnx_function as fn

    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if node.op_type != fn.OP_TYPE or node.domain != fn.DOMAIN:
            continue
        count += 1
        where = f"{path}: SqzLinear node {node.name or count}"
        values = {key: value.decode() if isinstance(value, bytes) else value for key, value in _attribute_values(node).items()}
        missing = [name for name in SQZ_NODE_ATTRIBUTES if name not in values]
        if missing:
            raise UserError(f"{where} lacks attributes {', '.join(missing)}")
        expected = {"layout": LAYOUT_ROWMAJOR, "plugin_namespace": fn.PLUGIN_NAMESPACE, "plugin_version": fn.PLUGIN_VERSION}
        for name, value in expected.items():
            if values[name] != value:
                raise UserError(f"{where}: attribute {name}={values[name]!r}, expected {value!r}")
        bits, k, n = values["bits"], values["in_features"], values["out_features"]
        if bits not in SUPPORTED_BITS:
            raise UserError(f"{where}: attribute bits={bits}, expected one of {SUPPORTED_BITS}")
        if not (isinstance(k, int) and isinstance(n, int) and k > 0 and n > 0):
            raise UserError(f"{where}: in_features={k}, out_features={n}; expected positive integers")
        if len(node.input) not in (3, 7):
            raise UserError(f"{where} has {len(node.input)} inputs; expected 3 (dense) or 7 (dense and sparse)")
        expected_shapes = {node.input[1]: (n, packed_words(k, bits)), node.input[2]: (n, 1 << bits)}
        for name, shape in expected_shapes.items():
            if name in shapes and shapes[name] != shape:
                raise UserError(
                    f"{where}: input {name} has shape {list(shapes[name])}, expected {list(shape)} for "
                    f"bits={bits}, in_features={k}, out_features={n}"
                )
    return count



def check_export_folder(folder: Path) -> dict[str, Any]:
    """The manifest of an export folder, after checking every file it lists (size and sha256).

    A graph copied in from another export, or a truncated one, fails here with the file's name,
    rather than inside onnxruntime with a shape error.
    """
    from sqz_export.checkpoint import verify_files
    from sqz_export.export.sqz_model import MANIFEST_FILE, read_manifest

    manifest = read_manifest(folder)
    verify_files(folder, manifest, MANIFEST_FILE)
    return manifest


def model_config(folder: Path) -> dict[str, Any]:
    """The config.json of a checkpoint or export folder, as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json; expected a folder written by sqz-export")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc


def check_same_model(config: dict[str, Any], other: dict[str, Any], what: str, other_what: str) -> None:
    """Refuses two folders whose config.json describe different models (architecture and sizes)."""
    from sqz_export.export.sqz_model import CONFIG_KEYS

    problems = [f"{key} {other.get(key)!r} (vs {config.get(key)!r})" for key in CONFIG_KEYS if config.get(key) != other.get(key)]
    if problems:
        raise UserError(f"{other_what} is not a model of {what}: {'; '.join(problems)}")
