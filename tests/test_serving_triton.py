"""The invemb model repository on a REAL tritonserver: a toy checkpoint exported with export/to_onnx.py into a
temp copy of model_repository/, served by serving/launch.py (invemb.serving.launch), called over gRPC by
serving/client.py (invemb.serving.client).

Parity: `encode` == in-process encode (atol 1e-5); `roundtrip` == in-process decode texts; client-side beam
search over decoder_init/decoder_step == server-side beam_search. Bad inputs get INVALID_ARGUMENT with a clear
message and the next good request is served."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO as ROOT
from invemb.serving.client import ClientError, TritonClient, load_export, text_tensor
from invemb.serving.launch import TritonServer

MODELS = ("tokenizer", "encoder", "decoder_init", "decoder_step", "beam_search", "encode", "roundtrip")


@pytest.fixture(scope="session")
def triton_repo(toy_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(repository, export dir): the committed configs + python models, and the toy export placed in them."""
    from invemb.export import exporter, placement
    base = tmp_path_factory.mktemp("triton")
    repo, export_dir = placement.fresh_triton_repo(base / "repo"), base / "onnx"
    with exporter.quiet_exporter():  # + the one-call beam search graph as the generated model beam_search_op
        # the fp32 encoder, so that Triton's vectors can be held to the torch model's (the int8 default: below)
        exporter.export_checkpoint(toy_checkpoint, export_dir, triton_repo=repo, one_call=True,
                                   triton_encoder="fp32")
    assert placement.served_variant(repo) is None
    return repo, export_dir


@pytest.fixture(scope="session")
def server(triton_repo):
    with TritonServer(triton_repo[0], startup_timeout=300, log_file=triton_repo[0].parent / "server.log") as s:
        yield s


@pytest.fixture(scope="session")
def client(server):
    with TritonClient(server.grpc_url, timeout=120, ready_timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def reference(toy_model, headlines32):
    """In-process torch results for the 32 memorised headlines."""
    vectors = toy_model.encode(headlines32)
    return {"vectors": vectors, "texts": toy_model.decode(vectors, beam_size=4)}


def test_encode_matches_in_process(client, reference, headlines32):
    got = client.encode(headlines32, batch_size=5, max_in_flight=3)  # ragged batches, several in flight
    assert got.shape == reference["vectors"].shape and got.dtype == np.float32
    np.testing.assert_allclose(got, reference["vectors"], atol=1e-5, rtol=0)


def test_one_call_beam_search_op_serves_the_in_process_ids(client, reference, toy_model, triton_repo):
    """beam_search_op (the whole search in one BeamSearch-op call) answers what OneCallDecoder gives in process;
    a NaN vector is that request's INVALID_ARGUMENT."""
    from invemb.export.beam_graph import OneCallDecoder
    from invemb.manifest import generation_limit
    local = OneCallDecoder(triton_repo[1], threads=1)
    vec = reference["vectors"][:6]
    want_ids, _ = local.decode_ids(vec, beam_size=4)
    steps = np.array([generation_limit(local.manifest) + 1], np.int32)
    out = client.infer("beam_search_op", {"sentence_embedding": vec, "num_beams": np.array([4], np.int32),
                                          "max_length": steps}, ["sequences"])
    eos = local.eos
    got = [row[:row.index(eos)] if eos in row else row for row in out["sequences"][:, 0, 1:].tolist()]
    assert got == want_ids
    assert toy_model.detokenize(got) == reference["texts"][:6]
    bad = vec.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ClientError, match="INVALID_ARGUMENT.*NaN"):
        client.infer("beam_search_op", {"sentence_embedding": bad, "num_beams": np.array([4], np.int32),
                                        "max_length": steps}, ["sequences"])


def test_roundtrip_matches_in_process_decode(client, reference, headlines32, toy_model):
    got = client.roundtrip(headlines32, batch_size=8, max_in_flight=2)
    assert got == reference["texts"]
    assert sum(a == b for a, b in zip(got, toy_model.reference_texts(headlines32))) >= 28  # it memorised them


