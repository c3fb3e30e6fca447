"""Peak RSS per stage (export, onnxruntime session + decode, compare) against model size.

For each LLaMA-shaped size, random weights are built in code (random packed 3-bit layers with 0.45%
sparse, no calibration), saved as an FP16 source folder (safetensors) and a checkpoint, and then
every stage runs in its own child process, which reports its own peak RSS (``ru_maxrss``, which
counts file pages mapped into the process too), with glibc's allocator tuned as the ``sqz-export``
command tunes it (``sqz_export.cli.return_freed_memory``). Stages, in the pipeline's order (``STAGES``):

- ``export``: ``export_checkpoint`` (model.onnx + baseline.onnx);
- ``session-baseline``, ``session-model``, ``session-model-fold``, ``session-model-call``: sqz-export's
  onnxruntime CPU session (``sqz_export.ort_session.create_session``) on baseline.onnx, and on
  model.onnx's SqzLinear function fallback unpacked layer by layer by sqz-export before onnxruntime
  loads it (``--unpack stream``, the default), folded by onnxruntime at session creation (``--unpack
  session``), or unpacked on every run (``--unpack call``); each runs one prefill of ``PROMPT_TOKENS``
  tokens and ``DECODE_STEPS`` decode steps and also reports the median decode step time (meaningful
  only on an idle machine);
- ``reference``: the compare's torch reference runner alone (checkpoint load + one prefill);
- ``compare``, ``compare-call``: ``compare_folder`` (torch reference, model.onnx, baseline.onnx) on one
  window, model.onnx unpacked as by default or on every run.

``--skip SIZE:STAGE`` leaves out a stage that does not fit the machine (model.onnx folded by
onnxruntime needs about 25 B per quantized weight: 24 GiB at the 1.1B shape); ``--previous`` keeps the
stages of earlier runs' JSON, so a long measurement on a shared machine can be done in parts.

Bytes per parameter divide the peak by the model's parameter count; the slope is the least-squares
fit of peak against parameters over the sizes run (bytes per added parameter, independent of the
interpreter's fixed cost). Prints a table and the acceptance checks of issue 14 per size, and writes
JSON (atomically).

    python benchmarks/memory.py --sizes 135m 0.5b 1.1b --work runs/memory --out runs/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

SIZES = {
    # name: (hidden, layers, intermediate, heads, kv_heads); vocabulary 49152 (SmolLM2's tokenizer)
    "135m": (576, 30, 1536, 9, 3),
    "0.5b": (1280, 24, 3584, 20, 4),
    "1.1b": (2048, 22, 5632, 32, 4),
}
VOCAB = 49152
BITS = 3
SPARSITY = 0.0045
PROMPT_TOKENS = 32
DECODE_STEPS = 16
STAGES = (
    "export", "session-baseline", "session-model", "session-model-fold", "session-model-call", "reference", "compare", "compare-call"
)
TEXT = "The quick brown fox jumps over the lazy dog. Quantization maps each weight to one of a few values.\n" * 200


def prepare(size: str, work: Path) -> None:
    """FP16 source folder and a random 3-bit checkpoint of ``size`` under ``work`` (skipped if present)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sqz_export.checkpoint import QuantizationConfig, save_checkpoint
    from sqz_export.formats import PackedLinear, SparsePart, pack_indices
    from sqz_export.models import load_model, quantizable_linears

    if (work / "ckpt" / "sqz_manifest.json").is_file():
        return
    hidden, layers, intermediate, heads, kv_heads = SIZES[size]
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=size == "135m",
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.float16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.weight.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # real inv_freq (to_empty left garbage)
    tokenizer = load_model(None).tokenizer  # SmolLM2's tokenizer: ids below VOCAB
    model.save_pretrained(work / "source")
    tokenizer.save_pretrained(str(work / "source"))
    generator = torch.Generator().manual_seed(1)
    packed = {}
    for name, linear in quantizable_linears(model).items():
        n, k = linear.out_features, linear.in_features
        indices = torch.randint(0, 1 << BITS, (n, k), generator=generator, dtype=torch.int64)
        lut = (torch.randn(n, 1 << BITS, generator=generator) * 0.02).to(torch.float16)
        mask = torch.rand(n, k, generator=generator) < SPARSITY
        sparse = SparsePart.from_dense(torch.randn(n, k, generator=generator) * 0.01 * mask)
        packed[name] = PackedLinear(BITS, k, n, pack_indices(indices, BITS), lut, sparse)
        linear.weight = None  # drop the FP weight as soon as its layer is packed
    qconfig = QuantizationConfig("squeezellm", BITS, SPARSITY, 0.0, list(packed), str(work / "source"), chunk_nnz=32, method="rtn")
    save_checkpoint(work / "ckpt", model, packed, qconfig, tokenizer)


