"""SqzLinear kernel speed against cuBLAS FP16 on LLaMA-7B/13B layer shapes.

For every (shape, M, bits, sparsity): median time per call of torch.ops.sqz (the CUDA kernel the
launcher picks, or --kernel), of torch.matmul with an FP16 weight (cuBLAS) and the device copy rate,
all measured in the same run. Calls are timed as CUDA-graph replays with CUDA events, inputs rotated
over more than twice the L2 cache; see sqz_export/kernels/benchutil.py. Prints a table, writes JSON.

    python benchmarks/kernels.py --out runs/kernels.json
    python benchmarks/kernels.py --device cpu --shapes 64x96 --m 1 --iters 3 --repeats 2   # dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from sqz_export import kernels
from sqz_export.formats import to_rowmajor
from sqz_export.kernels import benchutil
from sqz_export.runtime import sqz_reference_weight

logger = logging.getLogger(__name__)

# (N, K) = (out_features, in_features) of the LLaMA-7B / 13B linears.
DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "12288x4096", "13824x5120"]


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


def measure(
    args: argparse.Namespace, device: torch.device, n: int, k: int, m: int, bits: int, density: float, copy_rate: float
) -> Row:
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    l2 = benchutil.l2_bytes(device)
    probe = benchutil.random_packed(n, k, bits, density, device, seed=0)
    sqz_bytes = probe.nbytes() + m * k * 2 + m * n * 2
    copies = benchutil.rotation_count(sqz_bytes, l2)
    layers = [probe] + [benchutil.random_packed(n, k, bits, density, device, seed=i) for i in range(1, copies)]
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
    max_err = float((got - xs[0].float() @ weight.t()).abs().max())
    del weight
    sqz_seconds = benchutil.time_per_call([sqz_call(i) for i in range(copies)], device, args.iters, args.repeats)

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
    )  # fmt: skip


def format_table(rows: list[Row], copy_rate: float) -> str:
    lines = [
        f"device copy rate: {copy_rate / 1e9:.0f} GB/s (read + write)",
        (
            f"{'N x K':>12} {'M':>3} {'bits':>4} {'sparse':>7} {'sqz us':>8} {'cuBLAS us':>9} {'speedup':>7} "
            f"{'GB/s':>7} {'%copy':>6} {'max err':>8}  kernel"
        ),
    ]
    for r in rows:
        lines.append(
            f"{r.n:>5} x {r.k:<5} {r.m:>3} {r.bits:>4} {r.density * 100:>6.2f}% {r.sqz_us:>8.2f} {r.cublas_fp16_us:>9.2f} "
            f"{r.speedup:>6.2f}x {r.gbps:>7.0f} {r.copy_fraction * 100:>5.1f}% {r.max_abs_err:>8.1e}  {r.kernel.split(' ')[0]}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (use --device cpu for a dry run)", file=sys.stderr)
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
    if args.out is not None:
        benchutil.write_report(
            args.out,
            "kernels",
            device,
            args,
            copy_rate_bytes_per_s=copy_rate,
            rows=[dataclasses.asdict(r) for r in rows],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
