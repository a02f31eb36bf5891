"""Serving benchmark: Triton (`encode`, `roundtrip` over gRPC) beside in-process ONNX Runtime, same machine, same run.

    python scripts/bench_serving.py                          # small preset (MiniLM backbone), untrained decoder
    python scripts/bench_serving.py --checkpoint runs/small/final --concurrency 1,4,16

For each workload and concurrency level: a bounded number of requests (and a time cap), each request one batch
of validation headlines; throughput (texts/s) and p50/p99 request latency; in-process and Triton runs are
interleaved and the best of --repeats is kept (the machine may be shared). In-process runs use
invemb.ort.OnnxEmbedder (tokenize + ORT encoder; + the core beam search over ORT for roundtrip) from a thread
pool with the same concurrency. Writes results/bench_serving.{md,json} with machine info and the command.
An untrained decoder never emits EOS, so every roundtrip decodes the full max_length - 1 tokens (worst case).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from invemb.paths import checkout_root

REPO = checkout_root()


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1e3, q)) if latencies else float("nan")


def summarize(latencies: list[float], n_texts: int, seconds: float) -> dict:
    return {"requests": len(latencies), "texts": n_texts, "seconds": round(seconds, 3),
            "texts_per_s": round(n_texts / seconds, 2), "requests_per_s": round(len(latencies) / seconds, 2),
            "p50_ms": round(percentile_ms(latencies, 50), 2), "p99_ms": round(percentile_ms(latencies, 99), 2)}


def bench_inprocess(fn, batches: list, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """Call fn(batch) from `concurrency` threads until max_requests or max_seconds; per-call latency."""
    latencies, n_texts, lock = [], 0, __import__("threading").Lock()
    deadline = time.perf_counter() + max_seconds
    counter = iter(range(max_requests))

    def worker():
        nonlocal n_texts
        for i in counter:
            if time.perf_counter() > deadline:
                return
            batch = batches[i % len(batches)]
            t = time.perf_counter()
            fn(batch)
            with lock:
                latencies.append(time.perf_counter() - t)
                n_texts += len(batch)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return summarize(latencies, n_texts, time.perf_counter() - start)


def bench_triton(client, model: str, output: str, batches: list, concurrency: int, max_requests: int,
                 max_seconds: float) -> dict:
    """Asynchronous gRPC requests, `concurrency` in flight, until max_requests or max_seconds."""
    from invemb.serving.client import ClientError, text_tensor
    grpc = client.grpc
    done: queue.Queue = queue.Queue()
    latencies, n_texts, sent, in_flight = [], 0, 0, 0
    deadline = time.perf_counter() + max_seconds
    requested = [grpc.InferRequestedOutput(output)]

    def submit(i: int) -> None:
        batch = batches[i % len(batches)]
        inputs = client._inputs({"text": text_tensor(batch)})
        t = time.perf_counter()
        client.client.async_infer(model, inputs, lambda result=None, error=None: done.put(
            (time.perf_counter() - t, len(batch), error)), outputs=requested, client_timeout=client.timeout)

    start = time.perf_counter()
    while True:
        while in_flight < concurrency and sent < max_requests and time.perf_counter() < deadline:
            submit(sent)
            sent, in_flight = sent + 1, in_flight + 1
        if in_flight == 0:
            break
        latency, n, error = done.get(timeout=client.timeout + 30)
        in_flight -= 1
        if error is not None:
            raise ClientError(f"{model}: {error.message()}")
        latencies.append(latency)
        n_texts += n
    return summarize(latencies, n_texts, time.perf_counter() - start)


def machine_info() -> dict:
    import onnxruntime
    import tritonclient
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "tritonserver": "2.51.0 (nvidia-pytriton 0.7.0)",
            "tritonclient": getattr(tritonclient, "__version__", "?"), "load_avg_start": os.getloadavg()}


def prepare(args, work: Path) -> tuple[Path, Path, str]:
    """(repository, export dir, model description): export a checkpoint (or the untrained preset) into a repo copy."""
    from invemb.export import exporter as to_onnx
    ckpt, desc = args.checkpoint, f"checkpoint {args.checkpoint}"
    if not ckpt:
        import torch

        from invemb.config import preset
        from invemb.model import InvertibleEmbedder
        torch.manual_seed(0)
        cfg = preset(args.preset).model
        model = InvertibleEmbedder(cfg).eval()  # pretrained MiniLM backbone, random pooler + decoder
        ckpt = model.save_pretrained(work / "ckpt")
        desc = (f"preset {args.preset!r}: {cfg.encoder.model_name} backbone, S={cfg.encoder.sentence_dim}, "
                f"decoder {cfg.decoder.n_layers}x{cfg.decoder.d_model}, untrained pooler/decoder")
    repo = work / "repo"
    shutil.copytree(REPO / "model_repository", repo, ignore=lambda d, names: [
        n for n in names if n.endswith(".onnx") or n in ("manifest.json", "__pycache__")
        or (n == "tokenizer" and Path(d).name == "1")])
    with to_onnx.quiet_exporter():
        to_onnx.export_checkpoint(ckpt, work / "onnx", triton_repo=repo)
    return repo, work / "onnx", desc


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    lines = ["# Serving benchmark: Triton vs in-process ONNX Runtime", "",
             f"Command: `{report['command']}`  ", f"Date: {report['date']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB; Python {m['python']}, "
             f"onnxruntime {m['onnxruntime']}, tritonserver {m['tritonserver']}, numpy {m['numpy']}  ",
             f"Load average at start / end: {', '.join(f'{x:.1f}' for x in m['load_avg_start'])} / "
             f"{', '.join(f'{x:.1f}' for x in report['load_avg_end'])} (the machine is shared)  ",
             f"Model: {report['model']}  ",
             "Triton: 1 instance per model, intra-op threads 1, models on CPU, encoder via the Python-based "
             "onnxruntime backend; gRPC client in the benchmark process. In-process: OnnxEmbedder with "
             f"{report['ort_threads']} intra-op thread(s), a thread pool of the same concurrency. Each level: "
             f"in-process and Triton runs interleaved, best of {report['repeats']} by throughput.", ""]
    for wl in report["workloads"]:
        lines += [f"## {wl['name']} (batch {wl['batch']} texts per request{wl['note']})", "",
                  "| concurrency | Triton texts/s | Triton p50 ms | Triton p99 ms | in-process texts/s | "
                  "in-process p50 ms | in-process p99 ms | Triton / in-process |", "|---|---|---|---|---|---|---|---|"]
        for row in wl["rows"]:
            t, p = row["triton"], row["inprocess"]
            lines.append(f"| {row['concurrency']} | {t['texts_per_s']:.1f} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} "
                         f"| {p['texts_per_s']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
                         f"{t['texts_per_s'] / p['texts_per_s']:.0%} |")
        lines.append("")
    enc = next((w for w in report["workloads"] if w["name"] == "encode"), None)
    if enc:
        best_t = max(r["triton"]["texts_per_s"] for r in enc["rows"])
        best_p = max(r["inprocess"]["texts_per_s"] for r in enc["rows"])
        per_level = ", ".join(f"c={r['concurrency']}: {r['triton']['texts_per_s'] / r['inprocess']['texts_per_s']:.0%}"
                              for r in enc["rows"])
        verdict = "met" if best_t >= 0.85 * best_p else "NOT met"
        lines += [f"Target (Triton encode throughput >= 85% of in-process ORT at the same batch): best Triton "
                  f"{best_t:.1f} texts/s vs best in-process {best_p:.1f} texts/s = {best_t / best_p:.0%}: "
                  f"**{verdict}** (same concurrency: {per_level}).", ""]
    lines += ["Notes: the load average shows other jobs sharing the 2 vCPUs, so single numbers are noisy (hence the "
              "interleaving). Triton's encoder is one instance with one thread; the dynamic batcher only merges "
              "requests whose padded lengths match, so at moderate concurrency the encoder, the tokenizer, the "
              "gRPC server and the client compete for the same two vCPUs, while at 16 in flight more requests are "
              "merged. Every roundtrip decoding step is a BLS round trip (beam_search -> decoder_step -> back) "
              "that carries log_probs [N, V] and the whole KV cache; an untrained decoder decodes the full "
              "max_length - 1 steps.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="invemb checkpoint (default: the untrained --preset)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data", default=os.environ.get("INVEMB_DATA") or str(REPO.parent / "shared/data/financial-news-headlines"))
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--encode-batch", type=int, default=8)
    ap.add_argument("--roundtrip-batch", type=int, default=4)
    ap.add_argument("--encode-requests", type=int, default=200, help="max requests per level and run")
    ap.add_argument("--roundtrip-requests", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="time cap per level, backend and run")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per level; the best is reported")
    ap.add_argument("--ort-threads", type=int, default=1, help="in-process intra-op threads (Triton's config: 1)")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_serving"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from invemb.data import load_split
    from invemb.ort import OnnxEmbedder
    from invemb.serving.client import TritonClient
    from invemb.serving.launch import TritonServer
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = [r.text for r in load_split(args.data).val[:512]]
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "ort_threads": args.ort_threads,
              "repeats": args.repeats, "workloads": []}
    with tempfile.TemporaryDirectory(prefix="bench_serving.") as tmp:
        repo, export_dir, report["model"] = prepare(args, Path(tmp))
        print(f"model: {report['model']}", flush=True)
        emb = OnnxEmbedder(export_dir, threads=args.ort_threads)
        workloads = [("encode", "encode", "sentence_embedding", args.encode_batch, args.encode_requests,
                      lambda b: emb.encode(b), ""),
                     ("roundtrip", "roundtrip", "decoded_text", args.roundtrip_batch, args.roundtrip_requests,
                      lambda b: emb.decode(emb.encode(b), beam_size=4), ", beam 4")]
        with TritonServer(repo, log_file=Path(tmp) / "server.log") as server:
            client = TritonClient(server.grpc_url, timeout=300)
            for name, model, output, batch, max_req, fn, note in workloads:
                batches = [texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)]
                fn(batches[0])  # warm-up both
                bench_triton(client, model, output, batches, 2, 4, args.max_seconds)
                rows = []
                for c in levels:  # in-process and Triton interleaved, best of --repeats (the machine is shared)
                    runs = {"inprocess": [], "triton": []}
                    for _ in range(args.repeats):
                        runs["inprocess"].append(bench_inprocess(fn, batches, c, max_req, args.max_seconds))
                        runs["triton"].append(bench_triton(client, model, output, batches, c, max_req,
                                                           args.max_seconds))
                    row = {"concurrency": c, **{k: max(v, key=lambda r: r["texts_per_s"]) for k, v in runs.items()},
                           "all_runs": runs}
                    print(f"{name:9s} c={c:2d}: triton {row['triton']}\n{'':15s}in-process {row['inprocess']}",
                          flush=True)
                    rows.append(row)
                report["workloads"].append({"name": name, "batch": batch, "note": note, "rows": rows})
    report["load_avg_end"] = os.getloadavg()
    write_report(report, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
