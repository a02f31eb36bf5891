"""Load run: N good gRPC clients against a real, supervised Triton server for some minutes, one adversarial client
beside them, and faults: a model process SIGKILLed (--kill-stub), one stopped for some seconds (--stall-stub, SIGSTOP
then SIGCONT), tritonserver itself SIGKILLed (--kill-server), spread evenly over the run in that order. Every good
answer is checked against in-process ONNX Runtime; the run passes when 0 good requests failed or differed, every
fault ended in a recorded restart, and no server process or /dev/shm region is left after stop. Writes
results/load_serving.{md,json}.

    python scripts/load_serving.py --minutes 5 --concurrency 16                 # the shipped model, exported first
    python scripts/load_serving.py --minutes 10 --kill-stub tokenizer --stall-stub encoder 5 --kill-server
    python scripts/load_serving.py --bulk 20000 --out results/load_serving_bulk  # bulk encode, server killed, resumed

Good clients: 9 of 10 requests `encode` (4 validation headlines; the vectors must equal OnnxEmbedder.encode within
1e-4), 1 of 10 `beam_search` (2 of those vectors, beam 2; the texts must equal OnnxEmbedder.decode). The adversary
cycles through bad requests: out-of-vocabulary token ids to `encoder`, a NaN vector and an absurd beam size to
`beam_search`, an empty and an over-long text to `encode`; each must be answered INVALID_ARGUMENT, except while a
killed model reloads (--kill-stub): the adversary does not retry, so it then sees the transient answers of a
reloading model (counted apart; the good clients retry them). The good clients use the DEFAULT client settings.

--bulk N: `serving/client.py encode` of N training headlines (chunks written as they finish) through a server that
is SIGKILLed when 40% of the chunks are written (unsupervised, so the job fails after its retry budget), then the
same command with --resume against a new server; the vectors are compared row by row with an uninterrupted run and
with in-process ONNX Runtime.
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

from invemb.paths import checkout_root, display_command
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


def prepare(a, export: Path, repo: Path) -> str | None:
    """A fresh repository serving a new export (as the pipeline), or with --reuse-export the one an earlier run left
    in --work; the served encoder variant."""
    from invemb.export.exporter import place_export
    from invemb.export.placement import served_variant
    if a.reuse_export and (repo / "tokenizer" / "1" / "manifest.json").is_file() and export.is_dir():
        return served_variant(repo)
    return place_export(export, repo, a.checkpoint)


def fault_plan(a) -> list[tuple[float, str, str, float]]:
    """[(at second, kind, model, stall seconds)]: the requested faults spread evenly over the run."""
    kinds = ([("kill-stub", a.kill_stub, 0.0)] if a.kill_stub else []) + \
        ([("stall-stub", a.stall_stub[0], float(a.stall_stub[1]))] if a.stall_stub else []) + \
        ([("kill-server", "", 0.0)] if a.kill_server else [])
    return [(60 * a.minutes * (i + 1) / (len(kinds) + 1), *k) for i, k in enumerate(kinds)]


def inject(server, kind: str, model: str, seconds: float, elapsed: float) -> dict:
    """Do one fault to the server's current generation; what was done."""
    from invemb.serving.procs import stubs
    pid = server.proc.pid
    if kind != "kill-server":
        found = [s.pid for s in stubs(server.proc.pid, server.repo) if s.model == model and s.state != "Z"]
        if not found:
            return {"kind": kind, "model": model, "after_s": round(elapsed), "done": "no such model process"}
        pid = found[0]
    os.kill(pid, signal.SIGSTOP if kind == "stall-stub" else signal.SIGKILL)
    if kind == "stall-stub":  # resumed after `seconds` (unless the supervisor has ended it by then)
        threading.Timer(seconds, lambda: _resume(pid)).start()
    return {"kind": kind, "model": model or "tritonserver", "pid": pid, "after_s": round(elapsed),
            **({"stall_s": seconds} if kind == "stall-stub" else {})}


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def run(a) -> dict:
    from invemb.data import load_split
    from invemb.ort import OnnxEmbedder
    from invemb.serving.client import TRANSIENT, ClientError, TritonClient, text_tensor
    from invemb.serving.launch import TritonServer

    work = Path(a.work or tempfile.mkdtemp(prefix="invemb-load-"))
    export, repo = work / "onnx", work / "model_repository"
    variant = prepare(a, export, repo)
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
        with TritonClient(url) as c:  # the DEFAULT client settings (timeout, retry budget)
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
                    transient = any(code in str(e) and part in str(e) for code, part in TRANSIENT)
                    outcome = "" if "INVALID_ARG" in str(e) else "reload" if transient else f"{name}: {str(e)[:200]}"
                with lock:
                    stats["bad"] += 1
                    if outcome == "reload":
                        stats["bad_reloading"] += 1
                    elif outcome:
                        stats["bad_other"].append(outcome)
                    else:
                        stats["bad_invalid_arg"] += 1

    groups: set[int] = set()  # process groups of every server generation seen
    # a long startup limit (also for each restart): beside a training run the helpers get a few % of the cores
    with TritonServer(repo, log_file=work / "server.log", startup_timeout=a.startup_timeout) as server:
        threads = [threading.Thread(target=good, args=(k, server.grpc_url)) for k in range(a.concurrency)]
        threads.append(threading.Thread(target=adversary, args=(server.grpc_url,)))
        t_start = time.monotonic()
        for t in threads:
            t.start()
        plan = fault_plan(a)  # [(at seconds, kind, model, stall seconds)]
        faults = []
        while time.monotonic() - t_start < 60 * a.minutes:
            time.sleep(0.5)
            groups.add(server.proc.pid)
            elapsed = time.monotonic() - t_start
            if plan and elapsed >= plan[0][0] and server.alive():
                _, kind, model, seconds = plan.pop(0)
                faults.append(inject(server, kind, model, seconds, elapsed))
        stop.set()
        for t in threads:
            t.join(300)
        seconds = time.monotonic() - t_start
        restarts = [{k: r[k] for k in ("reason", "ok", "down_s")} for r in server.restarts]
        regions = set(server.reaped) | set(server.regions)
    from invemb.serving import procs
    left = {"processes": sorted(g for g in groups if procs.group_alive(g)),
            "shm_regions": sorted(r for r in regions if os.path.exists(f"/dev/shm/{r}"))}
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
            "bad_other": stats["bad_other"][:5], "faults": faults, "restarts": restarts,
            "server_generations": len(groups), "left_after_stop": left}


