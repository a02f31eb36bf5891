"""KV-cached step decoding equals the full-sequence forward, for every step and chunking: full vocabulary with
linear memory, and the shipped design (multi-query pooling, chunk memory, compact output vocabulary)."""
import dataclasses

import numpy as np
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


def test_cached_steps_equal_full_forward_in_the_shipped_design(headlines32):
    """The shipped design (multi-query pooling -> the vector's chunks as memory slots, compact output vocabulary):
    cached steps, one token at a time and in uneven chunks, equal the teacher-forced pass over the compact
    vocabulary; the full-vocabulary rows the search reads (TorchStepper) hold those logits at the compact pieces
    and NEG_LOGIT elsewhere, for inputs that include pieces outside the compact vocabulary."""
    from invemb.encoder import load_tokenizer
    from invemb.model import InvertibleEmbedder
    from invemb.vocab import compact_vocab_ids
    cfg = preset("toy").model
    cfg.encoder = dataclasses.replace(cfg.encoder, pooling="multiquery", pool_queries=4, freeze_backbone=True)
    tok = load_tokenizer(cfg.encoder.model_name)
    vocab = compact_vocab_ids(tok, tok(headlines32[:16])["input_ids"])
    cfg.decoder = dataclasses.replace(cfg.decoder, memory_slots=4, memory_mode="chunks", output_vocab=len(vocab))
    torch.manual_seed(0)
    model = InvertibleEmbedder(cfg, tok).eval()
    dec = model.decoder
    dec.set_vocab(vocab, tok.unk_token_id)
    texts = headlines32[16:22]  # other headlines: some of their pieces are outside the compact vocabulary
    ids = model.tokenize(texts)["input_ids"]  # [N,T] tokenizer ids, [CLS] first
    n, t_len = ids.shape
    assert bool((dec.vocab_ids[dec.vocab_map[ids]] != ids).any())  # inputs outside the compact vocabulary
    vectors = model.encode(texts)  # [N,S] numpy, through the multi-query pooling
    vec = torch.as_tensor(vectors)
    outside = torch.ones(dec.vocab_size, dtype=torch.bool)
    outside[dec.vocab_ids] = False  # [V] pieces the decoder cannot write
    with torch.no_grad():
        full = dec(vec, ids)  # [N,T,Vc] compact logits
        assert full.shape == (n, t_len, len(vocab))
        compact, wide = dec.init_cache(vec), dec.init_cache(vec)
        for t in range(t_len):
            logits, compact = dec.step(ids[:, t:t + 1], compact, full_vocab=False)  # [N,1,Vc]
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
            rows, wide = dec.step(ids[:, t:t + 1], wide)  # [N,1,V]
            torch.testing.assert_close(rows[:, 0, dec.vocab_ids], full[:, t], atol=1e-5, rtol=1e-5)
            assert bool((rows[:, 0, outside] == dec.NEG_LOGIT).all())
        cache, outs = dec.init_cache(vec), []  # uneven chunks: 5, 1, the rest
        for a, b in [(0, 5), (5, 6), (6, t_len)]:
            logits, cache = dec.step(ids[:, a:b], cache, full_vocab=False)
            outs.append(logits)
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
        # the search's rows: TorchStepper's log-probs over all V pieces, from the same cache path
        ref = torch.log_softmax(dec.to_full_vocab(full), -1).numpy()  # [N,T,V]
    stepper = model._stepper(vectors)
    lp, cache = stepper.start(1)  # consumes [CLS]
    for t in range(1, t_len):
        np.testing.assert_allclose(lp[:, dec.vocab_ids.numpy()], ref[:, t - 1, dec.vocab_ids.numpy()], atol=1e-4)
        assert (lp[:, outside.numpy()] < -1e8).all()
        lp, cache = stepper.step(ids[:, t].numpy(), cache)
