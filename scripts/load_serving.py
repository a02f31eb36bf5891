"""Load run: N good gRPC clients against a real Triton server for some minutes, one adversarial client beside them
(and, optionally, a model process SIGKILLed halfway). Every good answer is checked against in-process ONNX Runtime;
the run passes when 0 good requests failed or differed. Writes results/load_serving.{md,json}.

    python scripts/load_serving.py --minutes 5 --concurrency 16                 # the shipped model, exported first
    python scripts/load_serving.py --minutes 1 --concurrency 4 --kill-stub tokenizer --out /tmp/load

Good clients: 9 of 10 requests `encode` (4 validation headlines; the vectors must equal OnnxEmbedder.encode within
1e-4), 1 of 10 `beam_search` (2 of those vectors, beam 2; the texts must equal OnnxEmbedder.decode). The adversary
cycles through bad requests: out-of-vocabulary token ids to `encoder`, a NaN vector and an absurd beam size to
`beam_search`, an empty and an over-long text to `encode`; each must be answered INVALID_ARGUMENT, except while a
killed model reloads (--kill-stub): the adversary does not retry, so it then sees the transient answers of a
reloading model (counted apart; the good clients retry them).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from invemb.paths import checkout_root
from invemb.util import describe_machine

REPO = checkout_root()


def bad_requests(vocab: int, dim: int) -> list[tuple[str, str, dict, list]]:
    from invemb.serving.client import text_tensor
    return [
        ("encoder ids >= vocab", "encoder", {"input_ids": np.full((2, 6), vocab + 7, np.int64),
                                            "attention_mask": np.ones((2, 6), np.int64)}, ["sentence_embedding"]),
        ("beam_search NaN vector", "beam_search", {"sentence_embedding": np.full((1, dim), np.nan, np.float32),
                                                   "beam_size": np.full((1, 1), 2, np.int32)}, ["text"]),
        ("beam_search beam 10^6", "beam_search", {"sentence_embedding": np.zeros((1, dim), np.float32),
                                                  "beam_size": np.full((1, 1), 10 ** 6, np.int32)}, ["text"]),
        ("encode empty text", "encode", {"text": text_tensor([""])}, ["sentence_embedding"]),
        ("encode 100k-char text", "encode", {"text": text_tensor(["x" * 100_000])}, ["sentence_embedding"]),
    ]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def run(a) -> dict:
    from invemb.data import load_split
    from invemb.ort import OnnxEmbedder
    from invemb.serving.client import RELOADING, ClientError, TritonClient, text_tensor
    from invemb.serving.launch import TritonServer, python_stubs

    work = Path(a.work or tempfile.mkdtemp(prefix="invemb-load-"))
    export, repo = work / "onnx", work / "model_repository"
    from invemb.export.exporter import place_export
    variant = place_export(export, repo, a.checkpoint)  # a fresh repository serving a new export (as the pipeline)
    texts = [r.text for r in load_split(a.data).val[:a.texts]]
    ref = OnnxEmbedder(export, variant=variant)  # the graphs Triton serves (int8 encoder by default)
    vectors = ref.encode(texts)  # [T,S]
    pairs = [(i, i + 2) for i in range(0, 32, 2)]
    decoded = {p: ref.decode(vectors[p[0]:p[1]], beam_size=2) for p in pairs}
    dim, vocab = vectors.shape[1], len(ref.tokenizer)

    stats = {"good": 0, "good_failed": [], "good_wrong": [], "lat_encode": [], "lat_decode": [],
             "bad": 0, "bad_invalid_arg": 0, "bad_reloading": 0, "bad_other": []}
    lock, stop = threading.Lock(), threading.Event()

    def good(k: int, url: str) -> None:
        with TritonClient(url, timeout=120, retries=8, backoff=0.25) as c:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    t0 = time.perf_counter()
                    if n % 10 == 0:
                        p = pairs[(k + n) % len(pairs)]
                        got = c.infer("beam_search", {"sentence_embedding": vectors[p[0]:p[1]],
                                                      "beam_size": np.full((2, 1), 2, np.int32)}, ["text"])["text"]
                        ok = [t.decode() for t in got.reshape(-1)] == decoded[p]
                        kind = "lat_decode"
                    else:
                        i = (k * 7 + n * 4) % (len(texts) - 4)
                        got = c.infer("encode", {"text": text_tensor(texts[i:i + 4])},
                                      ["sentence_embedding"])["sentence_embedding"]
                        ok = bool(np.allclose(got, vectors[i:i + 4], atol=1e-4, rtol=0))
                        kind = "lat_encode"
                    dt = time.perf_counter() - t0
                    with lock:
                        stats["good"] += 1
                        stats[kind].append(dt)
                        if not ok:
                            stats["good_wrong"].append(f"client {k} request {n} ({kind[4:]})")
                except ClientError as e:
                    with lock:
                        stats["good"] += 1
                        stats["good_failed"].append(str(e)[:300])

    def adversary(url: str) -> None:
        reqs = bad_requests(vocab, dim)
        with TritonClient(url, timeout=120, retries=0) as c:
            n = 0
            while not stop.is_set():
                name, model, feeds, outputs = reqs[n % len(reqs)]
                n += 1
                try:
                    c.infer(model, feeds, outputs)
                    outcome = f"{name}: accepted"
                except ClientError as e:
                    reloading = any(part in str(e) for _, part in RELOADING)
                    outcome = "" if "INVALID_ARG" in str(e) else "reload" if reloading else f"{name}: {str(e)[:200]}"
                with lock:
                    stats["bad"] += 1
                    if outcome == "reload":
                        stats["bad_reloading"] += 1
                    elif outcome:
                        stats["bad_other"].append(outcome)
                    else:
                        stats["bad_invalid_arg"] += 1

    with TritonServer(repo, log_file=work / "server.log") as server:
        threads = [threading.Thread(target=good, args=(k, server.grpc_url)) for k in range(a.concurrency)]
        threads.append(threading.Thread(target=adversary, args=(server.grpc_url,)))
        t_start = time.monotonic()
        for t in threads:
            t.start()
        killed = None
        while time.monotonic() - t_start < 60 * a.minutes:
            time.sleep(1.0)
            if a.kill_stub and killed is None and time.monotonic() - t_start >= 30 * a.minutes:
                stubs = [pid for pid, (m, _) in python_stubs(server.proc.pid, server.repo).items()
                         if m == a.kill_stub]
                if stubs:
                    os.kill(stubs[0], signal.SIGKILL)
                    killed = {"model": a.kill_stub, "pid": stubs[0], "after_s": round(time.monotonic() - t_start)}
        stop.set()
        for t in threads:
            t.join(300)
        seconds = time.monotonic() - t_start
        recoveries = [{k: r[k] for k in ("model", "ok", "detail")} for r in server.recoveries]
    return {"minutes": a.minutes, "concurrency": a.concurrency, "seconds": round(seconds, 1),
            "good_requests": stats["good"], "good_failed": len(stats["good_failed"]),
            "good_wrong": len(stats["good_wrong"]), "good_failed_examples": stats["good_failed"][:5],
            "good_wrong_examples": stats["good_wrong"][:5],
            "encode_requests": len(stats["lat_encode"]), "decode_requests": len(stats["lat_decode"]),
            "encode_texts_per_s": round(4 * len(stats["lat_encode"]) / seconds, 1),
            "encode_p50_ms": percentile(stats["lat_encode"], 50), "encode_p99_ms": percentile(stats["lat_encode"], 99),
            "decode_p50_ms": percentile(stats["lat_decode"], 50), "decode_p99_ms": percentile(stats["lat_decode"], 99),
            "bad_requests": stats["bad"], "bad_invalid_argument": stats["bad_invalid_arg"],
            "bad_while_reloading": stats["bad_reloading"], "bad_other_count": len(stats["bad_other"]),
            "bad_other": stats["bad_other"][:5], "killed_stub": killed, "recoveries": recoveries}


def render(r: dict, command: str) -> str:
    verdict = "PASS" if r["good_failed"] == 0 and r["good_wrong"] == 0 and r["bad_other_count"] == 0 else "FAIL"
    lines = ["# Serving load run", "", f"Command: `{command}`", f"Machine: {describe_machine()}.", "",
             f"**{verdict}**: {r['good_requests']} good requests from {r['concurrency']} clients over "
             f"{r['seconds']} s, {r['good_failed']} failed, {r['good_wrong']} differed from in-process ONNX Runtime; "
             f"{r['bad_requests']} adversarial requests beside them, {r['bad_invalid_argument']} answered "
             f"INVALID_ARGUMENT, {r['bad_while_reloading']} a reloading model's transient answer (model killed: "
             f"{r['killed_stub']}), {r['bad_other_count']} anything else.", "", "| metric | value |", "|---|---|"]
    for k, v in r.items():
        lines.append(f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--data", default=os.environ.get("INVEMB_DATA"))
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--texts", type=int, default=256, help="validation headlines the good clients send")
    ap.add_argument("--kill-stub", default="", help="SIGKILL this model's process halfway (e.g. tokenizer)")
    ap.add_argument("--work", default=None, help="export + repository folder (default: a temp dir)")
    ap.add_argument("--out", default=str(REPO / "results/load_serving"))
    a = ap.parse_args(argv)
    if a.minutes <= 0 or a.concurrency < 1 or a.texts < 36:
        print("error: --minutes must be > 0, --concurrency >= 1, --texts >= 36", file=sys.stderr)
        return 2
    r = run(a)
    command = "python scripts/load_serving.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **r}, indent=2))
    text = render(r, command)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0 if r["good_failed"] == 0 and r["good_wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
