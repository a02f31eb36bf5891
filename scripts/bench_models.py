"""Beam-4 decode speed of two models in ONE run (a new model against the one it replaces), in process, ONNX
Runtime with the int8 variant (int8 encoder + top-k decoder graphs), one thread: the `ort_int8` arm of
scripts/bench_export.py. Each round times every arm once (a slow spell of a shared machine hits every arm); the
best round of each arm is kept. A model with surface heads is timed as users get it (the text as written: the
search + one decoder_surface pass) and with normalized=True (the search alone).

    git show HEAD~1:models/invemb-minilm-s768/model.safetensors ...   # the old model into a folder (see --help)
    python scripts/bench_models.py --new models/invemb-minilm-s768 --old runs/old_model \
        --data ../shared/data/financial-news-headlines --n 64 --rounds 5 --out results/bench_models

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
    from invemb.data import load_split
    texts = [r.text for r in load_split(args.data).val][:args.n]
    with tempfile.TemporaryDirectory() as tmp:
        new, new_torch = export(args.new, Path(tmp) / "new", args.threads)
        old, old_torch = export(args.old, Path(tmp) / "old", args.threads)
        v_new, v_old = new.encode(texts), old.encode(texts)  # [n,S] each: each model decodes its own vectors
        arms = {"old": lambda: old.decode(v_old, beam_size=4),
                "new_written": lambda: new.decode(v_new, beam_size=4),
                "new_normalized": lambda: new.decode(v_new, beam_size=4, normalized=True)}
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
    best = {k: min(v) for k, v in times.items()}
    per_s = {k: len(texts) / t for k, t in best.items()}
    return {"command": display_command(["python", "scripts/bench_models.py", *args.argv]),
            "machine": {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(),
                        "load_avg_1m_at_end": os.getloadavg()[0], "python": platform.python_version(),
                        "onnxruntime": onnxruntime.__version__},
            "threads": args.threads, "n": len(texts), "rounds": args.rounds,
            "models": {"new": display_path(args.new), "old": display_path(args.old)},
            "headlines_per_s": per_s, "generated_pieces_mean": lengths,
            "new_written_vs_old": per_s["new_written"] / per_s["old"],
            "new_normalized_vs_old": per_s["new_normalized"] / per_s["old"], **same,
            "all_rounds_s": times}


def to_markdown(res: dict) -> str:
    p = res["headlines_per_s"]
    m = res["machine"]
    return "\n".join([
        "# Beam-4 decode speed: new model vs the model it replaces (one run)", "",
        f"Command: `{res['command']}`", "",
        f"Machine: {m['cpu']} ({m['isa']}), {m['cores']} cores, load average {m['load_avg_1m_at_end']:.1f} at the end; "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}; {res['threads']} ORT thread, int8 variant (int8 "
        f"encoder + top-k decoder graphs), {res['n']} validation headlines, best of {res['rounds']} interleaved rounds.",
        "", "| arm | model | headlines/s | vs old | generated pieces (mean) |", "|---|---|---|---|---|",
        f"| old | {res['models']['old']} | {p['old']:.1f} | 100% | {res['generated_pieces_mean']['old']:.2f} |",
        f"| new, text as written (search + tag pass) | {res['models']['new']} | {p['new_written']:.1f} | "
        f"{100 * res['new_written_vs_old']:.0f}% | {res['generated_pieces_mean']['new']:.2f} |",
        f"| new, normalized=True (search only) | {res['models']['new']} | {p['new_normalized']:.1f} | "
        f"{100 * res['new_normalized_vs_old']:.0f}% | {res['generated_pieces_mean']['new']:.2f} |", "",
        f"The int8 variant's texts (as written) equal the PyTorch fp32 model's on the same vectors (all 64): {res['new_ort_vs_torch_written']}.", ""])


def main(argv=None) -> int:
    import sys
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", required=True, help="model folder (e.g. models/invemb-minilm-s768)")
    ap.add_argument("--old", required=True, help="the model it replaces (a folder; e.g. from git show)")
    ap.add_argument("--data", default=None, help="headlines (default: $INVEMB_DATA)")
    ap.add_argument("--n", type=int, default=64, help="validation headlines decoded per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
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
