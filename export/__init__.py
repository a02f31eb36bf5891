"""ONNX / TensorRT export tools (run as scripts: python export/to_onnx.py ...)."""
