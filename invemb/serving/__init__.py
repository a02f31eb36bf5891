"""Serving: a real Triton server from the nvidia-pytriton wheel (`launch`), the gRPC client (`client`), helpers for
the Triton python models (`triton_utils`) and the Python-based ONNX Runtime backend (`onnxruntime_backend`, copied
into the server folder as backends/onnxruntime/model.py). Importing this package imports nothing heavy: the
Triton python models (model_repository/) import `invemb.serving.triton_utils` inside the server."""
