"""Every numerical tolerance of the test suite, in one table keyed by (op, dtype).

Values are (atol, rtol) for torch.testing.assert_close. Rationale per row: fp32 paths differ only in
summation order; fp16/bf16 paths are bounded by the output's rounding (fp16: 2^-11 relative,
bf16: 2^-8) times a small factor for K-long accumulations.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[tuple[str, torch.dtype], tuple[float, float]] = {
    # SqzLinear against the fp32 dense reference x @ W^T.
    ("sqz_linear", torch.float32): (1e-5, 1e-5),
    ("sqz_linear", torch.float16): (2e-2, 1e-2),
    ("sqz_linear", torch.bfloat16): (1e-1, 4e-2),
    # The CPU kernel in fp32 against the fp32 dense reference at K up to ~4k: its scalar path sums k
    # in order (error growing ~K * 2^-24 of the sum of |terms|), the reference is a blocked BLAS sum.
    ("sqz_linear_cpu", torch.float32): (1e-4, 1e-4),
    # Hooked vs brute-force Fisher: the same gradients, only the fp32 accumulation order of grad**2 differs.
    ("fisher", torch.float32): (0.0, 1e-6),
    # Hooked vs token-by-token Hessians: the same products, summed in another order (fp32).
    ("hessian", torch.float32): (1e-5, 1e-5),
    # A decoder graph with its attention fused (onnxruntime's RotaryEmbedding + GroupQueryAttention)
    # against the same graph as exported: the same math, other summation orders; in fp16 the exported
    # graph also rounds its scores and rotary products to fp16 between nodes, the fused kernels less so.
    ("fused_attention", torch.float32): (1e-5, 1e-5),
    ("fused_attention", torch.float16): (2e-3, 4e-3),
    # Whole-model logits: quantized torch reference vs the same model run elsewhere (ORT, kernels).
    ("model_logits", torch.float32): (1e-3, 1e-3),
    ("model_logits", torch.float16): (5e-2, 2e-2),
}


def tolerance(op: str, dtype: torch.dtype) -> dict[str, float]:
    """Keyword arguments for torch.testing.assert_close."""
    atol, rtol = TOLERANCES[(op, dtype)]
    return {"atol": atol, "rtol": rtol}
