"""Reconstruction metrics.

Teacher-forced (from logits): positional token accuracy and top-k accuracy, k in TOPK (the report's table).
Generated text: positional token accuracy of generated ids, exact match, BLEU (sacrebleu), BERTScore F1
(bert-score; default all-mpnet-base-v2 layer 8, RAW F1 — no baseline rescaling offline), paraphrase cosine
(sentence-transformers; default all-mpnet-base-v2, the report's paraphrase-mpnet-base-v2 as a named option).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from invemb.text import IGNORE

TOPK = (1, 3, 5, 10, 15, 25, 50, 100)
DEFAULT_SCORER = "all-mpnet-base-v2"
BERTSCORE_LAYERS = {"all-mpnet-base-v2": 8, "all-minilm-l6-v2": 4}


class TopKAccumulator:
    """Accumulates top-k hits over batches of logits [B,T,V] and labels [B,T] (ignore_index positions skipped)."""

    def __init__(self, ks: Sequence[int] = TOPK, ignore_index: int = IGNORE):
        self.ks, self.ignore = tuple(ks), ignore_index
        self.hits = np.zeros(len(self.ks), dtype=np.int64)
        self.total = 0

    def update(self, logits, labels) -> None:
        import torch
        mask = labels != self.ignore  # [B,T]
        logits, labels = logits[mask], labels[mask]  # [M,V], [M]
        if labels.numel() == 0:
            return
        kmax = min(max(self.ks), logits.shape[-1])
        top = logits.topk(kmax, dim=-1).indices  # [M,kmax]
        found = top == labels.unsqueeze(-1)  # [M,kmax]
        first = torch.where(found.any(-1), found.float().argmax(-1), torch.full_like(labels, kmax))  # rank or kmax
        for i, k in enumerate(self.ks):
            self.hits[i] += int((first < k).sum())
        self.total += int(labels.numel())

    def result(self) -> dict[str, float]:
        return {f"top{k}": float(h) / max(1, self.total) for k, h in zip(self.ks, self.hits)}


def topk_accuracy(logits, labels, ks: Sequence[int] = TOPK, ignore_index: int = IGNORE) -> dict[str, float]:
    acc = TopKAccumulator(ks, ignore_index)
    acc.update(logits, labels)
    return acc.result()


def positional_token_accuracy(hyp_ids: Sequence[Sequence[int]], ref_ids: Sequence[Sequence[int]]) -> float:
    """Share of reference tokens matched at the same position by the hypothesis (missing positions are wrong)."""
    hits = sum(sum(a == b for a, b in zip(h, r)) for h, r in zip(hyp_ids, ref_ids))
    return hits / max(1, sum(len(r) for r in ref_ids))


def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
    return float(np.mean([h == r for h, r in zip(hyps, refs)])) if refs else 0.0


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


@lru_cache(maxsize=4)
def _bert_scorer(model: str, num_layers: int | None):
    from bert_score import BERTScorer
    from invemb.assets import scorer_path
    layers = num_layers or BERTSCORE_LAYERS.get(model.lower())
    if layers is None:
        from invemb.errors import InvembError
        raise InvembError(f"BERTScore model {model!r}: pass num_layers (no default layer known for it)")
    return BERTScorer(model_type=scorer_path(model), num_layers=layers, lang="en")


def bertscore_f1(hyps: Sequence[str], refs: Sequence[str], model: str = DEFAULT_SCORER,
                 num_layers: int | None = None, batch_size: int = 64) -> float:
    """Mean raw BERTScore F1 (no baseline rescaling: none exists offline for a local model folder)."""
    if not refs:
        return 0.0
    scorer = _bert_scorer(model, num_layers)
    scorer.batch_size = batch_size
    _, _, f1 = scorer.score([h if h.strip() else "." for h in hyps], list(refs), batch_size=batch_size)
    return float(f1.mean())


@lru_cache(maxsize=4)
def _sentence_model(model: str):
    from sentence_transformers import SentenceTransformer
    from invemb.assets import scorer_path
    return SentenceTransformer(scorer_path(model), device="cpu")


def paraphrase_cosine(hyps: Sequence[str], refs: Sequence[str], model: str = DEFAULT_SCORER,
                      batch_size: int = 64) -> float:
    """Mean cosine similarity of sentence-transformer embeddings of each hypothesis and its reference."""
    if not refs:
        return 0.0
    st = _sentence_model(model)
    a = st.encode(list(hyps), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    b = st.encode(list(refs), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    return float((a * b).sum(1).mean())


def text_metrics(hyps: Sequence[str], refs: Sequence[str], scorer: str | None = DEFAULT_SCORER,
                 paraphrase_model: str | None = None) -> dict[str, float]:
    """exact, BLEU, and (when `scorer` is set) BERTScore F1 + paraphrase cosine."""
    out = {"exact_match": exact_match(hyps, refs), "bleu": bleu(hyps, refs)}
    if scorer:
        out["bertscore_f1"] = bertscore_f1(hyps, refs, scorer)
        out["paraphrase_cos"] = paraphrase_cosine(hyps, refs, paraphrase_model or scorer)
    return out


# ------------------------------------------------------------------------------------------------ facts (issue 29)
def fact_scores(hyp: str, original: str) -> dict[str, int]:
    """Counts for one headline: numbers / names of `original` and how many of each `hyp` holds. A number counts
    with its separators, currency and unit ("5.5%" is not "55%" nor "5.5"), WordPiece spacing inside it joined
    and case ignored (invemb.facts.number_keys); a name is a capitalised word of the original other than its
    first (invemb.facts.find_names), found as a whole word (invemb.facts.name_count). Repeats count as often as
    the original holds them."""
    from collections import Counter

    from invemb.facts import find_names, name_count, number_keys
    ref_nums, hyp_nums = Counter(number_keys(original)), Counter(number_keys(hyp))
    names = Counter(n.lower() for n in find_names(original))
    return {"numbers": sum(ref_nums.values()), "numbers_found": sum((ref_nums & hyp_nums).values()),
            "names": sum(names.values()), "names_found": sum(min(c, name_count(n, hyp)) for n, c in names.items())}


def fact_metrics(hyps: Sequence[str], originals: Sequence[str]) -> dict[str, float]:
    """number_recall / name_recall (over every number / name of the originals), numbers_all_right (share of the
    headlines holding a number whose numbers all come back), facts_all_right (share of the headlines holding a
    number or a name whose numbers AND names all come back), and the counts behind them."""
    rows = [fact_scores(h, o) for h, o in zip(hyps, originals)]
    with_num = [r for r in rows if r["numbers"]]
    with_fact = [r for r in rows if r["numbers"] or r["names"]]
    nums, names = sum(r["numbers"] for r in rows), sum(r["names"] for r in rows)
    return {"number_recall": sum(r["numbers_found"] for r in rows) / max(1, nums),
            "name_recall": sum(r["names_found"] for r in rows) / max(1, names),
            "numbers_all_right": float(np.mean([r["numbers_found"] == r["numbers"] for r in with_num]))
            if with_num else 0.0,
            "facts_all_right": float(np.mean([r["numbers_found"] == r["numbers"] and r["names_found"] == r["names"]
                                              for r in with_fact])) if with_fact else 0.0,
            "n_numbers": nums, "n_names": names, "with_numbers": len(with_num), "with_facts": len(with_fact)}


# ------------------------------------------------------------------------------------------------ written form (issue 30)
def _collapse(text: str) -> str:
    return " ".join(text.split())


def surface_metrics(written: Sequence[str], originals: Sequence[str]) -> dict[str, float]:
    """Decoded text as written against the original headlines (whitespace collapsed on both sides): raw_exact
    (case- and space-sensitive), caseless_exact (case ignored, spacing not), cased_bleu (sacrebleu on the original
    strings, case-sensitive)."""
    hyps, refs = [_collapse(h) for h in written], [_collapse(o) for o in originals]
    return {"raw_exact": exact_match(hyps, refs),
            "caseless_exact": exact_match([h.casefold() for h in hyps], [r.casefold() for r in refs]),
            "cased_bleu": bleu(hyps, refs)}


def exact_split(hyps: Sequence[str], refs: Sequence[str], mask: Sequence[bool]) -> dict[str, float]:
    """Exact match of the rows where `mask` holds vs the others (issue 33: headlines with a WordPiece outside the
    decoder's compact vocabulary vs the rest), with the row counts."""
    inside = [(h, r) for h, r, m in zip(hyps, refs, mask) if m]
    rest = [(h, r) for h, r, m in zip(hyps, refs, mask) if not m]
    return {"exact_with": exact_match(*zip(*inside)) if inside else 0.0, "n_with": len(inside),
            "exact_without": exact_match(*zip(*rest)) if rest else 0.0, "n_without": len(rest)}
