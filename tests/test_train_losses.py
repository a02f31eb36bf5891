"""invemb.losses: straight-through Gumbel similarity gradients, min-over-paraphrases CE, noise, paraphrase files."""
from __future__ import annotations

import json
import math

import pytest
import torch

from invemb.config import preset
from invemb.errors import InvembError
from invemb.losses import (IGNORE, Objective, SentenceSimilarityLoss, add_vector_noise, fact_weighted_ce,
                           load_paraphrases, min_paraphrase_ce, per_example_ce)

TEXTS = ["oil prices fall as opec output rises", "stocks rally after fed holds rates steady"]


@pytest.fixture(scope="module")
def toy():
    from invemb.model import InvertibleEmbedder
    torch.manual_seed(0)
    return InvertibleEmbedder(preset("toy").model)


@pytest.fixture(scope="module")
def sim(toy):
    return SentenceSimilarityLoss(toy.tokenizer, "all-MiniLM-L6-v2", tau=0.5)


def test_similarity_gradient_reaches_decoder_through_gumbel(toy, sim):
    toy.zero_grad(set_to_none=True)
    batch = toy.tokenize(TEXTS)
    out = toy(**batch)
    loss = sim(out["logits"], out["labels"], batch["input_ids"], batch["attention_mask"])  # the similarity term alone
    assert 0.0 <= float(loss.detach()) <= 2.0
    loss.backward()
    dec = dict(toy.decoder.named_parameters())
    with_grad = [n for n, p in dec.items() if p.grad is not None and float(p.grad.abs().sum()) > 0]
    assert len(with_grad) == len(dec), sorted(set(dec) - set(with_grad))
    assert toy.encoder.pooler.proj[0].weight.grad.abs().sum() > 0  # and on into the encoder
    assert all(p.grad is None for p in sim.model.parameters())  # the paraphrase model stays frozen
    toy.zero_grad(set_to_none=True)


def test_similarity_is_low_for_the_exact_reconstruction(toy, sim):
    batch = toy.tokenize(TEXTS)
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE)
    logits = torch.full((*labels.shape, len(toy.tokenizer)), -30.0)
    logits.scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 30.0)  # a peaked decoder that predicts the input
    exact = float(sim(logits, labels, batch["input_ids"], batch["attention_mask"]))
    shuffled = float(sim(logits.flip(0), labels.flip(0), batch["input_ids"], batch["attention_mask"]))
    assert exact < 1e-4 < 0.2 < shuffled


def test_similarity_needs_a_shared_vocab(toy):
    from transformers import AutoTokenizer
    from invemb.encoder import resolve_model_path
    other = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    other.add_tokens(["zzzunseen"])
    with pytest.raises(InvembError, match="different vocabulary"):
        SentenceSimilarityLoss(other, "all-MiniLM-L6-v2")
    with pytest.raises(InvembError, match="id_map must have shape"):
        SentenceSimilarityLoss(other, "all-MiniLM-L6-v2", id_map=torch.arange(5))


def test_min_over_paraphrases_picks_the_minimum():
    v = 5
    labels = torch.tensor([[[1, 2, IGNORE], [3, IGNORE, IGNORE], [4, 4, 4]],
                           [[0, 1, 2], [2, 2, IGNORE], [0, 0, 0]]])  # [B=2,P=3,T=3]
    logits = torch.zeros(2, 3, 3, v)  # uniform: CE log(5) everywhere ...
    logits[0, 1, 0, 3] = 10.0  # ... except example 0 paraphrase 1, predicted almost perfectly
    logits[1, 2, :, 0] = 4.0  # example 1 paraphrase 2: better than uniform, but it is masked out below
    logits[1, 0, :, 1] = 2.0  # example 1 paraphrase 0: worse than uniform (mass on the wrong token)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    ce = per_example_ce(logits, labels)  # [2,3]
    got = min_paraphrase_ce(logits, labels, valid)
    assert torch.allclose(got[0], ce[0, 1]) and float(got[0]) < 1e-3
    assert torch.allclose(got[1], ce[1, 1]) and math.isclose(float(got[1]), math.log(v), rel_tol=1e-5)
    assert float(ce[1, 2]) < float(got[1])  # the invalid (masked) paraphrase would have been lower
    none = min_paraphrase_ce(logits, labels, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(2))


def test_noise_scale_follows_rms():
    torch.manual_seed(0)
    v = torch.randn(64, 512) * torch.linspace(0.5, 4.0, 64).unsqueeze(1)  # rows of different scale
    noisy = add_vector_noise(v, 0.1)
    ratio = (noisy - v).std(dim=1) / v.pow(2).mean(1).sqrt()
    assert torch.allclose(ratio, torch.full_like(ratio, 0.1), atol=0.02)
    assert torch.equal(add_vector_noise(v, 0.0), v)


