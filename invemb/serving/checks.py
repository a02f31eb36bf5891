"""Checks of what a user sends, shared by the client (before sending, naming the user's file lines) and the Triton
python models (naming the request's rows): texts that hold nothing visible, over-long texts, vectors that no
model could decode. Every check lists ALL bad rows (the first 10 and a count), not only the first.

Rows are reported in one format, `row(s) [i, j, ...]` (0-based, of the request), that the client rewrites into
the user's terms (`line(s) 3, 17 of headlines.txt`, `row(s) 20 of vecs.npy`): invemb.serving.client.relabel.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Callable, Sequence

import numpy as np

# Unicode categories that draw nothing: controls (NUL, ...), format characters (zero-width space U+200B, BOM
# U+FEFF, joiners, bidi marks), separators (spaces, line/paragraph separators), unassigned and private use.
INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")
SHOWN = 10  # bad rows named in a message; the rest counted


def invisible_only(text: str) -> bool:
    """True when `text` holds no character that a reader could see (blank, or only U+200B / U+FEFF / NUL ...)."""
    return all(unicodedata.category(c) in INVISIBLE for c in text)


def rows_text(rows: Sequence[int], label: Callable[[list[int]], str] | None = None) -> str:
    """`row(s) [3, 7]` (the first SHOWN, and `and N more`), or the caller's words for those rows (label)."""
    rows = [int(r) for r in rows]
    shown = label(rows[:SHOWN]) if label else f"row(s) {rows[:SHOWN]}"
    return shown + (f" and {len(rows) - SHOWN} more" if len(rows) > SHOWN else "")


def text_problems(texts: Sequence[str], max_chars: int) -> list[tuple[str, list[int]]]:
    """[(what is wrong, rows)] of `texts`: nothing visible, more than `max_chars` characters."""
    blank = [i for i, t in enumerate(texts) if invisible_only(t)]
    long = [i for i, t in enumerate(texts) if len(t) > max_chars]
    out = []
    if blank:
        out.append(("hold(s) no visible text (empty, whitespace, or only invisible characters such as U+200B, "
                    "U+FEFF, NUL)", blank))
    if long:
        out.append((f"hold(s) more than {max_chars} characters (the limit; the model reads at most its first "
                    f"max_length tokens anyway)", long))
    return out


def vector_problems(vectors: np.ndarray, max_abs: float) -> list[tuple[str, list[int]]]:
    """[(what is wrong, rows)] of float vectors [N,S]: NaN/Inf, components beyond +-max_abs."""
    finite = np.isfinite(vectors).all(1)  # [N]
    out = []
    if not finite.all():
        out.append(("contain(s) NaN or Inf", np.flatnonzero(~finite).tolist()))
    huge = np.flatnonzero(finite & (np.abs(np.where(np.isfinite(vectors), vectors, 0)).max(1) > max_abs))
    if huge.size:
        out.append((f"have components beyond +-{max_abs:g} (sentence vectors are O(1))", huge.tolist()))
    return out


def problems_message(problems: list[tuple[str, list[int]]], label=None) -> str:
    """One line: `row(s) [1, 4] hold(s) no visible text; row(s) [9] ...`."""
    return "; ".join(f"{rows_text(rows, label)} {what}" for what, rows in problems)


ROWS_RE = re.compile(r"\b(?:row|position)(?:\(s\))? \[([0-9, ]*)\]|\brow (\d+)\b")


def relabel(message: str, rows: Sequence[int], label: Callable[[list[int]], str]) -> str:
    """Rewrite a server message's request rows (`row(s) [1, 4]`, `position(s) [2]`, `row 6`) into the user's terms:
    `rows[i]` is the user's index of the request's row i; `label` words a list of user indices."""
    def sub(m: re.Match) -> str:
        found = m.group(1) if m.group(1) is not None else m.group(2)
        idx = [int(x) for x in found.replace(" ", "").split(",") if x]
        if not idx or max(idx) >= len(rows):
            return m.group(0)
        return label(sorted(int(rows[i]) for i in idx))
    return ROWS_RE.sub(sub, message)
