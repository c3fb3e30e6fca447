"""``torch.ops.sqz.sqz_linear``: the SqzLinear op for torch, one schema with a CPU and a CUDA kernel.

    sqz::sqz_linear(Tensor x, Tensor qweight, Tensor lut, Tensor? row_ptr, Tensor? col, Tensor? val,
                    Tensor? chunk_row, int bits, int in_features, int chunk_nnz, str kernel='auto') -> Tensor

x [M, K] (fp16, bf16 or fp32), qweight int32 [N, ceil(K/32) * bits] (layout 2), lut fp16 [N, 2**bits],
optional CSR sparse part (all four tensors or none); returns y [M, N] in x's dtype.

- CPU: the C++ LUT kernel of plugins/kernels/sqzLinearCpu.cpp through the CPU extension
  (:func:`sqz_export.kernels.build.cpu_extension`, built by scripts/setup.sh): x is converted to
  fp32, fp32 accumulation, one rounding to x's dtype. Below ``CPU_GEMM_MIN_M`` rows of x the LUT
  GEMV reads the packed weight once per call (never expanded); from there on ``kernel="auto"``
  dequantizes W in tiles of at least 1M weights (4 MiB) and 256 rows into torch's GEMM. ``kernel``
  = "auto", "gemv" (the GEMV at every M, the widest ISA the CPU has), "scalar", "avx2", "avx512"
  (the GEMV with that ISA, an error where the CPU lacks it), or "dequant_gemm" (the torch reference:
  the whole weight dequantized, then a matmul). The ISA that ran is logged (INFO, once per layer
  shape). Both paths run on torch's intra-op threads.
- fp32 activations on CUDA: the torch reference, the semantics of
  :func:`sqz_export.kernels.reference.sqz_reference_weight`, fp32 matmul, one rounding to x's dtype.
- CUDA (fp16/bf16): the kernels of plugins/kernels/sqzLinear.cu through the JIT extension
  (:mod:`sqz_export.kernels.build`); ``kernel`` = "auto" | "gemv" | "dequant_gemm" (auto = the
  launcher's rule by M). The chosen kernel is logged (INFO, once per layer shape and kernel).
"""

from __future__ import annotations

import logging

import torch

from sqz_export.formats import FormatError, check_bits, packed_words
from sqz_export.kernels.reference import sqz_reference_weight

logger = logging.getLogger(__name__)

KERNEL_KINDS = {"auto": 0, "gemv": 1, "dequant_gemm": 2}
"""Values of the op's ``kernel`` argument -> sqz::KernelKind (CUDA)."""
CPU_ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
"""Values of the op's ``kernel`` argument that force an ISA of the CPU kernel -> sqz::cpu::Isa."""
CPU_GEMM_MIN_M = 48
"""From this many rows of x on, kernel="auto" on CPU dequantizes W in tiles into torch's GEMM instead
of the LUT GEMV. Measured on LLaMA-7B shapes, 3-bit, on the 2-core AVX-512 dev machine (2026-12-01,
both on 2 threads): at M = 16 the GEMV runs 4096 x 4096 in 6.5 ms (FP32 matmul 9.4, the GEMM path
9.3) and 4096 x 11008 in 14.0 (FP32 20.9, GEMM path 23.4); at M = 32 the two are even within the
machine's noise; at M = 64 and above the GEMM path is faster (4096 x 4096, M = 128: 27.7 ms against
50.6), because the GEMV's cost grows with every 16 rows of x and the GEMM's barely."""

_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor lut, Tensor? row_ptr, Tensor? col, Tensor? val, Tensor? chunk_row, "
    "int bits, int in_features, int chunk_nnz, str kernel='auto') -> Tensor"
)
_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_logged_choices: set[tuple] = set()


