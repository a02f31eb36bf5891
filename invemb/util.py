"""Small helpers with one home: a free TCP port on the loopback interface, a best-of-N wall-clock timer, the CPU's
name (for the machine lines of results and model cards), a JSON file reader with user-facing errors."""
from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Callable

from invemb.errors import InvembError


def read_json(path: str | os.PathLike, what: str = "") -> object:
    """The parsed JSON of `path`; InvembError naming the file (and the line/column of a syntax error) otherwise.

    `what` names the file for the user ("deepspeed_config", "an invemb checkpoint config") in the message."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise InvembError(f"{label} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvembError(f"{label} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvembError(f"{label} cannot be read: {e}") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def best_of(fn: Callable[[], object], repeats: int) -> tuple[object, float]:
    """(fn()'s last result, seconds of the fastest of `repeats` calls), after one warm-up call (the machine may
    be shared: the best run is the one least disturbed)."""
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_isa() -> str:
    """The x86 vector extensions that decide ONNX Runtime's / oneDNN's kernels, e.g. "AVX-512 VNNI, AVX-512 BF16"
    or "AVX2": int8 GEMMs run ~2x faster with VNNI, so benchmark ratios name it (results/bench_export.md)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    names = [("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "AVX-512 BF16"), ("amx_int8", "AMX"),
             ("avx_vnni", "AVX-VNNI")]
    found = [name for flag, name in names if flag in flags]
    if not found:
        found = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"]
    return ", ".join(found)


def describe_machine(extra: str = "") -> str:
    """One line: CPU, cores, OS/arch[, extra], no GPU unless torch sees one."""
    gpu = "no GPU"
    try:
        import torch
        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    parts = [cpu_name(), f"{os.cpu_count()} cores", f"{platform.system()} {platform.machine()}", extra, gpu]
    return ", ".join(p for p in parts if p)
