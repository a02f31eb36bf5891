"""Small helpers with one home: a free TCP port on the loopback interface, a best-of-N wall-clock timer."""
from __future__ import annotations

import socket
import time
from typing import Callable


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
