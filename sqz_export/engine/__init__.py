"""TensorRT stage: ONNX (with sqz::SqzLinear plugins, or the FP16 baseline) -> engine, and a Polygraphy runner."""
