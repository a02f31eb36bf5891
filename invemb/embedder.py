"""The surface every embedder shares (the torch `InvertibleEmbedder` and the ONNX Runtime `OnnxEmbedder`):
encode texts in length-sorted batches, check vectors, the generation defaults, decode (step search or the
one-pass cut at EOS; optionally re-ranking the beam's n-best by re-encoding them) and detokenize. A backend
supplies the pieces that touch its runtime:

    _encode_batch(texts) -> float32 [b,S]        one batch of clean texts through the encoder
    _stepper(vectors [N,S]) -> Stepper            the decoder as an invemb.generation.Stepper
    _onepass_ids(vectors, cfg) -> [[int]]         argmax ids of every position (one-pass decoders only)
    _surface_tags(vectors, ids) -> (case, space)  tags of generated pieces (models with surface heads only)
    one_pass: bool, sentence_dim, eos_id, max_length (encoder tokens incl. specials), tokenizer
and may set `search_workers` (default 1): searches split a batch's rows into that many slices decoded at once in
threads (invemb.generation.split_search; same texts), for backends whose steps release the GIL (ONNX Runtime).

Torch-free (numpy only).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from invemb.generation import (GenerationConfig, Hypothesis, beam_search, cut_at_eos, generate, generation_config,
                                split_search)
from invemb.text import check_vectors, clean_texts, detokenize_ids, length_sorted_batches, token_counts


# padded tokens per encode batch at most (and batch_size texts): after sorting by token count, smaller batches of
# equal-length texts run faster on a CPU (cache-sized activations). 256 validation headlines, batch_size 64, 1 ORT
# thread, sentences/s (one run): int8 384 unlimited / 332 at 2048 / 351 at 1024 / 401 at 512 / 414 at 384 / 407 at
# 256; fp32 191 / 198 / 215 / 205 / 229 / 216 (sorted by characters instead: int8 283, fp32 127)
ENCODE_MAX_TOKENS = 384


# decode's default re-ranking ("auto"): the n-best candidates scored (length-normalised log-probability) within
# RERANK_MARGIN of the beam's best are re-encoded, and so is every candidate whose NUMBERS differ from the best's
# (the beam's choice between "$3.2 billion" and "$3.5 billion" is the decoder's prior; the vector knows better); a
# row with no such rival is not re-encoded at all. First 2,000 validation headlines, shipped model, beam 4
# (results/rerank_margin.md): beam only: cased BLEU 69.49, number recall 0.819; margin 0.0075 + numbers: 70.09,
# 0.837 at 0.41 encodes per headline; 0.015 + numbers: 70.51, 0.839 at 0.63; every candidate (rerank=True): 73.90,
# 0.843 at 4.0. Each encode costs ~1/10 of a headline's beam-4 search (int8, one thread), and the written form's tag
# pass already ~3-5%: 0.0075 keeps decode within 10% of the speed before re-ranking (results/bench_models.md).
RERANK_MARGIN = 0.0075


def rerank_margin(rerank) -> float:
    """decode's `rerank` -> the score margin within which candidates are re-encoded: False / None / "off" -> 0
    (the beam's best, no encode), "auto" -> RERANK_MARGIN, True / "all" -> inf (every candidate), a number >= 0 ->
    itself. ValueError naming the value otherwise."""
    if rerank is True or rerank == "all":
        return float("inf")
    if rerank is False or rerank is None or rerank == "off":
        return 0.0
    if rerank == "auto":
        return RERANK_MARGIN
    if isinstance(rerank, (int, float, np.floating, np.integer)) and float(rerank) >= 0:  # NaN fails >= 0
        return float(rerank)
    raise ValueError(f"rerank must be 'auto', 'all', 'off', True, False or a score margin >= 0, got {rerank!r}")


def parse_rerank(text: str):
    """A command line's --rerank value: auto | all | off | a margin >= 0 (argparse `type`; bare --rerank = all)."""
    import argparse
    if text in ("auto", "all", "off"):
        return text
    try:
        return rerank_margin(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, all, off or a score margin >= 0, got {text!r}") from None


class EmbedderBase:
    """Mixin: text <-> vector on top of a backend's `_encode_batch` / `_stepper` / `_onepass_ids`."""

    one_pass: bool
    sentence_dim: int
    eos_id: int
    max_length: int  # encoder tokens incl. [CLS]/[SEP]; a search generates at most max_length - 1 tokens
    tokenizer: object
    search_workers: int = 1  # row slices searched at once (threads); see set_search_workers
    surface_table: dict | None = None  # piece -> written form (invemb.surface); None: no surface heads (normalised)
    _search_pool = None
    _digit_ids: frozenset | None = None  # tokenizer ids of pieces holding a digit (rerank_rivals)

    def set_search_workers(self, workers: int) -> None:
        """Decode a batch's rows in `workers` slices at once, each in its own thread (the caller's + workers - 1
        pool threads). Worth it where one step is too small for intra-op threads (serving batches on a CPU)."""
        from concurrent.futures import ThreadPoolExecutor
        if int(workers) < 1:
            raise ValueError(f"search workers must be >= 1, got {workers}")
        if self._search_pool is not None:
            self._search_pool.shutdown(wait=True)
        self.search_workers = int(workers)
        self._search_pool = ThreadPoolExecutor(self.search_workers - 1, thread_name_prefix="invemb-search") \
            if self.search_workers > 1 else None

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _stepper(self, vectors: np.ndarray):
        raise NotImplementedError

    def _onepass_ids(self, vectors: np.ndarray, cfg: GenerationConfig) -> list[list[int]]:
        raise NotImplementedError

    def _surface_tags(self, vectors: np.ndarray, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Checked vectors [N,S] + generated ids (no specials) -> case / space tags [N,T] (row i: its ids' tags)."""
        raise NotImplementedError

    @property
    def writes_surface(self) -> bool:
        """Whether decode returns text as written (the model has surface heads); else normalised WordPiece text."""
        return self.surface_table is not None

    def texts(self, vectors, ids: list[list[int]], normalized: bool = False) -> list[str]:
        """Generated ids of checked vectors [N,S] -> texts: as written (case and spacing from the surface heads:
        one teacher-forced pass over the finished pieces) or, with normalized=True or a model without surface
        heads, the normalised lower-cased WordPiece text (`detokenize`)."""
        if normalized or self.surface_table is None or not ids:
            return self.detokenize(ids)
        from invemb.surface import render
        case, space = self._surface_tags(vectors, ids)  # [N,T] each
        return [render(self.tokenizer, row, case[i], space[i], self.surface_table) for i, row in enumerate(ids)]

    # ----------------------------------------------------------------------------------------------- text
    def detokenize(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Token ids -> readable text: special tokens dropped, WordPiece spacing around punctuation undone."""
        return detokenize_ids(self.tokenizer, ids)

    def encode(self, texts: Sequence[str] | str, batch_size: int = 64, progress: bool = False,
               max_tokens: int | None = ENCODE_MAX_TOKENS) -> np.ndarray:
        """Texts -> float32 [B,S], in batches of at most batch_size texts and max_tokens padded tokens."""
        from tqdm.auto import tqdm
        texts = clean_texts(texts)  # an empty text is an error naming its position in `texts`, not in a batch
        out = np.zeros((len(texts), self.sentence_dim), np.float32)
        # batches of similar TOKEN counts (less padding); rows are written back in input order. Counting is a second
        # tokenizer pass (each batch is tokenized again by _encode_batch): 25 ms per 256 headlines, ~4% of an int8
        # encode, against x1.36-1.5 from the sorting
        lengths = token_counts(self.tokenizer, texts, self.max_length)
        for rows in tqdm(length_sorted_batches(texts, batch_size, lengths, max_tokens), disable=not progress,
                         desc="encode", unit="batch"):
            out[rows] = self._encode_batch([texts[r] for r in rows])
        return out

    # ----------------------------------------------------------------------------------------------- vectors
    def check_vectors(self, vectors) -> np.ndarray:
        return check_vectors(vectors, self.sentence_dim)

    def generation_config(self, beam_size: int = 4, max_length: int | None = None, **kw) -> GenerationConfig:
        """invemb.generation.generation_config for this model: at most max_length - 1 generated tokens."""
        return generation_config(self.eos_id, self.max_length - 1, beam_size, max_length, **kw)

    def decode_ids(self, vectors, beam_size: int = 4, max_length: int | None = None, **kw) -> list[list[int]]:
        """Vectors [N,S] -> generated token ids per row (EOS excluded)."""
        v = self.check_vectors(vectors)
        cfg = self.generation_config(beam_size, max_length, **kw)
        if self.one_pass:  # all positions at once, cut at the first EOS
            return cut_at_eos(self._onepass_ids(v, cfg), self.eos_id)
        return [h.tokens for h in self.search(v, cfg)]

    def _workers(self, workers: int | None) -> int:
        return self.search_workers if workers is None else max(1, min(int(workers), self.search_workers))

    def search(self, vectors: np.ndarray, cfg: GenerationConfig, workers: int | None = None) -> list[Hypothesis]:
        """The best hypothesis per row of checked vectors [N,S] (the core's generate), the rows split over
        `workers` (default and at most: search_workers) slices at once."""
        return split_search(lambda part: generate(self._stepper(part), cfg), vectors, self._workers(workers),
                            self._search_pool)

    def nbest_search(self, vectors: np.ndarray, cfg: GenerationConfig, workers: int | None = None
                     ) -> list[list[Hypothesis]]:
        """Per row of checked vectors [N,S] the beam's finished hypotheses, best first (split like search)."""
        return split_search(lambda part: beam_search(self._stepper(part), cfg), vectors, self._workers(workers),
                            self._search_pool)

    def decode_nbest(self, vectors, beam_size: int = 4, max_length: int | None = None, **kw
                     ) -> list[list[Hypothesis]]:
        """Vectors [N,S] -> per row the beam's finished hypotheses, best score first (up to beam_size)."""
        if self.one_pass:
            raise ValueError("a one-pass decoder has no beam: n-best decoding needs a step decoder")
        v = self.check_vectors(vectors)
        cfg = self.generation_config(beam_size, max_length, num_return=beam_size, **kw)
        return self.nbest_search(v, cfg)

    def rerank_ids(self, vectors, beam_size: int = 4, max_length: int | None = None, margin: float = float("inf"),
                   **kw) -> list[list[int]]:
        """Round-trip re-ranking: decode each vector's n-best, encode the candidate texts scored within `margin` of
        the best (default: every one) or differing from it in a number (roundtrip_choice), keep the one whose
        vector is closest (cosine) to the given vector (ties: the better search score). The search ranks by the
        decoder's likelihood, which favours frequent phrasings; the encoder tells which candidate says what the
        vector says. Costs one encode per candidate compared."""
        v = self.check_vectors(vectors)
        nbest = self.decode_nbest(v, beam_size, max_length, **kw)
        return [hyps[i].tokens if hyps else [] for hyps, i in zip(nbest, self.roundtrip_choice(v, nbest, margin))]

    def rerank_rivals(self, nbest: list[list[Hypothesis]], margin: float, numbers: bool = True
                      ) -> tuple[list[list[int]], list[list[str]]]:
        """Per row of an n-best: the indices of the hypotheses to compare by re-encoding -- those scored within
        `margin` of the row's best and (numbers=True; False only for studies) those whose numbers differ from the
        best's (invemb.facts.number_keys), the best included; [] when there is nothing to compare -- and their
        normalised texts."""
        from invemb.facts import number_keys
        if self._digit_ids is None:  # pieces holding a digit: a row without them has no number to compare
            self._digit_ids = frozenset(i for p, i in self.tokenizer.get_vocab().items() if any(map(str.isdigit, p)))
        rivals, texts = [], []
        for hyps in nbest:
            r = [i for i, h in enumerate(hyps) if hyps[0].score - h.score <= margin]
            if numbers and len(r) < len(hyps) and any(t in self._digit_ids for h in hyps for t in h.tokens):
                keys = [sorted(number_keys(x)) for x in self.detokenize([h.tokens for h in hyps])]
                r = sorted(set(r) | {i for i in range(len(hyps)) if keys[i] != keys[0]})
            rivals.append(r if len(r) > 1 else [])
            texts.append(self.detokenize([hyps[i].tokens for i in rivals[-1]]) if rivals[-1] else [])
        return rivals, texts

    def roundtrip_choice(self, vectors: np.ndarray, nbest: list[list[Hypothesis]], margin: float = float("inf")
                         ) -> list[int]:
        """Per row, the index of the hypothesis whose re-encoded text is closest (cosine) to the row's vector, among
        its rivals (rerank_rivals: within `margin` of the best or other numbers; the first, i.e. best-scored, of
        equal cosines; an empty text is never chosen over a non-empty one). A row with no rival keeps its best
        unencoded."""
        rivals, texts = self.rerank_rivals(nbest, margin)
        cos = self.candidate_cosines(vectors, texts)
        return [r[int(np.argmax(c))] if r else 0 for r, c in zip(rivals, cos)]  # argmax: the first of ties

    def candidate_cosines(self, vectors: np.ndarray, texts: list[list[str]]) -> list[np.ndarray]:
        """Per row i: the cosines [n_i] between vectors[i] and its candidate texts, all re-encoded in one encode
        call; an empty text (it cannot be encoded as it is) gets -inf, so it is never chosen over another."""
        flat = [t or "[UNK]" for ts in texts for t in ts]
        enc = self.encode(flat) if flat else np.zeros((0, vectors.shape[1]), np.float32)  # [sum n_i, S]
        enc /= np.linalg.norm(enc, axis=1, keepdims=True) + 1e-12
        unit = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)
        out, at = [], 0
        for row, ts in enumerate(texts):
            cos = enc[at:at + len(ts)] @ unit[row]  # [n_i]
            cos[[not t for t in ts]] = -np.inf
            out.append(cos)
            at += len(ts)
        return out

    def default_ids(self, vectors, beam_size: int = 4, max_length: int | None = None, rerank="auto",
                    **kw) -> list[list[int]]:
        """The ids `decode` turns into text: the search, its n-best re-ranked as `rerank` says (rerank_margin)."""
        margin = rerank_margin(rerank)
        if margin > 0 and beam_size > 1 and not self.one_pass:
            return self.rerank_ids(vectors, beam_size, max_length, margin=margin, **kw)
        return self.decode_ids(vectors, beam_size, max_length, **kw)

    def decode(self, vectors, beam_size: int = 4, max_length: int | None = None, batch_size: int = 64,
               progress: bool = False, rerank="auto", normalized: bool = False, **kw) -> list[str]:
        """Vectors [N,S] -> texts, as written (see `texts`; normalized=True: lower-cased WordPiece text).
        beam_size=1 is greedy. rerank (beam_size > 1): "auto" (default) re-encodes the n-best candidates scored
        within RERANK_MARGIN of the best or whose numbers differ from its, and keeps the one closest to the
        vector; True / "all": every candidate; False / "off": the beam's best; a number: that margin
        (rerank_margin, rerank_ids).
        kw: length_penalty, no_repeat_ngram_size."""
        from tqdm.auto import tqdm
        v = self.check_vectors(vectors)
        rerank_margin(rerank)  # a bad value fails before any search
        out: list[str] = []
        for i in tqdm(range(0, len(v), batch_size), disable=not progress, desc="decode", unit="batch"):
            part = v[i:i + batch_size]
            out.extend(self.texts(part, self.default_ids(part, beam_size, max_length, rerank, **kw), normalized))
        return out
