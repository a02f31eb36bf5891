"""ONNX export of the other decoders (one-pass: required; GRU) and the TensorRT builder's absent-TensorRT path."""
from __future__ import annotations

import numpy as np
import pytest

from invemb.export import exporter
from invemb.export import tensorrt_build
from invemb.export import validate


def _toy(kind: str):
    import dataclasses

    import torch

    from invemb.config import preset
    from invemb.model import InvertibleEmbedder
    torch.manual_seed(1)
    cfg = preset("toy").model
    cfg.decoder = dataclasses.replace(cfg.decoder, kind=kind)
    return InvertibleEmbedder(cfg).eval()  # untrained: parity is the point


@pytest.mark.parametrize("kind, graphs", [("onepass", {"encoder", "decoder_onepass"}),
                                          ("gru", {"encoder", "decoder_init", "decoder_step"})])
def test_other_decoders_export_with_parity(kind, graphs, tmp_path):
    from invemb.ort import OnnxEmbedder
    model = _toy(kind)
    with exporter.quiet_exporter():
        manifest = exporter.export_model(model, tmp_path / kind)
    assert manifest["decoder_kind"] == kind and set(manifest["graphs"]) == graphs
    rows = validate.graph_parity(model, tmp_path / kind, threads=1)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert {r.check for r in rows} == graphs
    assert {"batch=1", "batch=7"} <= {r.case.split(" past")[0] for r in rows if r.check != "encoder"}
    emb = OnnxEmbedder(tmp_path / kind, threads=1)
    vec = np.random.default_rng(0).standard_normal((5, model.sentence_dim)).astype(np.float32)
    for beam in (1, 3):
        assert emb.decode(vec, beam_size=beam) == model.decode(vec, beam_size=beam)
    if kind == "onepass":
        out = manifest["graphs"]["decoder_onepass"]["outputs"][0]
        assert out["name"] == "logits" and out["shape"] == ["batch", model.config.encoder.max_length - 1,
                                                            len(model.tokenizer)]
    else:
        assert [t["name"] for t in manifest["graphs"]["decoder_step"]["inputs"]] == ["input_ids", "hidden", "context"]


def test_tensorrt_absent_gives_one_line_message(tmp_path, capsys):
    try:
        tensorrt_build.require_tensorrt()
    except Exception as e:
        expected = str(e)
    else:
        pytest.skip("TensorRT and a GPU are present: the engine build is exercised on the GPU machine")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "manifest.json").write_text('{"format_version": 1, "graphs": {}, "max_length": 8}')
    rc = tensorrt_build.main(["--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path / "trt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {expected}" and len(err.splitlines()) == 1
    assert "TensorRT" in err or "GPU" in err
    assert not (tmp_path / "trt").exists()
