"""Peak memory and time per block of ``sqz-export quantize`` against model depth (issue: quantize >7B).

LLaMA-shaped models with random bf16 weights are built in code and saved as sharded safetensors (one
width, TinyLlama's: hidden 2048, intermediate 5632, 32 heads, 4 KV heads, SmolLM2's 49152-token
vocabulary) at several depths; each is quantized by the real command in a child process under
``/usr/bin/time`` (its maximum resident set size). A streamed quantizer's peak follows
one block, so it should barely grow with depth; the table shows peak RSS, bytes per parameter, peak
as a fraction of the fp32 model, wall time and seconds per block. SmolLM2-135M itself (the embedded
GGUF) is the last row when ``--smollm2`` is given.

    python benchmarks/quantize_memory.py --layers 8 16 22 32 --smollm2 --work runs/qmem --out runs/quantize-memory.json

Each run uses ``--no-overlap`` unless ``--overlap`` is given: one block in memory, the smallest peak.
The block inputs are the one part that grows with depth (8.4 MB per block at 4 x 256 windows); with
``--activation-memory 0`` they all go to the run folder on disk, and the peak follows the block alone.

Few calibration windows keep the run short on 2 cores (the windows' activations are the only part
that grows with depth: layers x windows x seq_len x hidden fp32, 8 MB per block at 4 x 256 tokens);
``--method`` defaults to squeezellm without extra k-means starts, the cheapest method that runs the
whole streamed calibration (Fisher, backward walk); lnq adds its Hessians and refinement per block.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 49152
SHARD_BYTES = 1 << 30


def build(folder: Path, layers: int) -> int:
    """A random bf16 LLaMA of ``layers`` blocks as sharded safetensors + SmolLM2's tokenizer; returns its parameter count.

    Tensors are made and written one shard at a time, so building a model never holds it whole.
    """
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from sqz_export.models import open_model

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048, tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    total = sum(torch.Size(shape).numel() for shape in shapes.values())
    if (folder / "model.safetensors.index.json").is_file():
        return total
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(layers)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0
    names = list(shapes)

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name in names:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        size += tensor.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    config.save_pretrained(folder)
    open_model(None).tokenizer.save_pretrained(folder)
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def measure(model: str, out: Path, args: argparse.Namespace, blocks: int, params: int, label: str) -> dict[str, object]:
    """Runs the real quantize command in a child and returns its peak RSS and times."""
    command = [
        sys.executable, "-m", "sqz_export", "quantize", "--model", model, "-o", str(out), "--method", args.method,
        "--kmeans-starts", "0", "--calib-windows", str(args.windows), "--seq-len", str(args.seq_len), "--json", str(out) + ".json",
        "--overlap" if args.overlap else "--no-overlap", "--activation-memory", args.activation_memory, "--device", args.device,
    ]
    from sqz_export.quantize.rundir import default_run_dir

    shutil.rmtree(default_run_dir(out), ignore_errors=True)  # an earlier, interrupted benchmark's run: measure a fresh one
    rss_file = Path(str(out) + ".maxrss")
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{label}: quantize failed:\n{result.stderr[-3000:]}")
    peak = int(rss_file.read_text().split()[-1]) * 1024  # GNU time reports kilobytes
    summary = json.loads(Path(str(out) + ".json").read_text())
    return {
        "model": label, "layers": blocks, "params": params, "peak_rss_bytes": peak, "bytes_per_param": peak / params,
        "fraction_of_fp32": peak / (4 * params), "wall_s": wall, "s_per_block": wall / blocks, "timings_s": summary["timings_s"],
        "peak_cuda_bytes": summary.get("peak_cuda_bytes"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 22, 32], help="depths to build and quantize")
    parser.add_argument("--smollm2", action="store_true", help="also quantize the embedded SmolLM2-135M")
    parser.add_argument("--method", default="squeezellm")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--overlap", action=argparse.BooleanOptionalAction, default=False,
        help="quantize behind the calibration pass (two blocks in memory; the CLI's default) instead of one block at a time (default here: --no-overlap)",
    )
    parser.add_argument(
        "--activation-memory", default="1G",
        help="the CLI's --activation-memory: block inputs kept in memory, the rest spilled to the run folder (default: the CLI's 1G; 0 spills all)",
    )
    parser.add_argument("--device", default="cpu", help="the CLI's --device (cuda: the JSON also holds each run's peak CUDA memory)")
    parser.add_argument("--work", type=Path, default=Path("runs/quantize-memory"))
    parser.add_argument("--out", type=Path, default=Path("runs/quantize-memory.json"))
    args = parser.parse_args()
    rows = []
    for layers in args.layers:
        folder = args.work / f"llama-{layers}l"
        params = build(folder, layers)
        rows.append(measure(str(folder), args.work / f"ckpt-{layers}l", args, layers, params, f"LLaMA h2048 x {layers}"))
        print(f"{rows[-1]['model']}: {rows[-1]['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if args.smollm2:
        rows.append(measure("smollm2-135m", args.work / "ckpt-smollm2", args, 30, 134_515_008, "SmolLM2-135M (GGUF)"))
    print("| model | params | peak RSS | B/param | of fp32 | peak CUDA | wall | s/block |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cuda = f"{row['peak_cuda_bytes'] / 2**30:.2f} GiB" if row["peak_cuda_bytes"] is not None else "-"
        print(
            f"| {row['model']} | {row['params'] / 1e9:.2f}B | {row['peak_rss_bytes'] / 2**30:.2f} GiB | {row['bytes_per_param']:.2f} | "
            f"{row['fraction_of_fp32']:.3f} | {cuda} | {row['wall_s']:.0f} s | {row['s_per_block']:.1f} |"
        )
    depths = [row for row in rows if row["model"].startswith("LLaMA")]
    growth = depths[-1]["peak_rss_bytes"] / depths[0]["peak_rss_bytes"] - 1 if len(depths) > 1 else 0.0
    print(f"peak growth from {depths[0]['layers']} to {depths[-1]['layers']} layers: {growth:+.1%}")
    from sqz_export.atomic import write_text

    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
        "command": " ".join(sys.argv), "method": args.method, "overlap": args.overlap, "activation_memory": args.activation_memory, "device": args.device, "windows": args.windows, "seq_len": args.seq_len,
        "rows": rows, "peak_growth": growth,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
