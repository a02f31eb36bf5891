"""Helpers of the Triton python models (model_repository/*/1/model.py and the ONNX Runtime backend): run inside
the python backend, where `triton_python_backend_utils` is importable (imported lazily, so this module also loads
outside a server)."""
from __future__ import annotations


def invalid_arg(message: str):
    """An error status for a bad request: INVALID_ARGUMENT where the python backend supports codes."""
    import triton_python_backend_utils as pb_utils
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def load_model_assets(args: dict) -> tuple[dict, dict, object]:
    """(model config, manifest, tokenizer) of a python model from its `initialize(args)`: manifest.json and
    tokenizer/ beside model.py in the version folder (written by export/to_onnx.py --triton-repo)."""
    import json
    from pathlib import Path

    from invemb.manifest import load_export_tokenizer, read_manifest
    folder = Path(args["model_repository"]) / args["model_version"]
    manifest = read_manifest(folder)
    return json.loads(args["model_config"]), manifest, load_export_tokenizer(folder, manifest)


def model_param(config: dict, key: str, default):
    """parameters { key: "<key>" value: { string_value: "..." } } of a model config (as a dict), else `default`;
    returned as a string (the caller converts: int(...))."""
    return str(config.get("parameters", {}).get(key, {}).get("string_value", default))


def decode_texts(raw, max_chars: int) -> list[str]:
    """BYTES [batch, 1] -> str per row; invalid UTF-8 or an over-long text is an InvembError naming the row."""
    from invemb.errors import InvembError
    texts = []  # raw: np.ndarray of bytes/str, any shape
    for i, item in enumerate(raw.reshape(-1)):
        if isinstance(item, str):
            text = item
        else:
            try:
                text = bytes(item).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvembError(f"text at row {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if len(text) > max_chars:
            raise InvembError(f"text at row {i} has {len(text)} characters; the limit is {max_chars} "
                              f"(the model reads at most its first max_length tokens anyway)")
        texts.append(text)
    return texts
