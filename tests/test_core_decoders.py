"""KV-cached step decoding equals the full-sequence forward, for every step and chunking."""
import dataclasses

import pytest
import torch

from invemb.config import preset
from invemb.decoders import build_decoder

V, S, T = 97, 16, 12


def _decoder(kind, **kw):
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("toy").model.decoder, kind=kind, **kw)
    return build_decoder(cfg, V, S, max_length=32).eval()


@pytest.mark.parametrize("kind,slots", [("transformer", 1), ("transformer", 4), ("gru", 4)])
def test_cached_steps_equal_full_forward(kind, slots):
    dec = _decoder(kind, memory_slots=slots)
    vec = torch.randn(3, S)
    ids = torch.randint(0, V, (3, T))
    with torch.no_grad():
        full = dec(vec, ids)  # [3,T,V]
        cache = dec.init_cache(vec)
        for t in range(T):  # one token at a time
            logits, cache = dec.step(ids[:, t:t + 1], cache)
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
        cache = dec.init_cache(vec)  # uneven chunks: 5, 1, 6 tokens
        outs = []
        for a, b in [(0, 5), (5, 6), (6, T)]:
            logits, cache = dec.step(ids[:, a:b], cache)
            outs.append(logits)
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_transformer_cache_shapes_and_causality():
    dec = _decoder("transformer", memory_slots=4)
    vec = torch.randn(2, S)
    cache = dec.init_cache(vec)
    h, dh = dec.cfg.n_heads, dec.cfg.d_model // dec.cfg.n_heads
    assert cache["cross_key_0"].shape == (2, h, 4, dh)
    assert cache["past_key_0"].shape == (2, h, 0, dh)
    _, cache = dec.step(torch.randint(0, V, (2, 3)), cache)
    assert cache["past_value_1"].shape == (2, h, 3, dh)
    ids = torch.randint(0, V, (2, T))
    ids2 = ids.clone()
    ids2[:, -1] = (ids[:, -1] + 1) % V  # changing the last token must not change earlier positions
    with torch.no_grad():
        torch.testing.assert_close(dec(vec, ids)[:, :-1], dec(vec, ids2)[:, :-1])


def test_decoders_depend_on_the_vector():
    for kind in ("transformer", "gru", "onepass"):
        dec = _decoder(kind)
        ids = torch.randint(0, V, (2, T))
        with torch.no_grad():
            a, b = dec(torch.randn(2, S), ids), dec(torch.randn(2, S), ids)
        assert a.shape == (2, T, V)
        assert not torch.allclose(a, b), kind


def test_onepass_length_argument():
    dec = _decoder("onepass")
    with torch.no_grad():
        assert dec(torch.randn(4, S), length=7).shape == (4, 7, V)
