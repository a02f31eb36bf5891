"""ONNX export of a toy checkpoint: files + manifest, graph parity at untraced shapes, ORT beam search == torch,
Triton placement, atomic output, clear errors for corrupted checkpoints and bad input."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from invemb.export import exporter
from invemb.export import placement
from invemb.export import validate
from invemb.errors import InvembError


@pytest.fixture(scope="session")
def onnx_dir(toy_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "toy"
    with exporter.quiet_exporter():
        exporter.export_checkpoint(toy_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def ort_embedder(onnx_dir):
    from invemb.ort import OnnxEmbedder
    return OnnxEmbedder(onnx_dir, threads=1)


def test_export_writes_graphs_manifest_and_tokenizer(onnx_dir, toy_model):
    import onnxruntime as ort
    from transformers import AutoTokenizer
    m = json.loads((onnx_dir / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["decoder_kind"] == "transformer"
    cfg = toy_model.config
    assert (m["sentence_dim"], m["num_layers"], m["num_heads"], m["head_dim"], m["memory_slots"], m["max_length"]) \
        == (cfg.encoder.sentence_dim, cfg.decoder.n_layers, cfg.decoder.n_heads,
            cfg.decoder.d_model // cfg.decoder.n_heads, cfg.decoder.memory_slots, cfg.encoder.max_length)
    assert m["special_ids"] == {"bos": toy_model.bos_id, "eos": toy_model.eos_id, "pad": toy_model.pad_id}
    assert m["vocab_size"] == len(toy_model.tokenizer)
    assert set(m["graphs"]) == {"encoder", "decoder_init", "decoder_step"}
    layers = range(cfg.decoder.n_layers)
    step = m["graphs"]["decoder_step"]
    assert [t["name"] for t in step["inputs"]] == ["input_ids"] + [
        f"{p}_{kv}_{i}" for p in ("cross", "past") for i in layers for kv in ("key", "value")]
    assert step["inputs"][-1]["shape"] == ["batch", m["num_heads"], "past", m["head_dim"]]
    for name, g in m["graphs"].items():  # the graph files carry exactly the manifest's names, ranks and dtypes
        path = onnx_dir / g["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == g["sha256"]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for got, want in [(sess.get_inputs(), g["inputs"]), (sess.get_outputs(), g["outputs"])]:
            assert [(t.name, len(t.shape)) for t in got] == [(t["name"], len(t["shape"])) for t in want]
            assert [t.type for t in got] == [f"tensor({'float' if t['dtype'] == 'float32' else t['dtype']})"
                                             for t in want]
            for t, w in zip(got, want):  # symbolic axes stayed dynamic (not frozen to the traced size)
                assert all(isinstance(a, str) for a, s in zip(t.shape, w["shape"]) if isinstance(s, str)), t
    tok = AutoTokenizer.from_pretrained(str(onnx_dir / m["tokenizer_dir"]))
    assert tok("oil prices fall")["input_ids"] == toy_model.tokenizer("oil prices fall")["input_ids"]


def test_graph_parity_at_untraced_shapes(onnx_dir, toy_model):
    rows = validate.graph_parity(toy_model, onnx_dir, threads=1)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    cases = {(r.check, r.case) for r in rows}
    L = toy_model.config.encoder.max_length
    for b in (1, 7):
        assert ("encoder", f"batch={b} sequence={L}") in cases
        assert ("decoder_init", f"batch={b}") in cases
        for p in (0, 1, 8, L - 1):
            assert ("decoder_step", f"batch={b} past={p} new=1") in cases


def test_parity_detects_a_wrong_graph(onnx_dir, toy_model, tmp_path):
    """The parity check can fail: a graph exported from a perturbed decoder is out of tolerance."""
    import copy

    import torch
    other = copy.deepcopy(toy_model)
    with torch.no_grad():
        other.decoder.ln_f.bias.add_(0.05)
    rows = validate.graph_parity(other, onnx_dir, threads=1)
    assert all(r.ok for r in rows if r.check == "encoder")
    assert not any(r.ok for r in rows if r.check.startswith("decoder"))


def test_ort_beam_search_returns_torch_texts(onnx_dir, toy_model, headlines32, ort_embedder):
    rows, details = validate.beam_parity(toy_model, onnx_dir, headlines32, beam_size=4, embedder=ort_embedder)
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert details["ort"] == details["torch"]
    assert details["torch_exact_match"] >= 0.5  # the toy memorised its headlines: decoding is non-trivial
    vec = toy_model.encode(headlines32[:8])
    assert ort_embedder.decode(vec, beam_size=1) == toy_model.decode(vec, beam_size=1)
    assert ort_embedder.decode(vec, beam_size=3, max_length=6) == toy_model.decode(vec, beam_size=3, max_length=6)


def test_ort_stepper_log_probs_match_torch_stepper(onnx_dir, toy_model, ort_embedder):
    import torch

    from invemb.model import TorchStepper
    vec = toy_model.encode(["oil prices fall as opec output rises", "stocks rally"])
    ts = TorchStepper(toy_model.decoder, torch.from_numpy(vec), toy_model.bos_id)
    os_ = ort_embedder.stepper(vec)
    (lp_t, c_t), (lp_o, c_o) = ts.start(3), os_.start(3)
    assert lp_o.shape == lp_t.shape == (6, len(toy_model.tokenizer))
    np.testing.assert_allclose(lp_o, lp_t, atol=2e-4)
    rows = np.array([0, 0, 2, 3, 5, 5])
    tokens = lp_t.argmax(-1)
    lp_t, c_t = ts.step(tokens, ts.reorder(c_t, rows))
    lp_o, c_o = os_.step(tokens, os_.reorder(c_o, rows))
    np.testing.assert_allclose(lp_o, lp_t, atol=2e-4)
    assert set(c_o) - {"_item"} == set(c_t) and c_o["past_key_0"].shape == tuple(c_t["past_key_0"].shape) == (6, 4, 2, 16)


def test_topk_outputs_decode_exactly_like_full_rows(onnx_dir, toy_model, ort_embedder, headlines32):
    """The step graphs end in TopK: the search over their candidates gives the full-row texts and scores, and the
    candidates are exactly the K best of the graph's own log_probs (ties by lower id)."""
    from invemb.generation import Candidates, generate
    from invemb.graph_stepper import GraphStepper
    from invemb.manifest import cache_plan
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert cache_plan(manifest).top_k == min(64, manifest["vocab_size"])
    vec = toy_model.encode(headlines32[:12])
    stepper = ort_embedder.stepper(vec)
    assert stepper.max_candidates == 64
    lp, _ = stepper.start(4, candidates=8)
    assert isinstance(lp, Candidates) and lp.ids.shape == (48, 8)
    full, _ = GraphStepper(ort_embedder.run_graph, manifest, vec, candidates=False).start(4)
    assert validate.consistent_top(full, lp.log_probs, lp.ids)
    for beam, max_length in ((1, None), (4, None), (3, 6)):
        cfg = ort_embedder.generation_config(beam_size=beam, max_length=max_length)
        top = generate(GraphStepper(ort_embedder.run_graph, manifest, vec), cfg)
        rows = generate(GraphStepper(ort_embedder.run_graph, manifest, vec, candidates=False), cfg)
        assert [(h.tokens, h.score) for h in top] == [(h.tokens, h.score) for h in rows]
    assert ort_embedder.decode(vec, beam_size=4) == toy_model.decode(vec, beam_size=4)


