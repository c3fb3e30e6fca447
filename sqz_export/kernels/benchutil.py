"""Helpers shared by the benchmarks and the tests: the random-layer builder, and GPU/CPU timing.

Timing follows the project's benchmark rules: warm-up first, CUDA events around CUDA-graph replays
(so Python and launch overhead do not count, as in a TensorRT engine), median of several repeats,
and inputs rotated over more bytes than the L2 cache so each call streams its weights from DRAM.
On CPU (dry runs) the same calls are timed with perf_counter.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from sqz_export import atomic
from sqz_export.formats import (
    DEFAULT_CHUNK_NNZ,
    PackedLinear,
    SparsePart,
    balanced_partition,
    pack_indices,
    packed_words,
)

DEFAULT_L2_BYTES = 50 * 2**20


def random_packed(
    out_features: int,
    in_features: int,
    bits: int,
    density: float,
    seed: int = 0,
    device: torch.device | str = "cpu",
    chunk_nnz: int = DEFAULT_CHUNK_NNZ,
    heavy_row: bool = False,
) -> PackedLinear:
    """A random quantized layer (layout 1, as a checkpoint holds it), built on ``device``: the one
    random-layer builder of the tests and the benchmarks.

    Every b-bit pattern is a valid index, so when K is a multiple of 32 the packed words are drawn
    directly (no CPU packing of LLaMA-sized layers); otherwise indices are packed so the padding is 0.
    LUT entries are N(0, 0.02) pushed away from zero (a LUT with no zeros: a dropped term shows);
    sparse values are N(0, 1), never zero. ``heavy_row`` makes output row N // 2 hold a non-zero in
    its first tenth of the columns (a row far heavier than the rest, for the balanced splits).
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    words = packed_words(in_features, bits)
    if in_features % 32 == 0:
        qweight = torch.randint(
            -(2**31), 2**31, (words, out_features), dtype=torch.int32, device=device, generator=generator
        )
    else:
        indices = torch.randint(
            0, 1 << bits, (out_features, in_features), generator=torch.Generator().manual_seed(seed)
        )
        qweight = pack_indices(indices, bits).to(device)
    lut = torch.randn(out_features, 1 << bits, device=device, generator=generator) * 0.02
    lut = torch.where(lut.abs() < 1e-3, torch.full_like(lut, 1e-3), lut).to(torch.float16)
    sparse = None
    if density > 0:
        mask = torch.rand(out_features, in_features, device=device, generator=generator) < density
        if heavy_row:
            mask[out_features // 2, : max(1, in_features // 10)] = True
        rows, cols = torch.nonzero(mask, as_tuple=True)
        counts = torch.bincount(rows, minlength=out_features)
        row_ptr = torch.zeros(out_features + 1, dtype=torch.int64, device=device)
        row_ptr[1:] = torch.cumsum(counts, 0)
        values = torch.randn(rows.numel(), device=device, generator=generator)
        values = torch.where(values.abs() < 1e-2, torch.full_like(values, 0.5), values)
        sparse = SparsePart(
            row_ptr=row_ptr.to(torch.int32),
            col=cols.to(torch.int32),
            val=values.to(torch.float16),
            chunk_row=balanced_partition(row_ptr.cpu(), chunk_nnz).to(device),
            chunk_nnz=chunk_nnz,
        )
    return PackedLinear(bits, in_features, out_features, qweight, lut, sparse)


def benchmark_device(name: str) -> torch.device | None:
    """The device a benchmark runs on, or None after saying why (``--device cuda`` without a GPU)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {name} but no CUDA device is available (use --device cpu for a dry run)", file=sys.stderr)
        return None
    return device


def rotation_count(bytes_per_copy: int, l2_bytes: int) -> int:
    """Copies of the inputs to cycle through so one pass reads more than twice the L2 cache."""
    return max(2, math.ceil(2 * l2_bytes / max(1, bytes_per_copy)))


def l2_bytes(device: torch.device) -> int:
    """L2 cache bytes of a CUDA device; 0 on CPU (dry runs do not rotate inputs)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", DEFAULT_L2_BYTES))


def time_per_call(calls: Sequence[Callable[[], object]], device: torch.device, iters: int, repeats: int) -> float:
    """Median seconds per call of ``calls`` run round-robin ``iters`` times (warm-up excluded).

    CUDA: the ``iters`` calls are captured once into a CUDA graph; each repeat times one replay with
    CUDA events. CPU: perf_counter around the same loop.
    """
    if device.type != "cuda":
        for call in calls:
            call()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(iters):
                calls[i % len(calls)]()
            samples.append((time.perf_counter() - start) / iters)
        return statistics.median(samples)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (JIT build, cuBLAS handles) off the capture
        for call in calls:
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            calls[i % len(calls)]()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / iters)
    del graph
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device copy rate in bytes/s (read + write bytes of a large dst.copy_(src)), same run."""
    if device.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = time_per_call([lambda: dst.copy_(src)], device, iters=4, repeats=repeats)
    return 2 * src.numel() * 4 / seconds


def environment(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, sm=f"{props.major}{props.minor}", memory_bytes=props.total_memory, l2_bytes=l2_bytes(device)
        )
        info["cuda"] = torch.version.cuda
    return info


def write_report(out: Path, benchmark: str, device: torch.device, args: argparse.Namespace, **results: object) -> None:
    """Writes a benchmark's JSON (atomically) with the envelope every report shares: what ran, when,
    where, and with which settings; ``results`` are the benchmark's own keys."""
    report = {
        "benchmark": benchmark,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        **results,
    }
    atomic.write_text(out, json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
