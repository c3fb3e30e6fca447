"""``sqz-export eval``: perplexity of an FP model or a quantized checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqz_export.cli.common import add_dataset_argument, add_json_argument, positive_int, print_table, write_json


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

    from sqz_export.checkpoint import MANIFEST_FILE, load_quantized_model, read_checkpoint
    from sqz_export.cli import progress_enabled
    from sqz_export.data import load_windows
    from sqz_export.evaluate import perplexity
    from sqz_export.models import load_model

    if args.model and (Path(args.model) / MANIFEST_FILE).is_file():
        model, tokenizer = load_quantized_model(args.model)
        if tokenizer is None:
            tokenizer = load_model(read_checkpoint(args.model, verify=False).qconfig.source_model).tokenizer
        label = f"checkpoint {args.model}"
    else:
        loaded = load_model(args.model, torch.float32)
        model, tokenizer, label = loaded.model, loaded.tokenizer, f"FP model {loaded.source}"
    evaluation = load_windows(tokenizer, args.dataset, evaluation=(args.eval_windows, args.seq_len))["evaluation"]
    result = perplexity(model, evaluation.tokens, batch_size=args.batch_size, progress=progress_enabled())
    print_table([
        ("model", label),
        ("dataset", f"{args.dataset}: {evaluation.num_tokens} tokens ({evaluation.tokens.shape[0]} x {evaluation.tokens.shape[1]}) from token {evaluation.first_token} of {evaluation.stream_tokens}"),
        ("perplexity", f"{result.perplexity:.3f}"),
        ("time", f"{result.seconds:.1f}s"),
    ])
    write_json(args.json, {"model": args.model, "perplexity": result.perplexity, "nll": result.nll, "evaluation": evaluation.describe(), "seconds": result.seconds})
    return 0
