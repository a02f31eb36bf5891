"""Helpers of the Triton python models (model_repository/*/1/model.py and the ONNX Runtime backend): run inside
the python backend, where `triton_python_backend_utils` is importable (imported lazily, so this module also loads
outside a server)."""
from __future__ import annotations


def invalid_arg(message: str):
    """An error status for a bad request: INVALID_ARGUMENT where the python backend supports codes."""
    import triton_python_backend_utils as pb_utils
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def model_param(config: dict, key: str, default):
    """parameters { key: "<key>" value: { string_value: "..." } } of a model config (as a dict), else `default`;
    returned as a string (the caller converts: int(...))."""
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))
