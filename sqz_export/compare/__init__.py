"""Accuracy and latency of the exported model against the FP16 baseline and the torch reference.

Built from Polygraphy's pieces (habit: no hand-rolled comparator): ``OnnxrtRunner`` over
``sqz_export.ort_session`` sessions for the ONNX graphs, a ``BaseRunner`` subclass for the torch reference, the
TensorRT runner of ``sqz_export.engine.runner`` when an engine is given, ``Comparator.run`` over the
same token windows and ``Comparator.compare_accuracy`` for the error statistics.
"""

from __future__ import annotations
