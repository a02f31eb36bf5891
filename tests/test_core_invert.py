"""The levers of the shipped model: feature cache == live backbone, multi-query pooling against hand-computed
values, the compact output vocabulary (mapping, unseen pieces, full-vocabulary step logits), the sampled softmax,
float16 save/load without the backbone, and a toy model with all of them that still memorises headlines."""
import dataclasses

import numpy as np
import pytest
import torch

from invemb.config import DecoderConfig, EncoderConfig, ModelConfig, preset
from invemb.decoders import TransformerDecoder
from invemb.encoder import MultiQueryPooling, load_tokenizer
from invemb.model import InvertibleEmbedder
from invemb.vocab import compact_vocab_ids, single_char_ids, spell_ids


def _toy(pooling="multiquery", output_vocab=0, texts=None, slots=4, number_slots=0, token_identity=False):
    cfg = preset("toy").model
    chunk = cfg.encoder.sentence_dim // slots
    cfg.encoder = dataclasses.replace(cfg.encoder, pooling=pooling, pool_queries=slots, freeze_backbone=True,
                                      number_slots=number_slots, token_identity=token_identity,
                                      sentence_dim=chunk * (slots + number_slots))
    cfg.decoder = dataclasses.replace(cfg.decoder, memory_slots=slots + number_slots, memory_mode="chunks")
    tok = load_tokenizer(cfg.encoder.model_name)
    ids = None
    if output_vocab:
        ids = compact_vocab_ids(tok, tok(texts)["input_ids"])
        cfg.decoder = dataclasses.replace(cfg.decoder, output_vocab=len(ids))
    torch.manual_seed(0)
    model = InvertibleEmbedder(cfg, tok)
    if ids is not None:
        model.decoder.set_vocab(ids, tok.unk_token_id)
    return model, ids


# ------------------------------------------------------------------------------------------------ feature cache
def test_feature_cache_equals_live_encoder(headlines32, tmp_path):
    from invemb.training.features import FeatureCache
    model, _ = _toy()
    texts = headlines32[:20]
    cache = FeatureCache.open_or_build(tmp_path, model.encoder, model.tokenizer, texts, "toy", 32, batch_size=7)
    again = FeatureCache.open_or_build(tmp_path, model.encoder, model.tokenizer, texts, "toy", 32)
    assert again.folder == cache.folder and len(cache) == 20
    enc = model.tokenize(texts)
    with torch.no_grad():
        live = model.encoder.token_states(enc["input_ids"], enc["attention_mask"])  # [20,T,H]
        rows = [3, 0, 19, 7]
        t = int(enc["attention_mask"][rows].sum(1).max())
        cached = cache.states(rows, t)
        mask = enc["attention_mask"][rows, :t].bool()
        diff = (cached - live[rows, :t])[mask].abs()
        assert float(diff.max()) < 2e-2 * float(live.abs().max())  # float16 storage
        assert float(cached[~mask].abs().max()) == 0.0  # padding is zero
        v_live = model.encoder(enc["input_ids"][rows, :t], enc["attention_mask"][rows, :t])
        v_cached = model.encoder(enc["input_ids"][rows, :t], enc["attention_mask"][rows, :t], cached)
        cos = torch.nn.functional.cosine_similarity(v_live, v_cached, dim=-1)
        assert float(cos.min()) > 0.999
    # another text list (or max_length) never reads this cache
    other = FeatureCache.open_or_build(tmp_path, model.encoder, model.tokenizer, texts[:19], "toy", 32)
    assert other.folder != cache.folder


# ------------------------------------------------------------------------------------------------ pooling
def test_multiquery_pooling_hand_computed_with_mask():
    pool = MultiQueryPooling(hidden=3, sentence_dim=4, queries=2)  # 2 chunks of 2
    with torch.no_grad():
        pool.score.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        pool.score.bias.zero_()
        pool.weight.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]],
                                        [[0.0, 0.0], [1.0, 0.0], [0.0, -1.0]]]))
        pool.bias.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    h = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [9.0, 9.0, 9.0]]])  # token 3 is padding
    mask = torch.tensor([[1, 1, 0]])
    out = pool(h, mask)[0].detach().numpy()
    hn = h[0, :2].numpy()
    expected = []
    for q, (wq, bq) in enumerate([(pool.weight[0].detach().numpy(), [0.5, 0.0]),
                                  (pool.weight[1].detach().numpy(), [0.0, 0.0])]):
        s = hn[:, 0] if q == 0 else hn[:, 2]
        w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        z = (w[:, None] * hn).sum(0) @ wq + np.array(bq)
        g = 0.5 * z * (1 + np.vectorize(__import__("math").erf)(z / np.sqrt(2)))
        expected.append((g - g.mean()) / np.sqrt(g.var() + 1e-5))
    np.testing.assert_allclose(out, np.concatenate(expected), atol=1e-5)
    # the padded token does not matter
    h2 = h.clone()
    h2[0, 2] = -50.0
    np.testing.assert_allclose(pool(h2, mask)[0].detach().numpy(), out, atol=1e-6)


