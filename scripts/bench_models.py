"""Beam-4 decode speed of two models in ONE run (a new model against the one it replaces), in process, ONNX
Runtime with the int8 variant (int8 encoder + top-k decoder graphs), one thread: the `ort_int8` arm of
scripts/bench_export.py. Each round times every arm once (a slow spell of a shared machine hits every arm); the
best round of each arm is kept. The old model decodes as its default did (the beam's best); the new one as users get
it (decode's defaults: re-ranking "auto", the text as written: the search, the re-encoded rivals, one
decoder_surface pass), at each of --margins, with re-ranking off and with normalized=True (the search alone).

    git show HEAD~1:models/invemb-minilm-s768/model.safetensors ...   # the old model into a folder (see --help)
    python scripts/bench_models.py --new models/invemb-minilm-s768 --old runs/old_model \
        --data ../shared/data/financial-news-headlines --n 256 --rounds 5 --margins 0.01 0.03 \
        --out results/bench_models

Writes <out>.md and <out>.json (machine, versions, command).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from invemb.paths import display_command, display_path
from invemb.util import cpu_isa, cpu_name


def export(path: str, out: Path, threads: int):
    """A model folder -> its ONNX export with the int8 variant -> (OnnxEmbedder int8, the torch model)."""
    from invemb.export import exporter, optimize
    from invemb.model import InvertibleEmbedder
    from invemb.ort import OnnxEmbedder
    model = InvertibleEmbedder.from_pretrained(path)
    with exporter.quiet_exporter():
        exporter.export_model(model, out)
    optimize.make_variants(out, ("int8",))
    return OnnxEmbedder(out, threads=threads, variant="int8"), model


def run(args) -> dict:
    import numpy as np
    import onnxruntime
    from invemb.embedder import RERANK_MARGIN
    from invemb.data import load_split
    texts = [r.text for r in load_split(args.data).val][:args.n]
    with tempfile.TemporaryDirectory() as tmp:
        new, new_torch = export(args.new, Path(tmp) / "new", args.threads)
        old, old_torch = export(args.old, Path(tmp) / "old", args.threads)
        v_new, v_old = new.encode(texts), old.encode(texts)  # [n,S] each: each model decodes its own vectors
        # the old model decodes as its default did (the beam's best); the new one with its default (re-ranking
        # within RERANK_MARGIN, text as written), each margin of --margins, and with re-ranking off
        arms = {"old": lambda: old.decode(v_old, beam_size=4, rerank="off"),
                "new_default": lambda: new.decode(v_new, beam_size=4),
                **{f"new_margin_{m:g}": (lambda m=m: new.decode(v_new, beam_size=4, rerank=m)) for m in args.margins},
                "new_written": lambda: new.decode(v_new, beam_size=4, rerank="off"),
                "new_normalized": lambda: new.decode(v_new, beam_size=4, rerank="off", normalized=True)}
        for fn in arms.values():  # warm-up: sessions, allocator, tokenizer caches
            fn()
        times = {k: [] for k in arms}
        for _ in range(args.rounds):
            for k, fn in arms.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        lengths = {"old": float(np.mean([len(i) for i in old.decode_ids(v_old, beam_size=4)])),
                   "new": float(np.mean([len(i) for i in new.decode_ids(v_new, beam_size=4)]))}
        same = {"new_ort_vs_torch_written": new.decode(v_new, beam_size=4) == new_torch.decode(v_new, beam_size=4)}
        encodes = {}  # candidates re-encoded per headline at each margin (the cost the margin buys)
        nbest = new.decode_nbest(v_new, beam_size=4)
        for m in (RERANK_MARGIN, *args.margins):
            encodes[f"{m:g}"] = float(np.mean([len(r) for r in new.rerank_rivals(nbest, m)[0]]))
    best = {k: min(v) for k, v in times.items()}
    per_s = {k: len(texts) / t for k, t in best.items()}
    return {"command": display_command(["python", "scripts/bench_models.py", *args.argv]),
            "machine": {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(),
                        "load_avg_1m_at_end": os.getloadavg()[0], "python": platform.python_version(),
                        "onnxruntime": onnxruntime.__version__},
            "threads": args.threads, "n": len(texts), "rounds": args.rounds,
            "models": {"new": display_path(args.new), "old": display_path(args.old)},
            "headlines_per_s": per_s, "generated_pieces_mean": lengths,
            "vs_old": {k: per_s[k] / per_s["old"] for k in per_s}, "rerank_margin": RERANK_MARGIN,
            "encodes_per_headline": encodes, **same,
            "all_rounds_s": times}


ARM_NAMES = {"old": "old, its default decode before re-ranking (the beam's best)",
             "new_default": "new, default decode (text as written, re-ranking within {margin:g})",
             "new_written": "new, re-ranking off, text as written (search + tag pass)",
             "new_normalized": "new, re-ranking off, normalized=True (search only)"}


def to_markdown(res: dict) -> str:
    p, m, enc = res["headlines_per_s"], res["machine"], res["encodes_per_headline"]
    rows = []
    for k in p:
        name = ARM_NAMES.get(k, "new, text as written, re-ranking within {margin}").format(
            margin=res["rerank_margin"] if k == "new_default" else k.rsplit("_", 1)[-1])
        model = res["models"]["old" if k == "old" else "new"]
        key = f"{res['rerank_margin']:g}" if k == "new_default" else k.rsplit("_", 1)[-1]
        rows.append(f"| {name} | {model} | {p[k]:.1f} | {100 * res['vs_old'][k]:.0f}% | "
                    f"{enc[key] if key in enc else 0:.2f} |")
    return "\n".join([
        "# Beam-4 decode speed: new model vs the model it replaces (one run)", "",
        f"Command: `{res['command']}`", "",
        f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, load average {m['load_avg_1m_at_end']:.1f} at the end; "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}; {res['threads']} ORT thread, int8 variant (int8 "
        f"encoder + top-k decoder graphs), {res['n']} validation headlines, best of {res['rounds']} interleaved rounds.",
        "", "| arm | model | headlines/s | vs old | candidates re-encoded per headline |", "|---|---|---|---|---|",
        *rows, "",
        f"Generated pieces (mean): old {res['generated_pieces_mean']['old']:.2f}, new "
        f"{res['generated_pieces_mean']['new']:.2f}. The int8 variant's default texts equal the PyTorch fp32 model's "
        f"on the same vectors (all {res['n']}): {res['new_ort_vs_torch_written']}.", ""])


def main(argv=None) -> int:
    import sys
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", required=True, help="model folder (e.g. models/invemb-minilm-s768)")
    ap.add_argument("--old", required=True, help="the model it replaces (a folder; e.g. from git show)")
    ap.add_argument("--data", default=None, help="headlines (default: $INVEMB_DATA)")
    ap.add_argument("--n", type=int, default=64, help="validation headlines decoded per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--margins", type=float, nargs="*", default=[],
                    help="also time the default decode at these re-ranking margins (e.g. 0.01 0.03)")
    ap.add_argument("--out", default="results/bench_models")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2))
    Path(f"{args.out}.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
