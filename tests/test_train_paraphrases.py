"""scripts/make_paraphrases.py (invemb.training.paraphrases): JSONL records readable by
invemb.losses.load_paraphrases, resumable output.

A tiny random causal LM (MiniLM tokenizer, no chat template) stands in for SmolLM2 / T5 to keep this fast."""
from __future__ import annotations

import json

import pytest
from _train_fixtures import write_headlines

from invemb.training import paraphrases as make_paraphrases


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from invemb.encoder import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    path = tmp_path_factory.mktemp("lm") / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_records_are_appended_and_a_rerun_resumes(tiny_lm, tmp_path):
    from invemb.losses import load_paraphrases
    data = write_headlines(tmp_path / "h.txt", 60)
    out = tmp_path / "para.jsonl"
    args = ["--data", str(data), "--out", str(out), "--model", str(tiny_lm), "--num", "3", "--max-new-tokens", "6",
            "--batch-size", "2"]
    assert make_paraphrases.main(args + ["--limit", "3"]) == 0
    first = out.read_text().splitlines()
    assert len(first) == 3
    assert make_paraphrases.main(args + ["--limit", "5"]) == 0  # only the 2 new headlines are generated
    lines = out.read_text().splitlines()
    assert lines[:3] == first and len(lines) == 5
    recs = [json.loads(x) for x in lines]
    assert len({r["text"] for r in recs}) == 5 and all(isinstance(r["paraphrases"], list) for r in recs)
    assert all(len(r["paraphrases"]) <= 3 and r["text"] not in r["paraphrases"] for r in recs)
    assert set(load_paraphrases(out)) == {r["text"] for r in recs}


def test_clean_strips_prefixes_quotes_and_copies():
    assert make_paraphrases.clean('New headline: "Oil slides as OPEC pumps more"\nmore', "x") == \
        "Oil slides as OPEC pumps more"
    assert make_paraphrases.clean("Oil Falls", "oil falls") == ""


def test_bad_input(tmp_path, capsys):
    bad = tmp_path / "para.jsonl"
    bad.write_text("not json\n")
    data = write_headlines(tmp_path / "h.txt", 20)
    assert make_paraphrases.main(["--data", str(data), "--out", str(bad)]) == 2
    assert "is not a paraphrase record" in capsys.readouterr().err
    assert make_paraphrases.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o.jsonl")]) == 2


def test_clean_drops_echoed_instructions():
    assert make_paraphrases.clean("Reply:", "x") == ""
    assert make_paraphrases.clean("Rewrite this headline with different words:", "x") == ""