def test_search_workers_decode_the_same_texts(onnx_dir, ort_embedder, toy_model, headlines32):
    """OnnxEmbedder(search_workers=3): each batch's rows decoded in 3 slices at once (threads sharing the sessions)
    give the same texts, n-best (tokens and scores) and re-ranked choices as one search; concurrent callers too."""
    from concurrent.futures import ThreadPoolExecutor

    from invemb.errors import InvembError
    from invemb.ort import OnnxEmbedder
    split = OnnxEmbedder(onnx_dir, threads=1, search_workers=3)
    assert split.search_workers == 3
    vec = toy_model.encode(headlines32)  # [32,S]
    for beam, max_length in ((4, None), (1, None), (3, 6)):
        assert split.decode(vec, beam_size=beam, max_length=max_length, batch_size=11) == \
            ort_embedder.decode(vec, beam_size=beam, max_length=max_length, batch_size=11)
    want = ort_embedder.decode_nbest(vec[:10], beam_size=4)
    got = split.decode_nbest(vec[:10], beam_size=4)
    assert [[(h.tokens, h.score) for h in hs] for hs in got] == [[(h.tokens, h.score) for h in hs] for hs in want]
    assert split.decode(vec[:10], beam_size=4, rerank=True) == ort_embedder.decode(vec[:10], beam_size=4, rerank=True)
    with ThreadPoolExecutor(4) as pool:  # 4 callers sharing one 3-worker embedder
        parts = list(pool.map(lambda i: split.decode(vec[i:i + 8], beam_size=4), range(0, 32, 8)))
    assert sum(parts, []) == ort_embedder.decode(vec, beam_size=4)
    with pytest.raises(ValueError, match="search workers must be >= 1, got 0"):
        OnnxEmbedder(onnx_dir, threads=1, search_workers=0)
    with pytest.raises(InvembError, match="NaN"):  # bad input: still the caller's clear error
        split.decode(np.full((2, vec.shape[1]), np.nan, np.float32))


