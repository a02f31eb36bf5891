"""Tokenization and detokenization shared by every backend (torch model, ONNX Runtime, Triton, clients).

Imports no torch: `tokenize_texts(..., return_tensors="np")` serves torch-free callers, "pt" the torch model.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

from invemb.errors import InvembError

log = logging.getLogger("invemb")


def clean_texts(texts: Sequence[str] | str) -> list[str]:
    """Collapse whitespace; an empty or whitespace-only text is an InvembError naming its position(s)."""
    if isinstance(texts, str):
        texts = [texts]
    texts = [" ".join(str(t).split()) for t in texts]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise InvembError(f"empty or whitespace-only text at position(s) {empty[:10]}")
    return texts


def tokenize_texts(tokenizer, texts: Sequence[str] | str, max_length: int, return_tensors: str = "np") -> dict:
    """Texts -> {"input_ids", "attention_mask"} [B,T] (int64 for "np"); long texts truncated with a warning."""
    enc = tokenizer(clean_texts(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors=return_tensors, return_overflowing_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if return_tensors == "np":
        ids, mask = ids.astype("int64"), mask.astype("int64")
    n_long = int((mask.sum(1) >= max_length).sum())
    if n_long:
        log.warning("%d text(s) reached max_length=%d tokens and may have been truncated", n_long, max_length)
    return {"input_ids": ids, "attention_mask": mask}


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
