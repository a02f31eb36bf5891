"""Input handling shared by every backend (torch model, ONNX Runtime, Triton, clients): tokenization and
detokenization of texts, and the check of sentence vectors.

Imports no torch: `tokenize_texts(..., return_tensors="np")` serves torch-free callers, "pt" the torch model.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

import numpy as np

from invemb.errors import InvembError

log = logging.getLogger("invemb")
IGNORE = -100  # the label of a position without a target (padding): skipped by the losses and the accuracies


def clean_texts(texts: Sequence[str] | str) -> list[str]:
    """Collapse whitespace; an empty or whitespace-only text is an InvembError naming its position(s)."""
    if isinstance(texts, str):
        texts = [texts]
    texts = [" ".join(str(t).split()) for t in texts]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise InvembError(f"empty or whitespace-only text at position(s) {empty[:10]}")
    return texts


TOKENIZE_CHUNK = 65536  # texts per tokenizer call in tokenize_texts


def tokenize_texts(tokenizer, texts: Sequence[str] | str, max_length: int, return_tensors: str = "np") -> dict:
    """Texts -> {"input_ids", "attention_mask"} [B,T] (int64 for "np"); long texts truncated with a warning.
    Texts are tokenized TOKENIZE_CHUNK at a time and padded to the longest of all: a fast tokenizer's per-text
    objects (tokens, offsets, masks) cost ~8 KB a headline, so one call over a training set's 2.7M augmented
    texts took the 24 GB of the machine (killed) where the ids themselves are 0.9 GB."""
    texts = clean_texts(texts)
    parts = [_tokenize_chunk(tokenizer, texts[i:i + TOKENIZE_CHUNK], max_length)
             for i in range(0, len(texts), TOKENIZE_CHUNK)] or [_tokenize_chunk(tokenizer, [], max_length)]
    width = max(ids.shape[1] for ids, _ in parts)
    pad = tokenizer.pad_token_id or 0
    ids = np.concatenate([np.pad(i, ((0, 0), (0, width - i.shape[1])), constant_values=pad) for i, _ in parts])
    mask = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for _, m in parts])  # [B,T]
    n_long = int((mask.sum(1) >= max_length).sum())
    if n_long:
        log.warning("%d text(s) reached max_length=%d tokens and may have been truncated", n_long, max_length)
    if return_tensors == "pt":
        import torch
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    return {"input_ids": ids, "attention_mask": mask}


def _tokenize_chunk(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [b,t] of already cleaned texts, padded to their longest."""
    if not texts:
        return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np",
                    return_overflowing_tokens=False)
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def token_counts(tokenizer, texts: Sequence[str], max_length: int) -> list[int]:
    """Tokens per text (specials included, truncated at max_length). The same tokenizer settings as tokenize_texts
    on purpose: a fast tokenizer keeps padding/truncation as state on the shared object, so a call with other
    settings (e.g. no padding) from one thread un-pads another thread's batch mid-call (seen: ragged ids)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_overflowing_tokens=False)
    return [int(sum(m)) for m in enc["attention_mask"]]


def length_sorted_batches(texts: Sequence[str], batch_size: int, lengths: Sequence[int] | None = None,
                          max_tokens: int | None = None) -> list[np.ndarray]:
    """Row indices of `texts` in batches of similar length, so a batch pads to its own longest text instead of a
    random long one (headlines: ~1.4x faster encoding). `lengths`: each text's token count when the caller has the
    tokenizer (256 validation headlines in batches of 64 pad to 1.14x their tokens; sorted by characters, the
    cheap proxy used without it, 1.33x; unsorted 1.50x). `max_tokens`: a batch also ends before rows x its longest
    length would pass this (one row always fits). Callers write each batch's results back at its indices: the
    output order is the input order."""
    key = np.array([len(t) for t in texts] if lengths is None else lengths, dtype=np.int64)
    order = np.argsort(key, kind="stable")
    if not max_tokens:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches, start = [], 0
    for i in range(1, len(order) + 1):  # ascending lengths: the row being added is the batch's longest
        if i == len(order) or i - start == batch_size or (i + 1 - start) * key[order[i]] > max_tokens:
            batches.append(order[start:i])
            start = i
    return batches


_NO_SPACE_BEFORE = re.compile(r" ([.,!?:;%)\]}])")
_NO_SPACE_AFTER = re.compile(r"([(\[{$£€]) ")
_JOINERS = re.compile(r"(?<=\w) ?([-'/&]) ?(?=\w)")
_CLITIC = re.compile(r"(\w) ' (s|t|re|ll|ve|d|m)\b")


def detokenize_spacing(text: str) -> str:
    """Undo WordPiece's spaces: "cramer ' s week : covid - 19 , 5 %" -> "cramer's week: covid-19, 5%"."""
    text = _CLITIC.sub(r"\1'\2", text)
    text = _JOINERS.sub(r"\1", text)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    return _NO_SPACE_AFTER.sub(r"\1", text)


def detokenize_ids(tokenizer, ids: Sequence[Sequence[int]]) -> list[str]:
    """Token ids -> readable text: special tokens dropped, WordPiece spacing around punctuation undone."""
    return [detokenize_spacing(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def check_vectors(vectors, sentence_dim: int) -> np.ndarray:
    """float32 [N,S] with S = sentence_dim, N >= 1 and finite values, else an InvembError naming the problem."""
    try:
        v = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvembError(f"vectors are not numeric: {e}") from None
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != sentence_dim or v.shape[0] == 0:
        raise InvembError(f"vectors must have shape [N, {sentence_dim}] with N >= 1, got {list(np.shape(vectors))}")
    bad = np.flatnonzero(~np.isfinite(v).all(1))
    if bad.size:
        raise InvembError(f"vector(s) at row(s) {bad[:10].tolist()} contain NaN or Inf")
    from invemb.limits import MAX_VECTOR_ABS
    huge = np.flatnonzero(np.abs(v).max(1) > MAX_VECTOR_ABS)
    if huge.size:
        raise InvembError(f"vector(s) at row(s) {huge[:10].tolist()} have components beyond +-{MAX_VECTOR_ABS:g}: far "
                          "outside the scale of sentence vectors (trained vectors are O(1))")
    return v
