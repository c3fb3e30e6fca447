"""ONNX export: the FP baseline exporter (baseline.py), the SqzLinear ONNX function (onnx_function.py),
the decoder I/O contract (signature.py) and the quantized-export driver (sqz_model.py)."""
