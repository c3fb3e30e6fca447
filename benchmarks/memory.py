"""Peak RSS per stage (export, onnxruntime session + decode, compare) against model size.

For each LLaMA-shaped size, random weights are built in code (random packed 3-bit layers with 0.45%
sparse, no calibration), saved as an FP16 source folder and a checkpoint, and then every stage runs
in its own child process, which reports its own peak RSS (``ru_maxrss``):

- ``export``: ``export_checkpoint`` (model.onnx + baseline.onnx);
- ``session-model`` / ``session-baseline``: an onnxruntime CPU session on model.onnx (the SqzLinear
  function fallback) or baseline.onnx, one prefill of ``PROMPT_TOKENS`` tokens and 16 decode steps;
- ``reference``: the compare's torch reference runner alone (checkpoint load + one prefill);
- ``compare``: ``compare_folder`` (torch reference, model.onnx, baseline.onnx) on one window.

Bytes per parameter divide the peak by the model's parameter count; the slope is the least-squares
fit of peak against parameters over the sizes run (bytes per added parameter, independent of the
interpreter's fixed cost). Prints a table and writes JSON (atomically).

    python benchmarks/memory.py --sizes 135m 0.5b 1.1b --work runs/memory --out runs/memory.json
"""

from __future__ import annotations

import argparse
import json
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
STAGES = ("export", "session-baseline", "session-model", "reference", "compare")
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


def run_stage(stage: str, work: Path) -> None:
    """Runs one stage on ``work`` (in this process)."""
    if stage == "export":
        from sqz_export.export.sqz_model import export_checkpoint

        export_checkpoint(work / "ckpt", work / "onnx")
    elif stage.startswith("session-"):
        import numpy as np
        import onnxruntime as ort

        from sqz_export.export.signature import DecoderSignature

        path = work / "onnx" / ("model.onnx" if stage == "session-model" else "baseline.onnx")
        signature = DecoderSignature.from_onnx(path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = ["logits", *signature.present_names]
        outputs = session.run(names, signature.feed(np.arange(3, 3 + PROMPT_TOKENS)[None]))
        for _ in range(DECODE_STEPS):
            past = dict(zip(signature.past_names, outputs[1:], strict=True))
            outputs = session.run(names, signature.feed(outputs[0][:, -1:].argmax(-1), past))
    elif stage == "reference":
        import torch

        from sqz_export.checkpoint import load_quantized_model

        model, _ = load_quantized_model(work / "ckpt")
        with torch.no_grad():
            model(torch.arange(3, 3 + PROMPT_TOKENS)[None])
    elif stage == "compare":
        from sqz_export.compare.driver import CompareOptions, compare_folder

        text = work / "text.txt"
        text.write_text(TEXT)
        compare_folder(work / "onnx", CompareOptions(dataset=str(text), seq_len=PROMPT_TOKENS, iterations=1, warm_up=0))
    else:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


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
    parser.add_argument("--work", type=Path, required=True, help="folder for the models and exports (kept)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage is not None:  # child mode: one stage, report its own peak
        start = time.perf_counter()
        work = args.work / args.size
        work.mkdir(parents=True, exist_ok=True)
        prepare(args.size, work) if args.stage == "prepare" else run_stage(args.stage, work)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - start}))
        return

    from sqz_export.atomic import write_text

    rows: dict[str, dict[str, dict]] = {}
    for size in args.sizes:
        child(["--work", str(args.work), "--size", size, "--stage", "prepare"])
        rows[size] = {}
        for stage in args.stages:
            measured = child(["--work", str(args.work), "--size", size, "--stage", stage])
            measured["bytes_per_param"] = measured["peak_rss"] / parameters(size)
            rows[size][stage] = measured
            print(f"{size:>5} {stage:<17} {measured['peak_rss'] / 2**30:6.2f} GiB  {measured['bytes_per_param']:6.2f} B/param  ({measured['seconds']:.0f} s)", flush=True)

    slopes = {}
    for stage in args.stages:
        xs = [float(parameters(size)) for size in args.sizes]
        slopes[stage] = slope(xs, [float(rows[size][stage]["peak_rss"]) for size in args.sizes])
    print(f"\n{'stage':<17} " + " ".join(f"{size:>16}" for size in args.sizes) + f" {'slope B/param':>14}")
    for stage in args.stages:
        cells = " ".join(
            f"{rows[size][stage]['peak_rss'] / 2**30:6.2f} GiB {rows[size][stage]['bytes_per_param']:5.1f}" for size in args.sizes
        )
        print(f"{stage:<17} {cells} {slopes[stage] if slopes[stage] is not None else float('nan'):>14.2f}")
    for size in args.sizes:
        row = rows[size]
        if "session-model" in row and "session-baseline" in row:
            ratio = row["session-model"]["peak_rss"] / row["session-baseline"]["peak_rss"]
            print(f"{size}: session model.onnx / baseline.onnx = {ratio:.2f}x (acceptance <= 1.15x)")
        runners = [row[s]["peak_rss"] for s in ("session-model", "session-baseline", "reference") if s in row]
        if "compare" in row and runners:
            print(f"{size}: compare / largest runner = {row['compare']['peak_rss'] / max(runners):.2f}x (acceptance <= 1.2x)")
    if args.out:
        results = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
            "command": " ".join(sys.argv),
            "parameters": {size: parameters(size) for size in args.sizes},
            "stages": rows,
            "slope_bytes_per_param": slopes,
        }
        write_text(args.out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
