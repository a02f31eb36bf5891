"""ONNX export of the shipped model's design (multi-query pooling, chunk memory, compact output vocabulary) on a
toy backbone: graph parity at untraced shapes, and ORT beam search == torch texts on memorised headlines."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `export` is not installed

from export import to_onnx, validate  # noqa: E402

from test_core_invert import _toy  # noqa: E402


@pytest.fixture(scope="module")
def compact_model(headlines32):
    texts = headlines32[:16]
    model, _ = _toy(output_vocab=1, texts=texts)
    batch = model.tokenize(texts)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(**batch, sampled_negatives=256)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_compact_multiquery_export_matches_torch(compact_model, headlines32, tmp_path):
    out = tmp_path / "onnx"
    with to_onnx.quiet_exporter():
        manifest = to_onnx.export_model(compact_model, out)
    assert manifest["vocab_size"] == len(compact_model.tokenizer)  # the graphs speak tokenizer ids
    rows = validate.graph_parity(compact_model, out, threads=1)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    rows, details = validate.beam_parity(compact_model, out, headlines32[:16], beam_size=4)
    assert all(r.ok for r in rows), rows
    assert details["torch_exact_match"] == 1.0  # memorised: the texts compared are the real headlines