def test_objective_adds_paraphrase_and_noise_terms(toy, tmp_path):
    f = tmp_path / "para.jsonl"
    f.write_text(json.dumps({"text": TEXTS[0], "paraphrases": ["crude slides as opec pumps more", TEXTS[0]]}) + "\n")
    table = load_paraphrases(f)
    assert table == {TEXTS[0]: ["crude slides as opec pumps more"]}  # the identical paraphrase is dropped
    batch = toy.tokenize(TEXTS)
    para = toy.tokenize(["crude slides as opec pumps more", "x"])
    obj = Objective(toy, noise_sigma=0.05).train()
    out = obj(**batch, para_ids=para["input_ids"].unsqueeze(1), para_mask=para["attention_mask"].unsqueeze(1),
              para_valid=torch.tensor([[True], [False]]))
    assert float(out["para"]) > 0 and torch.isclose(out["loss"], out["ce"] + out["para"])
    obj.eval()
    a, b = obj(**batch)["loss"], obj(**batch)["loss"]
    assert torch.equal(a, b)  # no noise at evaluation


def test_paraphrase_file_errors(tmp_path):
    with pytest.raises(InvembError, match="does not exist"):
        load_paraphrases(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(InvembError, match="bad.jsonl:1"):
        load_paraphrases(bad)


def test_word_dropout_masks_decoder_inputs_in_training_only(toy, monkeypatch):
    seen = []
    real = toy.decoder.forward
    monkeypatch.setattr(toy.decoder, "forward", lambda v, ids: seen.append(ids.clone()) or real(v, ids))
    batch = toy.tokenize(TEXTS * 8)  # 16 rows
    obj = Objective(toy, word_dropout=0.5).train()
    torch.manual_seed(0)
    obj(**batch)
    dec_in, real_in = seen[-1], batch["input_ids"][:, :-1]
    masked = dec_in == toy.tokenizer.mask_token_id
    assert torch.equal(dec_in[:, 0], real_in[:, 0])  # [CLS] is never dropped
    assert 0.3 < masked[:, 1:].float().mean() < 0.7  # about half of the others
    assert torch.equal(dec_in[~masked], real_in[~masked])  # the rest unchanged
    obj.eval()
    obj(**batch)
    assert torch.equal(seen[-1], real_in)  # evaluation sees the real inputs
    with pytest.raises(InvembError, match="word_dropout"):
        from invemb.config import TrainConfig
        TrainConfig.from_dict({"preset": "toy", "word_dropout": 1.0})


def test_cpu_bf16_engine_autocasts_only_where_the_cpu_has_bf16(monkeypatch):
    """cpu_bf16: the plain engine runs the step under bf16 autocast when the CPU multiplies bf16 natively (the
    flags say so), never on other CPUs (emulated bf16 is slower than fp32); the weights stay fp32 and the step
    still learns."""
    import dataclasses

    from invemb.model import InvertibleEmbedder
    from invemb.training import engine as eng_mod
    cfg = dataclasses.replace(preset("toy"), cpu_bf16=True, lr=3e-3)
    for native in (False, True):
        monkeypatch.setattr(eng_mod, "cpu_bf16_available", lambda: native)
        torch.manual_seed(0)
        model = InvertibleEmbedder(cfg.model)
        eng = eng_mod.PlainEngine(Objective(model).train(), cfg)
        assert eng.bf16 is native
        batch = model.tokenize(TEXTS)
        with torch.no_grad():
            first = float(eng.forward(**batch)["loss"])
        for _ in range(30):
            out = eng.train_micro_batch(**batch)
        assert out["loss"].item() < first * 0.8, (native, first, out["loss"].item())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg_off = dataclasses.replace(cfg, cpu_bf16=False)
    assert eng_mod.PlainEngine(Objective(InvertibleEmbedder(cfg.model)).train(), cfg_off).bf16 is False


def test_gpu_bf16_is_the_recipes_choice_where_the_gpu_has_bf16(monkeypatch):
    """autocast_bf16: on a GPU, bf16 autocast follows gpu_bf16 (default on) where the GPU has bf16, never where it
    lacks it; the CPU rule (cpu_bf16 AND native bf16) is separate from it."""
    import dataclasses

    from invemb.training import engine as eng_mod
    cfg = preset("toy")
    assert cfg.gpu_bf16 is True
    for gpu_has, cpu_has in ((True, False), (False, True)):
        monkeypatch.setattr(eng_mod, "bf16_available", lambda: gpu_has)
        monkeypatch.setattr(eng_mod, "cpu_bf16_available", lambda: cpu_has)
        assert eng_mod.autocast_bf16(cfg, "cuda") is gpu_has
        assert eng_mod.autocast_bf16(dataclasses.replace(cfg, gpu_bf16=False), "cuda") is False
        assert eng_mod.autocast_bf16(cfg, "cpu") is False  # cpu_bf16 is off in the preset
        assert eng_mod.autocast_bf16(dataclasses.replace(cfg, cpu_bf16=True), "cpu") is cpu_has


def test_separation_hinge_is_zero_beyond_the_margin_and_pushes_pairs_apart():
    from invemb.losses import separation_loss
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 1.0, 3.0], [2.0, 0.0, 0.0, 0.2]])  # relative distances 1.0 and 0.1
    assert float(separation_loss(a, b, 0.5)) == pytest.approx((0.0 + 0.4) / 2)
    assert float(separation_loss(a[:0], b[:0], 0.5)) == 0.0
    same = a.clone().requires_grad_(True)
    separation_loss(same, a.clone(), 0.5).backward()
    assert torch.isfinite(same.grad).all()  # identical vectors: a finite gradient, not NaN
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    y = (x + 0.01 * torch.randn(4, 8)).requires_grad_(True)
    opt = torch.optim.SGD([y], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        loss = separation_loss(x, y, 0.5)
        loss.backward()
        opt.step()
    assert float(separation_loss(x, y.detach(), 0.5)) < 1e-3 < 0.4 < float(separation_loss(x, x + 0.01, 0.5))


def test_objective_adds_the_separation_term_in_training_only(toy):
    batch = toy.tokenize(["tesla up 5.5% after deal", "stocks rally after fed holds rates steady"])
    pair = toy.tokenize(["tesla up 7.1% after deal"])
    pairs = dict(pair_of=torch.tensor([0]), pair_ids=pair["input_ids"], pair_mask=pair["attention_mask"])
    obj = Objective(toy, separation_weight=2.0, separation_margin=5.0).train()  # a margin no pair reaches
    out = obj(**batch, **pairs)
    assert 0 < float(out["sep"]) <= 5.0 and out["pairs"] == 1
    assert torch.isclose(out["loss"], out["ce"] + out["surface"] + 2.0 * out["sep"])
    assert float(Objective(toy, separation_weight=2.0).eval()(**batch, **pairs)["sep"]) == 0.0
    assert float(Objective(toy).train()(**batch, **pairs)["sep"]) == 0.0  # weight 0: off


def test_fact_weighted_ce_is_a_weighted_mean_of_the_piece_losses():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 5), torch.tensor([[1, 2, IGNORE], [4, 0, 3]])
    fact = torch.tensor([[0, 1, 1], [0, 0, 1]])  # a fact tag on an ignored position counts for nothing
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                           reduction="none").view(2, 3)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    assert all(torch.isclose(x, plain) for x in fact_weighted_ce(logits, labels, None, 3.0))  # no tags: plain
    want = (ce[0, 0] + 3 * ce[0, 1] + ce[1, 0] + ce[1, 1] + 3 * ce[1, 2]) / 9
    weighted, also_plain = fact_weighted_ce(logits, labels, fact, 3.0)
    assert torch.isclose(weighted, want) and torch.isclose(also_plain, plain)
    assert torch.isclose(fact_weighted_ce(logits, labels, fact, 1.0)[0], plain)  # weight 1: the plain mean


