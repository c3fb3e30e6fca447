"""SqzLinear kernel speed against cuBLAS FP16 on LLaMA-7B/13B layer shapes.

For every (shape, M, bits, sparsity): median time per call of torch.ops.sqz (the CUDA kernel the
launcher picks, or --kernel), of torch.matmul with an FP16 weight (cuBLAS) and the device copy rate,
all measured in the same run. At M = 1 (dense, fp16) it also times the seed's kernel design
(benchmarks/baselines/seedDesignGemv.cu: one thread per row, LUTs reloaded per K block, fp32 atomics).
Calls are timed as CUDA-graph replays with CUDA events, inputs rotated over more than twice the L2
cache; see sqz_export/kernels/benchutil.py. Every timed kernel's output is first checked against the
fp32 reference. Prints a table and the issue's acceptance checks, writes JSON.

    python benchmarks/kernels.py --out runs/kernels.json
    python benchmarks/kernels.py --device cpu --shapes 64x96 --m 1 --iters 3 --repeats 2   # dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
from pathlib import Path
from types import ModuleType

import torch

from sqz_export import kernels
from sqz_export.formats import PackedLinear, to_rowmajor
from sqz_export.kernels import benchutil, build
from sqz_export.kernels.reference import sqz_reference_weight

logger = logging.getLogger(__name__)

# (N, K) = (out_features, in_features) of the LLaMA-7B / 13B linears.
DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "12288x4096", "13824x5120"]
LLAMA_7B_SHAPES = {(4096, 4096), (11008, 4096), (4096, 11008)}
"""The shapes the acceptance checks are judged on."""

BASELINE_DIR = Path(__file__).resolve().parent / "baselines"
SANITY_REL_ERR = 0.02
"""A timed kernel whose max error exceeds this fraction of max |y| is broken: its time is not reported.
A guard against timing garbage, far looser than the correctness tests' tolerance table."""


@dataclasses.dataclass
class Row:
    """One measured configuration."""

    n: int
    k: int
    m: int
    bits: int
    density: float
    nnz: int
    kernel: str
    sqz_us: float
    cublas_fp16_us: float
    speedup: float
    sqz_bytes: int
    gbps: float
    copy_fraction: float
    max_abs_err: float
    seed_design_us: float | None = None
    vs_seed_design: float | None = None


@dataclasses.dataclass
class Criterion:
    """One acceptance check of issue 4, evaluated on this run's rows (None: not measured in this run)."""

    name: str
    target: str
    measured: float | None
    passed: bool | None


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be NxK, e.g. 11008x4096") from error
    return n, k


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES], help="NxK list"
    )
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 16], help="rows of x (tokens)")
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    parser.add_argument("--density", nargs="+", type=float, default=[0.0, 0.0045], help="sparse fraction")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--kernel", choices=sorted(kernels.KERNEL_KINDS), default="auto")
    parser.add_argument("--iters", type=int, default=200, help="calls per timed graph replay")
    parser.add_argument("--repeats", type=int, default=20, help="timed replays; the median is reported")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of the logic")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    return parser


@functools.cache
def seed_design_extension() -> ModuleType:
    """The seed-design baseline GEMV, compiled like the product's extension (on first use)."""
    return build.build_extension(
        "sqz_seed_design_ext",
        [BASELINE_DIR / "seedDesignBinding.cpp", BASELINE_DIR / "seedDesignGemv.cu"],
        [BASELINE_DIR, build.PLUGINS_DIR / "common"],
    )


def check_sanity(what: str, got: torch.Tensor, reference: torch.Tensor) -> float:
    """Max abs error of ``got`` against the fp32 reference; raises if the kernel is plainly wrong."""
    err = float((got.float() - reference).abs().max())
    scale = float(reference.abs().max())
    if err > SANITY_REL_ERR * max(scale, 1e-6):
        raise RuntimeError(
            f"{what}: max abs error {err:.3g} against the fp32 reference is over {SANITY_REL_ERR:.0%} of max |y| "
            f"({scale:.3g}); its timing would be meaningless"
        )
    return err


