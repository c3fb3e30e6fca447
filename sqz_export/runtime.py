"""Runtime: the ``SqzLinear`` torch module that stands in for ``nn.Linear`` and keeps its weight packed.

``forward`` calls :func:`sqz_export.kernels.sqz_linear`: on CPU the C++ LUT kernel
(plugins/kernels/sqzLinearCpu.cpp) that ``torch.ops.sqz.sqz_linear`` runs there, called without the
op's dispatcher; on CUDA the op and its CUDA kernels. The reference semantics the kernels are
checked against are in ``sqz_export.kernels.reference``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from sqz_export import kernels
from sqz_export.formats import PackedLinear, SparsePart, to_rowmajor
from sqz_export.kernels.reference import sqz_reference_weight

logger = logging.getLogger(__name__)


class SqzLinear(nn.Module):
    """y = x @ (LUT[idx] + S)^T + bias, with the packed tensors as buffers (layout 2 on the module).

    ``forward`` runs the packed kernels (:func:`sqz_export.kernels.sqz_linear`) and never holds a dense copy
    of the weight, except inside :func:`materialized_weights`, which trades that memory for speed
    during a long evaluation. ``compute_dtype`` is the dtype of that materialized matmul; fp32 by
    default so the reference is not limited by fp16 rounding (the CPU kernel accumulates in fp32).
    """

    def __init__(self, packed: PackedLinear, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.bits = packed.bits
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.compute_dtype = compute_dtype
        self.chunk_nnz = packed.sparse.chunk_nnz if packed.sparse is not None else 0
        self.register_buffer("qweight", to_rowmajor(packed.qweight))  # int32 [N, ceil(K/32)*bits]
        self.register_buffer("lut", packed.lut.clone())  # fp16 [N, 2**bits]
        sparse = packed.sparse
        self.register_buffer("sparse_row_ptr", sparse.row_ptr.clone() if sparse else None)
        self.register_buffer("sparse_col", sparse.col.clone() if sparse else None)
        self.register_buffer("sparse_val", sparse.val.clone() if sparse else None)
        self.register_buffer("sparse_chunk_row", sparse.chunk_row.clone() if sparse else None)
        self.register_buffer("bias", packed.bias.clone() if packed.bias is not None else None)
        self.materialized: torch.Tensor | None = None
        """The reconstructed weight while inside materialized_weights(); never saved."""
        self.checked_buffers: tuple = ()
        """What kernels.sqz_linear last checked these buffers with (x dtype + data pointers)."""

    @classmethod
    def shell(cls, in_features: int, out_features: int, bits: int, chunk_nnz: int, bias: bool) -> SqzLinear:
        """A layer of the given shape whose buffers are empty placeholders, for loaders that fill them
        tensor by tensor (transformers' ``from_pretrained``, see :mod:`sqz_export.hf_quantizer`); the
        buffers' names are the checkpoint's tensor names. The sparse ones stay empty for a dense layer."""
        empty = torch.empty(0, dtype=torch.int32)
        placeholder = PackedLinear(
            bits=bits,
            in_features=in_features,
            out_features=out_features,
            qweight=empty,
            lut=torch.empty(0, dtype=torch.float16),
            sparse=SparsePart(empty, empty, torch.empty(0, dtype=torch.float16), empty, chunk_nnz),
            bias=torch.empty(0, dtype=torch.float16) if bias else None,
        )
        return cls(placeholder)

    @property
    def has_sparse(self) -> bool:
        return self.sparse_col is not None and self.sparse_col.numel() > 0

    def to_packed(self) -> PackedLinear:
        """Back to the checkpoint representation (layout 1), exactly."""
        sparse = None
        if self.sparse_col is not None:
            sparse = SparsePart(
                row_ptr=self.sparse_row_ptr.cpu(),
                col=self.sparse_col.cpu(),
                val=self.sparse_val.cpu(),
                chunk_row=self.sparse_chunk_row.cpu(),
                chunk_nnz=self.chunk_nnz,
            )
        return PackedLinear(
            bits=self.bits,
            in_features=self.in_features,
            out_features=self.out_features,
            qweight=self.qweight.t().contiguous().cpu(),
            lut=self.lut.cpu(),
            sparse=sparse,
            bias=self.bias.cpu() if self.bias is not None else None,
        )

    def reconstruct_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = LUT[idx] + S as a dense [N, K] tensor on the module's device."""
        return sqz_reference_weight(
            self.qweight, self.lut, self.sparse_row_ptr, self.sparse_col, self.sparse_val, self.bits, self.in_features
        ).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.materialized is not None:
            y = torch.matmul(x.to(self.compute_dtype), self.materialized.t())
            if self.bias is not None:
                y = y + self.bias.to(self.compute_dtype)
            return y.to(x.dtype)
        y = kernels.sqz_linear(self, x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        nnz = int(self.sparse_col.numel()) if self.sparse_col is not None else 0
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, sparse_nnz={nnz}"


@contextlib.contextmanager
def materialized_weights(model: nn.Module) -> Iterator[int]:
    """Reconstructs every SqzLinear weight once for the duration of the block (yields how many).

    Perplexity over tens of thousands of tokens would otherwise unpack every layer on every forward
    pass, which costs more than the matmuls on a CPU. Results are bit-identical: the cached tensor is
    the one forward() would rebuild.
    """
    modules = [module for module in model.modules() if isinstance(module, SqzLinear)]
    try:
        for module in modules:
            module.materialized = module.reconstruct_weight(module.compute_dtype)
        yield len(modules)
    finally:
        for module in modules:
            module.materialized = None


def replace_linears(model: nn.Module, packed: dict[str, PackedLinear], compute_dtype: torch.dtype = torch.float32) -> int:
    """Swaps each named ``nn.Linear`` for a ``SqzLinear``; returns how many were replaced.

    Raises:
        KeyError: a name in ``packed`` is not a module of ``model``.
        ValueError: the module is not an ``nn.Linear`` of the packed shape.
    """
    modules = dict(model.named_modules())
    for name, layer in packed.items():
        if name not in modules:
            raise KeyError(f"checkpoint layer {name!r} is not a module of {type(model).__name__}")
        old = modules[name]
        if not isinstance(old, nn.Linear):
            raise ValueError(f"module {name!r} is {type(old).__name__}, expected nn.Linear")
        if (old.out_features, old.in_features) != (layer.out_features, layer.in_features):
            raise ValueError(
                f"module {name!r} is [{old.out_features}, {old.in_features}], checkpoint layer is "
                f"[{layer.out_features}, {layer.in_features}]"
            )
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        new = SqzLinear(layer, compute_dtype=compute_dtype).to(old.weight.device)
        setattr(parent, child, new)
    return len(packed)
