"""ONNX export of the shipped model's design (multi-query pooling, chunk memory, compact output vocabulary) on a
toy backbone: graph parity at untraced shapes, and ORT beam search == torch texts on memorised headlines."""
from __future__ import annotations

from invemb.export import exporter
from invemb.export import validate


def test_compact_multiquery_export_matches_torch(every_lever_toy, headlines32, tmp_path):
    out = tmp_path / "onnx"
    with exporter.quiet_exporter():
        manifest = exporter.export_model(every_lever_toy, out)
    assert manifest["vocab_size"] == len(every_lever_toy.tokenizer)  # the graphs speak tokenizer ids
    rows = validate.graph_parity(every_lever_toy, out, threads=1)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    rows, details = validate.beam_parity(every_lever_toy, out, headlines32[:16], beam_size=4)
    assert all(r.ok for r in rows), rows
    assert details["torch_exact_match"] == 1.0  # memorised: the texts compared are the real headlines
