"""Export acceptance numbers on a real checkpoint: file sizes, export time, ORT accuracy and latency.

Exports the checkpoint (fp16 SqzLinear graph + FP16 baseline), then compares the torch reference, the
sqz graph and the baseline in onnxruntime on windows of the offline Wikipedia sample. Prints a table
and writes JSON. Latency is onnxruntime on this machine's CPU (median after warm-up).

    sqz-export quantize --method squeezellm --bits 3 --sparsity 0.45% -o runs/smollm2-3b
    python benchmarks/export_smollm2.py runs/smollm2-3b --out runs/export_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from polygraphy.logger import G_LOGGER

from sqz_export.checkpoint import WEIGHTS_FILE
from sqz_export.compare.driver import BASELINE, SQZ, CompareOptions, compare_folder
from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE, export_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (sqz-export quantize)")
    parser.add_argument("--onnx", type=Path, help="export folder to write (default: a temporary folder)")
    parser.add_argument("--windows", type=int, default=1, help="windows of --seq-len tokens to compare (default: 1)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=5, help="timed runs per runner after warm-up (default: 5)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    G_LOGGER.module_severity = G_LOGGER.WARNING  # Polygraphy's per-session [I] lines

    with tempfile.TemporaryDirectory(prefix="sqz-export-bench-") as tmp:
        folder = args.onnx or Path(tmp) / "onnx"
        start = time.perf_counter()
        result = export_checkpoint(args.checkpoint, folder)
        export_s = time.perf_counter() - start
        checkpoint_bytes = (args.checkpoint / WEIGHTS_FILE).stat().st_size
        model_bytes = (folder / MODEL_FILE).stat().st_size
        options = CompareOptions(windows=args.windows, seq_len=args.seq_len, iterations=args.iterations)
        report, _ = compare_folder(folder, options)
        baseline_bytes = (folder / BASELINE_FILE).stat().st_size

    pairs = {pair.runner: pair for pair in report.pairs}
    latency = {entry.runner: entry for entry in report.latency}
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "checkpoint": str(args.checkpoint),
        "rewritten": result.rewritten,
        "checkpoint_bytes": checkpoint_bytes,
        "model_onnx_bytes": model_bytes,
        "model_to_checkpoint_ratio": model_bytes / checkpoint_bytes,
        "baseline_onnx_bytes": baseline_bytes,
        "export_s": export_s,
        "report": report.to_json(),
    }
    rows = [
        ("rewritten", f"{result.rewritten} linears -> sqz::SqzLinear"),
        (
            "model.onnx",
            f"{model_bytes / 2**20:.1f} MiB = {model_bytes / checkpoint_bytes:.3f}x the checkpoint's {WEIGHTS_FILE}",
        ),
        ("baseline.onnx", f"{baseline_bytes / 2**20:.1f} MiB ({baseline_bytes / model_bytes:.2f}x model.onnx)"),
        ("export", f"{export_s:.1f} s (both graphs)"),
        (
            "sqz vs torch",
            f"top-1 {pairs[SQZ].top1_agreement:.2%} over {pairs[SQZ].positions} positions, max |d| {pairs[SQZ].max_abs:.3g}, mean |d| {pairs[SQZ].mean_abs:.3g}",
        ),
        ("fp16 vs torch", f"top-1 {pairs[BASELINE].top1_agreement:.2%} (quantization error)"),
    ]
    for name in (SQZ, BASELINE):
        entry = latency[name]
        rows.append(
            (
                f"{name} ORT CPU",
                f"prefill {entry.prefill_ms:.1f} ms ({args.seq_len} tokens), decode {entry.decode_ms:.2f} ms/token",
            )
        )
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
