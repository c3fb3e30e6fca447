"""``sqz-export build``: ONNX -> TensorRT engine (SqzLinear plugins), or the FP16 baseline engine."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqz_export.cli.common import add_json_argument, check_outputs, human_bytes, positive_int, print_table, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build a TensorRT engine from the exported ONNX (needs TensorRT and libsqz_trt_plugin.so)",
        description=(
            "Build a TensorRT engine from model.onnx, whose sqz::SqzLinear nodes run as plugins from "
            "libsqz_trt_plugin.so, or with --baseline from baseline.onnx (no plugin). The engine has two "
            "optimization profiles: 0 = decode (one token after a KV cache), 1 = prefill (a prompt, empty cache). "
            "TensorRT networks are strongly typed: the engine computes in the ONNX graph's dtype (export fp16)."
        ),
        epilog=(
            "examples:\n"
            "  sqz-export build runs/onnx/model.onnx -o runs/model.engine --plugin-library build/plugins/sqzLinearPlugin/libsqz_trt_plugin.so\n"
            "  sqz-export build --baseline runs/onnx/baseline.onnx -o runs/baseline.engine"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("onnx", type=Path, nargs="?", help="model.onnx with SqzLinear nodes (from `sqz-export export`)")
    parser.add_argument("--baseline", type=Path, metavar="ONNX", help="build the FP16 baseline from this graph instead (no plugin)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="engine file to write")
    parser.add_argument(
        "--plugin-library",
        metavar="SO",
        help="libsqz_trt_plugin.so (default: $SQZ_PLUGIN_LIBRARY, else the first one under ./build or the repository's build/)",
    )
    parser.add_argument("--max-batch", type=positive_int, default=1, help="largest batch of both profiles (default: 1)")
    parser.add_argument("--max-seq", type=positive_int, default=512, help="longest prompt of the prefill profile (default: 512)")
    parser.add_argument("--max-context", type=positive_int, default=2048, help="longest cache + new tokens of the decode profile (default: 2048)")
    parser.add_argument("--workspace-mib", type=positive_int, help="cap on TensorRT's tactic workspace in MiB (default: TensorRT's)")
    add_json_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sqz_export.atomic import check_writable
    from sqz_export.engine.build import BuildLimits, build_engine
    from sqz_export.errors import UserError
    from sqz_export.export.signature import load_graph
    from sqz_export.validate import check_input_file, check_sqz_linear_nodes

    if (args.onnx is None) == (args.baseline is None):
        raise UserError("pass exactly one graph: MODEL.onnx (SqzLinear plugins) or --baseline BASELINE.onnx")
    if args.baseline is not None and args.plugin_library:
        raise UserError("--plugin-library is for SqzLinear graphs; the --baseline graph needs no plugin")
    source = args.baseline if args.baseline is not None else args.onnx
    check_input_file(source, "--baseline" if args.baseline is not None else "ONNX file")
    if args.plugin_library:
        check_input_file(args.plugin_library, "--plugin-library")
    check_writable(args.output, "-o")
    check_outputs(args, "json")
    check_sqz_linear_nodes(load_graph(source), source)
    result = build_engine(
        source,
        args.output,
        plugin_library=args.plugin_library,
        baseline=args.baseline is not None,
        limits=BuildLimits(max_batch=args.max_batch, max_seq=args.max_seq, max_context=args.max_context),
        workspace_mib=args.workspace_mib,
    )
    print_table([
        ("engine", f"{result.engine_path} ({human_bytes(result.engine_bytes)})"),
        ("tensorrt", result.tensorrt_version),
        ("plugin layers", f"{result.plugin_layers} SqzLinear (of {result.sqz_nodes} nodes in the graph)"),
        ("profiles", ", ".join(f"{i} {name}" for i, name in enumerate(result.profiles))),
        ("build time", f"{result.seconds:.1f} s"),
    ])
    write_json(args.json, {
        "engine": str(result.engine_path),
        "engine_bytes": result.engine_bytes,
        "tensorrt_version": result.tensorrt_version,
        "sqz_nodes": result.sqz_nodes,
        "plugin_layers": result.plugin_layers,
        "profiles": {name: {t: list(map(list, s)) for t, s in shapes.items()} for name, shapes in result.profiles.items()},
        "seconds": result.seconds,
    })
    return 0
