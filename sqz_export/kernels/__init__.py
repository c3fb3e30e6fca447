"""SqzLinear kernels for torch: ``torch.ops.sqz.sqz_linear`` (C++ CPU kernel + CUDA kernels).

Importing this package registers the op. :func:`sqz_linear` is what
``sqz_export.runtime.SqzLinear.forward`` calls on every device; the CPU extension is built by
scripts/setup.sh, the CUDA extension on first use (see :mod:`sqz_export.kernels.build`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sqz_export.formats import FormatError
from sqz_export.kernels.ops import (
    CPU_ISAS,
    KERNEL_KINDS,
    check_args,
    cpu_isa,
    cpu_linear,
    cuda_launch,
    sqz_linear_op,
)

if TYPE_CHECKING:
    from sqz_export.runtime import SqzLinear

__all__ = [
    "CPU_ISAS",
    "KERNEL_KINDS",
    "available",
    "check_args",
    "cpu_isa",
    "cpu_linear",
    "cuda_launch",
    "sqz_linear",
    "sqz_linear_op",
]


def available() -> bool:
    """True when a CUDA device is present, so the CUDA kernels can run (they are built on first use).

    A failing build is not hidden behind this: it raises from the first :func:`sqz_linear` call.
    """
    return torch.cuda.is_available()


def sqz_linear(module: SqzLinear, x: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """y = x @ W^T for a :class:`~sqz_export.runtime.SqzLinear` (bias not added: the module adds it).

    Args:
        module: the layer whose packed buffers (layout 2) are used.
        x: activations [..., in_features] on the module's device.
        kernel: "auto" (the launcher's rule by M), "gemv" or "dequant_gemm"; on CPU also an ISA.

    Returns:
        [..., out_features] in x's dtype.

    On CPU (outside torch.compile) this calls the kernel without the op's dispatcher: the module's
    buffers get the op's full check_args once per set of buffers (by data pointer), x every call.
    """
    if x.shape[-1] != module.in_features:
        raise FormatError(f"sqz_linear: x must be [..., in_features={module.in_features}], got {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    sparse = (module.sparse_row_ptr, module.sparse_col, module.sparse_val, module.sparse_chunk_row)
    if not module.has_sparse:
        sparse = (None, None, None, None)
    args = (x2, module.qweight, module.lut, *sparse, module.bits, module.in_features, module.chunk_nnz, kernel)
    if x.device.type == "cpu" and kernel != "dequant_gemm" and not torch.compiler.is_compiling():
        key = (x.dtype, *(t.data_ptr() if t is not None else 0 for t in args[1:7]))
        if module.checked_buffers != key:
            check_args(*args)
            module.checked_buffers = key
        y = cpu_linear(x2, module.qweight, module.lut, *sparse[:3], module.bits, kernel)
    else:
        y = torch.ops.sqz.sqz_linear(*args)
    return y.reshape(*lead, module.out_features)