def stage_export(work: Path) -> dict:
    from sqz_export.export.sqz_model import export_checkpoint

    export_checkpoint(work / "ckpt", work / "onnx")
    return {}


def stage_session(work: Path, graph: str, unpack: str) -> dict:
    """One prefill and ``DECODE_STEPS`` greedy steps; the median step time rides along."""
    import numpy as np

    from sqz_export.generate import OnnxGenerator

    generator = OnnxGenerator(work / "onnx" / graph, unpack=unpack)
    logits, past = generator.step(np.arange(3, 3 + PROMPT_TOKENS)[None], None)
    steps = []
    for _ in range(DECODE_STEPS):
        start = time.perf_counter()
        logits, past = generator.step(logits[:, -1:].argmax(-1), past)
        steps.append(time.perf_counter() - start)
    return {"decode_ms": 1000 * sorted(steps)[len(steps) // 2]}


def stage_reference(work: Path) -> dict:
    import torch

    from sqz_export.checkpoint import load_quantized_model

    model, _ = load_quantized_model(work / "ckpt")
    with torch.no_grad():
        model(torch.arange(3, 3 + PROMPT_TOKENS)[None])
    return {}


def stage_compare(work: Path, unpack: str) -> dict:
    from sqz_export.compare.driver import CompareOptions, compare_folder

    text = work / "text.txt"
    text.write_text(TEXT)
    options = CompareOptions(dataset=str(text), seq_len=PROMPT_TOKENS, iterations=1, warm_up=0, unpack=unpack)
    compare_folder(work / "onnx", options)
    return {}


def run_stage(stage: str, work: Path) -> dict:
    """Runs one stage on ``work`` (in this process); returns what it measured besides the peak."""
    runs = {
        "export": lambda: stage_export(work),
        "session-baseline": lambda: stage_session(work, "baseline.onnx", "stream"),
        "session-model": lambda: stage_session(work, "model.onnx", "stream"),
        "session-model-fold": lambda: stage_session(work, "model.onnx", "session"),
        "session-model-call": lambda: stage_session(work, "model.onnx", "call"),
        "reference": lambda: stage_reference(work),
        "compare": lambda: stage_compare(work, "stream"),
        "compare-call": lambda: stage_compare(work, "call"),
    }
    if stage not in runs:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return runs[stage]()


def parameters(size: str) -> int:
    hidden, layers, intermediate, heads, kv_heads = SIZES[size]
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    embeddings = VOCAB * hidden * (1 if size == "135m" else 2)
    return layers * per_layer + embeddings + hidden


def child(args: list[str]) -> dict:
    """Runs this script as a child with ``args``; returns the JSON it prints last (peak RSS, seconds)."""
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"child {args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--skip", nargs="+", default=[], metavar="SIZE:STAGE", help="stages not run at a size")
    parser.add_argument(
        "--previous", type=Path, nargs="+", default=[], help="JSON of earlier runs: their stages are kept, not rerun"
    )
    parser.add_argument("--work", type=Path, required=True, help="folder for the models and exports (kept)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage is not None:  # child mode: one stage, report its own peak
        from sqz_export.cli import return_freed_memory

        return_freed_memory()  # glibc tuned as the sqz-export command tunes it, so a stage holds what the CLI would
        start = time.perf_counter()
        work = args.work / args.size
        work.mkdir(parents=True, exist_ok=True)
        extra: dict = {}
        if args.stage == "prepare":
            prepare(args.size, work)
        else:
            extra = run_stage(args.stage, work)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - start, **extra}))
        return

    from sqz_export.atomic import write_text

    previous: dict[str, dict[str, dict]] = {}
    for path in args.previous:
        for size, stages in json.loads(path.read_text())["stages"].items():
            previous.setdefault(size, {}).update(stages)
    rows: dict[str, dict[str, dict]] = {}
    for size in args.sizes:
        rows[size] = {stage: previous[size][stage] for stage in args.stages if stage in previous.get(size, {})}
        todo = [stage for stage in args.stages if stage not in rows[size] and f"{size}:{stage}" not in args.skip]
        if todo:
            child(["--work", str(args.work), "--size", size, "--stage", "prepare"])
        for stage in todo:
            measured = child(["--work", str(args.work), "--size", size, "--stage", stage])
            measured["bytes_per_param"] = measured["peak_rss"] / parameters(size)
            rows[size][stage] = measured
            decode = f", decode {measured['decode_ms']:.0f} ms/token" if "decode_ms" in measured else ""
            print(
                f"{size:>5} {stage:<19} {measured['peak_rss'] / 2**30:6.2f} GiB  {measured['bytes_per_param']:6.2f} B/param"
                f"  ({measured['seconds']:.0f} s{decode})",
                flush=True,
            )

    slopes: dict[str, float | None] = {}
    for stage in args.stages:
        sizes = [size for size in args.sizes if stage in rows[size]]
        xs = [float(parameters(size)) for size in sizes]
        slopes[stage] = slope(xs, [float(rows[size][stage]["peak_rss"]) for size in sizes])
    print(f"\n{'stage':<19} " + " ".join(f"{size:>16}" for size in args.sizes) + f" {'slope B/param':>14}")
    for stage in args.stages:
        cells = " ".join(
            f"{rows[size][stage]['peak_rss'] / 2**30:6.2f} GiB {rows[size][stage]['bytes_per_param']:5.1f}"
            if stage in rows[size]
            else f"{'not run':>16}"
            for size in args.sizes
        )
        print(f"{stage:<19} {cells} {slopes[stage] if slopes[stage] is not None else float('nan'):>14.2f}")
    checks = [line for size in args.sizes for line in acceptance(rows, slopes, size)]
    for line in checks:
        print(line)
    if args.out:
        results = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": cpu_name(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "command": " ".join(sys.argv),
            "previous": [str(path) for path in args.previous],
            "parameters": {size: parameters(size) for size in args.sizes},
            "stages": rows,
            "slope_bytes_per_param": slopes,
            "acceptance": checks,
        }
        write_text(args.out, json.dumps(results, indent=2) + "\n")


