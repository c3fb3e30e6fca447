"""Quality sweep on the embedded default: perplexity, size and quantization time per method.

Loads the model and computes the Fisher information once, then for each configuration quantizes,
evaluates perplexity on the held-out end of the dataset, and records the packed size and the time of
each phase. Prints a table and writes JSON.

    python benchmarks/quality.py --out runs/quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sqz_export import atomic
from sqz_export.data import load_windows
from sqz_export.evaluate import perplexity
from sqz_export.models import load_model, quantizable_linears
from sqz_export.quantize import QuantizeOptions, quantize_model
from sqz_export.quantize.fisher import load_or_compute_fisher
from sqz_export.runtime import replace_linears

CONFIGS: list[tuple[str, int, float]] = [
    ("rtn", 4, 0.0),
    ("rtn", 3, 0.0),
    ("squeezellm", 4, 0.0),
    ("squeezellm", 3, 0.0),
    ("squeezellm", 4, 0.0045),
    ("squeezellm", 3, 0.0045),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model spec (default: embedded SmolLM2-135M)")
    parser.add_argument("--dataset", default="wikipedia")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=80)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--only", nargs="*", help="subset of configs, e.g. squeezellm-3-0.0045")
    parser.add_argument("--fisher", type=Path, default=Path("runs/fisher.safetensors"), help="Fisher cache (reused when it matches)")
    parser.add_argument("--out", type=Path, default=Path("runs/quality.json"))
    args = parser.parse_args()

    loaded = load_model(args.model, torch.float32)
    layers = quantizable_linears(loaded.model)
    windows = load_windows(loaded.tokenizer, args.dataset, calibration=(args.calib_windows, args.seq_len), evaluation=(args.eval_windows, args.seq_len))
    evaluation = windows["evaluation"].tokens
    weights = sum(layer.weight.numel() for layer in layers.values())

    rows: list[dict[str, object]] = []
    fp = perplexity(loaded.model, evaluation)
    rows.append({"config": "fp32", "perplexity": fp.perplexity, "packed_MiB": weights * 2 / 2**20, "timings_s": {}})
    print(f"fp32 perplexity {fp.perplexity:.3f}", flush=True)

    start = time.perf_counter()
    fisher, computed = load_or_compute_fisher(
        loaded.model, windows["calibration"], layers, cache=args.fisher, source=loaded.source, autocast_dtype=torch.bfloat16, progress=False
    )
    fisher_s = time.perf_counter() - start
    fisher_key = "fisher" if computed else "fisher_cache_read"
    print(f"{fisher_key} {fisher_s:.1f}s", flush=True)

    for method, bits, sparsity in CONFIGS:
        name = f"{method}-{bits}-{sparsity}"
        if args.only and name not in args.only:
            continue
        options = QuantizeOptions(method=method, bits=bits, sparsity=sparsity, sensitive_fraction=min(0.0005, sparsity))
        result = quantize_model(loaded.model, fisher if method == "squeezellm" else None, options, layers=layers, progress=False)
        model = copy.deepcopy(loaded.model)
        replace_linears(model, result.packed)
        ppl = perplexity(model, evaluation)
        timings = dict(result.timings)
        if method == "squeezellm":
            timings[fisher_key] = fisher_s
        nnz = sum(layer.sparse.nnz for layer in result.packed.values() if layer.sparse is not None)
        row = {
            "config": name,
            "method": method,
            "bits": bits,
            "sparsity_target": sparsity,
            "sparsity_actual": nnz / weights,
            "perplexity": ppl.perplexity,
            "packed_MiB": sum(layer.nbytes() for layer in result.packed.values()) / 2**20,
            "timings_s": {key: round(value, 2) for key, value in timings.items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model

    print(f"\n{'config':<24} {'ppl':>8} {'linears MiB':>12}  timings (s)")
    for row in rows:
        timing = ", ".join(f"{key} {value:.1f}" for key, value in row["timings_s"].items())
        print(f"{row['config']:<24} {row['perplexity']:>8.2f} {row['packed_MiB']:>12.1f}  {timing}")
    payload = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "model": loaded.source,
        "calibration": windows["calibration"].describe(),
        "evaluation": windows["evaluation"].describe(),
        "rows": rows,
    }
    atomic.write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
