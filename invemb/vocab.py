"""The compact output vocabulary: the WordPiece ids a decoder predicts, and re-spelling of the others.

16,297 of MiniLM's 30,522 WordPiece ids occur in the training split; predicting only those (plus every special
and single-character piece) halves the output layer, the largest cost of a training step. A piece outside the set
is still decodable: `spell_ids` rewrites it as single-character pieces ("xyz" -> "x ##y ##z"), which detokenize to
the same text.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def single_char_ids(tokenizer) -> set[int]:
    """Ids of every one-character piece ("a", "##a", "$", ...) and every special token of a WordPiece tokenizer."""
    vocab = tokenizer.get_vocab()
    out = {i for piece, i in vocab.items() if len(piece) == 1 or (piece.startswith("##") and len(piece) == 3)}
    return out | set(tokenizer.all_special_ids)


def compact_vocab_ids(tokenizer, id_rows: Iterable[Sequence[int]]) -> np.ndarray:
    """Sorted unique tokenizer ids: those in `id_rows` (the training split's tokens) + single-character/specials."""
    seen = set(single_char_ids(tokenizer))
    for row in id_rows:
        seen.update(int(i) for i in row)
    return np.array(sorted(seen), dtype=np.int64)


def spell_ids(tokenizer, ids: Sequence[int], known: set[int]) -> list[int]:
    """Rewrite the ids outside `known` as single-character pieces (same detokenized text); the rest unchanged."""
    out: list[int] = []
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    for i in ids:
        i = int(i)
        if i in known:
            out.append(i)
            continue
        piece = tokenizer.convert_ids_to_tokens(i)
        cont = piece.startswith("##")
        chars = piece[2:] if cont else piece
        for j, ch in enumerate(chars):
            sub = vocab.get(f"##{ch}" if (cont or j) else ch)
            out.append(sub if sub is not None and sub in known else unk)
    return out
