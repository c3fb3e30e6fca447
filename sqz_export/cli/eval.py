"""``sqz-export eval``: perplexity of an FP model or a quantized checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqz_export.cli.common import add_dataset_argument, add_json_argument, check_outputs, positive_int, print_table, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity of an FP model or a quantized checkpoint",
        description=(
            "Perplexity on non-overlapping windows from the end of the dataset (the calibration windows of "
            "`quantize` come from its start, so they never overlap)."
        ),
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a quantized checkpoint folder, or an FP model (folder, .gguf, hub id; default: the embedded SmolLM2)",
    )
    add_dataset_argument(parser)
    parser.add_argument("--eval-windows", type=positive_int, default=80, help="windows to score (default: 80 x 512 = 40,960 tokens)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default: 1)")
    add_json_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from sqz_export.checkpoint import MANIFEST_FILE, build_model, read_checkpoint
    from sqz_export.data import load_windows
    from sqz_export.evaluate import perplexity
    from sqz_export.models import load_weights, open_model
    from sqz_export.validate import check_seq_len

    check_outputs(args, "json")
    # The model's positions and the dataset are checked before the weights load or unpack.
    if args.model and (Path(args.model) / MANIFEST_FILE).is_file():
        checkpoint = read_checkpoint(args.model)
        if (checkpoint.path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path))
        else:
            tokenizer = open_model(checkpoint.qconfig.source_model).tokenizer
        check_seq_len(args.seq_len, getattr(checkpoint.hf_config, "max_position_embeddings", None), f"checkpoint {args.model}")
        evaluation = load_windows(tokenizer, args.dataset, evaluation=(args.eval_windows, args.seq_len))["evaluation"]
        model, label = build_model(checkpoint), f"checkpoint {args.model}"
    else:
        files = open_model(args.model)
        check_seq_len(args.seq_len, files.max_positions, files.source)
        evaluation = load_windows(files.tokenizer, args.dataset, evaluation=(args.eval_windows, args.seq_len))["evaluation"]
        model, label = load_weights(files, torch.float32).model, f"FP model {files.source}"
    result = perplexity(model, evaluation.tokens, batch_size=args.batch_size, progress=True)
    print_table([
        ("model", label),
        ("dataset", f"{args.dataset}: {evaluation.num_tokens} tokens ({evaluation.tokens.shape[0]} x {evaluation.tokens.shape[1]}) from token {evaluation.first_token} of {evaluation.stream_tokens}"),
        ("perplexity", f"{result.perplexity:.3f}"),
        ("time", f"{result.seconds:.1f}s"),
    ])
    write_json(args.json, {"model": args.model, "perplexity": result.perplexity, "nll": result.nll, "evaluation": evaluation.describe(), "seconds": result.seconds})
    return 0
