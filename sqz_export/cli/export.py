"""``sqz-export export``: packed checkpoint -> ONNX folder (sqz::SqzLinear model + FP16 baseline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqz_export.atomic import check_replaceable
from sqz_export.cli.common import (
    add_json_argument,
    check_outputs,
    human_bytes,
    print_table,
    write_json,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a quantized checkpoint to ONNX with sqz::SqzLinear custom ops (+ FP16 baseline)",
        description=(
            "Export the checkpoint's model with KV cache to ONNX, rewrite every quantized MatMul into "
            "sqz::SqzLinear (packed weights as initializers, a model-local ONNX function so onnxruntime runs "
            "the same file), and export the FP16 baseline from the source model for comparisons. "
            "Run the result with `polygraphy run OUT/model.onnx --onnxrt --load-inputs OUT/polygraphy_inputs.json` "
            "(a real prompt's prefill feed; Polygraphy's random default inputs are not valid token ids)."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder written by `sqz-export quantize`")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output folder (model.onnx, baseline.onnx, manifest.json, tokenizer)",
    )
    parser.add_argument(
        "--baseline-from", metavar="MODEL", help="FP model for baseline.onnx (default: the checkpoint's source_model)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip baseline.onnx")
    parser.add_argument(
        "--dtype", choices=("fp16", "fp32"), default="fp16", help="floating dtype of both graphs (default: fp16)"
    )
    parser.add_argument("--opset", type=int, default=18, help="ai.onnx opset, at least 18 (default: 18)")
    add_json_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sqz_export.errors import UserError
    from sqz_export.export.baseline import DTYPES
    from sqz_export.export.onnx_function import MIN_ONNX_OPSET
    from sqz_export.export.sqz_model import MANIFEST_FILE, export_checkpoint
    from sqz_export.models import resolve_model_spec
    from sqz_export.progress import stage

    check_replaceable(args.output, MANIFEST_FILE, "ONNX folder")
    check_outputs(args, "json")
    if args.baseline_from:
        resolve_model_spec(args.baseline_from)
    if args.opset < MIN_ONNX_OPSET:
        raise UserError(f"--opset {args.opset}: the SqzLinear ONNX function needs opset {MIN_ONNX_OPSET} or newer")
    if args.no_baseline and args.baseline_from:
        raise UserError("--no-baseline and --baseline-from contradict each other; pass one")
    with stage(f"export {args.checkpoint}"):
        result = export_checkpoint(
            args.checkpoint,
            args.output,
            baseline_from=args.baseline_from,
            with_baseline=not args.no_baseline,
            dtype=DTYPES[args.dtype],
            opset=args.opset,
        )
    sqz_nodes = sum(count for op, count in result.op_counts.items() if op.endswith("SqzLinear"))
    print_table(
        [
            ("output", str(result.out_dir)),
            (
                "rewritten",
                f"{result.rewritten} of {result.layers} quantized linears -> sqz::SqzLinear ({sqz_nodes} nodes in the graph)",
            ),
            (
                "tensor bytes",
                f"{human_bytes(result.bytes_before)} with FP weights -> {human_bytes(result.bytes_after)} packed ({result.bytes_before / max(result.bytes_after, 1):.2f}x smaller)",
            ),
            (
                "files",
                ", ".join(
                    f"{name} {human_bytes(info['bytes'])}"
                    for name, info in result.files.items()
                    if name.endswith((".onnx", ".data"))
                ),
            ),
            ("baseline", result.baseline_source or "skipped"),
        ]
    )
    write_json(
        args.json,
        {
            "output": str(result.out_dir),
            "rewritten": result.rewritten,
            "layers": result.layers,
            "op_counts": result.op_counts,
            "tensor_bytes_before": result.bytes_before,
            "tensor_bytes_after": result.bytes_after,
            "files": result.files,
            "baseline_source": result.baseline_source,
        },
    )
    return 0
