"""Metrics on known pairs."""
import pytest
import torch

from invemb import metrics as M


def test_identical_and_different_strings():
    refs = ["oil prices fall as opec output rises", "stocks rally on trade hopes"]
    assert M.exact_match(refs, refs) == 1.0 and M.bleu(refs, refs) == pytest.approx(100.0)
    assert M.exact_match(["x", refs[1]], refs) == 0.5
    assert M.bleu(["completely unrelated words here", "nothing alike at all"], refs) < 5


def test_positional_token_accuracy():
    assert M.positional_token_accuracy([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert M.positional_token_accuracy([[1, 9, 3, 4]], [[1, 2, 3]]) == pytest.approx(2 / 3)
    assert M.positional_token_accuracy([[2, 3]], [[1, 2, 3]]) == 0.0  # shifted: nothing at the same position
    assert M.positional_token_accuracy([[1]], [[1, 2, 3, 4]]) == 0.25  # missing positions count as wrong


def test_topk_on_known_logits():
    logits = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0]] * 3])  # ranks: token0=1st ... token4=5th
    labels = torch.tensor([[0, 2, -100]])
    acc = M.topk_accuracy(logits, labels, ks=(1, 3, 5))
    assert acc == {"top1": 0.5, "top3": 1.0, "top5": 1.0}
    acc = M.TopKAccumulator(ks=(1, 2))
    acc.update(logits, torch.tensor([[4, 1, 0]]))
    assert acc.result() == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


def test_bertscore_and_paraphrase_cosine_offline():
    refs = ["oil prices fall as opec output rises"]
    same = M.bertscore_f1(refs, refs, "all-MiniLM-L6-v2")
    other = M.bertscore_f1(["the dog sleeps in the garden"], refs, "all-MiniLM-L6-v2")
    assert same == pytest.approx(1.0, abs=1e-4) and other < same - 0.2
    assert M.paraphrase_cosine(refs, refs, "all-MiniLM-L6-v2") == pytest.approx(1.0, abs=1e-5)
    close = M.paraphrase_cosine(["crude prices drop as opec pumps more"], refs, "all-MiniLM-L6-v2")
    far = M.paraphrase_cosine(["the dog sleeps in the garden"], refs, "all-MiniLM-L6-v2")
    assert close > far + 0.3


def test_default_scorer_is_mpnet_layer8():
    refs = ["oil prices fall as opec output rises"]
    assert M.bertscore_f1(refs, refs) == pytest.approx(1.0, abs=1e-4)
    assert M._bert_scorer("all-mpnet-base-v2", None).num_layers == 8