def check_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    lut: torch.Tensor,
    row_ptr: torch.Tensor | None,
    col: torch.Tensor | None,
    val: torch.Tensor | None,
    chunk_row: torch.Tensor | None,
    bits: int,
    in_features: int,
    chunk_nnz: int,
    kernel: str,
) -> None:
    """Validates the op's arguments; every error names the argument and what was expected.

    Raises:
        FormatError: a tensor has the wrong dtype, shape or device, or an attribute is out of range.
    """
    check_bits(bits)
    kernels = KERNEL_KINDS if x.device.type != "cpu" else {**KERNEL_KINDS, **CPU_ISAS}
    if kernel not in kernels:
        raise FormatError(f"sqz_linear: kernel={kernel!r}, expected one of {sorted(kernels)} on {x.device.type}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise FormatError(f"sqz_linear: x must be [M, in_features={in_features}], got {tuple(x.shape)}")
    if x.dtype not in _ACTIVATION_DTYPES:
        raise FormatError(f"sqz_linear: x must be fp16, bf16 or fp32, got {x.dtype}")
    words = packed_words(in_features, bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[1] != words:
        raise FormatError(
            f"sqz_linear: qweight must be int32 [N, {words}] (layout 2, {bits}-bit, in_features={in_features}), "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    n = qweight.shape[0]
    if lut.dtype != torch.float16 or tuple(lut.shape) != (n, 1 << bits):
        raise FormatError(f"sqz_linear: lut must be float16 [{n}, {1 << bits}], got {lut.dtype} {tuple(lut.shape)}")
    sparse = (row_ptr, col, val, chunk_row)
    if any(t is None for t in sparse) and not all(t is None for t in sparse):
        raise FormatError("sqz_linear: row_ptr, col, val and chunk_row must be given together or not at all")
    tensors = {"x": x, "qweight": qweight, "lut": lut}
    if row_ptr is not None:
        if row_ptr.dtype != torch.int32 or tuple(row_ptr.shape) != (n + 1,):
            raise FormatError(
                f"sqz_linear: row_ptr must be int32 [{n + 1}], got {row_ptr.dtype} {tuple(row_ptr.shape)}"
            )
        if col.dtype != torch.int32 or col.dim() != 1:
            raise FormatError(f"sqz_linear: col must be 1-D int32, got {col.dtype} {tuple(col.shape)}")
        if val.dtype != torch.float16 or val.shape != col.shape:
            raise FormatError(
                f"sqz_linear: val must be float16 shaped like col {tuple(col.shape)}, got {val.dtype} {tuple(val.shape)}"
            )
        if chunk_row.dtype != torch.int32 or chunk_row.dim() != 1:
            raise FormatError(
                f"sqz_linear: chunk_row must be 1-D int32, got {chunk_row.dtype} {tuple(chunk_row.shape)}"
            )
        if col.numel() and chunk_nnz <= 0:
            raise FormatError(f"sqz_linear: chunk_nnz must be > 0 with a sparse part, got {chunk_nnz}")
        tensors.update(row_ptr=row_ptr, col=col, val=val, chunk_row=chunk_row)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise FormatError(f"sqz_linear: all tensors must be on one device, got {devices}")


def _torch_sqz_linear(x, qweight, lut, row_ptr, col, val, bits, in_features) -> torch.Tensor:
    w = sqz_reference_weight(qweight, lut, row_ptr, col, val, bits, in_features)
    return torch.matmul(x.to(torch.float32), w.t()).to(x.dtype)


def cpu_isa(kernel: str, bits: int) -> int:
    """The sqz::cpu::Isa a CPU call runs for ``kernel`` (not "dequant_gemm") and ``bits``.

    Raises:
        FormatError: ``kernel`` names an ISA this CPU does not have.
    """
    from sqz_export.kernels.build import cpu_extension

    ext = cpu_extension()
    if kernel in CPU_ISAS:
        isa = CPU_ISAS[kernel]
        if not ext.supports(isa):
            raise FormatError(f"sqz_linear: kernel={kernel!r}, but this CPU does not support {kernel}")
    else:
        isa = ext.best_isa()
    return ext.effective_isa(isa, bits)


def _log_cpu_choice(m: int, k: int, n: int, bits: int, nnz: int, name: str) -> None:
    key = ("cpu", name, m if m <= 16 else "large", k, n, bits, nnz > 0)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("sqz_linear: M=%d K=%d N=%d bits=%d nnz=%d cpu -> %s", m, k, n, bits, nnz, name)


def cpu_linear(x, qweight, lut, row_ptr, col, val, bits: int, kernel: str) -> torch.Tensor:  # noqa: ANN001
    """The C++ CPU kernel on arguments check_args accepted (any kernel but "dequant_gemm"); y in x's dtype.

    The op's CPU implementation calls this after checking; ``kernels.sqz_linear`` calls it directly
    for a module whose buffers it checked before (the dispatcher and the checks cost ~30 us a call,
    as much as the kernel itself on SmolLM2's 576-wide layers).
    """
    from sqz_export.kernels.build import cpu_extension

    ext = cpu_extension()
    isa = cpu_isa(kernel, bits)
    m, k = x.shape
    nnz = col.numel() if col is not None else 0
    gemm = kernel == "auto" and m >= CPU_GEMM_MIN_M
    name = f"dequantized tiles + torch GEMM {ext.isa_name(isa)}" if gemm else f"lut-gemv {ext.isa_name(isa)}"
    _log_cpu_choice(m, k, qweight.shape[0], bits, nnz, name)
    sparse = (row_ptr.contiguous(), col.contiguous(), val.contiguous()) if nnz else (None, None, None)
    y = ext.linear(x.to(torch.float32).contiguous(), qweight.contiguous(), lut.contiguous(), *sparse, bits, isa, gemm)
    return y.to(x.dtype)


@torch.library.custom_op("sqz::sqz_linear", mutates_args=(), device_types="cpu", schema=_SCHEMA)
def sqz_linear_op(x, qweight, lut, row_ptr, col, val, chunk_row, bits, in_features, chunk_nnz, kernel="auto"):
    """CPU implementation: the C++ LUT kernel, or the torch reference for kernel="dequant_gemm"."""
    check_args(x, qweight, lut, row_ptr, col, val, chunk_row, bits, in_features, chunk_nnz, kernel)
    m, n = x.shape[0], qweight.shape[0]
    nnz = col.numel() if col is not None else 0
    if kernel == "dequant_gemm":
        _log_cpu_choice(m, in_features, n, bits, nnz, "dequant_gemm (torch reference: dense weight, then matmul)")
        return _torch_sqz_linear(x, qweight, lut, row_ptr, col, val, bits, in_features)
    return cpu_linear(x, qweight, lut, row_ptr, col, val, bits, kernel)


@sqz_linear_op.register_fake
def _(x, qweight, lut, row_ptr, col, val, chunk_row, bits, in_features, chunk_nnz, kernel="auto"):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def cuda_launch(
    y: torch.Tensor,
    x: torch.Tensor,
    qweight: torch.Tensor,
    lut: torch.Tensor,
    row_ptr: torch.Tensor | None,
    col: torch.Tensor | None,
    val: torch.Tensor | None,
    chunk_row: torch.Tensor | None,
    bits: int,
    chunk_nnz: int,
    kernel: str = "auto",
) -> str:
    """Runs the CUDA kernel into a caller-provided ``y`` [M, N] on the current stream.

    The op's CUDA implementation allocates ``y`` and calls this; tests call it directly with ``y``
    poisoned (NaN) to prove every element is written. Returns the name of the kernel that ran.
    """
    from sqz_export.kernels.build import extension

    ext = extension()
    m, k = x.shape
    n = qweight.shape[0]
    nnz = col.numel() if col is not None else 0
    bf16 = x.dtype == torch.bfloat16
    kind = KERNEL_KINDS[kernel]
    if kind == 0:
        kind = ext.choose_kernel(m, k, n, bits, nnz, chunk_nnz, bf16)
    ws_bytes = ext.workspace_size(m, k, n, bits, nnz, chunk_nnz, bf16, kind)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
    name = ext.kernel_name(kind)
    key = (name, m if kind == 1 else "large", k, n, bits, nnz > 0, x.dtype)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("sqz_linear: M=%d K=%d N=%d bits=%d nnz=%d %s -> %s", m, k, n, bits, nnz, x.dtype, name)
    ext.launch(x, qweight, lut, row_ptr, col, val, chunk_row, y, workspace, bits, chunk_nnz, kind)
    return name


@sqz_linear_op.register_kernel("cuda")
def _(x, qweight, lut, row_ptr, col, val, chunk_row, bits, in_features, chunk_nnz, kernel="auto"):
    """CUDA implementation: the kernels for fp16/bf16 x; fp32 x runs the torch reference on the GPU (logged)."""
    check_args(x, qweight, lut, row_ptr, col, val, chunk_row, bits, in_features, chunk_nnz, kernel)
    if x.dtype == torch.float32:
        key = ("fp32-reference", in_features, qweight.shape[0])
        if key not in _logged_choices:
            _logged_choices.add(key)
            logger.info(
                "sqz_linear: fp32 activations (K=%d N=%d) -> torch reference on CUDA (the kernels take fp16/bf16)",
                in_features,
                qweight.shape[0],
            )
        return _torch_sqz_linear(x, qweight, lut, row_ptr, col, val, bits, in_features)
    x, qweight, lut = x.contiguous(), qweight.contiguous(), lut.contiguous()
    row_ptr, col, val, chunk_row = (t.contiguous() if t is not None else None for t in (row_ptr, col, val, chunk_row))
    y = torch.empty((x.shape[0], qweight.shape[0]), dtype=x.dtype, device=x.device)
    cuda_launch(y, x, qweight, lut, row_ptr, col, val, chunk_row, bits, chunk_nnz, kernel)
    return y
