"""n-best decoding and round-trip re-ranking (EmbedderBase.decode_nbest / rerank_ids / decode(rerank=...)): every
candidate (rerank=True), none ("off") and decode's default, the candidates scored within a margin of the best."""
from __future__ import annotations

import numpy as np
import pytest


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_nbest_first_is_the_search_result(toy_model, headlines32):
    vecs = toy_model.encode(headlines32[:8])
    nbest = toy_model.decode_nbest(vecs, beam_size=4)
    assert [len(h) for h in nbest] == [4] * 8  # the beam's finished hypotheses, best first
    assert all(h[i].score >= h[i + 1].score for h in nbest for i in range(3))
    assert [h[0].tokens for h in nbest] == toy_model.decode_ids(vecs, beam_size=4)


@pytest.fixture(scope="module")
def undertrained(headlines32):
    """A toy trained too briefly: its beam often ranks a wrong text first (re-ranking has something to change)."""
    from conftest import train_toy
    return train_toy(headlines32, steps=45)


def test_rerank_picks_the_candidate_closest_to_the_vector(undertrained, headlines32):
    """Every pick is the n-best candidate whose re-encoded vector has the highest cosine to the input vector, and
    re-ranking changes some picks."""
    model = undertrained
    vecs = model.encode(headlines32)
    nbest = model.decode_nbest(vecs, beam_size=4)
    picked = model.rerank_ids(vecs, beam_size=4)
    changed = 0
    for row, (hyps, ids) in enumerate(zip(nbest, picked)):
        texts = model.detokenize([h.tokens for h in hyps])
        cos = _unit(model.encode(texts)) @ _unit(vecs[row])
        assert ids == hyps[int(np.argmax(cos))].tokens
        changed += ids != hyps[0].tokens
    assert changed > 0, "re-ranking never changed the beam's choice: the test exercises nothing"
    assert model.decode(vecs, beam_size=4, rerank=True) == model.detokenize(picked)


def test_rerank_keeps_memorised_headlines(toy_model, headlines32):
    vecs = toy_model.encode(headlines32)
    assert toy_model.decode(vecs, beam_size=4, rerank=True) == toy_model.reference_texts(headlines32)
    with pytest.raises(ValueError):  # a one-pass decoder has no beam
        from conftest import train_toy
        train_toy(headlines32[:2], kind="onepass", steps=1).decode_nbest(vecs[:2])


def test_a_margin_reencodes_only_the_rivals_scored_close_to_the_best(undertrained, headlines32, monkeypatch):
    """rerank=<margin>: a row re-encodes the candidates scored within the margin of its best (or with other numbers
    than the best's) and picks the closest of THOSE; a row with no such rival keeps the beam's best without any
    encode. The margin here is the median gap between the best two, so both kinds of rows occur (asserted)."""
    from invemb.facts import number_keys
    model = undertrained
    vecs = model.encode(headlines32)
    nbest = model.decode_nbest(vecs, beam_size=4)
    margin = float(np.median([h[0].score - h[1].score for h in nbest]))
    encoded: list[str] = []
    real_encode = model.encode
    monkeypatch.setattr(model, "encode", lambda texts, **kw: (encoded.extend(texts), real_encode(texts, **kw))[1])
    picked = model.rerank_ids(vecs, beam_size=4, margin=margin)
    n_rivals, alone, changed = 0, 0, 0
    for row, (hyps, ids) in enumerate(zip(nbest, picked)):
        keys = [sorted(number_keys(t)) for t in model.detokenize([h.tokens for h in hyps])]
        rivals = [h for h, k in zip(hyps, keys) if hyps[0].score - h.score <= margin or k != keys[0]]
        if len(rivals) < 2:
            alone += 1
            assert ids == hyps[0].tokens
            continue
        n_rivals += len(rivals)
        cos = _unit(real_encode(model.detokenize([h.tokens for h in rivals]))) @ _unit(vecs[row])
        assert ids == rivals[int(np.argmax(cos))].tokens
        changed += ids != hyps[0].tokens
    assert len(encoded) == n_rivals and 0 < alone < len(nbest) and changed > 0
    monkeypatch.setattr(model, "encode", real_encode)
    assert model.decode(vecs, beam_size=4, rerank=margin) == model.detokenize(picked)


