"""Arguments and output helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqz_export import atomic
from sqz_export.defaults import DEFAULT_DATASET, DEFAULT_MODEL


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model folder, .gguf file, or hub id (default: {DEFAULT_MODEL}, the embedded SmolLM2-135M-Instruct GGUF)",
    )


def add_dataset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"'wikipedia' (offline sample, default), 'news' (offline ABC news articles), 'wikitext2' or 'c4' (need datasets + internet), or a .txt/.jsonl file (default: {DEFAULT_DATASET})",
    )
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default: 512)")


def add_unpack_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unpack",
        choices=("stream", "session", "call"),
        default="stream",
        help="how model.onnx's SqzLinear layers are unpacked for onnxruntime when it runs their ONNX function: "
        "'stream' unpacks them one layer at a time into a temporary dense copy of the graph next to the model, which "
        "onnxruntime loads like baseline.onnx (FP16 speed and about the baseline's memory; the default), 'session' lets "
        "onnxruntime's constant folding unpack them at session creation (the same outputs, about 25 bytes per "
        "quantized weight at the peak), 'call' unpacks on every run (holds only the packed weights; decoding 20-35x "
        "slower). No effect on SqzLinear with --ort-ops: the custom-op library's kernel runs it on the packed weights",
    )


ATTENTION_CHOICES = ("fused", "exported")


def add_attention_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="fused",
        help="on the CPU provider, 'fused' (default) runs each layer's attention as onnxruntime's RotaryEmbedding + "
        "GroupQueryAttention (the same results: the graph's own mask, positions and rotary tables; in memory, the "
        "file is untouched), in model.onnx and baseline.onnx alike; 'exported' runs the graph's attention as "
        "exported (needed for several new tokens per sequence after a cache in a batch of more than one)",
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE ('-' for stdout)")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def byte_size(text: str) -> int:
    """A size in bytes: a number with an optional K, M, G or T suffix (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = body[-1:] if body[-1:] in units else ""
    try:
        value = float(body[: len(body) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; expected e.g. 512M, 4G or a number of bytes") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be >= 0")
    return int(value * units[unit])


def fraction(text: str) -> float:
    """Accepts 0.0045 or 0.45%; a percentage is divided in decimal, so 0.45% is exactly 0.0045."""
    try:
        value = Decimal(text[:-1]) / 100 if text.endswith("%") else Decimal(text)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) such as 0.0045 or 0.45%, got {text}")
    return float(value)


def check_outputs(args: argparse.Namespace, *options: str) -> None:
    """Checks, before any work, that the file outputs named by ``options`` (attribute names such as
    "json", "plot") can be written; '-' (stdout) and unset options pass."""
    for option in options:
        target = getattr(args, option, None)
        if target and str(target) != "-":
            atomic.check_writable(target, f"--{option}")


def write_json(target: str | None, payload: dict[str, Any]) -> None:
    """Writes JSON to a file atomically, or to stdout for '-'."""
    if not target:
        return
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    atomic.write_text(Path(target), text)


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")