def passed(r: dict) -> bool:
    left = r["left_after_stop"]
    return (r["good_failed"] == 0 and r["good_wrong"] == 0 and r["bad_other_count"] == 0 and not left["processes"]
            and not left["shm_regions"] and len(r["restarts"]) >= len(r["faults"])
            and all(x["ok"] for x in r["restarts"]))


def render(r: dict, command: str) -> str:
    verdict = "PASS" if passed(r) else "FAIL"
    faults = ", ".join(f"{f['kind']} {f['model']} at {f['after_s']} s" for f in r["faults"]) or "none"
    downs = ", ".join(f"{x['down_s']} s" for x in r["restarts"]) or "-"
    left = r["left_after_stop"]
    lines = ["# Serving load run", "", f"Command: `{command}`", f"Machine: {describe_machine()}.", "",
             f"**{verdict}**: {r['good_requests']} good requests from {r['concurrency']} clients over "
             f"{r['seconds']} s, {r['good_failed']} failed, {r['good_wrong']} differed from in-process ONNX Runtime; "
             f"{r['bad_requests']} adversarial requests beside them, {r['bad_invalid_argument']} answered "
             f"INVALID_ARGUMENT, {r['bad_while_reloading']} a transient answer of a restarting server (the "
             f"adversary does not retry), {r['bad_other_count']} anything else. Faults: {faults}; restarts: "
             f"{len(r['restarts'])} (down {downs}); left after stop: {len(left['processes'])} process groups, "
             f"{len(left['shm_regions'])} /dev/shm regions.", "", "| metric | value |", "|---|---|"]
    for k, v in r.items():
        lines.append(f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


# served vs in-process vectors: the server batches rows differently from OnnxEmbedder.encode (other batch sizes and
# padded lengths, so other kernel shapes and summation orders), measured ~1e-5 apart on equal rows; resumed vs
# uninterrupted (both served, the same chunks) must be bit-identical
IN_PROCESS_TOL = 1e-4


def bulk(a) -> dict:
    """The bulk-resume measurement (--bulk N, see the module doc)."""
    import subprocess

    from invemb.data import load_split
    from invemb.ort import OnnxEmbedder
    from invemb.serving.launch import TritonServer
    work = Path(a.work or tempfile.mkdtemp(prefix="invemb-bulk-"))
    export, repo = work / "onnx", work / "model_repository"
    variant = prepare(a, export, repo)
    texts = [r.text for r in load_split(a.data).train[:a.bulk]]
    (work / "bulk.txt").write_text("\n".join(texts) + "\n")
    t0 = time.monotonic()
    want = OnnxEmbedder(export, variant=variant).encode(texts)  # [N,S] in-process, the graphs Triton serves
    in_process_s = time.monotonic() - t0
    out, parts = work / "bulk.npy", work / "bulk.npy.parts"
    job = [sys.executable, str(REPO / "serving" / "client.py"), "--no-progress", "--retry-budget", "10"]
    r = {"rows": len(texts), "in_process_s": round(in_process_s, 1), "variant": variant or "fp32"}
    with TritonServer(repo, log_file=work / "server1.log", supervise=False, startup_timeout=a.startup_timeout) as first:
        t0 = time.monotonic()
        run = subprocess.Popen([*job, "--url", first.grpc_url, "encode", str(work / "bulk.txt"), "--out", str(out)],
                               stderr=subprocess.PIPE, text=True)
        chunks = -(-len(texts) // 1024)
        while len(list(parts.glob("chunk-*"))) < 0.4 * chunks and run.poll() is None:
            time.sleep(0.1)
        os.kill(first.proc.pid, signal.SIGKILL)
        r["killed_after_s"] = round(time.monotonic() - t0, 1)
        _, err = run.communicate()
        r.update(first_rc=run.returncode, first_error=err.strip().splitlines()[-1:],
                 chunks_written=len(list(parts.glob("chunk-*"))), chunks=chunks)
    with TritonServer(repo, log_file=work / "server2.log", startup_timeout=a.startup_timeout) as second:
        t0 = time.monotonic()
        done = subprocess.run([*job, "--url", second.grpc_url, "encode", str(work / "bulk.txt"), "--out", str(out),
                               "--resume"], capture_output=True, text=True)
        r.update(resume_rc=done.returncode, resume_s=round(time.monotonic() - t0, 1),
                 resume_stderr=done.stderr.strip().splitlines()[-2:])
        t0 = time.monotonic()
        whole = subprocess.run([*job, "--url", second.grpc_url, "encode", str(work / "bulk.txt"), "--out",
                                str(work / "whole.npy")], capture_output=True, text=True)
        r.update(uninterrupted_rc=whole.returncode, uninterrupted_s=round(time.monotonic() - t0, 1))
    for key in ("first_error", "resume_stderr"):  # the scratch folder is this machine's: named WORK in results
        r[key] = [line.replace(str(work), "WORK") for line in r[key]]
    if r["resume_rc"] == 0 and r["uninterrupted_rc"] == 0:
        got, ref = np.load(out), np.load(work / "whole.npy")  # [N,S] each
        diff = np.abs(got - want).max(1)  # [N]
        r.update(resumed_equals_uninterrupted_rows=int((got == ref).all(1).sum()),
                 resumed_equals_in_process_rows=int((got == want).all(1).sum()),
                 rows_within_1e_5_of_in_process=int((diff <= 1e-5).sum()),
                 rows_within_1e_4_of_in_process=int((diff <= IN_PROCESS_TOL).sum()), max_abs_diff=float(diff.max()),
                 min_cosine_to_in_process=float(((got * want).sum(1) / (np.linalg.norm(got, axis=1)
                                                                       * np.linalg.norm(want, axis=1))).min()))
    return r


def bulk_main(a, argv) -> int:
    r = bulk(a)
    ok = r.get("resume_rc") == 0 and r.get("resumed_equals_uninterrupted_rows") == r["rows"] and \
        r.get("rows_within_1e_4_of_in_process") == r["rows"] and r["first_rc"] == 2
    command = "python scripts/load_serving.py " + display_command(argv)
    lines = ["# Bulk encode through a killed server, resumed", "", f"Command: `{command}`",
             f"Machine: {describe_machine()}.", "", f"**{'PASS' if ok else 'FAIL'}**: {r['rows']} headlines; the "
             f"server was SIGKILLed after {r.get('killed_after_s')} s with {r['chunks_written']} of {r['chunks']} "
             f"chunks written (the job exited {r['first_rc']}); resumed on a new server in {r.get('resume_s')} s; "
             f"{r.get('resumed_equals_uninterrupted_rows')} rows identical to an uninterrupted run, "
             f"{r.get('rows_within_1e_4_of_in_process')} within 1e-4 of in-process ONNX Runtime, the load run's "
             f"tolerance ({r.get('rows_within_1e_5_of_in_process')} within 1e-5; max |diff| "
             f"{r.get('max_abs_diff')}).", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r.items()]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **r}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--data", default=os.environ.get("INVEMB_DATA"))
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--texts", type=int, default=256, help="validation headlines the good clients send")
    ap.add_argument("--kill-stub", default="", help="SIGKILL this model's process (e.g. tokenizer)")
    ap.add_argument("--stall-stub", nargs=2, metavar=("MODEL", "SECONDS"), default=None,
                    help="SIGSTOP this model's process, SIGCONT after SECONDS")
    ap.add_argument("--kill-server", action="store_true", help="SIGKILL tritonserver itself")
    ap.add_argument("--bulk", type=int, default=0, help="instead of the load run: the bulk encode of N headlines "
                                                        "through a server killed mid-job, then resumed")
    ap.add_argument("--work", default=None, help="export + repository folder (default: a temp dir)")
    ap.add_argument("--reuse-export", action="store_true", help="serve the export an earlier run left in --work")
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a (re)start may take")
    ap.add_argument("--out", default=str(REPO / "results/load_serving"))
    a = ap.parse_args(argv)
    if a.minutes <= 0 or a.concurrency < 1 or a.texts < 36 or a.bulk < 0:
        print("error: --minutes must be > 0, --concurrency >= 1, --texts >= 36, --bulk >= 0", file=sys.stderr)
        return 2
    if a.stall_stub and not a.stall_stub[1].replace(".", "", 1).isdigit():
        print(f"error: --stall-stub SECONDS must be a number, got {a.stall_stub[1]!r}", file=sys.stderr)
        return 2
    from invemb.data import resolve_data_path
    from invemb.errors import InvembError
    try:
        resolve_data_path(a.data)  # the headlines the clients send: a missing --data is one line, before any work
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.bulk:
        return bulk_main(a, sys.argv[1:] if argv is None else argv)
    r = run(a)
    command = "python scripts/load_serving.py " + display_command(sys.argv[1:] if argv is None else argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **r}, indent=2))
    text = render(r, command)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0 if passed(r) else 1


if __name__ == "__main__":
    sys.exit(main())