def test_client_side_and_server_side_decode_agree(client, reference, triton_repo):
    manifest, tokenizer = load_export(triton_repo[1])
    v = reference["vectors"]
    server_side = client.decode(v, beam_size=4, batch_size=7, mode="server")
    client_side = client.decode(v, beam_size=4, batch_size=7, mode="client", manifest=manifest, tokenizer=tokenizer)
    assert server_side == client_side == reference["texts"]


def step_count(client, model: str) -> int:
    stats = client.client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


def test_server_side_search_holds_its_own_decoder_sessions(client, reference):
    """decoder_runner onnxruntime (the default): beam_search runs the decoder graphs in its own ORT sessions, so a
    server-side decode makes no request to the decoder_step model, and gives the reference texts."""
    before = step_count(client, "decoder_step")
    assert client.decode(reference["vectors"][:8], beam_size=4, batch_size=4) == reference["texts"][:8]
    assert step_count(client, "decoder_step") == before


def test_bls_runner_gives_the_same_texts(triton_repo, reference, noisy, tmp_path_factory):
    """decoder_runner bls: one BLS request per step to decoder_init/decoder_step (and to the encoder to
    re-rank), same texts."""
    repo = tmp_path_factory.mktemp("bls") / "repo"
    shutil.copytree(triton_repo[0], repo)
    cfg = repo / "beam_search" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('string_value: "onnxruntime"', 'string_value: "bls"'))
    assert '"bls"' in cfg.read_text()
    with TritonServer(repo, startup_timeout=300, log_file=repo.parent / "server.log") as s, \
            TritonClient(s.grpc_url, timeout=120, ready_timeout=60) as c:
        before = step_count(c, "decoder_step")
        assert c.decode(reference["vectors"][:8], beam_size=4, batch_size=4) == reference["texts"][:8]
        assert step_count(c, "decoder_step") > before
        assert c.decode(noisy[0][:8], beam_size=4, batch_size=4, rerank=True) == noisy[1][:8]


def test_the_default_export_serves_the_static_int8_encoder(toy_checkpoint, headlines32, tmp_path_factory):
    """export_checkpoint's default (export/to_onnx.py --triton-repo, launch.py's auto-export, the pipeline): the
    repository serves the smoothed int8 encoder with fixed activation ranges, and fp32 decoders. Triton's vectors
    == in-process ORT with that variant (atol 1e-5, although the client's ragged batches are merged by dynamic
    batching: a vector does not depend on its batch), its round trip == that embedder's decode, and the vectors
    stay close to fp32's."""
    from invemb.export import exporter, placement
    from invemb.ort import OnnxEmbedder
    base = tmp_path_factory.mktemp("int8")
    repo, export_dir = placement.fresh_triton_repo(base / "repo"), base / "onnx"
    with exporter.quiet_exporter():
        exporter.export_checkpoint(toy_checkpoint, export_dir, triton_repo=repo)
    assert placement.served_variant(repo) == "int8_encoder"
    local = OnnxEmbedder(export_dir, threads=1, variant="int8_encoder")
    assert local.files["decoder_step"] == "decoder_step.onnx" and local.files["encoder"] == "encoder.int8.onnx"
    want = local.encode(headlines32)
    fp32 = OnnxEmbedder(export_dir, threads=1).encode(headlines32)
    cos = (want * fp32).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() > 0.99 and np.abs(want - fp32).max() > 1e-4  # int8: close, and not the fp32 graph
    with TritonServer(repo, startup_timeout=300, log_file=base / "server.log") as s, \
            TritonClient(s.grpc_url, timeout=120, ready_timeout=60) as c:
        np.testing.assert_allclose(c.encode(headlines32, batch_size=5, max_in_flight=3), want, atol=1e-5, rtol=0)
        assert c.roundtrip(headlines32, batch_size=8, max_in_flight=2) == local.decode(want, beam_size=4)


