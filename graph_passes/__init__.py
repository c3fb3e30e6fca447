"""ONNX graph passes of sqz-export, one file per pass, each shaped as pattern / check / rewrite.

- :class:`SqzLinearPass` (sqz_linear.py): MatMul/Gemm with a quantized layer's weight -> sqz::SqzLinear.
- :class:`CleanupPass` (cleanup.py): dead nodes/initializers, unused functions, topological order, shapes.
"""

from __future__ import annotations

from graph_passes.base import GraphPass, PassResult, Refusal, run_passes
from graph_passes.cleanup import CleanupPass
from graph_passes.sqz_linear import SqzLinearPass, sqz_linear_node

__all__ = ["CleanupPass", "GraphPass", "PassResult", "Refusal", "SqzLinearPass", "run_passes", "sqz_linear_node"]
