"""The reference semantics of SqzLinear in pure torch (any device): W = LUT[idx] + S.

Every implementation of the op (the CPU and CUDA kernels, the ONNX function, the TensorRT plugin) is
checked against these functions. They live in the kernels package, not in ``sqz_export.runtime``,
so the op can use them without importing the module that calls the op.
"""

from __future__ import annotations

import torch


def sqz_dequantize_reference(qweight_rowmajor: torch.Tensor, lut: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """LUT[idx] from layout-2 words, fp32 [N, K]; pure torch so it runs on any device.

    Bit b of the stream lives in word b // 32 at bit b % 32; index j of a row starts at stream bit
    bits*j (see ``formats``). Gathering two adjacent words handles indices that straddle a word.
    """
    device = qweight_rowmajor.device
    words = qweight_rowmajor.to(torch.int64) & 0xFFFFFFFF  # [N, W]
    start = torch.arange(in_features, device=device, dtype=torch.int64) * bits  # [K]
    word_idx = start // 32
    shift = start % 32
    lo = words[:, word_idx] >> shift  # [N, K]
    next_idx = torch.clamp(word_idx + 1, max=words.shape[1] - 1)
    hi = words[:, next_idx] << (32 - shift)
    idx = (lo | torch.where(shift + bits > 32, hi, torch.zeros_like(hi))) & ((1 << bits) - 1)
    return torch.gather(lut.to(torch.float32), 1, idx)


def sqz_reference_weight(
    qweight_rowmajor: torch.Tensor,
    lut: torch.Tensor,
    row_ptr: torch.Tensor | None,
    col: torch.Tensor | None,
    val: torch.Tensor | None,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """W = LUT[idx] + S as fp32 [N, K] on the tensors' device: the reference semantics of SqzLinear."""
    w = sqz_dequantize_reference(qweight_rowmajor, lut, bits, in_features)
    if col is not None and col.numel():
        counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(qweight_rowmajor.shape[0], device=w.device), counts)
        w.index_put_((rows, col.to(torch.int64)), val.to(torch.float32), accumulate=True)
    return w