def cpu_name() -> str:
    """The CPU model of /proc/cpuinfo (the dev machine changes between sessions), else the platform's."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def acceptance(rows: dict[str, dict[str, dict]], slopes: dict[str, float | None], size: str) -> list[str]:
    """Issue 14's acceptance lines for ``size`` (those whose stages were run; measured on ~1.1B)."""
    row, lines = rows[size], []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    if "export" in row:
        per_param, fitted = row["export"]["bytes_per_param"], slopes.get("export")
        ok = per_param <= 4 and (fitted is None or fitted <= 4)
        fitted_text = f", slope {fitted:.2f}" if fitted is not None else ""
        lines.append(f"{verdict(ok)} {size} export {per_param:.2f} B/param{fitted_text} (acceptance <= 4)")
    for stage in ("session-model", "session-model-fold", "session-model-call"):
        if stage in row and "session-baseline" in row:
            ratio = row[stage]["peak_rss"] / row["session-baseline"]["peak_rss"]
            lines.append(f"{verdict(ratio <= 1.15)} {size} {stage} / session-baseline = {ratio:.2f}x (acceptance <= 1.15x)")
    for compare, model in (("compare", "session-model"), ("compare-call", "session-model-call")):
        runners = [row[s]["peak_rss"] for s in (model, "session-baseline", "reference") if s in row]
        if compare in row and runners:
            ratio = row[compare]["peak_rss"] / max(runners)
            lines.append(f"{verdict(ratio <= 1.2)} {size} {compare} / largest runner = {ratio:.2f}x (acceptance <= 1.2x)")
    return lines


if __name__ == "__main__":
    main()
