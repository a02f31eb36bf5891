"""Text as written through the ONNX export: a toy model WITH surface heads (random weights: parity is the point)
exports decoder_surface + surface.json; ORT tags == torch tags, ORT texts == torch texts (written and normalised);
the int8 / fp16 variants and the one-call graph's decoder keep the written form."""
from __future__ import annotations

import json

import numpy as np
import pytest

from invemb.export import exporter
from invemb.export import validate
from invemb.surface import FIRST, TABLE, UPPER

TABLE_FORMS = {"oil": "OiL", "prices": "PRICES", "u": "U"}  # a small surface table (piece -> written form)


def surface_toy(seed: int = 2, hidden: int = 0, pieces: bool = False, after: bool = False):
    """A random toy with surface heads whose tags vary (heads re-drawn larger than their N(0, 0.02) init); hidden /
    pieces / after: heads with a hidden layer that also read the piece embeddings (decoder.surface_hidden /
    surface_pieces / surface_next)."""
    import dataclasses

    import torch

    from invemb.config import preset
    from invemb.model import InvertibleEmbedder
    torch.manual_seed(seed)
    cfg = preset("toy").model
    cfg.decoder = dataclasses.replace(cfg.decoder, surface_heads=True, surface_hidden=hidden, surface_pieces=pieces,
                                      surface_next=after)
    model = InvertibleEmbedder(cfg)
    with torch.no_grad():
        for head in (model.decoder.case_head, model.decoder.space_head):
            for layer in (m for m in head.modules() if isinstance(m, torch.nn.Linear)):
                layer.weight.normal_(0, 0.5), layer.bias.normal_(0, 0.5)
    model.surface_table = dict(TABLE_FORMS)
    return model.eval()


@pytest.fixture(scope="module")
def surface_model():
    return surface_toy()


