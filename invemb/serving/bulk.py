"""Bulk client jobs that survive a server death: finished chunks are written as they go, `--resume` continues.

A job over N input rows is cut into chunks of `chunk_rows` consecutive rows (the same cut in every run of the
job). Each finished chunk is written atomically into `<out>.parts/chunk-<k>.npy` (vectors [rows,S] float32) or
`.json` (texts), beside `job.json` (what the job is: input file hash, command, options, rows, chunk size). When every
chunk is there the output is assembled (atomically) and the folder removed. A rerun with --resume skips the chunks
already written; since a chunk's requests depend only on its rows, a resumed job sends the same requests as an
uninterrupted one and gives the same rows (tested; scripts/load_serving.py --bulk measures 20,000 headlines).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from invemb.errors import InvembError


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """write(file object) into a temp file beside `path`, then rename it over `path` (never half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class ChunkStore:
    """The finished chunks of one bulk job writing `out` (see the module doc)."""

    def __init__(self, out: str | os.PathLike, job: dict, rows: int, chunk_rows: int, resume: bool):
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")
        self.rows, self.chunk_rows = rows, chunk_rows
        self.job = {**job, "rows": rows, "chunk_rows": chunk_rows}
        meta = self.dir / "job.json"
        if self.dir.exists():
            if not resume:
                raise InvembError(f"{self.dir} holds the finished chunks of an interrupted job: add --resume to "
                                  "continue it, or remove that folder to start over")
            try:
                old = json.loads(meta.read_text())
            except (OSError, ValueError):
                old = {}
            differ = sorted(k for k in set(old) | set(self.job) if old.get(k) != self.job.get(k))
            if differ:
                raise InvembError(f"--resume: {self.dir} belongs to another job (it differs in: {', '.join(differ)});"
                                  " remove that folder to start over")
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir()
            atomic_write(meta, lambda f: f.write(json.dumps(self.job, indent=1).encode()))

    @property
    def count(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def span(self, k: int) -> tuple[int, int]:
        """[start, stop) input rows of chunk k."""
        return k * self.chunk_rows, min(self.rows, (k + 1) * self.chunk_rows)

    def _path(self, k: int, kind: str) -> Path:
        return self.dir / f"chunk-{k:06d}.{kind}"

    def done(self, k: int) -> bool:
        return self._path(k, "npy").is_file() or self._path(k, "json").is_file()

    def todo(self) -> list[int]:
        return [k for k in range(self.count) if not self.done(k)]

    def save(self, k: int, value: np.ndarray | list[str]) -> None:
        start, stop = self.span(k)
        if len(value) != stop - start:
            raise InvembError(f"chunk {k}: {len(value)} results for {stop - start} rows")
        if isinstance(value, np.ndarray):
            atomic_write(self._path(k, "npy"), lambda f: np.save(f, value))
        else:
            atomic_write(self._path(k, "json"), lambda f: f.write(json.dumps(list(value)).encode()))

    def load(self, k: int) -> np.ndarray | list[str]:
        if self._path(k, "npy").is_file():
            return np.load(self._path(k, "npy"), allow_pickle=False)
        return json.loads(self._path(k, "json").read_text())

    def assemble(self) -> np.ndarray | list[str]:
        """Every chunk's rows in input order: np.ndarray [N,S] or list of N texts."""
        parts = [self.load(k) for k in range(self.count)]
        return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [t for p in parts for t in p]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
