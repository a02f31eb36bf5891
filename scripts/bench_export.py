"""Speed of the exported model on this machine, all numbers from ONE run (ratios are what to compare):

  encode   sentences/s: PyTorch eager vs ONNX Runtime fp32 vs ORT int8 (fused + smoothed dynamic int8),
           length-sorted vs unsorted batches, encoder exported by TorchScript (default) vs dynamo, int8 encoder
           with vs without SkipLayerNormalization fusions
  decode   headlines/s, beam search (beam 4): PyTorch (TorchStepper) vs ORT over full log_probs rows vs ORT over
           the graphs' top-k outputs (the default) vs ORT int8 (top-k) vs the one-call BeamSearch-op graph
  steps    KV-cached step decoding vs full recompute (PyTorch re-running decoder.forward on the whole prefix at
           each step; greedy, no early stop) at generated lengths 8/16/24/32, plus ORT cached

    python scripts/bench_export.py [--checkpoint DIR | --preset small] [--data PATH] [--threads 1]
           [--encode-n 256] [--decode-n 16] [--step-rows 64] [--out results/bench_export] [--profile runs/profile]

Default model: the `small` preset (MiniLM backbone from the pip package, decoder d_model 256 x 3 layers) with
a random-initialised decoder (speed only: random decoders never emit EOS, so every search runs to max_length);
`--checkpoint shipped` measures the shipped model (stops at EOS: ~16 tokens per headline).
Writes <out>.md and <out>.json with the machine, versions and the exact command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from invemb.paths import display_command, display_path
from invemb.util import best_of, cpu_isa, cpu_name


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls (after a warm-up): invemb.util.best_of."""
    return best_of(fn, repeats)[1]


def step_bench(model, emb, vecs, lengths, repeats: int) -> list[dict]:
    """Greedy generation of exactly L tokens for len(vecs) rows: cached torch / recompute torch / cached ORT."""
    import numpy as np
    import torch
    dec, bos = model.decoder, model.bos_id
    v = torch.from_numpy(vecs)

    @torch.no_grad()
    def cached(n):
        cache = dec.init_cache(v)
        tok = torch.full((len(v), 1), bos, dtype=torch.long)
        for _ in range(n):
            logits, cache = dec.step(tok, cache)  # [N,1,V]
            tok = logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def recompute(n):
        ids = torch.full((len(v), 1), bos, dtype=torch.long)
        for _ in range(n):
            logits = dec(v, ids)  # [N,t,V]: the whole prefix again
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)

    def ort_cached(n):
        st = emb.stepper(vecs)
        lp, cache = st.start(1)
        for _ in range(n - 1):
            lp, cache = st.step(lp.argmax(-1).astype(np.int64), cache)

    rows = []
    for n in lengths:
        t_c, t_r, t_o = (best_time(lambda: f(n), repeats) for f in (cached, recompute, ort_cached))
        rows.append({"length": n, "rows": len(v), "torch_cached_s": t_c, "torch_recompute_s": t_r,
                     "ort_cached_s": t_o, "cached_speedup": t_r / t_c, "ort_cached_speedup": t_r / t_o})
    return rows