@pytest.fixture(scope="session")
def noisy(reference, toy_model):
    """Vectors off the memorised points (noise 0.6 x RMS): the beam's best is often not the closest candidate, so
    re-ranking changes texts (asserted: otherwise the re-ranking tests would compare nothing)."""
    from invemb.losses import add_vector_noise
    v = np.asarray(add_vector_noise(reference["vectors"][:16], 0.6, seed=0), dtype=np.float32)
    want = toy_model.decode(v, beam_size=4, rerank=True)
    assert want != toy_model.decode(v, beam_size=4, rerank="off")
    return v, want


def test_rerank_on_the_server_and_in_the_client_equals_in_process(client, noisy, triton_repo):
    manifest, tokenizer = load_export(triton_repo[1])
    v, want = noisy
    assert client.decode(v, beam_size=4, batch_size=5, rerank=True) == want  # beam_search re-encodes them
    assert client.decode(v, beam_size=4, batch_size=5, rerank=True, mode="client", manifest=manifest,
                         tokenizer=tokenizer) == want  # the search here, the encoder model on the server


def test_rerank_modes_on_the_server_equal_in_process(client, noisy, toy_model):
    """beam_search's default (no rerank input: default_rerank auto), rerank_margin and rerank=false answer what the
    in-process decode gives with the same mode; a negative margin is that request's INVALID_ARGUMENT (a bad
    mode in the client: ClientError before any request), and the server answers the next request."""
    from invemb.embedder import RERANK_MARGIN
    from invemb.serving.client import ClientError
    v = noisy[0]
    nbest = toy_model.decode_nbest(v, beam_size=4)
    margin = float(np.median([h[0].score - h[1].score for h in nbest]))  # some rows compare, some do not
    for mode in (None, margin, "off"):
        want = toy_model.decode(v, beam_size=4, rerank="auto" if mode is None else mode)
        assert client.decode(v, beam_size=4, batch_size=5, rerank=mode) == want, mode
    assert client.decode(v, beam_size=4, rerank="auto") == toy_model.decode(v, beam_size=4, rerank=RERANK_MARGIN)
    bad = {"sentence_embedding": v[:2], "rerank_margin": np.full((2, 1), -1.0, np.float32)}
    good = {"sentence_embedding": v[2:4]}
    with pytest.raises(ClientError, match="rerank_margin must be >= 0"):
        client.infer_many("beam_search", [bad], ["text"])
    assert [t.decode() for t in client.infer_many("beam_search", [good], ["text"])[0]["text"].reshape(-1)] == \
        toy_model.decode(v[2:4], beam_size=4)
    with pytest.raises(ClientError, match="rerank must be"):
        client.decode(v, rerank=-1)


@pytest.mark.parametrize("beam_size,max_length", [(1, None), (3, 6)])
def test_decode_options_match_in_process(client, reference, toy_model, triton_repo, beam_size, max_length):
    manifest, tokenizer = load_export(triton_repo[1])
    v = reference["vectors"][:9]
    want = toy_model.decode(v, beam_size=beam_size, max_length=max_length)
    assert client.decode(v, beam_size, max_length, batch_size=4) == want
    assert client.decode(v, beam_size, max_length, batch_size=4, mode="client", manifest=manifest,
                         tokenizer=tokenizer) == want


def test_long_text_is_truncated_like_in_process(client, toy_model):
    text = "Stocks rally as markets cheer rate cut hopes " * 22  # ~1,000 characters, far over max_length tokens
    np.testing.assert_allclose(client.encode([text]), toy_model.encode([text]), atol=1e-5, rtol=0)


def test_health_metrics_and_model_configs(server, client):
    for path in ("/v2/health/live", "/v2/health/ready", *(f"/v2/models/{m}/ready" for m in MODELS)):
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10) as r:
            assert r.status == 200, path
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        metrics = r.read().decode()
    assert 'nv_inference_request_success{model="encode",version="1"}' in metrics
    # tensor names are the export manifest's, auto-completed from the ONNX graphs
    manifest = json.loads((server.repo / "beam_search" / "1" / "manifest.json").read_text())
    for graph in ("encoder", "decoder_init", "decoder_step"):
        cfg = client.client.get_model_config(graph, as_json=True)["config"]
        assert [i["name"] for i in cfg["input"]] == [t["name"] for t in manifest["graphs"][graph]["inputs"]]
        assert [o["name"] for o in cfg["output"]] == [t["name"] for t in manifest["graphs"][graph]["outputs"]]


