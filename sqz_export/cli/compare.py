"""``sqz-export compare``: Polygraphy accuracy and latency report of an exported folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqz_export.cli.common import (
    add_dataset_argument,
    add_json_argument,
    add_attention_argument,
    add_unpack_argument,
    check_outputs,
    positive_int,
    write_json,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare model.onnx (and a TensorRT engine) with the torch reference and the FP16 baseline",
        description=(
            "Run the torch reference (the quantized checkpoint), model.onnx and baseline.onnx in onnxruntime, and "
            "optionally a TensorRT engine, on the same real token windows with Polygraphy's Comparator; report "
            "per-output max/mean absolute and relative error, top-1 token agreement, and median latency."
        ),
    )
    parser.add_argument("folder", type=Path, help="folder written by `sqz-export export`")
    parser.add_argument("--engine", type=Path, help="TensorRT engine built by `sqz-export build` (needs TensorRT)")
    parser.add_argument("--plugin", type=Path, help="SqzLinear plugin library for --engine (default: the build's own)")
    parser.add_argument(
        "--ort-ops",
        type=Path,
        metavar="LIB",
        help="onnxruntime custom-op library libsqz_ort_ops.so (plugins/ort) for model.onnx: SqzLinear runs the C++ "
        "kernel on the packed weights; --unpack then does not matter for SqzLinear (default: the model's ONNX "
        "function, unpacked as --unpack says)",
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="checkpoint for the torch reference (default: the one recorded at export)"
    )
    add_dataset_argument(parser)
    parser.add_argument("--windows", type=positive_int, default=1, help="token windows to compare (default: 1)")
    parser.add_argument(
        "--iterations", type=positive_int, default=10, help="timed runs per runner, after 2 warm-up runs (default: 10)"
    )
    parser.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance of the pass/fail verdict (default: 5e-2)"
    )
    parser.add_argument(
        "--rtol", type=float, default=None, help="relative tolerance of the pass/fail verdict (default: 2e-2)"
    )
    parser.add_argument(
        "--check-stat",
        choices=("elemwise", "max", "mean", "median"),
        help="error statistic the verdict checks against the tolerances (default: mean)",
    )
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="write a histogram of logit errors")
    add_unpack_argument(parser)
    add_attention_argument(parser)
    add_json_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from polygraphy.logger import G_LOGGER

    from sqz_export.compare.driver import (
        DEFAULT_ATOL,
        DEFAULT_CHECK_STAT,
        DEFAULT_RTOL,
        CompareOptions,
        compare_folder,
    )
    from sqz_export.compare.report import write_plot
    from sqz_export.export.signature import load_graph
    from sqz_export.export.sqz_model import MODEL_FILE
    from sqz_export.ort_ops import check_library
    from sqz_export.progress import stage
    from sqz_export.validate import (
        check_export_folder,
        check_input_file,
        check_same_model,
        check_seq_len,
        check_sqz_linear_nodes,
        model_config,
    )

    # Checked before any graph, model or engine loads: outputs, inputs, positions, the graph's nodes.
    check_outputs(args, "json", "plot")
    if args.ort_ops is not None:
        check_library(args.ort_ops, "--ort-ops")
    check_export_folder(args.folder)
    config = model_config(args.folder)
    check_seq_len(args.seq_len, config.get("max_position_embeddings"), f"exported to {args.folder}")
    if args.checkpoint is not None:
        check_same_model(config, model_config(args.checkpoint), f"export {args.folder}", f"--checkpoint {args.checkpoint}")
    for path, what in ((args.engine, "--engine"), (args.plugin, "--plugin")):
        if path is not None:
            check_input_file(path, what)
    check_sqz_linear_nodes(load_graph(args.folder / MODEL_FILE), args.folder / MODEL_FILE)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        G_LOGGER.module_severity = G_LOGGER.WARNING  # Polygraphy's per-run [I] lines only with --verbose
    options = CompareOptions(
        checkpoint=args.checkpoint,
        engine=args.engine,
        plugin=args.plugin,
        dataset=args.dataset,
        windows=args.windows,
        seq_len=args.seq_len,
        iterations=args.iterations,
        atol=DEFAULT_ATOL if args.atol is None else args.atol,
        rtol=DEFAULT_RTOL if args.rtol is None else args.rtol,
        check_stat=args.check_stat or DEFAULT_CHECK_STAT,
        ort_ops=args.ort_ops,
        unpack=args.unpack,
        fuse_attention=args.attention == "fused",
    )
    with stage(f"compare {args.folder}"):
        report, errors = compare_folder(args.folder, options)
    print(report.table())
    if args.plot:
        write_plot(args.plot, errors)
        print(f"wrote {args.plot}")
    write_json(args.json, report.to_json())
    return 0 if all(pair.passed is not False for pair in report.pairs) else 1
