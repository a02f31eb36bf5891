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
    """BYTES [batch, 1] -> str per row; invalid UTF-8, nothing visible (blank, only U+200B / U+FEFF / NUL...) or
    over `max_chars` characters is an InvembError naming ALL such rows (invemb.serving.checks: the client rewrites
    them into the user's file lines)."""
    from invemb.errors import InvembError
    from invemb.serving.checks import invisible_only, rows_text
    texts, undecodable = [], []  # raw: np.ndarray of bytes/str, any shape
    for i, item in enumerate(raw.reshape(-1)):
        try:
            texts.append(item if isinstance(item, str) else bytes(item).decode("utf-8"))
        except UnicodeDecodeError as e:
            undecodable.append((i, f"{e.reason} at byte {e.start}"))
            texts.append("")
    if undecodable:
        raise InvembError(f"text at row {undecodable[0][0]} is not valid UTF-8 ({undecodable[0][1]}; "
                          f"{rows_text([i for i, _ in undecodable])} are not)")
    blank = [i for i, t in enumerate(texts) if invisible_only(t)]
    if blank:
        raise InvembError("empty or whitespace-only text (or only invisible characters such as U+200B, U+FEFF, "
                          f"NUL) at position(s) {blank[:10]}" + (f" and {len(blank) - 10} more" if len(blank) > 10
                                                                 else ""))
    long = [i for i, t in enumerate(texts) if len(t) > max_chars]
    if long:
        raise InvembError(f"text at row {long[0]} has {len(texts[long[0]])} characters; the limit is {max_chars} "
                          f"(the model reads at most its first max_length tokens anyway; over the limit: "
                          f"{rows_text(long)})")
    return texts


class CoreSlots:
    """The box's cores as `n` slots shared by every process that opens the same `folder` (the searching model
    instances of one server, each in its own python-backend stub): one lock file per slot, taken with a
    non-blocking flock. A search takes what is free, so it splits over both cores when no other search runs and
    keeps to one when another does (splitting whenever a core was free gave 88-89% of in-process at concurrency 4,
    one slice per search 102-109%: serving/README.md, search workers). The kernel drops the locks of a process
    that dies; a slot is never waited for."""

    def __init__(self, folder, n: int):
        import os
        from pathlib import Path
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # this object's own open file descriptions: flock locks conflict between them even within one process
        self.folder = folder
        self.fds = [os.open(folder / f"core{i}.lock", os.O_RDWR | os.O_CREAT, 0o600) for i in range(int(n))]

    def take(self, most: int) -> list[int]:
        """Up to `most` free slots, locked now (possibly none); give them back with release()."""
        import fcntl
        taken = []
        for fd in self.fds:
            if len(taken) >= most:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken.append(fd)
            except BlockingIOError:
                continue
        return taken

    def release(self, taken: list[int]) -> None:
        import fcntl
        for fd in taken:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self, remove: bool = False) -> None:
        """Close this object's descriptors (dropping its locks); remove=True also deletes the files (at server
        shutdown: a process still holding them keeps working, newcomers start a fresh set)."""
        import os
        import shutil
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