def test_objective_weighs_the_pieces_of_facts_in_training_only(toy):
    texts = ["Tesla up 5.5% after Lagos deal", "stocks rally after Fed holds rates steady"]
    t = toy.decoder_targets(texts)
    batch = {**toy.tokenize(texts), "target_ids": torch.from_numpy(t["ids"]).long(),
             "target_mask": torch.from_numpy(t["mask"]).long(), "fact_tags": torch.from_numpy(t["fact"]).long()}
    assert int(batch["fact_tags"].sum()) >= 3  # 5.5 / Lagos / Fed: tagged by the targets
    obj = Objective(toy, fact_weight=4.0).train()
    out = obj(**batch)
    weighted, plain = fact_weighted_ce(out["logits"], out["labels"], batch["fact_tags"][:, 1:], 4.0)
    assert torch.isclose(out["ce"], plain)  # the logged ce: the plain mean
    extra = weighted - plain
    assert abs(float(extra.detach())) > 1e-4  # the weighting changes the loss ...
    assert torch.isclose(out["loss"], out["ce"] + out["surface"] + extra, atol=1e-5)  # ... by exactly that
    ev = Objective(toy, fact_weight=4.0).eval()(**batch)  # evaluation: the plain mean, comparable across recipes
    assert torch.isclose(ev["loss"], ev["ce"] + ev["surface"])
