"""``sqz-export inspect``: what a checkpoint holds, and how much smaller it is."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqz_export.cli.common import add_json_argument, check_outputs, human_bytes, print_table, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="summarize a quantized checkpoint (bits, sparsity, sizes, compression)",
        description="Validate a checkpoint (checksums, versions, shapes) and summarize it.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder written by `sqz-export quantize`")
    parser.add_argument("--layers", action="store_true", help="also list every quantized layer")
    add_json_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sqz_export.checkpoint import read_checkpoint
    from sqz_export.validate import natural_key

    check_outputs(args, "json")
    checkpoint = read_checkpoint(args.checkpoint)
    qconfig = checkpoint.qconfig
    packed = checkpoint.packed
    weights = sum(layer.in_features * layer.out_features for layer in packed.values())
    nnz = sum(layer.sparse.nnz for layer in packed.values() if layer.sparse is not None)
    packed_bytes = sum(layer.nbytes() for layer in packed.values())
    dense_bytes = sum(tensor.numel() * tensor.element_size() for tensor in checkpoint.dense_state.values())
    file_bytes = sum(path.stat().st_size for path in args.checkpoint.iterdir() if path.is_file())
    summary = {
        "checkpoint": str(args.checkpoint),
        "quant_method": qconfig.quant_method,
        "method": qconfig.algorithm,
        "method_settings": qconfig.method_settings,
        "bits": qconfig.bits,
        "format_version": qconfig.format_version,
        "layers": len(packed),
        "quantized_weights": weights,
        "sparse_nnz": nnz,
        "sparse_fraction": nnz / weights if weights else 0.0,
        "bits_per_weight": packed_bytes * 8 / weights if weights else 0.0,
        "quantized_fp16_bytes": weights * 2,
        "quantized_packed_bytes": packed_bytes,
        "compression_ratio": weights * 2 / packed_bytes if packed_bytes else 0.0,
        "unquantized_bytes": dense_bytes,
        "files_bytes": file_bytes,
        "source_model": qconfig.source_model,
        "calibration": qconfig.calibration,
    }
    calibration = qconfig.calibration or {}
    print_table([
        ("checkpoint", f"{args.checkpoint} (format v{qconfig.format_version}, checksums ok)"),
        ("method", f"{qconfig.algorithm}, {qconfig.bits}-bit, {summary['sparse_fraction']:.4%} exact weights ({nnz} non-zeros)"),
        ("layers", f"{len(packed)} linears, {weights / 1e6:.2f}M weights"),
        ("quantized linears", f"{human_bytes(weights * 2)} fp16 -> {human_bytes(packed_bytes)} packed ({summary['compression_ratio']:.2f}x, {summary['bits_per_weight']:.3f} bits/weight incl. LUT and sparse)"),
        ("other tensors", f"{human_bytes(dense_bytes)} (embeddings, norms, lm_head; fp16)"),
        ("files", human_bytes(file_bytes)),
        ("source model", qconfig.source_model),
        ("calibration", f"{calibration.get('num_tokens', 0)} tokens of {calibration.get('dataset', '-')}" if calibration else "none (rtn)"),
    ])
    if args.layers:
        for name in sorted(packed, key=natural_key):  # layers.2 before layers.10: model order
            layer = packed[name]
            nnz_layer = layer.sparse.nnz if layer.sparse is not None else 0
            print(f"    {name:<48} [{layer.out_features:>6} x {layer.in_features:<6}] {layer.bits}-bit nnz={nnz_layer:<7} {human_bytes(layer.nbytes())}")
    write_json(args.json, summary)
    return 0