@pytest.fixture(scope="module")
def surface_export(surface_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("surface") / "onnx"
    with exporter.quiet_exporter():
        exporter.export_model(surface_model, out)
    return out


@pytest.fixture(scope="module")
def vectors(surface_model):
    return np.random.default_rng(0).standard_normal((6, surface_model.sentence_dim)).astype(np.float32)


def test_export_writes_the_surface_graph_and_table(surface_export, surface_model):
    m = json.loads((surface_export / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["surface"] == {"graph": "decoder_surface", "table": "surface.json"}
    assert set(m["graphs"]) == {"encoder", "decoder_init", "decoder_step", "decoder_surface"}
    g = m["graphs"]["decoder_surface"]
    assert [(t["name"], t["shape"]) for t in g["inputs"]] == [
        ("sentence_embedding", ["batch", surface_model.sentence_dim]), ("input_ids", ["batch", "sequence"])]
    assert [(t["name"], t["shape"]) for t in g["outputs"]] == [
        ("case_logits", ["batch", "sequence", 4]), ("space_logits", ["batch", "sequence", 2])]
    assert json.loads((surface_export / "surface.json").read_text(encoding="utf-8"))["table"] == TABLE_FORMS


def test_surface_graph_parity_at_untraced_shapes(surface_model, surface_export):
    rows = [r for r in validate.graph_parity(surface_model, surface_export, threads=1) if r.check == "decoder_surface"]
    assert {r.case for r in rows} >= {"batch=1 sequence=1", "batch=7 sequence=32"}, [r.case for r in rows]
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


def test_ort_tags_and_written_texts_equal_torch(surface_model, surface_export, vectors):
    from invemb.ort import OnnxEmbedder
    emb = OnnxEmbedder(surface_export, threads=1)
    assert emb.writes_surface and emb.surface_table == TABLE_FORMS
    ids = surface_model.decode_ids(vectors, beam_size=3, max_length=12)
    assert emb.decode_ids(vectors, beam_size=3, max_length=12) == ids
    ids[1] = ids[1][:3]  # ragged rows: the padding after a short row changes none of its tags
    case_t, space_t = surface_model._surface_tags(vectors, ids)
    case_o, space_o = emb._surface_tags(vectors, ids)
    for i, row in enumerate(ids):
        n = len(row)
        assert case_o[i, :n].tolist() == case_t[i, :n].tolist() and space_o[i, :n].tolist() == space_t[i, :n].tolist()
    used = {int(c) for i, row in enumerate(ids) for c in case_o[i, :len(row)]}
    assert len(used) > 1 and {FIRST, UPPER, TABLE} & used  # the tags vary: the test can fail
    written = emb.decode(vectors, beam_size=3, max_length=12, rerank="off")  # the search's ids, both forms
    assert written == surface_model.decode(vectors, beam_size=3, max_length=12, rerank="off")
    normalized = emb.decode(vectors, beam_size=3, max_length=12, normalized=True, rerank="off")
    assert normalized == surface_model.detokenize(surface_model.decode_ids(vectors, beam_size=3, max_length=12))
    assert written != normalized and [w.lower() for w in written] != written  # cased text came back
    rows = validate.beam_parity(surface_model, surface_export, ["Oil prices fall", "U.S. stocks rise"], 2, 1)[0]
    assert all(r.ok for r in rows) and any("tags" in r.check for r in rows), rows


@pytest.mark.parametrize("after", [False, True], ids=["before", "before+after"])
def test_heads_that_read_the_pieces_export_with_parity(vectors, tmp_path, after):
    """Heads trained on a frozen decoder (a hidden layer; the final state + the embeddings of the piece read, the
    one before and, with `after`, the one after): the same graph, tags and texts in ORT as in torch; a row's tags do
    not depend on the other rows of its batch (each row ends with [SEP]); a row at the position limit still tags."""
    from invemb.ort import OnnxEmbedder
    model = surface_toy(seed=3, hidden=16, pieces=True, after=after)
    out = tmp_path / "onnx"
    with exporter.quiet_exporter():
        exporter.export_model(model, out)
    rows = [r for r in validate.graph_parity(model, out, threads=1) if r.check == "decoder_surface"]
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    emb = OnnxEmbedder(out, threads=1)
    ids = model.decode_ids(vectors, beam_size=2, max_length=10)
    ids[0] = (ids[0] * 40)[:model.max_length - 1]  # the longest row a search can return
    ids[1] = ids[1][:2]
    (case_t, space_t), (case_o, space_o) = model._surface_tags(vectors, ids), emb._surface_tags(vectors, ids)
    for i, row in enumerate(ids):
        n = len(row)
        assert case_o[i, :n].tolist() == case_t[i, :n].tolist()
        assert space_o[i, :n].tolist() == space_t[i, :n].tolist()
        alone, _ = model._surface_tags(vectors[i:i + 1], [row])
        assert alone[0, :n].tolist() == case_t[i, :n].tolist(), i
    written = emb.decode(vectors, beam_size=2, max_length=10)
    assert written == model.decode(vectors, beam_size=2, max_length=10)
    assert written != emb.decode(vectors, beam_size=2, max_length=10, normalized=True)


def test_variants_and_one_call_keep_the_written_form(surface_model, surface_export, vectors, tmp_path):
    import shutil

    from invemb.export.beam_graph import OneCallDecoder, build_one_call_graph
    from invemb.export.optimize import make_variants
    from invemb.ort import OnnxEmbedder
    d = tmp_path / "onnx"
    shutil.copytree(surface_export, d)
    variants = make_variants(d, ("int8", "fp16"))
    assert variants["int8"]["files"]["decoder_surface"] == "decoder_surface.int8.onnx"
    assert variants["fp16"]["files"]["decoder_surface"] == "decoder_surface.fp16.onnx"
    for v in ("int8", "int8_encoder"):
        emb = OnnxEmbedder(d, threads=1, variant=v)
        assert emb.files["decoder_surface"] == ("decoder_surface.int8.onnx" if v == "int8" else "decoder_surface.onnx")
        texts = emb.decode(vectors, beam_size=2, max_length=10)
        assert texts == emb.texts(vectors, emb.default_ids(vectors, beam_size=2, max_length=10))
        assert texts != emb.decode(vectors, beam_size=2, max_length=10, normalized=True)
    build_one_call_graph(d)
    one = OneCallDecoder(d, threads=1)
    ids, _ = one.decode_ids(vectors, beam_size=2, max_length=10)
    ref = OnnxEmbedder(d, threads=1)
    assert one.decode(vectors, beam_size=2, max_length=10) == ref.texts(vectors, ids)  # chained decoder_surface
    assert one.decode(vectors, beam_size=2, max_length=10, normalized=True) == ref.detokenize(ids)


def test_cli_decode_and_roundtrip_written_or_normalized(surface_model, vectors, tmp_path, capsys):
    from invemb.cli import main
    ckpt = surface_model.save_pretrained(tmp_path / "ckpt")
    np.save(tmp_path / "v.npy", vectors)
    want = {False: surface_model.decode(vectors), True: surface_model.decode(vectors, normalized=True)}
    for flag in (False, True):
        out = tmp_path / f"texts{flag}.txt"
        args = ["decode", "--checkpoint", str(ckpt), "--input", str(tmp_path / "v.npy"), "--output", str(out)]
        assert main(args + (["--normalized"] if flag else [])) == 0
        assert out.read_text(encoding="utf-8").splitlines() == want[flag]
    capsys.readouterr()
    assert main(["roundtrip", "--checkpoint", str(ckpt), "Oil prices fall"]) == 0
    assert "beam 4, as written" in capsys.readouterr().out
    assert main(["roundtrip", "--checkpoint", str(ckpt), "--normalized", "Oil prices fall"]) == 0
    assert "beam 4, normalised" in capsys.readouterr().out