def test_place_export_fills_a_fresh_repository(toy_checkpoint, tmp_path):
    """place_export (the pipeline's export stage, scripts/load_serving.py): the committed template + a new export."""
    from invemb.paths import checkout_root
    (tmp_path / "repo" / "stale").mkdir(parents=True)
    assert exporter.place_export(tmp_path / "onnx", tmp_path / "repo", toy_checkpoint, triton_encoder="fp32") is None
    assert not (tmp_path / "repo" / "stale").exists()  # fresh: the old folder is replaced
    assert (tmp_path / "repo" / "beam_search" / "config.pbtxt").is_file()
    assert (tmp_path / "repo" / "encoder" / "1" / "model.onnx").read_bytes() == \
        (tmp_path / "onnx" / "encoder.onnx").read_bytes()
    with pytest.raises(InvembError, match="template"):  # never wipes the committed model_repository/
        placement.fresh_triton_repo(checkout_root() / "model_repository")


def test_place_in_triton_repo_keeps_serving_files(onnx_dir, tmp_path):
    repo = tmp_path / "model_repository"
    for name in ("encoder", "beam_search"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text("name: x")
    (repo / "beam_search" / "1" / "model.py").write_text("# serving code")
    placement.place_in_triton_repo(onnx_dir, repo)
    placement.place_in_triton_repo(onnx_dir, repo)  # idempotent
    for g in ("encoder", "decoder_init", "decoder_step"):
        assert (repo / g / "1" / "model.onnx").read_bytes() == (onnx_dir / f"{g}.onnx").read_bytes()
    want = {**json.loads((onnx_dir / "manifest.json").read_text()), "served_variant": None}  # the fp32 graphs
    for name in ("tokenizer", "beam_search"):
        assert json.loads((repo / name / "1" / "manifest.json").read_text()) == want
        assert (repo / name / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert (repo / "encoder" / "config.pbtxt").read_text() == "name: x"
    assert (repo / "beam_search" / "1" / "model.py").read_text() == "# serving code"
    assert not [p for p in repo.rglob(".*")]  # no temp leftovers


def test_export_is_atomic(toy_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    real = exporter._export_graph

    def failing(module, spec, path, *a):
        if spec.name == "decoder_init":  # the encoder is already written in the temp folder
            raise RuntimeError("simulated exporter failure")
        return real(module, spec, path, *a)

    monkeypatch.setattr(exporter, "_export_graph", failing)
    with exporter.quiet_exporter(), pytest.raises(RuntimeError, match="simulated"):
        exporter.export_model(toy_model, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "corrupted or incompatible"),
    ("no-config", "not an invemb checkpoint"),
    ("bad-json", "not valid JSON"),
])
def test_corrupted_checkpoint_gives_one_line_error(toy_checkpoint, tmp_path, capsys, damage, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_checkpoint, ckpt)
    if damage == "truncate":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif damage == "no-config":
        (ckpt / "config.json").unlink()
    else:
        (ckpt / "config.json").write_text("{not json")
    rc = exporter.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_onnx_embedder_bad_input(onnx_dir, ort_embedder, tmp_path):
    from invemb.ort import OnnxEmbedder
    with pytest.raises(InvembError, match=r"shape \[N, 64\]"):
        ort_embedder.decode(np.zeros((2, 5), np.float32))
    with pytest.raises(InvembError, match="NaN or Inf"):
        ort_embedder.decode(np.full((1, 64), np.nan, np.float32))
    with pytest.raises(InvembError, match="empty"):
        ort_embedder.encode(["ok", "  "])
    with pytest.raises(InvembError, match="no manifest.json"):
        OnnxEmbedder(tmp_path)
    with pytest.raises(InvembError, match="no 'int4' variant"):
        OnnxEmbedder(onnx_dir, variant="int4")
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    (broken / "decoder_step.onnx").write_bytes(b"not a graph")
    with pytest.raises(InvembError, match="cannot load ONNX graph"):
        OnnxEmbedder(broken)


def test_validate_cli_passes(toy_checkpoint, onnx_dir, data_dir, capsys):
    rc = validate.main(["--checkpoint", str(toy_checkpoint), "--onnx", str(onnx_dir), "--data", str(data_dir),
                        "-n", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"decoder_step +\| batch=7 past=31 new=1 +\| .* PASS", out) and "OK:" in out
    assert f"--data {data_dir.name} " in out.splitlines()[0] and str(toy_checkpoint) not in out  # no machine path


def test_int8_variant_within_accuracy_budget(onnx_dir, headlines32, tmp_path):
    """optimize.py: fused + int8 graphs load through the manifest and cost at most 5 points of token accuracy
    (and 0.01 of encoder cosine) on the memorised headlines."""
    from invemb.export import optimize, optimize_report
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    made = optimize.make_variants(d, ("opt", "int8"))
    assert made["int8"]["files"] == {g: f"{g}.int8.onnx" for g in ("encoder", "decoder_init", "decoder_step")}
    assert made["opt"]["fused_ops"].get("BiasGelu", 0) > 0
    assert "SkipLayerNormalization" not in made["opt"]["fused_ops"]  # ORT's CPU kernel is slower than Add + LN
    assert made["int8"]["smoothing"]["smoothing_muls"]["encoder"] > 0  # the encoder's MatMul inputs are smoothed
    assert made["int8"]["smoothing"]["static_activations"]["encoder"] > 0  # ... and quantised with fixed ranges
    assert "decoder_step" not in made["int8"]["smoothing"]["static_activations"]  # no calibration text: dynamic
    assert made["int8_encoder"]["files"] == {"encoder": "encoder.int8.onnx"}  # + the fp32 decoders
    rows = {r["variant"]: r
            for r in optimize_report.measure(d, headlines32, ("opt", "int8"), threads=1, repeats=1)}
    assert rows["fp32"]["token_accuracy"] >= 0.5
    assert rows["opt"]["same_text_as_fp32"] == 1.0 and rows["opt"]["cosine_min"] > 0.9999
    assert rows["int8"]["cosine_min"] > 0.99
    assert rows["int8"]["token_accuracy_change"] >= -0.05
    import onnx
    head = onnx.load(str(d / "decoder_step.int8.onnx")).graph
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in head.node)
    placement.place_in_triton_repo(d, tmp_path / "repo", variant="int8")
    assert placement.served_variant(tmp_path / "repo") == "int8"
    assert (tmp_path / "repo" / "decoder_step" / "1" / "model.onnx").read_bytes() == \
        (d / "decoder_step.int8.onnx").read_bytes()
    # the fidelity study's three arms: fp32, int8, and the int8 encoder with fp32 decoders
    from invemb.fidelity import ort_int8_study
    from invemb.ort import OnnxEmbedder
    fp32 = OnnxEmbedder(d, threads=1)
    refs = fp32.decode(fp32.encode(headlines32[:12]))
    study = ort_int8_study(d, headlines32[:12], refs, threads=1)
    assert study["n"] == 12 and study["fp32"]["exact_match"] == 1.0  # refs are fp32's own texts
    assert study["same_text_rate"] == study["int8"]["exact_match"]
    assert study["int8_encoder_same_text_rate"] == study["int8_encoder"]["exact_match"] >= 0.75


def test_cpu_sessions_run_no_skip_layer_norm(onnx_dir, tmp_path, monkeypatch):
    """ORT's CPU SkipLayerNormalization kernel is ~8x slower than Add + LayerNormalization, so the sessions invemb
    makes on the CPU keep them apart (ORT's load-time SkipLayerNormFusion would otherwise re-fuse some): the graphs
    ORT actually runs, dumped after its optimisations, have LayerNormalization and no SkipLayerNormalization; the
    fusion stays on for a GPU provider."""
    import onnx
    import onnxruntime as ort
    from invemb import ort as invemb_ort
    from invemb.export import optimize
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    optimize.make_variants(d, ("int8",), encoder_only=True)
    options = invemb_ort.session_options

    def dumping(threads=None):  # make_session's options, with the optimised graph written out
        opts = options(threads)
        opts.optimized_model_filepath = str(tmp_path / "ran.onnx")
        return opts
    monkeypatch.setattr(invemb_ort, "session_options", dumping)
    for graph in ("encoder.onnx", "encoder.int8.onnx", "decoder_step.onnx"):
        invemb_ort.make_session(d / graph, threads=1)
        ops = {n.op_type for n in onnx.load(str(tmp_path / "ran.onnx"), load_external_data=False).graph.node}
        assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops, graph
    # the control: without the guard ORT fuses at least one residual Add + LayerNorm of these graphs
    ort.InferenceSession(str(d / "decoder_step.onnx"), dumping(1), providers=["CPUExecutionProvider"])
    assert "SkipLayerNormalization" in {n.op_type for n in onnx.load(str(tmp_path / "ran.onnx")).graph.node}
    assert invemb_ort.disabled_optimizers([("CUDAExecutionProvider", {}), "CPUExecutionProvider"]) == []
