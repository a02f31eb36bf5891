"""The decoder's target representation and the written form of a headline.

The encoder reads MiniLM's uncased WordPiece; the decoder predicts the same pieces plus, per piece, two tags that
give the text back AS WRITTEN ("U.S.-China deal lifts Nestlé to $3.2bn"):
- case: LOWER (the piece as it is), FIRST (first letter upper), UPPER (all upper), TABLE (the piece's most common
  written form in the training headlines: "iPhone", "Nestlé", "McD"), from a small head on the decoder's state;
- space: whether a space stands before the piece (WordPiece splits "U.S.-China" into 6 pieces with no spaces).
Targets (`decoder_targets`) also spell pieces the decoder cannot predict (outside its compact vocabulary) and,
with `spell_numbers`, every number, as single-character pieces ("587" -> "5 ##8 ##7"): any number can be written
digit by digit from the vector instead of being one frequent piece guessed by the prior.

    t = decoder_targets(tokenizer, ["Tesla up 5.5% on U.S. sales"], 40, known=None)
    render(tokenizer, t["ids"][0], t["case"][0], t["space"][0], table={})  # "Tesla up 5.5% on U.S. sales"

The tag of a piece is predicted from the decoder state of the step that READS it (position i of the decoder input
holds piece i): it knows the piece, the vector and everything before, so tagging a finished search is one
teacher-forced pass and never changes which pieces the search picks. Numpy + a fast tokenizer; no torch.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

LOWER, FIRST, UPPER, TABLE = 0, 1, 2, 3
N_CASE, N_SPACE = 4, 2
NO_TAG = -1  # tag of [CLS] / [SEP] / padding (no loss)
SURFACE_FILE = "surface.json"
CHUNK = 8192  # texts per tokenizer call (offsets cost ~8 KB a text)


def _case_of(written: str, piece: str) -> int:
    if written == piece:
        return LOWER
    if written == piece[:1].upper() + piece[1:]:
        return FIRST
    if written == piece.upper():
        return UPPER
    return TABLE


def apply_case(piece: str, case: int, table: dict[str, str]) -> str:
    if case == FIRST:
        return piece[:1].upper() + piece[1:]
    if case == UPPER:
        return piece.upper()
    if case == TABLE:
        return table.get(piece, piece)
    return piece


def _spell(piece: str, cont: bool, written: str, vocab: dict, known) -> list[tuple[int, str]] | None:
    """(id, written char) per character of `piece` as single-character pieces; None when one is not predictable."""
    if len(written) != len(piece):  # e.g. a ligature expanded by normalisation: keep the piece whole
        return None
    out = []
    for j, ch in enumerate(piece):
        sub = vocab.get(f"##{ch}" if (cont or j) else ch)
        if sub is None or (known is not None and sub not in known):
            return None
        out.append((sub, written[j]))
    return out


def _encode_one(enc, text: str, tokenizer, vocab, known, spell_numbers: bool, max_length: int, special: set,
                practice: float = 0.0, rng: random.Random | None = None):
    """One tokenized text -> lists (ids, case, space, fact) incl. [CLS]/[SEP], spelled where needed, cut at
    max_length. fact: 1 for the pieces of a number (a word piece holding a digit) and of a name (a capitalised word
    after the text's first word; what invemb.metrics' name recall asks back), else 0.
    `special`: the tokenizer's special ids (computed once per call of decoder_targets, not per text).
    `practice`: the chance (drawn from `rng`) that a piece of a capitalised word is spelled although the decoder
    could predict it whole: training texts only, so the decoder practises the spelling it needs for pieces outside
    its vocabulary (mostly rare names), which the training split alone never asks of it."""
    ids, case, space, fact = [tokenizer.cls_token_id], [NO_TAG], [NO_TAG], [0]
    prev_end, capital, later_word = None, False, False
    for tid, tok, (start, end) in zip(enc.ids, enc.tokens, enc.offsets):
        if tid in special and tid != tokenizer.unk_token_id:
            continue
        cont = tok.startswith("##")
        piece = tok[2:] if cont else tok
        written = text[start:end]
        gap = int(prev_end is not None and start > prev_end and not cont)
        later_word = later_word or bool(gap)  # past the first word (a word ends at a space)
        prev_end = end
        if not cont:  # a word's later pieces belong to the capitalised word their first piece starts
            capital = written[:1].isupper()
        is_fact = int(any(c.isdigit() for c in piece) or (capital and later_word and piece.isalpha()))
        spelled = None
        if len(piece) > 1 and ((known is not None and tid not in known) or
                               (spell_numbers and any(c.isdigit() for c in piece)) or
                               (practice > 0 and capital and piece.isalpha() and rng.random() < practice)):
            spelled = _spell(piece, cont, written, vocab, known)
        if spelled is None:
            ids.append(tid), case.append(_case_of(written, piece) if tid != tokenizer.unk_token_id else LOWER)
            space.append(gap), fact.append(is_fact)
            continue
        for j, (sub, ch) in enumerate(spelled):
            ids.append(sub), case.append(_case_of(ch, piece[j])), space.append(gap if j == 0 else 0)
            fact.append(is_fact)
    ids, case, space, fact = ids[:max_length - 1], case[:max_length - 1], space[:max_length - 1], fact[:max_length - 1]
    return ids + [tokenizer.sep_token_id], case + [NO_TAG], space + [NO_TAG], fact + [0]


def tag_rows(ids: Sequence[Sequence[int]], bos: int, eos: int, max_length: int) -> tuple[np.ndarray, int]:
    """Generated ids (rows without specials) -> the tagging pass's input_ids int64 [N,W] = [CLS] + pieces + [SEP],
    [SEP] after, and T = the longest row (row i's tags are columns 1..len(row)). A tag reads at most the piece after
    its own (the decoder is causal), so a row's tags never depend on the longest row of its batch. W = min(T + 2,
    max_length): no [SEP] column after a row at the position limit (training never saw one there: a cut target has
    none). InvertibleEmbedder._surface_tags and invemb.graph_stepper.surface_tags both build their input here."""
    width = max(1, max((len(r) for r in ids), default=0))
    x = np.full((len(ids), min(width + 2, max_length)), eos, np.int64)  # [N,W]
    x[:, 0] = bos
    for i, row in enumerate(ids):
        x[i, 1:1 + len(row)] = row
    return x, width


def decoder_targets(tokenizer, texts: Sequence[str], max_length: int, known=None,
                    spell_numbers: bool = False, practice: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Cleaned texts -> the decoder's targets, padded: ids int32 [B,T] ([CLS] pieces [SEP], pad 0), mask int8 [B,T],
    case / space int8 [B,T] (NO_TAG at specials and padding), fact int8 [B,T] (1: a piece of a number or a name;
    _encode_one). `known`: the tokenizer ids the decoder can predict
    (its compact vocabulary; None: all); pieces outside it, and numbers with `spell_numbers`, are spelled.
    `practice` > 0 (training texts): pieces of capitalised words are also spelled by chance, drawn from `seed`
    (the same texts and seed give the same targets; a text repeated in the list gets its own draw)."""
    rng = random.Random(seed) if practice > 0 else None
    vocab = tokenizer.get_vocab()
    known = None if known is None else set(int(i) for i in known)
    special = set(tokenizer.all_special_ids)
    rows = []
    for s in range(0, len(texts), CHUNK):
        chunk = list(texts[s:s + CHUNK])
        encs = tokenizer(chunk, truncation=True, max_length=max_length, add_special_tokens=False,
                         return_offsets_mapping=True).encodings
        rows.extend(_encode_one(e, t, tokenizer, vocab, known, spell_numbers, max_length, special, practice, rng)
                    for e, t in zip(encs, chunk))
    width = max((len(r[0]) for r in rows), default=2)
    out = {"ids": np.zeros((len(rows), width), np.int32), "mask": np.zeros((len(rows), width), np.int8),
           "case": np.full((len(rows), width), NO_TAG, np.int8), "space": np.full((len(rows), width), NO_TAG, np.int8),
           "fact": np.zeros((len(rows), width), np.int8)}
    for i, (ids, case, space, fact) in enumerate(rows):
        n = len(ids)
        out["ids"][i, :n], out["mask"][i, :n], out["case"][i, :n], out["space"][i, :n] = ids, 1, case, space
        out["fact"][i, :n] = fact
    return out