def test_multiquery_needs_divisible_width():
    from invemb import InvembError
    with pytest.raises(InvembError, match="multiple of pool_queries"):
        MultiQueryPooling(8, 10, 3)
    with pytest.raises(InvembError, match="pool_queries \\+ number_slots"):
        MultiQueryPooling(8, 64, 4, number_slots=2)  # 64 is not a multiple of 6 chunks
    with pytest.raises(InvembError, match="vocabulary"):
        MultiQueryPooling(8, 48, 4, number_slots=2)  # which pieces hold a digit?
    enc = dict(pooling="multiquery", pool_queries=4, sentence_dim=96, number_slots=2)
    with pytest.raises(InvembError, match=r"memory_slots \(4\) must be pool_queries \+ number_slots"):
        ModelConfig(EncoderConfig(**enc), DecoderConfig(memory_slots=4, memory_mode="chunks")).validate()
    with pytest.raises(InvembError, match="need encoder.pooling multiquery"):
        ModelConfig(EncoderConfig(pooling="attention", token_identity=True), DecoderConfig()).validate()
    ModelConfig(EncoderConfig(**enc), DecoderConfig(memory_slots=6, memory_mode="chunks")).validate()


# ------------------------------------------------------------------------------------------------ compact vocab
def test_compact_vocab_maps_every_training_id_and_back(headlines32):
    tok = load_tokenizer("all-MiniLM-L6-v2")
    rows = tok(headlines32)["input_ids"]
    ids = compact_vocab_ids(tok, rows)
    assert set(single_char_ids(tok)) <= set(ids.tolist()) and np.all(np.diff(ids) > 0)
    dec = TransformerDecoder(DecoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, output_vocab=len(ids)),
                             len(tok), 8, 32)
    dec.set_vocab(ids, tok.unk_token_id)
    train_ids = torch.tensor(sorted({i for r in rows for i in r}))
    assert torch.equal(dec.vocab_ids[dec.targets(train_ids)], train_ids)  # every training id maps and back
    unseen = torch.tensor([i for i in range(len(tok)) if i not in set(ids.tolist())][:50])
    assert torch.all(dec.targets(unseen) == int(dec.vocab_map[tok.unk_token_id]))  # -> [UNK]
    assert torch.equal(dec.targets(torch.tensor([-100, 5])), torch.stack([torch.tensor(-100), dec.vocab_map[5]]))
    # step logits cover the full vocabulary: compact logits at their ids, NEG_LOGIT elsewhere
    vec = torch.randn(2, 8)
    inp = torch.tensor([[tok.cls_token_id, int(train_ids[5])], [tok.cls_token_id, int(train_ids[9])]])
    dec.eval()
    with torch.no_grad():
        full = dec.step(inp, dec.init_cache(vec))[0]  # [2,2,V]
        compact = dec(vec, inp)  # [2,2,Vc]
    assert full.shape[-1] == len(tok) and compact.shape[-1] == len(ids)
    torch.testing.assert_close(full[..., ids], compact)
    assert float(full[..., unseen].max()) == TransformerDecoder.NEG_LOGIT