def run(args) -> dict:
    import numpy as np
    import onnxruntime
    import torch

    from invemb.export import exporter as to_onnx
    from invemb.export import optimize
    from invemb.config import preset
    from invemb.data import load_split
    from invemb.model import InvertibleEmbedder
    from invemb.ort import OnnxEmbedder

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.checkpoint == "shipped":
        from invemb.shipped import default_model_path
        args.checkpoint = str(default_model_path())
    model = (InvertibleEmbedder.from_pretrained(args.checkpoint) if args.checkpoint
             else InvertibleEmbedder(preset(args.preset).model)).eval()
    val = [r.text for r in load_split(args.data).val]
    enc_texts, dec_texts = val[:args.encode_n], val[:args.decode_n]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = Path(tmp) / "onnx"
        with to_onnx.quiet_exporter():
            to_onnx.export_model(model, onnx_dir)
        optimize.make_variants(onnx_dir, ("int8",))
        from invemb.export.beam_graph import OneCallDecoder, build_one_call_graph
        one_call = None
        if model.config.decoder.kind == "transformer":
            build_one_call_graph(onnx_dir)
            one_call = OneCallDecoder(onnx_dir, threads=args.threads)
        ort32 = OnnxEmbedder(onnx_dir, threads=args.threads)
        ort8 = OnnxEmbedder(onnx_dir, threads=args.threads, variant="int8")
        skip_dir = Path(tmp) / "onnx_skip_layer_norm"  # the int8 encoder as written before SkipLayerNorm was dropped
        shutil.copytree(onnx_dir, skip_dir)
        optimize.make_variants(skip_dir, ("int8",), encoder_only=True, fuse_skip_layer_norm=True)
        skip8 = OnnxEmbedder(skip_dir, threads=args.threads, variant="int8_encoder")
        dyn_dir = Path(tmp) / "onnx_dynamo_encoder"  # the encoder through the dynamo exporter (the other choice)
        with to_onnx.quiet_exporter():
            to_onnx.export_model(model, dyn_dir, encoder_exporter="dynamo")
        optimize.make_variants(dyn_dir, ("int8",))
        dyn32 = OnnxEmbedder(dyn_dir, threads=args.threads)
        dyn8 = OnnxEmbedder(dyn_dir, threads=args.threads, variant="int8")
        r = args.repeats
        def unsorted(emb):  # batches in input order (each pads to a random long headline): the pre-sorting path
            def run():
                with torch.inference_mode():  # what model.encode does around its batches
                    return [emb._encode_batch(enc_texts[i:i + 64]) for i in range(0, len(enc_texts), 64)]
            return run
        def sorted_(emb):
            return lambda: emb.encode(enc_texts, batch_size=64)
        arms = {"torch": sorted_(model), "ort": sorted_(ort32), "ort_int8": sorted_(ort8),
                "torch_unsorted": unsorted(model), "ort_unsorted": unsorted(ort32), "ort_int8_unsorted": unsorted(ort8),
                "ort_dynamo": sorted_(dyn32), "ort_int8_dynamo": sorted_(dyn8),
                "ort_int8_skip_layer_norm": sorted_(skip8)}
        # interleaved like the decode arms (a slow spell of a shared machine hits every arm, not one): each round
        # times every arm once; 3 x repeats rounds, as one encode call is short (0.2-2 s); the best of each is kept
        enc_runs = {k: [] for k in arms}
        for _ in range(3 * r):
            for k, fn in arms.items():
                enc_runs[k].append(best_time(fn, 1))
        enc = {k: min(v) for k, v in enc_runs.items()}
        vecs = model.encode(dec_texts)
        dr = max(1, r - 1)
        ort_rows = OnnxEmbedder(onnx_dir, threads=args.threads)
        ort_rows.candidates = False  # the search ranks full [N, V] log_probs rows (the graphs' log_probs output)

        def decode(emb):
            if emb is one_call:
                return lambda: one_call.decode_ids(vecs, beam_size=4)
            return lambda: emb.decode(vecs, beam_size=4)
        # interleaved: each round times every backend once, the best round of each is kept
        backends = [("torch", model), ("ort_rows", ort_rows), ("ort", ort32), ("ort_int8", ort8)]
        backends += [("one_call", one_call)] if one_call else []
        runs = {k: [] for k, _ in backends}
        for _ in range(dr):
            for k, emb in backends:
                runs[k].append(best_time(decode(emb), 1))
        dec = {k: min(v) for k, v in runs.items()}
        ref = model.decode(vecs, beam_size=4)
        same = ort32.decode(vecs, beam_size=4) == ref
        same_rows = ort_rows.decode(vecs, beam_size=4) == ref
        lengths = [len(ids) for ids in model.decode_ids(vecs, beam_size=4)]
        one_call_same = None
        if one_call:  # how often the op's texts equal the core search's, on more headlines (val[:--compare-n])
            cv = model.encode(val[:args.compare_n])
            mine = ort32.decode(cv, beam_size=4)
            theirs = model.detokenize(one_call.decode_ids(cv, beam_size=4)[0])
            # the HF-style variant (early_stopping=0): its stop test reads other items' scores (beam_graph.py)
            build_one_call_graph(onnx_dir, early_stopping=False, file="beam_search_op_hf.onnx", record=False)
            hf = OneCallDecoder(onnx_dir, threads=args.threads, file="beam_search_op_hf.onnx")
            hf_batched = model.detokenize(hf.decode_ids(cv, beam_size=4)[0])
            hf_alone = model.detokenize([hf.decode_ids(cv[i:i + 1], beam_size=4)[0][0] for i in range(len(cv))])
            op_alone = model.detokenize([one_call.decode_ids(cv[i:i + 1], beam_size=4)[0][0]
                                         for i in range(len(cv))])

            def rate(a, b):
                return sum(x == y for x, y in zip(a, b)) / len(a)
            one_call_same = {"n": len(mine), "same_text_rate": rate(mine, theirs),
                             "alone_vs_batched": rate(op_alone, theirs),
                             "hf_same_text_rate": rate(mine, hf_batched),
                             "hf_alone_vs_batched": rate(hf_alone, hf_batched),
                             "hf_alone_same_text_rate": rate(mine, hf_alone),
                             "examples": [(a, b) for a, b in zip(mine, theirs) if a != b][:5]}
        rows = np.resize(np.arange(len(vecs)), args.step_rows)  # items x beams rows, as in a beam search
        steps = step_bench(model, ort32, np.ascontiguousarray(vecs[rows]), args.lengths, r)
    cfg = model.config
    return {
        "command": display_command(["python", "scripts/bench_export.py", *args.argv]),
        "machine": {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "threads": args.threads,
        "model": {"source": (display_path(args.checkpoint) if args.checkpoint
                             else f"preset {args.preset} (decoder random-initialised)"),
                  "backbone": cfg.encoder.model_name, "sentence_dim": cfg.encoder.sentence_dim,
                  "decoder": f"{cfg.decoder.kind} d_model {cfg.decoder.d_model} x {cfg.decoder.n_layers} layers",
                  "max_length": cfg.encoder.max_length, "vocab": len(model.tokenizer)},
        "encode": {"n": len(enc_texts), "batch_size": 64, **{f"{k}_per_s": len(enc_texts) / v for k, v in enc.items()},
                   "ort_speedup": enc["torch"] / enc["ort"], "ort_int8_speedup": enc["torch"] / enc["ort_int8"],
                   "sorting_speedup_torch": enc["torch_unsorted"] / enc["torch"],
                   "ort_int8_vs_unsorted_eager": enc["torch_unsorted"] / enc["ort_int8"]},
        "decode_beam4": {"n": len(dec_texts), **{f"{k}_per_s": len(dec_texts) / v for k, v in dec.items()},
                         "ort_rows_speedup": dec["torch"] / dec["ort_rows"],
                         "ort_speedup": dec["torch"] / dec["ort"], "ort_int8_speedup": dec["torch"] / dec["ort_int8"],
                         "topk_vs_rows": dec["ort_rows"] / dec["ort"], "ort_texts_equal_torch": same,
                         "ort_rows_texts_equal_torch": same_rows, "mean_generated_tokens": float(np.mean(lengths)),
                         "one_call_vs_ort": dec["ort"] / dec["one_call"] if one_call else None,
                         "one_call_same_text": one_call_same},
        "steps": steps,
    }


def to_markdown(res: dict) -> str:
    m, e, d = res["machine"], res["encode"], res["decode_beam4"]
    lines = [
        "# Export benchmark: PyTorch eager vs ONNX Runtime (one run, same machine)", "",
        f"- command: `{res['command']}`",
        f"- machine: {m['cpu']}{' (' + m['isa'] + ')' if m.get('isa') else ''}, {m['cores']} cores (shared with other jobs: 1-min load {m['load_avg_1m_at_end']:.1f} "
        f"at the end); Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
        f"{res['threads']} thread(s) for torch and ORT",
        f"- model: {res['model']['source']}: {res['model']['backbone']} -> S={res['model']['sentence_dim']}, "
        f"{res['model']['decoder']}, vocab {res['model']['vocab']}, max_length {res['model']['max_length']}",
        "- timings: best of interleaved rounds after a warm-up (encode: 3 x repeats rounds); ratios are within this "
        "run", "",
        "| task | PyTorch eager | ORT fp32 | ORT int8 | ORT / eager | ORT int8 / eager |", "|---|---|---|---|---|---|",
        f"| encode, sentences/s ({e['n']} headlines, batch {e['batch_size']}) | {e['torch_per_s']:.1f} | "
        f"{e['ort_per_s']:.1f} | {e['ort_int8_per_s']:.1f} | x{e['ort_speedup']:.2f} | x{e['ort_int8_speedup']:.2f} |",
        *([f"| encode unsorted (batches in input order, the path before length sorting) | "
           f"{e['torch_unsorted_per_s']:.1f} | {e['ort_unsorted_per_s']:.1f} | {e['ort_int8_unsorted_per_s']:.1f} | "
           f"x{e['ort_unsorted_per_s'] / e['torch_unsorted_per_s']:.2f} | "
           f"x{e['ort_int8_unsorted_per_s'] / e['torch_unsorted_per_s']:.2f} |", "",
           f"Length sorting speeds eager encoding x{e['sorting_speedup_torch']:.2f}; sorted ORT int8 vs unsorted "
           f"eager (the encode target's baseline): x{e['ort_int8_vs_unsorted_eager']:.2f}."]
          if "torch_unsorted_per_s" in e else []),
        *(["", f"Encoder graph exported by torch's dynamo exporter instead of TorchScript (sorted): ORT fp32 "
               f"{e['ort_dynamo_per_s']:.1f}/s, int8 {e['ort_int8_dynamo_per_s']:.1f}/s (TorchScript: "
               f"x{e['ort_per_s'] / e['ort_dynamo_per_s']:.2f} / "
               f"x{e['ort_int8_per_s'] / e['ort_int8_dynamo_per_s']:.2f})."
               " The int8 encoder is smoothed before quantisation (invemb/export/optimize.py smooth_activations)."]
          if "ort_dynamo_per_s" in e else []),
        *(["", f"The int8 encoder as written before (12 SkipLayerNormalization fusions, whose ORT CPU kernel is ~8x "
               f"slower than Add + LayerNormalization): {e['ort_int8_skip_layer_norm_per_s']:.1f}/s; without them "
               f"x{e['ort_int8_per_s'] / e['ort_int8_skip_layer_norm_per_s']:.2f} (invemb/export/optimize.py "
               "optimize_encoder)."] if "ort_int8_skip_layer_norm_per_s" in e else []),
        "", f"## Beam-4 decode, headlines/s ({d['n']} headlines, {d['mean_generated_tokens']:.1f} generated tokens "
        "on average; interleaved rounds, best of each)", "",
        "| PyTorch (full rows) | ORT fp32, full rows | ORT fp32, top-k graphs | ORT int8, top-k | ORT one-call graph "
        "| top-k / full rows | ORT top-k / eager | one-call / top-k |", "|---|---|---|---|---|---|---|---|",
        f"| {d['torch_per_s']:.2f} | {d['ort_rows_per_s']:.2f} | {d['ort_per_s']:.2f} | {d['ort_int8_per_s']:.2f} | "
        f"{d.get('one_call_per_s', float('nan')):.2f} | x{d['topk_vs_rows']:.2f} | x{d['ort_speedup']:.2f} | "
        f"x{d['one_call_vs_ort'] or float('nan'):.2f} |", "",
        f"ORT fp32 beam-4 texts identical to PyTorch's: top-k {d['ort_texts_equal_torch']}, full rows "
        f"{d['ort_rows_texts_equal_torch']}.", ""]
    oc = d.get("one_call_same_text")
    if oc:
        lines += [f"One-call graph (ONNX Runtime BeamSearch op, invemb/export/beam_graph.py) vs the core search "
                  f"(ORT top-k), beam 4, {oc['n']} validation headlines decoded as one batch (rates of equal texts):", "",
                  "| variant | same text as the core search | each item alone == in the batch | alone: same as core |",
                  "|---|---|---|---|",
                  f"| early_stopping=1 (the exported default) | {oc['same_text_rate']:.1%} | "
                  f"{oc['alone_vs_batched']:.1%} | - |",
                  f"| early_stopping=0 (HF-style stop test) | {oc['hf_same_text_rate']:.1%} | "
                  f"{oc['hf_alone_vs_batched']:.1%} | {oc['hf_alone_same_text_rate']:.1%} |", ""]
        if oc["examples"]:
            lines.append("Texts where the default graph and the core search differ (first 5):")
        lines += [f"- core: `{a}` / op: `{b}`" for a, b in oc["examples"]] + [""]
    lines += [
        f"## KV-cached step decoding vs full recompute (greedy, exactly L tokens, {res['steps'][0]['rows']} rows)", "",
        "| L | torch cached (s) | torch recompute (s) | cached speed-up | ORT cached (s) | ORT cached vs recompute |",
        "|---|---|---|---|---|---|"]
    for s in res["steps"]:
        lines.append(f"| {s['length']} | {s['torch_cached_s']:.3f} | {s['torch_recompute_s']:.3f} | "
                     f"x{s['cached_speedup']:.1f} | {s['ort_cached_s']:.3f} | x{s['ort_cached_speedup']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None,
                    help="a trained checkpoint, or 'shipped' (default: --preset, random decoder)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data", default=None, help="headlines (default: $INVEMB_DATA)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and ORT threads (1: on a shared machine torch's OpenMP threads spin-wait badly)")
    ap.add_argument("--encode-n", type=int, default=256)
    ap.add_argument("--decode-n", type=int, default=16)
    ap.add_argument("--compare-n", type=int, default=200, help="headlines for the one-call vs core text comparison")
    ap.add_argument("--step-rows", type=int, default=64, help="rows of the step benchmark (16 items x 4 beams)")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 24, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench_export")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also write ONNX Runtime's per-node profile of every session under DIR (e.g. runs/profile)")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.profile:
        os.environ["INVEMB_ORT_PROFILE"] = args.profile  # read by invemb.ort.session_options
    from invemb.errors import InvembError
    try:
        res = run(args)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = to_markdown(res)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
