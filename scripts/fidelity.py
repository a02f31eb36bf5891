"""results/fidelity.md for a model (default: the shipped one): every table of invemb.fidelity, with its command.

    python scripts/fidelity.py --data ../shared/data/financial-news-headlines   # ~20 min on 2 cores (--decoder torch: ~40)
    python scripts/fidelity.py --val-limit 500 --score-limit 200 --out results/fidelity_quick.md   # a quick look
    python scripts/fidelity.py --checkpoint runs/mq16/final --out results/fidelity_mq16.md

Writes the markdown and a JSON beside it (same stem). Token accuracy / exact / BLEU / top-k use every headline of
the validation split (or --val-limit); BERTScore and paraphrase cosine (all-mpnet-base-v2, the slow part on 2 CPU
cores) the first --score-limit; the noise and compression studies --study-limit headlines (greedy); the int8
comparison --int8-limit headlines (beam 4, ONNX Runtime, exported into --work).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from invemb.errors import InvembError
from invemb.paths import checkout_root
from invemb.util import cpu_name

REPO = checkout_root()


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"
    return str(v)


def _mode_rows(name: str, res: dict) -> list[dict]:
    rows = []
    for mode in ("greedy", "beam4"):
        if mode in res:
            rows.append({"set": name, "decode": mode, "n": res["n"], **res[mode]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--data", default=None, help="headlines (default: $INVEMB_DATA)")
    ap.add_argument("--out", default=str(REPO / "results/fidelity.md"))
    ap.add_argument("--val-limit", type=int, default=0, help="validation headlines (0: the whole split)")
    ap.add_argument("--score-limit", type=int, default=1000, help="headlines scored with BERTScore/paraphrase cos")
    ap.add_argument("--study-limit", type=int, default=500, help="headlines of the noise/compression studies")
    ap.add_argument("--rerank-limit", type=int, default=0,
                    help="validation headlines of the re-ranking study (0: the whole split; -1: skip)")
    ap.add_argument("--int8-limit", type=int, default=1000, help="headlines of the ORT int8 vs fp32 check (0: skip)")
    ap.add_argument("--scorer", default="all-mpnet-base-v2")
    ap.add_argument("--work", default=str(REPO / "runs/fidelity"), help="export folder for the int8 check")
    ap.add_argument("--decoder", choices=("ort", "torch"), default="ort",
                    help="what decodes the vectors: ONNX Runtime over the model's fp32 export (top-k graphs; the "
                         "served texts, ~2x faster here) or PyTorch; ort also records its same-text rate with "
                         "PyTorch on --check-n headlines")
    ap.add_argument("--check-n", type=int, default=200)
    ap.add_argument("--render", default=None, help="only re-render the markdown from this fidelity JSON")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.out).write_text(render(res, res.get("seconds", 0.0)))
        return 0
    import torch
    from invemb.data import load_headlines, newest_cutoff, newest_records, split_records
    from invemb.fidelity import (REPORT_ROWS, compression_study, full_evaluation, noise_study,
                                 ort_int8_study, rerank_study)
    from invemb.model import InvertibleEmbedder, read_checkpoint_config
    t_start = time.time()
    try:
        model = InvertibleEmbedder.from_pretrained(args.checkpoint)
        records = load_headlines(args.data)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is None:
        from invemb.shipped import default_model_path
        ckpt = default_model_path()
    meta = read_checkpoint_config(ckpt)
    split = split_records(records, 0.1, 0)
    val = [r.text for r in split.val][:args.val_limit or None]
    newest = [r.text for r in newest_records(records, 30)]
    res: dict = {"command": "python scripts/fidelity.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                 "model": str(ckpt), "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}, {torch.get_num_threads()} torch threads",
                 "history": meta.get("info", {}).get("history", []), "curve": meta.get("info", {}).get("curve", [])}
    timings = {}

    def stage(name, fn):
        t0 = time.time()
        print(f"[fidelity] {name} ...", flush=True)
        out = fn()
        timings[name] = round(time.time() - t0, 1)
        print(f"[fidelity] {name}: {timings[name]} s", flush=True)
        return out

    work = Path(args.work)
    exported = False

    def export():
        nonlocal exported
        if not exported:
            subprocess.run([sys.executable, str(REPO / "export/to_onnx.py"), "--checkpoint", str(ckpt), "--out",
                            str(work / "onnx")], check=True)
            exported = True
    decoder = None
    if args.decoder == "ort":
        from invemb.ort import OnnxEmbedder
        stage("export", export)
        decoder = OnnxEmbedder(work / "onnx", threads=torch.get_num_threads())

        def check():  # the ORT texts are the torch texts (up to fp32 near-ties): measured, not assumed
            texts = val[:args.check_n]
            vec = model.encode(texts)
            same = sum(a == b for a, b in zip(decoder.decode(vec, beam_size=4), model.decode(vec, beam_size=4)))
            return {"n": len(texts), "beam": 4, "same_text_rate": same / max(1, len(texts))}
        res["decoder_check"] = stage("ORT vs PyTorch texts", check)
    res["decoder"] = ("ONNX Runtime fp32 export of the model (top-k graphs, the core search)" if decoder
                      else "PyTorch (the model itself)")
    res["val"] = stage("validation", lambda: full_evaluation(model, val, (1, 4), args.scorer, args.score_limit,
                                                             progress=True, decoder=decoder))
    res["newest"] = stage("newest month", lambda: full_evaluation(model, newest, (1, 4), args.scorer,
                                                                  min(args.score_limit, 500), decoder=decoder))
    res["newest"]["from"] = str(newest_cutoff(records, 30))
    study = val[:args.study_limit]
    res["noise"] = stage("noise study", lambda: noise_study(model, study, decoder=decoder))
    res["compression"] = stage("compression", lambda: compression_study(model, study, decoder=decoder))
    if args.rerank_limit >= 0:
        res["rerank"] = stage("re-ranking", lambda: rerank_study(model, val[:args.rerank_limit or None],
                                                                 decoder=decoder))
    if args.int8_limit > 0:
        def int8():
            export()
            subprocess.run([sys.executable, str(REPO / "export/optimize.py"), "--onnx", str(work / "onnx"),
                            "--variants", "opt,int8", "-n", "0"], check=True)
            texts = val[:args.int8_limit]
            return ort_int8_study(work / "onnx", texts, model.reference_texts(texts))
        res["int8"] = stage("ORT int8 vs fp32", int8)
    res["timings_s"] = timings
    for part in ("val", "newest"):
        res[part].pop("_hyps", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res["seconds"] = time.time() - t_start
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.write_text(render(res, res["seconds"]))
    print(out.read_text())
    return 0


def render(res: dict, seconds: float) -> str:
    from invemb.fidelity import REPORT_ROWS
    val, new = res["val"], res["newest"]
    hist = res["history"][-1] if res["history"] else {}
    from invemb.training.ship import gpu_minutes
    gpu_min = gpu_minutes(res["history"] or [])
    gpu = (f" plus {gpu_min:.1f} GPU minutes (the GPU runs of the model card's lineage: results/gpu_run.md)"
           if gpu_min else "")
    lines = ["# Fidelity of the shipped model", "",
             f"Model: `{res['model']}`; {hist.get('steps_cumulative', '?')} training steps, "
             f"{hist.get('cpu_hours_cumulative', '?')} CPU hours since scratch{gpu}. Machine: {res['machine']} "
             f"(no GPU). Command: `{res['command']}` ({seconds / 60:.0f} min).", "",
             "References are the inputs after the tokenizer (lower-cased WordPiece text): what a perfect "
             "reconstruction reads. token_acc = generated-token positional accuracy (the report's 'token "
             f"accuracy' is teacher-forced top-1, given in the top-k table). BERTScore: {val.get('bertscore')}; "
             "paraphrase cosine: all-mpnet-base-v2.", "",
             f"Decoded by: {res.get('decoder', 'PyTorch (the model itself)')}"
             + (f"; its beam-4 texts equal PyTorch's on {res['decoder_check']['same_text_rate']:.1%} of the first "
                f"{res['decoder_check']['n']} validation headlines." if res.get("decoder_check") else "."), "",
             "## Validation split and new headlines", ""]
    cols = ["set", "decode", "n", "token_acc", "exact_match", "bleu", "bertscore_f1", "paraphrase_cos", "scored_n"]
    lines += _table(_mode_rows("validation (seed-0 10%)", val) + _mode_rows(
        f"newest 30 days (from {new.get('from')}, held out of training)", new), cols)
    lines += ["", "The reference report (FinBERT, GPU, 40 epochs; validation):", ""]
    lines += _table(REPORT_ROWS, ["model", "token_acc", "bertscore_f1"])
    lines += ["", "(the report's token accuracy is teacher-forced: compare with top1 below)", "",
              "## Teacher-forced top-k (validation)", ""]
    tf = val["teacher_forced"]
    lines += _table([{"set": "validation", **tf}, {"set": "newest 30 days", **new["teacher_forced"]}],
                    ["set"] + list(tf))
    lines += ["", "## Noise study (greedy; sigma relative to each vector's RMS)", ""]
    lines += _table(res["noise"], ["sigma", "token_acc", "exact_match", "bleu"])
    lines += ["", "## Vector compression (greedy)", ""]
    lines += _table(res["compression"], ["compression", "bytes_per_headline", "cosine_to_fp32", "token_acc",
                                         "exact_match", "bleu"])
    if res.get("rerank"):
        rr = res["rerank"]
        lines += ["", f"## Round-trip re-ranking ({rr[0]['n']} validation headlines)", "",
                  "The beam's finished hypotheses (as many as the beam size) are re-encoded and the one whose vector "
                  "is closest (cosine) to the given vector is kept (`decode(..., rerank=True)`, `invemb decode "
                  "--rerank`): the decoder's likelihood favours frequent phrasings, the encoder checks which "
                  "candidate says what the vector says. Cost: one encode per candidate. Both rows of a beam size come "
                  "from one search (its best hypothesis / the re-ranked choice); seconds include the search.", ""]
        lines += _table(rr, ["decode", "token_acc", "exact_match", "bleu", "seconds"])
    if "int8" in res:
        i8 = res["int8"]
        lines += ["", f"## ONNX Runtime int8 variant vs fp32 ({i8['n']} validation headlines, beam 4)", ""]
        lines += _table([{"variant": v, **i8[v]} for v in ("fp32", "int8", "int8_encoder") if v in i8],
                        ["variant", "exact_match", "bleu", "seconds"])
        lines += ["", f"Same text from both: {i8['same_text_rate']:.4f}."]
        if "int8_encoder" in i8:
            lines += [f"int8_encoder = the int8 encoder graph with the fp32 decoder graphs (is the loss the "
                      f"encoder's or the decoder's?); same text as fp32: {i8['int8_encoder_same_text_rate']:.4f}. "
                      "It is what a Triton repository serves by default on CPU (export/to_onnx.py --triton-repo). "
                      "The int8 encoder is smoothed and has fixed calibrated activation ranges, so a vector does not "
                      "depend on its batch; the int8 decoders quantise activations per batch "
                      "(invemb/export/optimize.py)."]
    if res["curve"]:
        lines += ["", "## Learning curve (validation subset of 512, teacher-forced; greedy on 128 where logged)",
                  ""]
        lines += _table(res["curve"], ["step", "cpu_hours_cumulative", "val_top1", "val_loss", "val_greedy_bleu",
                                       "val_greedy_exact"])
    ex = val.get("examples", [])[:10]
    if ex:
        lines += ["", "## Examples (validation)", ""]
        keys = list(ex[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(e[k].replace("|", "\\|") for k in keys) + " |" for e in ex]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in res["timings_s"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