def test_an_unseen_piece_still_decodes_by_spelling():
    tok = load_tokenizer("all-MiniLM-L6-v2")
    known = set(compact_vocab_ids(tok, tok(["oil prices fall"])["input_ids"]).tolist())
    text = "zyxwv quorkles rally"
    ids = tok(text)["input_ids"]
    assert any(i not in known for i in ids)
    spelled = spell_ids(tok, ids, known)
    assert all(i in known for i in spelled) and len(spelled) > len(ids)
    assert tok.decode(spelled, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def test_sampled_softmax_candidates_hold_every_target(headlines32):
    model, ids = _toy(output_vocab=1, texts=headlines32)
    batch = model.tokenize(headlines32[:8])
    model.train()
    torch.manual_seed(1)
    out = model(**batch, sampled_negatives=64)
    full = model(**batch)  # same dropout seed is not needed: compare labels only
    valid = full["labels"] >= 0
    assert out["logits"].shape[-1] < full["logits"].shape[-1]
    assert torch.equal(out["labels"] < 0, ~valid)
    # the logit at a label's position is the target piece's logit (states . W[target]); all candidates distinct
    dec = model.decoder
    model.eval()  # no dropout
    with torch.no_grad():
        vec = model.encoder(batch["input_ids"], batch["attention_mask"])
        dec_in = batch["input_ids"][:, :-1]
        logits, pos = dec.sampled_logits(vec, dec_in, full["labels"], 64)
        states = dec.step(dec_in, dec.init_cache(vec), full_vocab=None)[0]  # [B,T,d]
        want = (states * dec.head.weight[full["labels"].clamp(min=0)]).sum(-1)  # [B,T]
        got = logits.gather(-1, pos.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    assert int(pos[valid].max()) < logits.shape[-1]
    model.eval()
    assert model(**batch, sampled_negatives=64)["logits"].shape[-1] == len(ids)  # evaluation: full softmax


def train_every_lever(texts, steps: int = 150):
    """A toy with multi-query pooling (+ 2 number slots, token identity) + chunk memory + compact vocabulary, trained
    with the sampled softmax."""
    model, _ = _toy(output_vocab=1, texts=texts, number_slots=2, token_identity=True)
    batch = model.tokenize(texts)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, sampled_negatives=256)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_toy_with_every_lever_memorises(every_lever_toy, headlines32):
    """multi-query pooling + fact slots + chunk memory + compact vocabulary + sampled softmax: still memorises 16
    headlines."""
    model, texts = every_lever_toy, headlines32[:16]
    assert model.config.encoder.number_slots == 2 and any(any(c.isdigit() for c in t) for t in texts)
    assert model.decode(model.encode(texts), beam_size=2) == model.reference_texts(texts)


# ------------------------------------------------------------------------------------------------ save / load
def test_float16_save_without_backbone_roundtrips(headlines32, tmp_path):
    """The shipped format: pooling + decoder in float16, the pretrained MiniLM loaded from its pip package."""
    cfg = ModelConfig(EncoderConfig(pooling="multiquery", pool_queries=4, sentence_dim=64, freeze_backbone=True,
                                    max_length=40),
                      DecoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, memory_slots=4,
                                    memory_mode="chunks"))
    torch.manual_seed(0)
    model = InvertibleEmbedder(cfg).eval()
    with torch.no_grad():  # what float16 storage keeps
        for name, p in model.named_parameters():
            if not name.startswith("encoder.backbone."):
                p.copy_(p.half().float())
    path = model.save_pretrained(tmp_path / "m", backbone=False, dtype=torch.float16, extra={"note": "x"})
    size = (path / "model.safetensors").stat().st_size
    assert size < 4_000_000  # the 30,522 x 32 embedding in float16, no 90 MB backbone
    loaded = InvertibleEmbedder.from_pretrained(path)
    v0, v1 = model.encode(headlines32[:4]), loaded.encode(headlines32[:4])
    np.testing.assert_allclose(v0, v1, atol=1e-5)
    assert model.decode(v0, beam_size=2, max_length=6) == loaded.decode(v1, beam_size=2, max_length=6)


def test_concat_cache_reads_each_group_at_its_rows_and_builds_only_new_groups(headlines32, tmp_path):
    from invemb.training.features import ConcatCache, FeatureCache
    model, _ = _toy()
    a, b = headlines32[:9], headlines32[9:14]
    whole = FeatureCache.open_or_build(tmp_path / "one", model.encoder, model.tokenizer, a + b, "toy", 32)
    first = ConcatCache.open_or_build(tmp_path, model.encoder, model.tokenizer, [a], "toy", 32)
    cat = ConcatCache.open_or_build(tmp_path, model.encoder, model.tokenizer, [a, [], b], "toy", 32)
    assert cat.parts[0].folder == first.parts[0].folder and len(cat.parts) == 2  # group a reused, [] skipped
    assert len(cat) == 14 and cat.lengths().tolist() == whole.lengths().tolist()
    rows = [12, 0, 9, 8, 13, 3]  # across both groups, unsorted
    t = int(whole.lengths()[rows].max())
    assert torch.equal(cat.states(rows, t), whole.states(rows, t))
