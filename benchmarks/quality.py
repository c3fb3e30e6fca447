"""Quality sweep on the embedded default: perplexity on two texts, size and quantization time per method.

Loads the model and runs one calibration pass that collects every statistic the methods need (the
Fisher, the gradient-weighted Hessians of lnq, the X^T X of gptq; cached), then for each configuration
quantizes, evaluates perplexity on the held-out end of each evaluation text, and records the packed
size and the time of each quantization phase. Prints a table and writes JSON.

Calibration always comes from the start of ``--dataset`` (the Wikipedia sample); ``news`` (ABC news
articles, another domain) is scored on its end only, to check that gains are not tuned to Wikipedia.

    python benchmarks/quality.py --out runs/quality.json
    python benchmarks/quality.py --only lnq-3-0.0045 squeezellm-3-0.0045
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
from sqz_export.quantize.calibration import StatisticsRequest, load_or_collect_statistics
from sqz_export.quantize.pipeline import DEFAULT_HESSIAN_GROUPS, DEFAULT_LNQ_ITERATIONS
from sqz_export.runtime import replace_linears

METHODS = ("rtn", "gptq", "squeezellm", "lnq")
CONFIGS: list[tuple[str, int, float]] = [(method, bits, sparsity) for method in METHODS for sparsity in (0.0, 0.0045) for bits in (4, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model spec (default: embedded SmolLM2-135M)")
    parser.add_argument("--dataset", default="wikipedia", help="calibration text (its start is calibrated on)")
    parser.add_argument("--eval-texts", nargs="+", default=["wikipedia", "news"], help="texts scored on their end (default: wikipedia news)")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=80)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hessian-groups", type=int, default=DEFAULT_HESSIAN_GROUPS)
    parser.add_argument("--lnq-iterations", type=int, default=DEFAULT_LNQ_ITERATIONS)
    parser.add_argument("--hessian-damp", type=float, default=None, help="lnq: H + DAMP * diag(H) (default: the per-bits default)")
    parser.add_argument("--only", nargs="*", help="subset of configs, e.g. lnq-3-0.0045 (method-bits-sparsity)")
    parser.add_argument("--skip-fp", action="store_true", help="do not re-measure the FP model")
    parser.add_argument("--stats", type=Path, default=Path("runs/calibration_stats.safetensors"), help="statistics cache (reused when it matches)")
    parser.add_argument("--out", type=Path, default=Path("runs/quality.json"))
    args = parser.parse_args()

    loaded = load_model(args.model, torch.float32)
    layers = quantizable_linears(loaded.model)
    # The calibration text, when also scored, is loaded once with both parts (checked not to overlap).
    both = args.dataset in args.eval_texts
    windows = load_windows(
        loaded.tokenizer, args.dataset, calibration=(args.calib_windows, args.seq_len), evaluation=(args.eval_windows, args.seq_len) if both else None
    )
    evaluations = {
        text: windows["evaluation"] if both and text == args.dataset else load_windows(loaded.tokenizer, text, evaluation=(args.eval_windows, args.seq_len))["evaluation"]
        for text in args.eval_texts
    }
    weights = sum(layer.weight.numel() for layer in layers.values())

    def scores(model: torch.nn.Module) -> dict[str, float]:
        return {name: perplexity(model, part.tokens).perplexity for name, part in evaluations.items()}

    rows: list[dict[str, object]] = []
    if not args.skip_fp:
        rows.append({"config": "fp32", "perplexity": scores(loaded.model), "packed_MiB": weights * 2 / 2**20, "timings_s": {}})
        print(json.dumps(rows[-1]), flush=True)

    by_name = {f"{m}-{b}-{sp}": (m, b, sp) for m, b, sp in CONFIGS}
    unknown = [name for name in args.only or [] if name not in by_name]
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; expected method-bits-sparsity, e.g. lnq-3-0.0045")
    configs = [by_name[name] for name in args.only] if args.only else CONFIGS  # in the order asked for
    # The union of what the chosen methods need; the cache adds what it lacks, so a later run reads it back.
    needed = [QuantizeOptions(method=m, hessian_groups=args.hessian_groups).statistics() for m, _, _ in configs]
    needed = [r for r in needed if r is not None]
    wanted = bool(needed)
    request = StatisticsRequest(
        fisher=any(r.fisher for r in needed), guided_groups=max((r.guided_groups for r in needed), default=0), xtx=any(r.xtx for r in needed)
    )
    stats, stats_s, stats_key = None, 0.0, "calibration_cache_read"
    if wanted:
        start = time.perf_counter()
        stats, computed = load_or_collect_statistics(
            loaded.model, windows["calibration"], layers, request, cache=args.stats, source=loaded.source, autocast_dtype=torch.bfloat16, progress=False
        )
        stats_s = time.perf_counter() - start
        stats_key = "calibration" if computed else "calibration_cache_read"
        print(f"{stats_key} ({', '.join(request.names())}) {stats_s:.1f}s", flush=True)

    for method, bits, sparsity in configs:
        options = QuantizeOptions(
            method=method,
            bits=bits,
            sparsity=sparsity,
            sensitive_fraction=min(0.0005, sparsity),
            hessian_groups=args.hessian_groups,
            lnq_iterations=args.lnq_iterations,
            hessian_damp=args.hessian_damp,
        )
        result = quantize_model(loaded.model, stats if method != "rtn" else None, options, layers=layers, progress=False)
        model = copy.deepcopy(loaded.model)
        replace_linears(model, result.packed)
        timings = dict(result.timings)
        if method != "rtn":
            timings[stats_key] = stats_s
        nnz = sum(layer.sparse.nnz for layer in result.packed.values() if layer.sparse is not None)
        row = {
            "config": f"{method}-{bits}-{sparsity}",
            "method": method,
            "bits": bits,
            "sparsity_target": sparsity,
            "sparsity_actual": nnz / weights,
            "settings": options.settings(),
            "perplexity": scores(model),
            "packed_MiB": sum(layer.nbytes() for layer in result.packed.values()) / 2**20,
            "timings_s": {key: round(value, 2) for key, value in timings.items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model

    texts = list(evaluations)
    print(f"\n{'config':<22} " + " ".join(f"{'ppl ' + t:>16}" for t in texts) + f" {'exact':>8} {'MiB':>7}  timings (s)")
    for row in rows:
        timing = ", ".join(f"{key} {value:.1f}" for key, value in row["timings_s"].items())
        exact = f"{row['sparsity_actual']:.4%}" if "sparsity_actual" in row else "-"
        print(f"{row['config']:<22} " + " ".join(f"{row['perplexity'][t]:>16.2f}" for t in texts) + f" {exact:>8} {row['packed_MiB']:>7.1f}  {timing}")
    payload = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "model": loaded.source,
        "calibration": windows["calibration"].describe(),
        "evaluation": {name: part.describe() for name, part in evaluations.items()},
        "statistics": {"names": request.names() if wanted else [], "guided_groups": request.guided_groups, "seconds": round(stats_s, 2), "source": stats_key},
        "rows": rows,
    }
    atomic.write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
