"""The one-call beam search graph (ONNX Runtime's BeamSearch op over our decoder graphs): it loads, decodes a
model that memorised its headlines to exactly the core search's texts, and its measured differences to the core
search (length normalisation, batch composition) are what invemb/export/beam_graph.py documents."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from invemb.errors import InvembError
from invemb.export import exporter
from invemb.export.beam_graph import OneCallDecoder, build_one_call_graph


@pytest.fixture(scope="module")
def one_call_dir(toy_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onecall") / "toy"
    with exporter.quiet_exporter():
        exporter.export_checkpoint(toy_checkpoint, out)
    build_one_call_graph(out)
    return out


def test_one_call_graph_reconstructs_like_the_core_search(one_call_dir, toy_model, headlines32):
    dec = OneCallDecoder(one_call_dir, threads=1)
    vec = toy_model.encode(headlines32[:12])
    for beam in (1, 4):
        ids, scores = dec.decode_ids(vec, beam_size=beam)
        assert len(ids) == 12 and scores.shape == (12,) and np.isfinite(scores).all()
        texts = toy_model.detokenize(ids)
        # the toy model memorised these headlines: both searches must give them back
        assert texts == toy_model.decode(vec, beam_size=beam)
        assert sum(t == r for t, r in zip(texts, toy_model.reference_texts(headlines32[:12]))) >= 10


def test_one_call_graph_batch_composition(one_call_dir, toy_model, headlines32):
    """Each item decoded alone gives the texts it gets inside a batch (measured here for a model that ends its
    hypotheses with EOS; the issue suspected ORT's beam scorer of mixing items)."""
    dec = OneCallDecoder(one_call_dir, threads=1)
    vec = toy_model.encode(headlines32[:8])
    together = dec.decode_ids(vec, beam_size=4)[0]
    alone = [dec.decode_ids(vec[i:i + 1], beam_size=4)[0][0] for i in range(8)]
    assert together == alone


def test_one_call_graph_rejects_gru_and_missing(tmp_path, one_call_dir):
    bare = tmp_path / "bare"
    shutil.copytree(one_call_dir, bare)
    import json
    m = json.loads((bare / "manifest.json").read_text())
    del m["one_call"]
    (bare / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InvembError, match="no one-call beam search graph"):
        OneCallDecoder(bare)
    m["decoder_kind"] = "gru"
    (bare / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InvembError, match="needs a transformer decoder"):
        build_one_call_graph(bare)
