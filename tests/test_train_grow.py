"""invemb.training.grow: a model's vector grown S -> f x S decodes exactly as before (vectors, logits, beam text),
its f copies get different gradients (so training pulls them apart), its lineage gets one row, bad input is an
error naming it; fact slots added to a model keep its query chunks and put the digit pieces in the new ones."""
import json
import subprocess
import sys

import pytest
import torch

from invemb.config import DecoderConfig, EncoderConfig, ModelConfig, TOY_BACKBONE
from invemb.errors import InvembError
from invemb.model import InvertibleEmbedder
from invemb.paths import checkout_root
from invemb.training.grow import add_fact_slots, grow_model, grow_state

HISTORY = [{"date": "2026-12-07", "run": "runs/toy", "checkpoint": "final", "machine": "toy", "steps": 120,
            "steps_cumulative": 120, "epochs_this_run": 1, "wall_hours": 0.3, "cpu_hours": 0.5,
            "cpu_hours_cumulative": 0.5, "gpu_hours": 0.0, "val_teacher_forced": None}]


def _saved(tmp_path, pooling="multiquery", mode="chunks"):
    cfg = ModelConfig(EncoderConfig(pooling=pooling, pool_queries=4, sentence_dim=64, max_length=32, random_init=True,
                                    freeze_backbone=True, backbone_overrides=dict(TOY_BACKBONE)),
                      DecoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0, memory_slots=4,
                                    memory_mode=mode))
    torch.manual_seed(0)
    model = InvertibleEmbedder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from init: LayerNorm gains and biases that are not 1 / 0 must be tiled too
            p.copy_(p.half().float())  # what float16 storage keeps
    return model.save_pretrained(tmp_path / "src", dtype=torch.float16, extra={"history": HISTORY})


def test_grown_model_decodes_as_the_model_it_grew_from(headlines32, tmp_path):
    src = _saved(tmp_path)
    out = grow_model(src, 3, tmp_path / "grown")
    a, b = InvertibleEmbedder.from_pretrained(src), InvertibleEmbedder.from_pretrained(out)
    assert b.config.encoder.sentence_dim == 192 and b.config.decoder == a.config.decoder
    texts = headlines32[:6]
    va, vb = a.encode(texts), b.encode(texts)  # [6,64], [6,192]
    assert vb.shape == (6, 192)
    copies = torch.as_tensor(vb).view(6, 4, 3, 16)  # chunk q = its 3 copies of the old 16 dims
    for i in range(3):
        torch.testing.assert_close(copies[:, :, i], torch.as_tensor(va).view(6, 4, 16), atol=1e-5, rtol=0)
    ids = a.tokenize(texts)["input_ids"][:, :-1]
    with torch.no_grad():
        la, lb = a.decoder(torch.as_tensor(va), ids), b.decoder(torch.as_tensor(vb), ids)  # [6,T,V]
    assert la.abs().max() > 1.0  # not a trivially flat model
    torch.testing.assert_close(lb, la, atol=2e-2 * float(la.abs().max()), rtol=0)  # the shares rounded to float16
    assert a.decode(va, beam_size=2, max_length=8) == b.decode(vb, beam_size=2, max_length=8)
    hist = json.loads((out / "config.json").read_text())["info"]["history"]
    assert hist[:-1] == HISTORY and hist[-1]["grown"]["factor"] == 3 and hist[-1]["cpu_hours"] == 0.0
    assert hist[-1]["steps_cumulative"] == 120 and hist[-1]["cpu_hours_cumulative"] == 0.5


def test_the_copies_get_different_gradients(headlines32, tmp_path):
    model = InvertibleEmbedder.from_pretrained(grow_model(_saved(tmp_path), 2, tmp_path / "grown"))
    enc = model.tokenize(headlines32[:4])
    v = model.encoder(enc["input_ids"], enc["attention_mask"])  # [4,128]
    model.decoder(v, enc["input_ids"][:, :-1]).logsumexp(-1).mean().backward()
    g = model.encoder.pooler.weight.grad.view(4, -1, 2, 16)  # [Q,H,copy,c]
    assert g[:, :, 0].abs().max() > 0 and not torch.allclose(g[:, :, 0], g[:, :, 1], atol=1e-6)