def test_decode_rerank_modes(undertrained, headlines32, monkeypatch):
    """"off" / False / 0 = the beam's best with no encode; "all" / True / inf = every candidate; the default is
    "auto" = RERANK_MARGIN; greedy never re-ranks; a bad mode is a ValueError naming it, before any search."""
    from invemb.embedder import RERANK_MARGIN, parse_rerank, rerank_margin
    model = undertrained
    vecs = model.encode(headlines32[:16])
    best = model.detokenize(model.decode_ids(vecs, beam_size=4))
    every = model.detokenize(model.rerank_ids(vecs, beam_size=4))
    assert every != best
    calls = []
    real_encode = model.encode
    monkeypatch.setattr(model, "encode", lambda texts, **kw: (calls.append(len(texts)), real_encode(texts, **kw))[1])
    for off in ("off", False, None, 0, 0.0):
        assert model.decode(vecs, beam_size=4, rerank=off, normalized=True) == best
    assert model.decode(vecs, beam_size=1, rerank="all") == model.detokenize(model.decode_ids(vecs, beam_size=1))
    assert calls == []
    for all_ in ("all", True, float("inf")):
        assert model.decode(vecs, beam_size=4, rerank=all_, normalized=True) == every
    assert model.decode(vecs, beam_size=4) == model.decode(vecs, beam_size=4, rerank=RERANK_MARGIN)
    assert rerank_margin("auto") == RERANK_MARGIN > 0 and parse_rerank("0.05") == 0.05 and parse_rerank("all") == "all"
    for bad in (-0.1, float("nan"), "sometimes", [0.1]):
        with pytest.raises(ValueError, match="rerank must be"):
            model.decode(vecs, beam_size=4, rerank=bad)
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="'-1'"):
        parse_rerank("-1")


def test_a_candidate_with_other_numbers_is_compared_however_low_its_score(toy_model, headlines32, monkeypatch):
    """The beam prefers "3 %" by far (outside any margin) but the vector says "5 %": the candidate with other numbers
    is re-encoded and wins; the one that only rephrases (same numbers, low score) is not even encoded."""
    from invemb.generation import Hypothesis
    tok = toy_model.tokenizer

    def hyp(text, score):
        return Hypothesis(tok(text, add_special_tokens=False)["input_ids"], score, score)
    nbest = [[hyp("oil rises 3 % on supply cuts", -0.1), hyp("oil rises 5 % on supply cuts", -3.0),
              hyp("oil rises 3 % on the supply cuts", -3.0)]]
    vector = toy_model.encode(["oil rises 5 % on supply cuts"])
    encoded: list[str] = []
    real_encode = toy_model.encode
    monkeypatch.setattr(toy_model, "encode", lambda texts, **kw: (encoded.extend(texts), real_encode(texts, **kw))[1])
    assert toy_model.roundtrip_choice(vector, nbest, margin=0.5) == [1]
    assert encoded == toy_model.detokenize([nbest[0][0].tokens, nbest[0][1].tokens])  # the third is not encoded
    encoded.clear()
    same = [[nbest[0][0], nbest[0][2]]]  # no number differs, nothing within the margin: no encode, the best kept
    assert toy_model.roundtrip_choice(vector, same, margin=0.5) == [0] and encoded == []


def test_the_margin_sweep_scores_what_decode_returns_at_each_margin(undertrained, headlines32):
    """invemb.fidelity.rerank_sweep (scripts/sweep_rerank.py) encodes every candidate once and lets each arm pick:
    its texts must be decode's at the same setting, and its encodes what rerank_rivals re-encodes."""
    from invemb.fidelity import rerank_sweep, score_ids
    model = undertrained
    vecs = model.encode(headlines32)
    nbest = model.decode_nbest(vecs, beam_size=4)
    margin = float(np.median([h[0].score - h[1].score for h in nbest]))
    rows = {r["arm"]: r for r in rerank_sweep(model, headlines32, (margin,), beam=4)}
    for arm, mode in (("beam only", "off"), (f"margin {margin:g} + numbers", margin), ("every candidate", "all")):
        want = score_ids(model, model.default_ids(vecs, beam_size=4, rerank=mode), headlines32)
        assert rows[arm]["exact_match"] == want["exact_match"] and rows[arm]["bleu"] == want["bleu"], arm
    assert rows["beam only"]["encodes"] == 0 and rows["every candidate"]["encodes"] == 4
    assert rows[f"margin {margin:g} + numbers"]["encodes"] == np.mean(
        [len(r) for r in model.rerank_rivals(nbest, margin)[0]])
    assert rows["every candidate"]["bleu"] != rows["beam only"]["bleu"]  # the arms differ here