def time_seed_design(
    args: argparse.Namespace,
    device: torch.device,
    layers: list[PackedLinear],
    xs: list[torch.Tensor],
    bits: int,
    reference: torch.Tensor,
) -> float:
    """Seconds per call of the seed-design GEMV (memset of y + one kernel) on the same rotated inputs."""
    ext = seed_design_extension()
    y = torch.empty(layers[0].out_features, dtype=torch.float32, device=device)
    inputs = [(x.reshape(-1), layer.qweight.contiguous(), layer.lut) for layer, x in zip(layers, xs)]
    ext.gemv(*inputs[0], y, bits)
    check_sanity(f"seed-design GEMV {layers[0].out_features}x{layers[0].in_features} {bits}-bit", y[None], reference)
    calls = [lambda i=i: ext.gemv(*inputs[i], y, bits) for i in range(len(inputs))]
    return benchutil.time_per_call(calls, device, args.iters, args.repeats)


def measure(
    args: argparse.Namespace, device: torch.device, n: int, k: int, m: int, bits: int, density: float, copy_rate: float
) -> Row:
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    l2 = benchutil.l2_bytes(device)
    probe = benchutil.random_packed(n, k, bits, density, seed=0, device=device)
    sqz_bytes = probe.nbytes() + m * k * 2 + m * n * 2
    copies = benchutil.rotation_count(sqz_bytes, l2)
    layers = [probe] + [benchutil.random_packed(n, k, bits, density, seed=i, device=device) for i in range(1, copies)]
    xs = [torch.randn(m, k, device=device).to(dtype) for _ in range(copies)]
    y = torch.empty(m, n, dtype=dtype, device=device)
    op_inputs = []
    for layer in layers:
        s = layer.sparse
        sparse = (s.row_ptr, s.col, s.val, s.chunk_row) if s is not None else (None, None, None, None)
        op_inputs.append((to_rowmajor(layer.qweight), layer.lut, *sparse))
    chunk = probe.sparse.chunk_nnz if probe.sparse is not None else 0

    def sqz_call(i: int):
        if device.type == "cuda":
            return lambda: kernels.cuda_launch(y, xs[i], *op_inputs[i], bits, chunk, args.kernel)
        return lambda: torch.ops.sqz.sqz_linear(xs[i], *op_inputs[i], bits, k, chunk, args.kernel)

    # Correctness of what is timed, against the fp32 reference of the first copy.
    if device.type == "cuda":
        kernel_name = kernels.cuda_launch(y, xs[0], *op_inputs[0], bits, chunk, args.kernel)
        got = y.float()
    else:
        kernel_name = "torch reference (cpu)"
        got = sqz_call(0)().float()
    weight = sqz_reference_weight(op_inputs[0][0], op_inputs[0][1], *op_inputs[0][2:5], bits, k)
    reference = xs[0].float() @ weight.t()
    del weight
    max_err = check_sanity(f"sqz {kernel_name} {n}x{k} M={m} {bits}-bit", got, reference)
    sqz_seconds = benchutil.time_per_call([sqz_call(i) for i in range(copies)], device, args.iters, args.repeats)
    seed_seconds = None
    if device.type == "cuda" and m == 1 and density == 0 and dtype == torch.float16 and bits in (3, 4):
        seed_seconds = time_seed_design(args, device, layers, xs, bits, reference)

    dense_bytes = n * k * 2
    dense_copies = benchutil.rotation_count(dense_bytes, l2)
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(dense_copies)]
    dense_out = torch.empty(m, n, dtype=dtype, device=device)
    dense_calls = [lambda i=i: torch.matmul(xs[i % copies], weights[i].t(), out=dense_out) for i in range(dense_copies)]
    dense_seconds = benchutil.time_per_call(dense_calls, device, args.iters, args.repeats)

    rate = sqz_bytes / sqz_seconds
    return Row(
        n=n, k=k, m=m, bits=bits, density=density, nnz=probe.sparse.nnz if probe.sparse is not None else 0,
        kernel=kernel_name, sqz_us=sqz_seconds * 1e6, cublas_fp16_us=dense_seconds * 1e6,
        speedup=dense_seconds / sqz_seconds, sqz_bytes=sqz_bytes, gbps=rate / 1e9,
        copy_fraction=rate / copy_rate, max_abs_err=max_err,
        seed_design_us=seed_seconds * 1e6 if seed_seconds is not None else None,
        vs_seed_design=seed_seconds / sqz_seconds if seed_seconds is not None else None,
    )  # fmt: skip


