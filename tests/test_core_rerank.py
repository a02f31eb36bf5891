"""n-best decoding and round-trip re-ranking (EmbedderBase.decode_nbest / rerank_ids / decode(rerank=True))."""
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


def test_rerank_picks_the_candidate_closest_to_the_vector(headlines32):
    """An under-trained toy (its beam often ranks a wrong text first): every pick is the n-best candidate whose
    re-encoded vector has the highest cosine to the input vector, and re-ranking changes some picks."""
    from conftest import train_toy
    model = train_toy(headlines32, steps=45)
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
