"""The invemb model repository on a real, supervised tritonserver (the toy export of test_serving_triton): the
client keeps to the server's limits, every error names the user's file lines (all of them), invisible-only texts
are refused, malformed encoder inputs are the sender's INVALID_ARGUMENT, a bulk encode interrupted by a server
death resumes to the same rows, and default clients ride through a stalled tokenizer and a killed server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO as ROOT
from invemb.serving import procs
from invemb.serving.client import ClientError, TritonClient, text_tensor
from invemb.serving.launch import TritonServer
from test_serving_triton import reference, triton_repo  # noqa: F401 (session fixtures: the toy export)


@pytest.fixture(scope="module")
def served(triton_repo):  # noqa: F811
    with TritonServer(triton_repo[0], startup_timeout=300, log_file=triton_repo[0].parent / "faults.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    with TritonClient(served.grpc_url, ready_timeout=60) as c:
        yield c


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "serving" / "client.py"), "--url", url, "--no-progress",
                           *args], capture_output=True, text=True, timeout=600)


def test_the_client_keeps_to_the_servers_limits(client, reference, headlines32):  # noqa: F811
    assert client.limits() == {"encode_batch": 64, "decode_batch": 32, "roundtrip_batch": 32, "max_beam_size": 16,
                               "max_text_chars": 2000}
    texts = headlines32 * 3  # 96 texts: requests of 70 would be refused (max_batch_size 64): split to fit
    want = np.concatenate([reference["vectors"]] * 3)  # [96,S]
    np.testing.assert_allclose(client.encode(texts, batch_size=70), want, atol=1e-5, rtol=0)
    assert client.decode(want[:40], batch_size=40) == (reference["texts"] * 2)[:40]  # 32 per request at most
    with pytest.raises(ClientError, match=r"beam size must be in \[1, 16\] \(the server's max_beam_size\)"):
        client.decode(want[:2], beam_size=17)


def test_cli_names_every_bad_line_of_the_users_file(served, tmp_path, headlines32):
    lines = list(headlines32[:14])
    lines[0] = "x" * 2001  # line 1: over the server's max_text_chars
    for no, junk in zip(range(3, 15), ["\u200b", "\ufeff", "\x00", "\u200b\u200b", "\u2060", "\u200b \ufeff"] * 2):
        lines[no - 1] = junk  # lines 3..14 hold nothing visible: 12 of them
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = cli(served.grpc_url, "encode", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "v.npy"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "line(s) 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 of texts.txt and 2 more hold(s) no visible text" in r.stderr
    assert "line(s) 1 of texts.txt hold(s) more than 2000 characters" in r.stderr
    assert not (tmp_path / "v.npy").exists()
    vectors = np.zeros((25, 64), np.float32)
    vectors[20, 3] = np.nan
    vectors[22] = 3.4e38
    np.save(tmp_path / "bad.npy", vectors)
    r = cli(served.grpc_url, "decode", str(tmp_path / "bad.npy"))
    assert r.returncode == 2 and "row(s) 20 of bad.npy contain(s) NaN or Inf" in r.stderr \
        and "row(s) 22 of bad.npy have components beyond" in r.stderr, r.stderr
    r = cli(served.grpc_url, "decode", str(tmp_path / "bad.npy"), "--beam-size", "17")
    assert r.returncode == 2 and "--beam-size must be in [1, 16] (the server's max_beam_size)" in r.stderr
    (tmp_path / "good.txt").write_text("\n".join(headlines32 * 3) + "\n")
    r = cli(served.grpc_url, "--batch-size", "70", "encode", str(tmp_path / "good.txt"), "--out",
            str(tmp_path / "vecs_noext"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "vecs_noext").shape[0] == 96 and not (tmp_path / "vecs_noext.npy").exists()


def test_server_errors_name_the_users_rows(client):
    """Past the client's own checks, the server's row numbers are rewritten into the caller's lines."""
    def label(rows):
        return "line(s) " + ", ".join(str(r + 1) for r in rows) + " of f.txt"
    requests = [{"text": text_tensor(["Oil prices fall", "\u200b"])}]
    with pytest.raises(ClientError, match=r"INVALID_ARGUMENT.*at line\(s\) 10 of f.txt") as err:
        client.infer_many("encode", requests, ["sentence_embedding"], rows=[np.array([4, 9])], label=label)
    assert "position" not in str(err.value)
    requests = [{"text": text_tensor(["x" * 3000, "ok", "y" * 2500])}]
    with pytest.raises(ClientError, match=r"over the limit: line\(s\) 7, 2 of f.txt|over the limit: line\(s\) 2, 7"):
        client.infer_many("encode", requests, ["sentence_embedding"], rows=[np.array([6, 0, 1])], label=label)


