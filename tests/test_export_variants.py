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
    for beam in (1, 3):  # the search's texts (re-ranking off: this untrained toy's candidates are near-ties in
        # cosine, which float order may flip; re-ranking parity is tests/test_export_onnx.py's)
        assert emb.decode(vec, beam_size=beam, rerank="off") == model.decode(vec, beam_size=beam, rerank="off")
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


def _matmul_model(w: np.ndarray):
    """x [N,C] @ w [C,M] -> y: the smallest graph the int8 smoothing pass rewrites."""
    from onnx import TensorProto, helper, numpy_helper
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_smoothing_is_exact_in_float_and_cuts_the_outlier_error(tmp_path):
    """SmoothQuant before dynamic int8: the smoothed float graph computes the same y; with two outlier input
    channels (50x) the int8 error falls at least 3x; a channel the calibration never fired is not amplified into
    an outlier when it fires later (the median floor)."""
    import onnx

    from invemb.export import optimize
    from invemb.ort import make_session
    rng = np.random.default_rng(0)
    c, m = 64, 32
    w = (rng.standard_normal((c, m)) * 0.1).astype(np.float32)
    scale = np.ones(c, np.float32)
    scale[:2] = 50.0
    calib = (rng.standard_normal((256, c)) * scale).astype(np.float32)
    x = (rng.standard_normal((512, c)) * scale).astype(np.float32)
    src = tmp_path / "mm.onnx"
    onnx.save(_matmul_model(w), str(src))

    smoothed = _matmul_model(w)
    assert optimize.smooth_activations(smoothed, [{"x": calib}]) == 1
    assert [n.op_type for n in smoothed.graph.node] == ["Mul", "MatMul"]
    onnx.save(smoothed, str(tmp_path / "smoothed.onnx"))
    y = x @ w
    y_smoothed = make_session(tmp_path / "smoothed.onnx", threads=1).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(y_smoothed, y, rtol=1e-4, atol=1e-3)

    def int8_error(calib_feeds, inputs):  # activations quantised per batch, as quantize_dynamic does
        dst = tmp_path / f"int8_{len(calib_feeds or [])}_{inputs[0, 5]:.3f}.onnx"
        n = 1 if calib_feeds else 0
        assert optimize.quantize_int8(src, dst, calib_feeds, static=False) == {
            "smoothing_muls": n, "static_activations": 0, "fused_matmuls": 0}
        got = make_session(dst, threads=1).run(["y"], {"x": inputs})[0]
        ref = inputs @ w
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))

    plain, smooth = int8_error(None, x), int8_error([{"x": calib}], x)
    assert smooth < plain / 3, (plain, smooth)
    silent = calib.copy()
    silent[:, 5] = 0.01  # channel 5 never fires in calibration ...
    fires = x.copy()
    fires[:, 5] = 8.0 * np.abs(fires[:, 5])  # ... and does at run time
    assert int8_error([{"x": silent}], fires) < int8_error(None, fires)


def test_int8_static_activations_make_a_row_independent_of_its_batch(tmp_path):
    """Dynamic int8 takes one activation range per batch, so a row's output changes with the other rows of its
    batch (here: one row 10x larger); static_activations (fixed ranges from calibration) gives every row the
    same output alone or in any batch, with an error no worse than dynamic's on inputs the calibration covers."""
    import onnx

    from invemb.export import optimize
    from invemb.ort import make_session
    rng = np.random.default_rng(1)
    c, m = 64, 32
    w = (rng.standard_normal((c, m)) * 0.1).astype(np.float32)
    src = tmp_path / "mm.onnx"
    onnx.save(_matmul_model(w), str(src))
    calib = [{"x": rng.standard_normal((4096, c)).astype(np.float32)}]
    x = rng.standard_normal((64, c)).astype(np.float32)
    x[0] *= 10.0
    outputs = {}
    for static in (False, True):
        dst = tmp_path / f"int8_static_{static}.onnx"
        passes = optimize.quantize_int8(src, dst, calib, static=static)
        assert passes == {"smoothing_muls": 1, "static_activations": int(static), "fused_matmuls": int(static)}
        ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
        assert ("QuantizeLinear" in ops, "DynamicQuantizeLinear" in ops) == (static, not static)
        assert ("MatMulIntegerToFloat" in ops, "MatMulInteger" in ops) == (static, not static)
        sess = make_session(dst, threads=1)
        alone = np.concatenate([sess.run(["y"], {"x": x[i:i + 1]})[0] for i in range(1, 64)])
        outputs[static] = (alone, sess.run(["y"], {"x": x})[0][1:])
    alone, batched = outputs[False]
    assert np.abs(alone - batched).max() > 1e-2  # dynamic: the large row coarsened the others' steps
    alone, batched = outputs[True]
    np.testing.assert_allclose(alone, batched, rtol=0, atol=1e-6)
    ref = x[1:] @ w
    err = {s: float(np.linalg.norm(outputs[s][0] - ref) / np.linalg.norm(ref)) for s in (False, True)}
    assert err[True] <= err[False] * 1.5, err


def test_fused_integer_matmul_computes_the_static_graph_exactly(tmp_path, monkeypatch):
    """fuse_integer_matmuls: MatMulInteger -> Cast -> Mul(scales) -> Add(bias) becomes one MatMulIntegerToFloat
    with the bias folded in, and the outputs equal the unfused static graph's (same int32 sums and scales)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from invemb.export import optimize
    from invemb.ort import make_session
    rng = np.random.default_rng(2)
    c, m = 48, 24
    w = (rng.standard_normal((c, m)) * 0.1).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                           helper.make_node("Add", ["h", "b"], ["y"], name="bias")], "mm_bias",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", m])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    src = tmp_path / "mm_bias.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    calib = [{"x": rng.standard_normal((512, c)).astype(np.float32)}]
    x = rng.standard_normal((37, c)).astype(np.float32)
    fused = tmp_path / "fused.onnx"
    assert optimize.quantize_int8(src, fused, calib)["fused_matmuls"] == 1
    assert [n.op_type for n in onnx.load(str(fused)).graph.node] == ["Mul", "QuantizeLinear", "MatMulIntegerToFloat"]
    monkeypatch.setattr(optimize, "fuse_integer_matmuls", lambda model: 0)
    plain = tmp_path / "plain.onnx"
    optimize.quantize_int8(src, plain, calib)
    assert {"Cast", "MatMulInteger", "Add"} <= {n.op_type for n in onnx.load(str(plain)).graph.node}
    got, ref = (make_session(p, threads=1).run(["y"], {"x": x})[0] for p in (fused, plain))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert np.linalg.norm(got - (x @ w + b)) / np.linalg.norm(x @ w + b) < 0.02  # and it is still the layer