S = 64  # the toy preset's sentence_dim
BAD_REQUESTS = {
    "empty text": ("encode", {"text": text_tensor([""])}, "empty or whitespace-only text"),
    "whitespace text": ("roundtrip", {"text": text_tensor(["ok", " \t "])}, r"position\(s\) \[1\]"),
    "roundtrip 10,000-char text": ("roundtrip", {"text": text_tensor(["ok", "x" * 10_000])},
                                   "row 1 has 10000 characters; the limit is 2000"),
    "vectors and text": ("beam_search", {"sentence_embedding": np.zeros((1, S), np.float32),
                                         "source_text": text_tensor(["Oil prices fall"])},
                         "either sentence_embedding or source_text, got sentence_embedding and source_text"),
    "neither vectors nor text": ("beam_search", {"beam_size": np.full((1, 1), 4, np.int32)}, "got neither"),
    "10,000-char text": ("encode", {"text": text_tensor(["x" * 10_000])}, "10000 characters; the limit is 2000"),
    "invalid UTF-8": ("encode", {"text": text_tensor([b"Oil \xff\xfe prices"])}, "not valid UTF-8"),
    "wrong vector width": ("beam_search", {"sentence_embedding": np.zeros((2, S + 3), np.float32)},
                           rf"shape \[N, {S}\].*\[2, {S + 3}\]"),
    "NaN vector": ("beam_search", {"sentence_embedding": np.stack([np.zeros(S), np.full(S, np.nan)])
                                   .astype(np.float32)}, r"row\(s\) \[1\] contain NaN or Inf"),
    "Inf vector": ("beam_search", {"sentence_embedding": np.full((1, S), -np.inf, np.float32)}, "NaN or Inf"),
    "decoder_init width": ("decoder_init", {"sentence_embedding": np.zeros((1, S + 1), np.float32)},
                           "unexpected shape"),
    "beam size": ("beam_search", {"sentence_embedding": np.zeros((1, S), np.float32),
                                  "beam_size": np.full((1, 1), 99, np.int32)}, r"beam_size must be in \[1, 16\]"),
    "max length": ("beam_search", {"sentence_embedding": np.zeros((1, S), np.float32),
                                   "max_length": np.full((1, 1), 500, np.int32)}, r"max_length must be in \[1, 31\]"),
    "encode batch above max": ("encode", {"text": text_tensor(["Oil prices fall"] * 65)}, "batch-size must be <= 64"),
    "decode batch above max": ("beam_search", {"sentence_embedding": np.zeros((33, S), np.float32)},
                               "batch-size must be <= 32"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(client, reference, case):
    model, feeds, message = BAD_REQUESTS[case]
    out = "sentence_embedding" if model == "encode" else "log_probs" if model == "decoder_init" else "text" \
        if model == "beam_search" else "decoded_text"
    with pytest.raises(ClientError, match=message) as err:
        client.infer(model, feeds, [out])
    assert "INVALID_ARGUMENT" in str(err.value)
    np.testing.assert_allclose(client.encode(["Oil prices fall as OPEC output rises"]),
                               client.encode(["Oil  prices fall as OPEC output rises "]), atol=1e-6)
    assert client.decode(reference["vectors"][:2]) == reference["texts"][:2]


def test_cli_encode_decode_roundtrip(server, triton_repo, headlines32, reference, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(headlines32[:6]) + "\n")
    base = [sys.executable, str(ROOT / "serving" / "client.py"), "--url", server.grpc_url, "--no-progress",
            "--batch-size", "4"]
    run = lambda *a: subprocess.run([*base, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    r = run("encode", str(texts), "--out", str(tmp_path / "v.npy"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), reference["vectors"][:6], atol=1e-5, rtol=0)
    r = run("decode", str(tmp_path / "v.npy"), "--mode", "client", "--export", str(triton_repo[1]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == reference["texts"][:6]
    r = run("roundtrip", str(texts), "--out", str(tmp_path / "rt.tsv"))
    assert r.returncode == 0, r.stderr
    assert [line.split("\t")[1] for line in (tmp_path / "rt.tsv").read_text().splitlines()] == reference["texts"][:6]
    np.save(tmp_path / "bad.npy", np.zeros((2, 5), np.float32))
    r = run("decode", str(tmp_path / "bad.npy"))
    assert r.returncode == 2 and r.stderr.startswith("error: beam_search: INVALID_ARGUMENT") \
        and len(r.stderr.strip().splitlines()) == 1


def test_graph_stepper_with_onnxruntime_equals_ort_embedder(triton_repo, reference, toy_model):
    """The one Stepper the server and client use, run here by ONNX Runtime: same texts as OnnxEmbedder."""
    import torch

    from invemb.generation import generate
    from invemb.graph_stepper import GraphStepper
    from invemb.ort import OnnxEmbedder
    emb = OnnxEmbedder(triton_repo[1], threads=1)

    def run(graph, feeds, outputs):
        return dict(zip(outputs, emb.sessions[graph].run(outputs, feeds)))

    v = reference["vectors"][:8]
    hyps = generate(GraphStepper(run, emb.manifest, v), emb.generation_config(beam_size=4))
    assert emb.detokenize([h.tokens for h in hyps]) == emb.decode(v, beam_size=4) == reference["texts"][:8]
    # the torch Stepper (another implementation of the same decoder) finds the same tokens with the same scores
    from invemb.model import TorchStepper
    torch_hyps = generate(TorchStepper(toy_model.decoder, torch.as_tensor(v), toy_model.bos_id),
                          toy_model.generation_config(beam_size=4))
    assert [h.tokens for h in hyps] == [h.tokens for h in torch_hyps]
    np.testing.assert_allclose([h.log_prob for h in hyps], [h.log_prob for h in torch_hyps], atol=1e-3, rtol=0)


def test_an_adversarial_client_does_not_fail_good_ones(server, reference, headlines32):
    """A client hammering the internal `encoder` and `decoder_step` models with out-of-range token ids beside good
    `encode` clients (dynamic batching merges their requests): 0 good requests fail, every bad one gets
    INVALID_ARGUMENT naming the problem."""
    import threading
    stop, bad_errors, good_failures, good_done = threading.Event(), [], [], []
    ids = np.full((2, 6), 10 ** 6, dtype=np.int64)
    mask = np.ones((2, 6), dtype=np.int64)

    def adversary():
        with TritonClient(server.grpc_url, timeout=60, retries=0) as c:
            for _ in range(40):  # bounded in count and time
                if stop.is_set():
                    break
                try:
                    c.infer("encoder", {"input_ids": ids, "attention_mask": mask}, ["sentence_embedding"])
                    bad_errors.append("accepted")
                except ClientError as e:
                    bad_errors.append(str(e))

    def good(k):
        with TritonClient(server.grpc_url, timeout=60) as c:
            for i in range(6):
                texts = headlines32[(k * 6 + i) % 28:(k * 6 + i) % 28 + 4]
                try:
                    got = c.encode(texts, batch_size=2, max_in_flight=2)
                    start = headlines32.index(texts[0])
                    np.testing.assert_allclose(got, reference["vectors"][start:start + 4], atol=1e-5, rtol=0)
                    good_done.append(1)
                except Exception as e:  # noqa: BLE001
                    good_failures.append(repr(e))

    threads = [threading.Thread(target=adversary)] + [threading.Thread(target=good, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(120)
    stop.set()
    threads[0].join(120)
    assert not good_failures, good_failures[:3]
    assert len(good_done) == 18
    assert bad_errors and all("input_ids must be in [0," in e for e in bad_errors), bad_errors[:3]