@pytest.mark.parametrize("case", ["shape mismatch", "zero-length", "all-zero mask", "huge vector"])
def test_malformed_graph_inputs_are_the_senders_error(client, case):
    ids, mask = np.full((2, 5), 101, np.int64), np.ones((2, 5), np.int64)
    model, feeds, message = {
        "shape mismatch": ("encoder", {"input_ids": ids, "attention_mask": mask[:, :4]}, "same shape"),
        "zero-length": ("encoder", {"input_ids": ids[:, :0], "attention_mask": mask[:, :0]}, "at least one token"),
        "all-zero mask": ("encoder", {"input_ids": ids, "attention_mask": mask * [[1], [0]]}, r"row\(s\) \[1\]"),
        "huge vector": ("decoder_init", {"sentence_embedding": np.full((1, 64), 3.4e38, np.float32)}, "beyond"),
    }[case]
    out = "sentence_embedding" if model == "encoder" else "log_probs"
    with pytest.raises(ClientError, match=f"INVALID_ARGUMENT.*{message}"):
        client.infer(model, feeds, [out])
    assert client.encode(["Oil prices fall"]).shape == (1, 64)


def test_bulk_encode_interrupted_by_a_server_death_resumes_to_the_same_rows(triton_repo, data_dir, tmp_path):  # noqa
    from invemb.data import load_split
    from invemb.ort import OnnxEmbedder
    texts = [r.text for r in load_split(data_dir).val[:1600]]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    job = ["--batch-size", "4", "--concurrency", "1", "--chunk-size", "64", "--retry-budget", "3"]
    out, parts = tmp_path / "v.npy", tmp_path / "v.npy.parts"
    with TritonServer(triton_repo[0], startup_timeout=300, supervise=False) as first:
        run = subprocess.Popen([sys.executable, str(ROOT / "serving" / "client.py"), "--url", first.grpc_url,
                                "--no-progress", *job, "encode", str(tmp_path / "texts.txt"), "--out", str(out)],
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(list(parts.glob("chunk-*"))) < 3 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(first.proc.pid, signal.SIGKILL)  # the server dies mid-job
        _, err = run.communicate(timeout=300)
    assert run.returncode == 2 and "--resume" in err and len(err.strip().splitlines()) == 1, err
    written = len(list(parts.glob("chunk-*")))
    assert 3 <= written < 25 and not out.exists()
    with TritonServer(triton_repo[0], startup_timeout=300) as second:
        r = cli(second.grpc_url, *job, "encode", str(tmp_path / "texts.txt"), "--out", str(out), "--resume")
        assert r.returncode == 0 and f"resuming: {written} of 25 chunks" in r.stderr, r.stderr
        r = cli(second.grpc_url, *job, "encode", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "u.npy"))
        assert r.returncode == 0, r.stderr
    resumed, uninterrupted = np.load(out), np.load(tmp_path / "u.npy")
    assert not parts.exists() and resumed.shape == (1600, 64)
    np.testing.assert_array_equal(resumed, uninterrupted)
    want = OnnxEmbedder(triton_repo[1], threads=1).encode(texts)
    np.testing.assert_allclose(resumed, want, atol=1e-5, rtol=0)


def test_default_clients_ride_through_a_stalled_tokenizer_and_a_killed_server(served, reference,  # noqa: F811
                                                                             headlines32):
    stop, ok, failed = threading.Event(), [], []

    def good(k: int) -> None:
        c = TritonClient(served.grpc_url)  # the DEFAULT settings
        while not stop.is_set():
            i = (k * 5 + len(ok)) % 28
            try:
                got = c.encode(headlines32[i:i + 4])
                (ok if np.allclose(got, reference["vectors"][i:i + 4], atol=1e-5, rtol=0) else failed).append(i)
            except ClientError as e:
                failed.append(str(e))

    threads = [threading.Thread(target=good, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    before = len(served.restarts)
    try:
        for k, fault in enumerate(("stall tokenizer", "kill server"), 1):
            deadline = time.monotonic() + 120
            while len(ok) < 10 * k and time.monotonic() < deadline:
                time.sleep(0.1)
            if fault == "stall tokenizer":
                stub, = [s for s in procs.stubs(served.proc.pid, served.repo) if s.model == "tokenizer"]
                os.kill(stub.pid, signal.SIGSTOP)
            else:
                os.kill(served.proc.pid, signal.SIGKILL)
            while len(served.restarts) < before + k and time.monotonic() < deadline + 120:
                time.sleep(0.1)
            assert len(served.restarts) == before + k and served.restarts[-1]["ok"], served.restarts
        n = len(ok)
        deadline = time.monotonic() + 120
        while len(ok) < n + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    assert failed == [] and len(ok) >= 30
    reasons = [r["reason"] for r in served.restarts[before:]]
    assert "tokenizer" in reasons[0] and "stopped making progress" in reasons[0] and "signal 9" in reasons[1]
