"""Serving benchmark: Triton (gRPC) beside in-process ONNX Runtime, same machine, same run.

    python scripts/bench_serving.py                              # the shipped model (stops at EOS)
    python scripts/bench_serving.py --checkpoint untrained --out results/bench_serving_untrained   # full length
    python scripts/bench_serving.py --checkpoint runs/small/final --concurrency 1,4,16

Workloads, each request one batch of validation headlines (or their vectors):
  encode     text -> vector: Triton `encode` ensemble (encoder: 2 instances), the same with a 1-instance encoder
             (`encode_x1`) vs in-process OnnxEmbedder.encode on the graphs Triton serves (the default export: the
             static int8 encoder) and on the fp32 encoder
  decode     vector -> text, beam 4: Triton `beam_search` with its own ORT sessions over the top-k graphs (the
             default: 2 instances), the same model as 1 instance (`beam_search_x1`), the same model with
             decoder_runner=bls (a BLS round trip per step), `beam_search_op` (the one-call BeamSearch-op graph:
             token ids, detokenized by the caller), in-process over the top-k graphs and in-process over full
             log_probs rows
  roundtrip  text -> text: Triton `roundtrip` (its beam_search: 2 instances x 2 search workers, the default) vs
             in-process encode + decode (1 thread); `roundtrip_w1`: over beam_search instances with 1 search worker
             (the default before), `roundtrip_x1`: over ONE instance with 2 workers; `in-process 2 workers`: the
             in-process search split the same way (OnnxEmbedder(search_workers=2): what one caller gets from both
             cores). Intra-op threads (2 per session) were slower than 1 at c=1/4/16 in the last run that had them:
             results/bench_serving_encoder.md
For each workload and concurrency level: a bounded number of requests (and a time cap); throughput (texts/s) and
p50/p99 latency; the backends' runs are interleaved and the best of --repeats is kept (the machine may be shared).
In-process runs call from a thread pool with the same concurrency. Writes results/bench_serving.{md,json} with the
machine and the command. An untrained decoder never emits EOS: every decode runs max_length - 1 steps.
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

from invemb.paths import checkout_root, display_command, display_path

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


def bench_triton(client, model: str, inputs, output: str, batches: list, concurrency: int, max_requests: int,
                 max_seconds: float) -> dict:
    """Asynchronous gRPC requests to `model`, `concurrency` in flight, until max_requests or max_seconds;
    inputs(batch) -> {name: array}."""
    from invemb.serving.client import ClientError
    grpc = client.grpc
    done: queue.Queue = queue.Queue()
    latencies, n_texts, sent, in_flight = [], 0, 0, 0
    deadline = time.perf_counter() + max_seconds
    requested = [grpc.InferRequestedOutput(output)]

    def submit(i: int) -> None:
        batch = batches[i % len(batches)]
        feeds = client._inputs(inputs(batch))
        t = time.perf_counter()
        client.client.async_infer(model, feeds, lambda result=None, error=None: done.put(
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
    """(repository, export dir, model description): export the model into a fresh repository copy, plus
    `beam_search_bls`: the beam_search model with decoder_runner=bls (one BLS call per decoding step)."""
    from invemb.export import exporter as to_onnx
    ckpt = args.checkpoint
    if ckpt == "untrained":
        import torch

        from invemb.config import preset
        from invemb.model import InvertibleEmbedder
        torch.manual_seed(0)
        cfg = preset(args.preset).model
        model = InvertibleEmbedder(cfg).eval()  # pretrained MiniLM backbone, random pooler + decoder
        ckpt = model.save_pretrained(work / "ckpt")
        desc = (f"preset {args.preset!r}: {cfg.encoder.model_name} backbone, S={cfg.encoder.sentence_dim}, "
                f"decoder {cfg.decoder.n_layers}x{cfg.decoder.d_model}, untrained pooler/decoder (never stops early)")
    else:
        from invemb.shipped import default_model_path
        ckpt = ckpt or default_model_path()
        desc = f"{'the shipped model ' if not args.checkpoint else 'checkpoint '}{display_path(ckpt)}"
    repo = work / "repo"
    to_onnx.place_export(work / "onnx", repo, ckpt, one_call=True)  # + beam_search_op
    copy_model(repo, "beam_search", "beam_search_bls",  # a BLS round trip per decode step
               ('value: { string_value: "onnxruntime" }', 'value: { string_value: "bls" }'))
    one_instance = ("instance_group [ { count: 2 ", "instance_group [ { count: 1 ")  # the defaults have 2
    copy_model(repo, "beam_search", "beam_search_x1", one_instance)
    copy_model(repo, "encoder", "encoder_x1", one_instance)
    copy_model(repo, "encode", "encode_x1", ('model_name: "encoder"', 'model_name: "encoder_x1"'))  # uses it
    # search workers: the default 2 instances with one worker each (the default before), and the roundtrip ensemble
    # over it and over the 1-instance (2-worker) search
    one_worker = tuple(f'"search_workers" value: {{ string_value: "{n}" }}' for n in (2, 1))
    copy_model(repo, "beam_search", "beam_search_w1", one_worker)
    copy_model(repo, "roundtrip", "roundtrip_w1", ('model_name: "beam_search"', 'model_name: "beam_search_w1"'))
    copy_model(repo, "roundtrip", "roundtrip_x1", ('model_name: "beam_search"', 'model_name: "beam_search_x1"'))
    return repo, work / "onnx", desc


def copy_model(repo: Path, src: str, dst: str, *replacements: tuple[str, str]) -> None:
    """A benchmark arm: model `src` of the Triton repository copied as `dst`, its config renamed and edited."""
    shutil.copytree(repo / src, repo / dst)
    cfg_file = repo / dst / "config.pbtxt"
    text = cfg_file.read_text().replace(f'name: "{src}"', f'name: "{dst}"')
    for old, new in replacements:
        text = text.replace(old, new)
    cfg_file.write_text(text)


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
             "Triton: 1 instance per model (encoder, beam_search: 2; the _x1 arms: 1), intra-op threads 1, "
             "beam_search with 2 search workers (the _w1 arms: 1), models on CPU, encoder via the Python-based "
             "onnxruntime backend; gRPC client in the benchmark process. Graphs served: "
             f"{report.get('served_variant') or 'fp32'} (export_checkpoint's default: the static int8 encoder, fp32 "
             "decoders). In-process: OnnxEmbedder on the same graphs (`in-process fp32`: the fp32 encoder) with "
             f"{report['ort_threads']} intra-op thread(s), a thread pool of the same concurrency. Each level: "
             f"the backends' runs interleaved, best of {report['repeats']} by throughput.", ""]
    for wl in report["workloads"]:
        names, ref = [b for b in wl["backends"]], wl["backends"][-1]
        lines += [f"## {wl['name']} (batch {wl['batch']} per request{wl['note']})", "",
                  "| concurrency | " + " | ".join(f"{b} texts/s (p50 ms)" for b in names) + " | "
                  + " | ".join(f"{b} / {ref}" for b in names[:-1]) + " |",
                  "|---|" + "---|" * (2 * len(names) - 1)]
        for row in wl["rows"]:
            cells = [f"{row[b]['texts_per_s']:.1f} ({row[b]['p50_ms']:.0f})" for b in names]
            ratios = [f"{row[b]['texts_per_s'] / row[ref]['texts_per_s']:.0%}" for b in names[:-1]]
            lines.append(f"| {row['concurrency']} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
    for wl in report["workloads"]:
        if wl["name"] in ("roundtrip", "decode"):
            tri, ref = wl["backends"][0], wl["backends"][-1]
            ratios = {r["concurrency"]: r[tri]["texts_per_s"] / r[ref]["texts_per_s"] for r in wl["rows"]}
            verdict = "met" if all(v >= 1.0 for v in ratios.values()) else "NOT met"
            lines += [f"Target ({tri} throughput >= 100% of {ref} at every concurrency): " + ", ".join(
                f"c={c}: {v:.0%}" for c, v in ratios.items()) + f": **{verdict}**.", ""]
    for wl in report["workloads"]:
        if {"Triton roundtrip", "in-process 2 workers"} <= set(wl["backends"]):
            lines += ["The same split of the search in both (Triton roundtrip vs in-process 2 workers): " + ", ".join(
                f"c={r['concurrency']}: {r['Triton roundtrip']['texts_per_s'] / r['in-process 2 workers']['texts_per_s']:.0%}"
                for r in wl["rows"]) + ".", ""]
    if report.get("decode_texts_identical"):
        lines += ["Decode texts identical to in-process top-k on 32 headlines: " + ", ".join(
            f"{k}: {v}" for k, v in report["decode_texts_identical"].items()) + ".", ""]
    lines += ["Notes: the load average shows whether other jobs shared the 2 vCPUs (single numbers are noisy, hence "
              "the interleaving). Each Triton model instance has one intra-op thread; the gRPC client "
              "runs in the benchmark process, on the same two cores. `beam_search` runs the core search with its "
              "own ONNX Runtime sessions of the decoder graphs and fetches only their top-k outputs (64 candidates "
              "per row instead of [N, V] log_probs), so neither the KV cache nor the scores leave its process; "
              "`beam_search_bls` does one BLS request to decoder_step per step (the path for decoder models "
              "served elsewhere, e.g. on a GPU). `search_workers` 2 (the default): a search splits its rows over "
              "the cores no other search holds (lock files shared by the server's searches), and keeps to one "
              "slice for 3 s after finding a core held (under load one slice per search uses the cores better); "
              "the first searches of a burst still split, so short runs at c=4 measure that transient.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None,
                    help="invemb checkpoint, or 'untrained' (the --preset, random decoder); default: the shipped model")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data", default=os.environ.get("INVEMB_DATA") or str(REPO.parent / "shared/data/financial-news-headlines"))
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--encode-batch", type=int, default=8)
    ap.add_argument("--roundtrip-batch", type=int, default=4)
    ap.add_argument("--encode-requests", type=int, default=200, help="max requests per level and run")
    ap.add_argument("--roundtrip-requests", type=int, default=32)
    ap.add_argument("--decode-batch", type=int, default=4)
    ap.add_argument("--decode-requests", type=int, default=32)
    ap.add_argument("--workloads", default="encode,decode,roundtrip")
    ap.add_argument("--max-seconds", type=float, default=12.0, help="time cap per level, backend and run")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per level; the best is reported")
    ap.add_argument("--ort-threads", type=int, default=1, help="in-process intra-op threads (Triton's config: 1)")
    ap.add_argument("--out", default=str(REPO / "results" / "bench_serving"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from invemb.data import load_split
    from invemb.export.placement import served_variant
    from invemb.ort import OnnxEmbedder
    from invemb.serving.client import TritonClient, text_tensor
    from invemb.serving.launch import TritonServer
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = [r.text for r in load_split(args.data).val[:512]]
    report = {"command": display_command([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "ort_threads": args.ort_threads,
              "repeats": args.repeats, "workloads": []}
    with tempfile.TemporaryDirectory(prefix="bench_serving.") as tmp:
        repo, export_dir, report["model"] = prepare(args, Path(tmp))
        print(f"model: {report['model']}", flush=True)
        # in process: the graphs Triton serves (the default export: the static int8 encoder, fp32 decoders)
        variant = report["served_variant"] = served_variant(repo)
        emb = OnnxEmbedder(export_dir, threads=args.ort_threads, variant=variant)
        fp32 = OnnxEmbedder(export_dir, threads=args.ort_threads)
        rows_emb = OnnxEmbedder(export_dir, threads=args.ort_threads, variant=variant)
        rows_emb.candidates = False  # in-process search over full [N, V] log_probs rows
        emb2 = OnnxEmbedder(export_dir, threads=1, variant=variant, search_workers=2)  # one caller, both cores
        vec_of = dict(zip(texts, emb.encode(texts)))

        def vectors(batch):
            return np.stack([vec_of[t] for t in batch])

        def text_in(batch):
            return {"text": text_tensor(batch)}

        def vec_in(batch):
            return {"sentence_embedding": vectors(batch)}

        from invemb.manifest import generation_limit
        steps = np.array([generation_limit(emb.manifest) + 1], np.int32)

        def op_in(batch):  # the one-call graph's inputs
            return {"sentence_embedding": vectors(batch), "num_beams": np.array([4], np.int32), "max_length": steps}
        # (name, batch, max requests, note, [(backend, kind, target, inputs, output)]); the last backend is the
        # reference of the ratio columns
        workloads = [
            ("encode", args.encode_batch, args.encode_requests, " texts", [
                ("Triton encode", "triton", "encode", text_in, "sentence_embedding"),
                ("Triton encode_x1", "triton", "encode_x1", text_in, "sentence_embedding"),
                ("in-process fp32", "inprocess", lambda b: fp32.encode(b), None, None),
                ("in-process", "inprocess", lambda b: emb.encode(b), None, None)]),
            ("decode", args.decode_batch, args.decode_requests, " vectors, beam 4", [
                ("Triton beam_search", "triton", "beam_search", vec_in, "text"),
                ("Triton beam_search_x1", "triton", "beam_search_x1", vec_in, "text"),
                ("Triton beam_search_bls", "triton", "beam_search_bls", vec_in, "text"),
                ("Triton beam_search_op", "triton", "beam_search_op", op_in, "sequences"),
                ("in-process full rows", "inprocess", lambda b: rows_emb.decode(vectors(b), beam_size=4), None, None),
                ("in-process", "inprocess", lambda b: emb.decode(vectors(b), beam_size=4), None, None)]),
            ("roundtrip", args.roundtrip_batch, args.roundtrip_requests, " texts, beam 4", [
                ("Triton roundtrip", "triton", "roundtrip", text_in, "decoded_text"),
                ("Triton roundtrip_w1", "triton", "roundtrip_w1", text_in, "decoded_text"),
                ("Triton roundtrip_x1", "triton", "roundtrip_x1", text_in, "decoded_text"),
                ("in-process 2 workers", "inprocess", lambda b: emb2.decode(emb2.encode(b), beam_size=4), None, None),
                ("in-process", "inprocess", lambda b: emb.decode(emb.encode(b), beam_size=4), None, None)])]
        wanted = args.workloads.split(",")
        with TritonServer(repo, log_file=Path(tmp) / "server.log") as server:
            client = TritonClient(server.grpc_url, timeout=300)
            for name, batch, max_req, note, backends in workloads:
                if name not in wanted:
                    continue
                batches = [texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)]

                def once(backend, c, n, seconds):
                    _, kind, target, inputs, output = backend
                    if kind == "inprocess":
                        return bench_inprocess(target, batches, c, n, seconds)
                    return bench_triton(client, target, inputs, output, batches, c, n, seconds)
                for b in backends:  # warm-up
                    once(b, 2, 4, args.max_seconds)
                rows = []
                for c in levels:  # backends interleaved, best of --repeats (the machine may be shared)
                    runs = {b[0]: [] for b in backends}
                    for _ in range(args.repeats):
                        for b in backends:
                            runs[b[0]].append(once(b, c, max_req, args.max_seconds))
                    row = {"concurrency": c, **{k: max(v, key=lambda r: r["texts_per_s"]) for k, v in runs.items()},
                           "all_runs": runs}
                    print(f"{name} c={c}: " + "; ".join(f"{k} {row[k]['texts_per_s']}/s" for k in runs), flush=True)
                    rows.append(row)
                report["workloads"].append({"name": name, "batch": batch, "note": note, "rows": rows,
                                            "backends": [b[0] for b in backends]})
            if "decode" in wanted:  # same texts on every path (the tests prove it; the benchmark shows it)
                v32, want = vectors(texts[:32]), emb.decode(vectors(texts[:32]), beam_size=4)
                report["decode_texts_identical"] = {
                    "in-process full rows": rows_emb.decode(v32, beam_size=4) == want,
                    "Triton beam_search": client.decode(v32, beam_size=4) == want}
    report["load_avg_end"] = os.getloadavg()
    write_report(report, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
