"""The `export/optimize.py` command: write an export's optimised variants (invemb.export.optimize), optionally place
one in a Triton repository (invemb.export.placement), measure each against fp32 and report.

    python export/optimize.py --onnx onnx/small [--data PATH] [-n 64] [--variants opt,int8,fp16] [--threads 2]
                              [--no-smooth] [--report results/optimize_export.md] [--triton-repo R --place int8]

The table compares each variant with fp32 on the same headlines, machine and thread count: encoder cosine,
beam search exact match / positional token accuracy vs the tokenized inputs, texts identical to fp32, and speed.
The command and the model are named as the repository names them (invemb.paths.display_command / display_path).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from invemb.errors import InvembError
from invemb.export.optimize import DEVICE, VARIANTS, make_variants
from invemb.export.placement import place_in_triton_repo
from invemb.manifest import read_manifest
from invemb.paths import display_command, display_path
from invemb.util import best_of


def measure(export_dir: str | os.PathLike, texts: list[str], variants=("opt", "int8"), beam_size: int = 4,
            threads: int = 2, repeats: int = 3) -> list[dict]:
    """One row per variant (fp32 first): quality vs the inputs and vs fp32, encode/decode throughput."""
    from invemb.metrics import bleu, exact_match, positional_token_accuracy
    from invemb.ort import OnnxEmbedder
    rows, base = [], None
    for v in (None, *variants):
        emb = OnnxEmbedder(export_dir, threads=threads, variant=v)
        enc = emb.tokenize(texts)
        specials = {emb.bos_id, emb.eos_id, emb.pad_id}
        ref_ids = [[t for t in row if t not in specials] for row in enc["input_ids"].tolist()]
        refs = emb.detokenize(ref_ids)
        vecs, t_enc = best_of(lambda: emb.encode(texts), repeats)
        ids, t_dec = best_of(lambda: emb.decode_ids(vecs, beam_size=beam_size), max(1, repeats - 1))
        hyps = emb.detokenize(ids)
        row = {"variant": v or "fp32", "device": DEVICE.get(v, "any"), "files": emb.files,
               "encode_per_s": len(texts) / t_enc, "decode_per_s": len(texts) / t_dec,
               "exact_match": exact_match(hyps, refs), "bleu": bleu(hyps, refs),
               "token_accuracy": positional_token_accuracy(ids, ref_ids)}
        if base is None:
            base = {"vecs": vecs, "hyps": hyps, **row}
        else:
            cos = (vecs * base["vecs"]).sum(1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(base["vecs"], axis=1))
            row.update(cosine_min=float(cos.min()), cosine_mean=float(cos.mean()),
                       same_text_as_fp32=float(np.mean([a == b for a, b in zip(hyps, base["hyps"])])),
                       encode_speedup=row["encode_per_s"] / base["encode_per_s"],
                       decode_speedup=row["decode_per_s"] / base["decode_per_s"],
                       exact_match_change=row["exact_match"] - base["exact_match"],
                       bleu_change=row["bleu"] - base["bleu"],
                       token_accuracy_change=row["token_accuracy"] - base["token_accuracy"])
        row["sizes_mb"] = {g: round((Path(export_dir) / f).stat().st_size / 2**20, 1) for g, f in emb.files.items()}
        rows.append(row)
    return rows


def format_table(rows: list[dict], header: str = "") -> str:
    cols = [("variant", "{}"), ("encode_per_s", "{:.1f}"), ("encode_speedup", "x{:.2f}"), ("decode_per_s", "{:.2f}"),
            ("decode_speedup", "x{:.2f}"), ("cosine_min", "{:.5f}"), ("exact_match", "{:.1%}"),
            ("exact_match_change", "{:+.1%}"), ("bleu", "{:.2f}"), ("bleu_change", "{:+.2f}"),
            ("token_accuracy", "{:.1%}"), ("token_accuracy_change", "{:+.1%}"), ("same_text_as_fp32", "{:.1%}")]
    lines = [header] if header else []
    lines += ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[c]) if c in r else "-" for c, f in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", required=True, help="folder written by export/to_onnx.py")
    ap.add_argument("--variants", default="opt,int8", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--no-smooth", action="store_true",
                    help="int8 without smoothing the encoder's activations (and without fixed activation ranges)")
    ap.add_argument("--data", default=None, help="headlines for the quality check (default: $INVEMB_DATA)")
    ap.add_argument("-n", type=int, default=64, help="validation headlines measured (0: only write variants)")
    ap.add_argument("--beam-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (same for every variant)")
    ap.add_argument("--report", default=None, help="also write the table here (.md, plus .json beside it)")
    ap.add_argument("--note", default="", help="a line about the model, written under the table's header")
    ap.add_argument("--triton-repo", default=None, help="place one variant's graphs in this Triton repository")
    ap.add_argument("--place", default="int8", help="the variant --triton-repo places (default: int8)")
    args = ap.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    try:
        made = make_variants(args.onnx, variants, smooth=not args.no_smooth)
        print("wrote " + "; ".join(f"{v}: {', '.join(x['files'].values())}" for v, x in made.items()))
        if args.triton_repo:
            place_in_triton_repo(args.onnx, args.triton_repo, args.place)
            print(f"placed the {args.place} graphs in {args.triton_repo}")
        if args.n <= 0:
            return 0
        from invemb.data import load_split
        texts = [r.text for r in load_split(args.data).val[:args.n]]
        rows = measure(args.onnx, texts, variants, args.beam_size, args.threads)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = display_command(["python", "export/optimize.py", *(sys.argv[1:] if argv is None else argv)])
    src = read_manifest(args.onnx).get("source", {})
    table = format_table(rows, f"{len(texts)} validation headlines, beam {args.beam_size}, {args.threads} ORT "
                               f"thread(s); speed-ups vs fp32 measured in this run. Command: `{cmd}`\n\n"
                               f"Model: {display_path(src.get('checkpoint', '?'))} ({src.get('backbone', '?')}). "
                               f"{args.note}\n")
    print(table)
    if args.report:
        rep = Path(args.report)
        rep.parent.mkdir(parents=True, exist_ok=True)
        rep.write_text(table + "\n")
        rep.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
