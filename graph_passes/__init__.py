"""ONNX graph passes of sqz-export, one file per pass, each shaped as pattern / check / rewrite.

- :class:`SqzLinearPass` (sqz_linear.py): placeholder linear of a quantized layer -> sqz::SqzLinear.
- :class:`DenseLinearPass` (dense_linear.py): placeholder linear -> MatMul on the module's FP weight.
  (Both match the placeholder pattern of placeholder.py by module name.)
- :class:`Fp16WeightLinearPass` (fp16_weight_linear.py): MatMul on an fp16 weight -> sqz::DenseLinear
  (session time, onnxruntime CPU with the custom-op library; never written to a file).
- :class:`SqzLinearMergePass` (merged_sqz_linear.py): SqzLinear nodes on one x -> one node + Split
  (session time, like the previous one).
- :class:`Fp32IoPass` (fp32_io.py): the library's nodes on fp16 activations -> on fp32, Casts at their edges
  (session time, like the previous one).
- :class:`GroupQueryAttentionPass` (group_query_attention.py): each layer's exported attention ->
  onnxruntime's RotaryEmbedding + GroupQueryAttention (session time, onnxruntime CPU, any graph).
- :class:`ShapeSharingPass` (shared_shapes.py): Shape nodes of equal symbolic shape -> one Shape.
- :class:`CleanupPass` (cleanup.py): dead nodes/initializers, unused functions, topological order, shapes.
"""

from __future__ import annotations

from graph_passes.base import GraphPass, PassResult, Refusal, run_passes
from graph_passes.cleanup import CleanupPass
from graph_passes.dense_linear import DenseLinearPass
from graph_passes.fp16_weight_linear import Fp16WeightLinearPass
from graph_passes.fp32_io import Fp32IoPass
from graph_passes.group_query_attention import GroupQueryAttentionPass
from graph_passes.merged_sqz_linear import SqzLinearMergePass
from graph_passes.shared_shapes import ShapeSharingPass
from graph_passes.sqz_linear import SqzLinearPass, sqz_linear_node

__all__ = ["CleanupPass", "DenseLinearPass", "Fp16WeightLinearPass", "Fp32IoPass", "GraphPass", "GroupQueryAttentionPass", "PassResult", "Refusal", "ShapeSharingPass", "SqzLinearMergePass", "SqzLinearPass", "run_passes", "sqz_linear_node"]