def format_table(rows: list[Row], copy_rate: float) -> str:
    lines = [
        f"device copy rate: {copy_rate / 1e9:.0f} GB/s (read + write)",
        (
            f"{'N x K':>12} {'M':>3} {'bits':>4} {'sparse':>7} {'sqz us':>8} {'cuBLAS us':>9} {'speedup':>7} "
            f"{'GB/s':>7} {'%copy':>6} {'seed us':>8} {'vs seed':>7} {'max err':>8}  kernel"
        ),
    ]
    for r in rows:
        seed_us = f"{r.seed_design_us:>8.2f}" if r.seed_design_us is not None else f"{'-':>8}"
        vs_seed = f"{r.vs_seed_design:>6.2f}x" if r.vs_seed_design is not None else f"{'-':>7}"
        lines.append(
            f"{r.n:>5} x {r.k:<5} {r.m:>3} {r.bits:>4} {r.density * 100:>6.2f}% {r.sqz_us:>8.2f} {r.cublas_fp16_us:>9.2f} "
            f"{r.speedup:>6.2f}x {r.gbps:>7.0f} {r.copy_fraction * 100:>5.1f}% {seed_us} {vs_seed} "
            f"{r.max_abs_err:>8.1e}  {r.kernel.split(' ')[0]}"
        )
    return "\n".join(lines)


def acceptance(rows: list[Row]) -> list[Criterion]:
    """Issue 4's kernel criteria on the batch-1 LLaMA-7B rows of this run (GPU runs only)."""
    batch1 = [r for r in rows if r.m == 1 and (r.n, r.k) in LLAMA_7B_SHAPES and r.bits in (3, 4)]
    dense = {(r.n, r.k, r.bits): r for r in batch1 if r.density == 0}
    fractions = [r.copy_fraction for r in dense.values()]
    overheads = [
        r.sqz_us / dense[(r.n, r.k, r.bits)].sqz_us - 1 for r in batch1 if r.density > 0 and (r.n, r.k, r.bits) in dense
    ]
    vs_seed = [r.vs_seed_design for r in dense.values() if r.vs_seed_design is not None]

    def check(name: str, target: str, values: list[float], worst, ok) -> Criterion:
        measured = worst(values) if values else None
        return Criterion(name, target, measured, ok(measured) if measured is not None else None)

    return [
        check("worst fraction of copy bandwidth, M=1 dense 3/4-bit", ">= 0.70", fractions, min, lambda v: v >= 0.70),
        check("worst sparse overhead over dense, M=1 3/4-bit", "<= 0.15", overheads, max, lambda v: v <= 0.15),
        check("worst speedup over the seed design, M=1 dense 3/4-bit", ">= 2.0", vs_seed, min, lambda v: v >= 2.0),
    ]


def format_acceptance(criteria: list[Criterion]) -> str:
    lines = ["acceptance (issue 4; batch-1 LLaMA-7B shapes of this run):"]
    for c in criteria:
        verdict = "not measured" if c.passed is None else ("PASS" if c.passed else "FAIL")
        measured = f"{c.measured:.3f}" if c.measured is not None else "-"
        lines.append(f"  {c.name:<56} {measured:>7} (target {c.target})  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    device = benchutil.benchmark_device(args.device)
    if device is None:
        return 2
    copy_rate = benchutil.copy_bandwidth(device)
    rows = []
    for n, k in args.shapes:
        for bits in args.bits:
            for density in args.density:
                for m in args.m:
                    rows.append(measure(args, device, n, k, m, bits, density, copy_rate))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # the rotated copies of the finished row
                    logger.info("%s", format_table(rows[-1:], copy_rate).splitlines()[-1])
    print(format_table(rows, copy_rate))
    criteria = acceptance(rows) if device.type == "cuda" else []
    print(format_acceptance(criteria) if criteria else "acceptance: not evaluated (CPU dry-run timings mean nothing)")
    if args.out is not None:
        benchutil.write_report(
            args.out,
            "kernels",
            device,
            args,
            copy_rate_bytes_per_s=copy_rate,
            rows=[dataclasses.asdict(r) for r in rows],
            acceptance=[dataclasses.asdict(c) for c in criteria],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
