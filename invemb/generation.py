"""The ONE greedy / beam search, in numpy, over a small step interface.

Any backend (torch, ONNX Runtime, Triton BLS, a gRPC client) plugs in by implementing `Stepper`:

    start(num_beams) -> (log_probs [B*num_beams, V], cache)   # consumes BOS; row b*num_beams + j is beam j of item b
    step(tokens [N] int64, cache) -> (log_probs [N, V], cache)
    reorder(cache, rows [N] int64) -> cache                  # keep/duplicate rows (beam reordering, finished items)

Optional capability, top-k candidates: a stepper with `max_candidates = m` (> 0) also accepts
`start(num_beams, candidates=n)` for n <= m, and from then on returns `Candidates` (each row's n best log-probs and
their ids, best first, ties by lower id) instead of full rows, e.g. from graphs that end in TopK. The search asks
for n = 2 x beam (1 for greedy): the 2k best of k x V beam extensions are always among the union of each beam's 2k
best tokens, so both forms rank exactly the same candidates and give identical hypotheses (tests/
test_core_generation.py). n-gram blocking must see every token, so it always asks for full rows.

This module imports only numpy so that servers and clients can use it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

NEG_INF = -1e9


@dataclass
class Candidates:
    """The best next tokens of each row, in place of its full log-prob row (a Stepper's top-k form)."""
    log_probs: np.ndarray  # [N,n] float, best first
    ids: np.ndarray  # [N,n] int64 token ids (ties: lower id first)
    vocab_size: int  # V of the full rows these were taken from

    def __post_init__(self):
        if self.log_probs.shape != self.ids.shape or self.log_probs.ndim != 2:
            raise ValueError(f"Candidates: log_probs {self.log_probs.shape} and ids {self.ids.shape} must be [N,n]")

    def take(self, rows: np.ndarray) -> "Candidates":
        """The rows `rows` [N'] (kept / duplicated, as reorder_rows does for a cache)."""
        return Candidates(self.log_probs[rows], self.ids[rows], self.vocab_size)

    @classmethod
    def of(cls, log_probs: np.ndarray, n: int) -> "Candidates":
        """The n best of full rows [N,V] (ties by lower id): what a TopK graph output holds."""
        ids = top_n(log_probs, n)  # [N,n]
        return cls(np.take_along_axis(log_probs, ids, axis=1), ids, log_probs.shape[1])


class Stepper(Protocol):
    batch_size: int

    def start(self, num_beams: int) -> tuple[np.ndarray, Any]: ...

    def step(self, tokens: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]: ...

    def reorder(self, cache: Any, rows: np.ndarray) -> Any: ...


def start_search(stepper: Stepper, num_beams: int, candidates: int, cfg: "GenerationConfig"):
    """stepper.start, asking for `candidates` per row when the stepper can give them and the search needs no
    full rows (n-gram blocking); returns full rows [N,V] or Candidates."""
    if candidates and not cfg.no_repeat_ngram_size and getattr(stepper, "max_candidates", 0) >= candidates:
        return stepper.start(num_beams, candidates=candidates)
    return stepper.start(num_beams)


def reorder_rows(cache: dict, rows: np.ndarray) -> dict:
    """Default `reorder` for a dict of arrays/tensors with batch on axis 0."""
    return {k: v[rows] for k, v in cache.items()}


@dataclass
class GenerationConfig:
    beam_size: int = 4
    max_length: int = 48  # generated tokens, EOS included
    length_penalty: float = 1.0  # score = sum(log p) / length ** length_penalty
    no_repeat_ngram_size: int = 0
    eos_id: int = 102
    num_return: int = 1  # hypotheses kept per item (<= beam_size)


def generation_config(eos_id: int, limit: int, beam_size: int = 4, max_length: int | None = None,
                      **kw) -> GenerationConfig:
    """THE generation defaults of every backend (torch, ONNX Runtime, Triton, the client): beam 4 and up to `limit`
    tokens (the decoder's positions after BOS: encoder max_length - 1). beam_size must be in [1, MAX_BEAM_SIZE]
    and max_length in [1, limit] (InvembError otherwise). kw: length_penalty, no_repeat_ngram_size, num_return."""
    from invemb.limits import MAX_BEAM_SIZE, check_range
    check_range("beam_size", beam_size, 1, MAX_BEAM_SIZE)
    if max_length is not None:
        check_range("max_length", max_length, 1, limit)
    return GenerationConfig(beam_size=beam_size, eos_id=eos_id, max_length=max_length or limit, **kw)


def cut_at_eos(rows: list[list[int]], eos_id: int) -> list[list[int]]:
    """Token rows of a one-pass decode (argmax at every position) -> each row up to its first EOS (excluded)."""
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, EOS excluded
    score: float  # length-normalised log-probability
    log_prob: float  # sum of token log-probabilities (EOS included when it ended)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Column indices of the n largest scores per row, best first, ties by lower index: exactly
    `np.argsort(-scores, axis=1, kind="stable")[:, :n]`, without sorting all k*V candidates (argpartition)."""
    if n >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")[:, :n]
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    threshold = np.take_along_axis(scores, part, axis=1).min(axis=1)  # the n-th largest score per row
    out = np.empty((scores.shape[0], n), dtype=np.int64)
    for r in range(scores.shape[0]):
        idx = np.flatnonzero(scores[r] >= threshold[r])  # every candidate that can rank in the top n (ties too)
        out[r] = idx[np.argsort(-scores[r, idx], kind="stable")[:n]]
    return out


def _ban_ngrams(log_probs: np.ndarray, history: np.ndarray, n: int) -> None:
    """In place: forbid tokens that would repeat an n-gram already in each row's history [N,t]."""
    if n <= 0 or history.shape[1] < n:
        return
    t = history.shape[1]
    for r in range(history.shape[0]):
        row = history[r]
        prefix = tuple(row[t - n + 1:]) if n > 1 else ()
        for i in range(t - n + 1):
            if tuple(row[i:i + n - 1]) == prefix:
                log_probs[r, row[i + n - 1]] = NEG_INF


def greedy_search(stepper: Stepper, cfg: GenerationConfig) -> list[Hypothesis]:
    """Argmax decoding for every item at once; finished rows are dropped from the batch."""
    lp, cache = start_search(stepper, 1, 1, cfg)  # [B,V] or Candidates [B,1]
    b = lp.ids.shape[0] if isinstance(lp, Candidates) else lp.shape[0]
    tokens: list[list[int]] = [[] for _ in range(b)]
    totals = np.zeros(b)
    done = np.zeros(b, dtype=bool)
    alive = np.arange(b)  # item index of each cache row
    for t in range(cfg.max_length):
        if cfg.no_repeat_ngram_size:
            history = np.array([tokens[i] for i in alive], dtype=np.int64).reshape(len(alive), t)
            _ban_ngrams(lp, history, cfg.no_repeat_ngram_size)
        if isinstance(lp, Candidates):
            nxt, gain = lp.ids[:, 0], lp.log_probs[:, 0]  # the argmax (first of ties) of each full row
        else:
            nxt = lp.argmax(-1)
            gain = lp[np.arange(len(alive)), nxt]
        totals[alive] += gain
        ended = nxt == cfg.eos_id
        for row, item in enumerate(alive):
            if ended[row]:
                done[item] = True
            else:
                tokens[item].append(int(nxt[row]))
        keep = np.flatnonzero(~ended)
        if keep.size == 0 or t == cfg.max_length - 1:
            break
        if keep.size < len(alive):
            cache, alive, nxt = stepper.reorder(cache, keep), alive[keep], nxt[keep]
        lp, cache = stepper.step(nxt.astype(np.int64), cache)
    return [Hypothesis(tokens[i], float(totals[i]) / max(1, len(tokens[i]) + done[i]) ** cfg.length_penalty,
                       float(totals[i])) for i in range(b)]


def best_extensions(scores: np.ndarray, lp, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The n best (beam score + token log-prob) of each item's k beams: (scores, beam, token) [A,n], best first,
    ties by the lower flat index beam * V + token. scores [A,k]; lp full rows [A*k,V] or Candidates [A*k,m>=n]."""
    a, k = scores.shape
    if isinstance(lp, Candidates):
        m, v = lp.ids.shape[1], lp.vocab_size
        cand = (scores[:, :, None] + lp.log_probs.reshape(a, k, m)).reshape(a, k * m)  # [A, k*m]
        beam = np.broadcast_to(np.repeat(np.arange(k), m), (a, k * m))  # [A, k*m]
        tok = lp.ids.reshape(a, k * m)
        order = np.lexsort((beam * v + tok, -cand), axis=-1)[:, :n]  # by score, then by full-row flat index
        return (np.take_along_axis(cand, order, 1), np.take_along_axis(beam, order, 1),
                np.take_along_axis(tok, order, 1))
    v = lp.shape[1]
    cand = (scores[:, :, None] + lp.reshape(a, k, v)).reshape(a, k * v)  # [A, k*V]
    top = top_n(cand, n)  # [A, n]
    return np.take_along_axis(cand, top, 1), top // v, top % v


def beam_search(stepper: Stepper, cfg: GenerationConfig) -> list[list[Hypothesis]]:
    """Batched beam search. Returns, per item, up to `num_return` hypotheses sorted by score (best first).

    An item is finished when it holds `beam_size` ended hypotheses and no live beam can beat the worst of them
    (the live beam's score at the current length is the bound, exact for length_penalty <= 0). Items that finish
    leave the batch; the search stops when all items finished or `max_length` tokens were generated.
    """
    k = cfg.beam_size
    if k < 1:
        raise ValueError("beam_size must be >= 1")
    lp, cache = start_search(stepper, k, 2 * k, cfg)  # [B*k, V] or Candidates [B*k, 2k]
    b = (lp.ids if isinstance(lp, Candidates) else lp).shape[0] // k
    scores = np.full((b, k), NEG_INF)  # [B,k] running log-prob of each live beam
    # Top-beam mask: the k beams of an item start identical (same BOS, same cache), so only beam 0 may expand at the
    # first step; NEG_INF on the others keeps k copies of one continuation out of the candidates.
    scores[:, 0] = 0.0
    history = np.zeros((b * k, 0), dtype=np.int64)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    alive = np.arange(b)  # item index of each block of k cache rows

    def norm(raw: float, length: int) -> float:
        return raw / max(1, length) ** cfg.length_penalty

    for t in range(cfg.max_length):
        n_alive = len(alive)
        if not isinstance(lp, Candidates):
            _ban_ngrams(lp, history, cfg.no_repeat_ngram_size)
        top_scores, top_beam, top_tok = best_extensions(scores, lp, 2 * k)  # [A, 2k] each, best first
        new_scores = np.full((n_alive, k), NEG_INF)  # [A,k] the next live beams' scores, cache rows, tokens
        new_rows = np.zeros((n_alive, k), dtype=np.int64)
        new_tok = np.zeros((n_alive, k), dtype=np.int64)
        searching = np.ones(n_alive, dtype=bool)  # [A] items that keep searching after this step
        last = t == cfg.max_length - 1
        for block in range(n_alive):  # block: an alive item's k consecutive cache rows
            item_hyps, n_live = finished[alive[block]], 0  # the item's ended hypotheses; live beams chosen so far
            for rank in range(top_scores.shape[1]):
                s, beam, tok = top_scores[block, rank], int(top_beam[block, rank]), int(top_tok[block, rank])
                # A candidate at or below NEG_INF / 2 extends a masked beam (or a banned n-gram token): real scores
                # are sums of log-probs, far above it, so here every real candidate has been seen.
                if s <= NEG_INF / 2:
                    break
                row = block * k + beam
                if tok == cfg.eos_id:
                    if rank < k:  # an ending counts only when it ranks among the k best candidates
                        item_hyps.append(Hypothesis(history[row].tolist(), norm(s, t + 1), float(s)))
                    continue
                new_scores[block, n_live], new_rows[block, n_live], new_tok[block, n_live] = s, row, tok
                n_live += 1
                if n_live == k:
                    break
            item_hyps.sort(key=lambda h: -h.score)
            del item_hyps[k:]
            if last:  # out of length: live beams become hypotheses too
                for live in range(n_live):
                    row = new_rows[block, live]
                    item_hyps.append(Hypothesis(history[row].tolist() + [int(new_tok[block, live])],
                                                norm(new_scores[block, live], t + 1), float(new_scores[block, live])))
                item_hyps.sort(key=lambda h: -h.score)
            best_live = new_scores[block].max()
            if n_live == 0 or (len(item_hyps) >= k and norm(best_live, t + 1) <= item_hyps[k - 1].score):
                searching[block] = False
        if last or not searching.any():
            break
        keep = np.flatnonzero(searching)
        rows = new_rows[keep].reshape(-1)  # [A'*k] rows of the current cache
        history = np.concatenate([history[rows], new_tok[keep].reshape(-1, 1)], axis=1)
        scores, alive = new_scores[keep], alive[keep]
        cache = stepper.reorder(cache, rows)
        lp, cache = stepper.step(new_tok[keep].reshape(-1), cache)
    n = max(1, min(cfg.num_return, k))
    return [sorted(f, key=lambda h: -h.score)[:n] for f in finished]


def generate(stepper: Stepper, cfg: GenerationConfig) -> list[Hypothesis]:
    """Best hypothesis per item: greedy when beam_size == 1, else beam search."""
    if cfg.beam_size == 1:
        return greedy_search(stepper, cfg)
    return [hyps[0] for hyps in beam_search(stepper, cfg)]


def split_search(search, vectors: np.ndarray, workers: int, pool=None) -> list:
    """`search(rows)` -> one result per row, over up to `workers` contiguous slices of `vectors` [N,S] at once,
    results in row order. Items never interact in a search (each has its own beams), so the results are the
    same as one call over all rows (tests: test_core_generation.py, test_export_onnx.py
    test_search_workers_decode_the_same_texts). One slice runs in the calling thread, the others
    on `pool` (a concurrent.futures executor); with no pool, one worker or one row: one call.

    Why: the decoder graphs at serving sizes (4 headlines x beam 4 = 16 rows of a 3x256 decoder) are too small for
    intra-op threads (ONNX Runtime with 2 threads decodes ~20% SLOWER than with 1), while two slices on two cores,
    each a 1-thread session run (which releases the GIL), decode a lone 4-headline request x1.35-1.4 faster."""
    n = len(vectors)
    parts = min(int(workers), n)
    if pool is None or parts <= 1:
        return search(vectors)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    futures = [pool.submit(search, vectors[a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
    out = list(search(vectors[bounds[0]:bounds[1]]))
    for f in futures:
        out.extend(f.result())
    return out