def build_table(tokenizer, texts: Sequence[str], max_length: int, min_count: int = 1) -> dict[str, str]:
    """Piece -> its most common written form among the TABLE-cased occurrences in `texts` (mixed case, accents)."""
    counts: dict[str, Counter] = {}
    for s in range(0, len(texts), CHUNK):
        chunk = list(texts[s:s + CHUNK])
        encs = tokenizer(chunk, truncation=True, max_length=max_length, add_special_tokens=False,
                         return_offsets_mapping=True).encodings
        for e, t in zip(encs, chunk):
            for tok, (a, b) in zip(e.tokens, e.offsets):
                piece = tok[2:] if tok.startswith("##") else tok
                if _case_of(t[a:b], piece) == TABLE:
                    counts.setdefault(piece, Counter())[t[a:b]] += 1
    return {p: c.most_common(1)[0][0] for p, c in sorted(counts.items()) if c.most_common(1)[0][1] >= min_count}


def render(tokenizer, ids: Sequence[int], case: Sequence[int], space: Sequence[int], table: dict[str, str]) -> str:
    """Pieces + tags -> the written text (specials dropped; the first piece never has a space before it)."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    out: list[str] = []
    for tid, c, s in zip(ids, case, space):
        tid = int(tid)
        if tid in special:
            continue
        tok = tokenizer.convert_ids_to_tokens(tid)
        cont = tok.startswith("##")
        piece = tok[2:] if cont else tok
        if out and not cont and int(s) == 1:
            out.append(" ")
        out.append(apply_case(piece, int(c), table))
    return "".join(out)


def save_table(folder: str | Path, table: dict[str, str]) -> None:
    Path(folder, SURFACE_FILE).write_text(json.dumps({"version": 1, "table": table}, ensure_ascii=False, indent=0))


def load_table(folder: str | Path) -> dict[str, str] | None:
    p = Path(folder, SURFACE_FILE)
    return json.loads(p.read_text(encoding="utf-8"))["table"] if p.is_file() else None


def oracle_roundtrip(tokenizer, texts: Sequence[str], max_length: int, table: dict[str, str], known=None,
                     spell_numbers: bool = False) -> tuple[float, list[tuple[str, str]]]:
    """Share of cleaned texts that targets -> render give back exactly, and the failures (original, rendered)."""
    t = decoder_targets(tokenizer, texts, max_length, known, spell_numbers)
    fails = []
    for i, text in enumerate(texts):
        got = render(tokenizer, t["ids"][i], t["case"][i], t["space"][i], table)
        if got != text:
            fails.append((text, got))
    return 1 - len(fails) / max(1, len(texts)), fails