def test_grow_state_shares_sum_to_the_old_memory():
    state = {"encoder.pooler.weight": torch.randn(2, 5, 3), "encoder.pooler.bias": torch.randn(2, 3),
             "encoder.pooler.norm.weight": torch.randn(3), "encoder.pooler.norm.bias": torch.randn(3),
             "decoder.memory.chunk_weight": torch.randn(2, 3, 4)}
    got = grow_state(state, 4, seed=1)
    assert got["encoder.pooler.weight"].shape == (2, 5, 12) and got["encoder.pooler.norm.bias"].shape == (12,)
    mem = got["decoder.memory.chunk_weight"].view(2, 4, 3, 4)  # [Q,copy,c,d]
    torch.testing.assert_close(mem.sum(1), state["decoder.memory.chunk_weight"])
    assert not torch.allclose(mem[:, 0], mem[:, 1])  # random shares, not 1/f each
    with pytest.raises(InvembError, match="multiquery pooling"):
        grow_state({"decoder.memory.chunk_weight": torch.zeros(1)}, 2)


def test_bad_input_is_an_error_naming_it(tmp_path):
    src = _saved(tmp_path / "mq")
    with pytest.raises(InvembError, match="--factor"):
        grow_model(src, 1, tmp_path / "x")
    with pytest.raises(InvembError, match="new folder"):
        grow_model(src, 2, src)
    with pytest.raises(InvembError, match="attention pooling"):
        grow_model(_saved(tmp_path / "att", pooling="attention", mode="linear"), 2, tmp_path / "y")
    script = checkout_root() / "scripts/grow_model.py"
    p = subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "nowhere"), "--out",
                        str(tmp_path / "z")], capture_output=True, text=True)
    assert p.returncode == 2 and "not a shipped model folder" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_fact_slots_keep_the_query_chunks_and_read_the_digits(headlines32, tmp_path):
    src = _saved(tmp_path)
    out = add_fact_slots(src, 2, True, tmp_path / "slots")
    a, b = InvertibleEmbedder.from_pretrained(src), InvertibleEmbedder.from_pretrained(out)
    e = b.config.encoder
    assert (e.sentence_dim, e.number_slots, e.token_identity, b.config.decoder.memory_slots) == (96, 2, True, 6)
    texts = ["Fed raises rates by 25 basis points", "Fed raises rates by 75 basis points", headlines32[0]]
    va, vb = a.encode(texts), b.encode(texts)  # [3,64], [3,96]
    torch.testing.assert_close(torch.as_tensor(vb[:, :64]), torch.as_tensor(va), atol=1e-5, rtol=0)  # identity: 0
    slots = torch.as_tensor(vb[:, 64:]).view(3, 2, 16)  # [N,K,c]
    assert not torch.allclose(slots[0, 0], slots[1, 0], atol=1e-3)  # "25" / "75": the first slot moves
    torch.testing.assert_close(slots[0, 1], slots[1, 1])  # one number: the second slot is "none" in both
    old = a.state_dict()
    new = b.state_dict()
    torch.testing.assert_close(new["decoder.memory.chunk_weight"][:4], old["decoder.memory.chunk_weight"])
    hist = json.loads((out / "config.json").read_text())["info"]["history"]
    assert hist[:-1] == HISTORY and hist[-1]["grown"]["number_slots"] == 2 and hist[-1]["cpu_hours"] == 0.0
    assert "encoder.pooler.num_proj.weight" in hist[-1]["grown"]["new_tensors"]
    with pytest.raises(InvembError, match="already has"):
        add_fact_slots(out, 2, False, tmp_path / "again")
    with pytest.raises(InvembError, match="number-slots"):
        add_fact_slots(src, 0, False, tmp_path / "none")
    with pytest.raises(InvembError, match="has number_slots"):
        grow_model(out, 2, tmp_path / "grown")
    script = checkout_root() / "scripts/grow_model.py"
    p = subprocess.run([sys.executable, str(script), "--model", str(src), "--number-slots", "-1", "--out",
                        str(tmp_path / "z")], capture_output=True, text=True)
    assert p.returncode == 2 and "--number-slots" in p.stderr and "Traceback" not in p.stderr, p.stderr
