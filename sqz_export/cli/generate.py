"""``sqz-export generate``: greedy text generation from an exported ONNX folder with onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqz_export.cli.common import (
    add_json_argument,
    add_attention_argument,
    add_unpack_argument,
    check_outputs,
    positive_int,
    print_table,
    write_json,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="greedy generation with onnxruntime from an exported ONNX folder (KV cache)",
        description="Greedy decoding with the exported graph and its KV cache, on onnxruntime (CPU by default).",
    )
    parser.add_argument(
        "--onnx", type=Path, required=True, metavar="OUTDIR", help="folder written by `sqz-export export`"
    )
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default: 32)")
    parser.add_argument(
        "--graph", choices=("model", "baseline"), default="model", help="model.onnx (sqz, default) or baseline.onnx"
    )
    parser.add_argument(
        "--provider", action="append", help="onnxruntime execution provider, repeatable (default: CPUExecutionProvider)"
    )
    parser.add_argument(
        "--ort-ops",
        type=Path,
        metavar="LIB",
        help="onnxruntime custom-op library libsqz_ort_ops.so (plugins/ort): SqzLinear runs the C++ kernel on the "
        "packed weights; --unpack then does not matter for SqzLinear (default: the model's ONNX function, unpacked "
        "as --unpack says)",
    )
    add_unpack_argument(parser)
    add_attention_argument(parser)
    add_json_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from sqz_export.errors import UserError
    from sqz_export.export.signature import load_graph
    from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE
    from sqz_export.generate import OnnxGenerator
    from sqz_export.ort_ops import check_library
    from sqz_export.validate import check_export_folder, check_sqz_linear_nodes, model_config

    check_outputs(args, "json")
    if args.ort_ops is not None:
        check_library(args.ort_ops, "--ort-ops")
    check_export_folder(args.onnx)
    path = args.onnx / (MODEL_FILE if args.graph == "model" else BASELINE_FILE)
    if not path.is_file():
        raise UserError(f"{path} does not exist (was the folder exported with --no-baseline?)")
    if not (args.onnx / "tokenizer_config.json").is_file():
        raise UserError(f"{args.onnx} has no tokenizer files; re-export from a checkpoint that holds its tokenizer")
    check_sqz_linear_nodes(load_graph(path), path)
    tokenizer = AutoTokenizer.from_pretrained(str(args.onnx))
    prompt_ids = tokenizer(args.prompt)["input_ids"]
    if not prompt_ids:
        raise UserError(f"--prompt {args.prompt!r} gives no tokens; expected some text to continue")
    positions = model_config(args.onnx).get("max_position_embeddings")
    if positions and len(prompt_ids) + args.max_new_tokens > positions:
        raise UserError(
            f"--prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {args.max_new_tokens} exceed the model's "
            f"{positions} positions; shorten one of them"
        )
    generator = OnnxGenerator(path, args.provider, args.unpack, args.ort_ops, fuse_attention=args.attention == "fused")
    result = generator.greedy(prompt_ids, args.max_new_tokens, tokenizer.eos_token_id)
    text = tokenizer.decode(result.new_ids, skip_special_tokens=True)
    print(args.prompt + text)
    print_table(
        [
            ("graph", str(path)),
            ("tokens", f"{len(prompt_ids)} prompt + {len(result.new_ids)} generated"),
            ("prefill", f"{result.prefill_s * 1000:.1f} ms"),
            (
                "decode",
                f"{result.tokens_per_s:.1f} tokens/s (onnxruntime, {', '.join(generator.session.get_providers())})",
            ),
            (
                "SqzLinear",
                f"custom-op library {args.ort_ops}" if args.ort_ops else f"ONNX function (no --ort-ops, --unpack {args.unpack})",
            ),
        ]
    )
    write_json(
        args.json,
        {
            "graph": str(path),
            "prompt": args.prompt,
            "prompt_ids": prompt_ids,
            "new_ids": result.new_ids,
            "text": text,
            "prefill_s": result.prefill_s,
            "decode_tokens_per_s": result.tokens_per_s,
            "ort_ops": str(args.ort_ops) if args.ort_ops else None,
            "unpack": args.unpack,
            "attention": args.attention,
        },
    )
    return 0
