"""results/fidelity.md for a model (default: the shipped one): every table of invemb.fidelity, with its command.

    python scripts/fidelity.py --data ../shared/data/financial-news-headlines   # ~20 min on 2 cores (--decoder torch: ~40)
    python scripts/fidelity.py --val-limit 500 --score-limit 200 --out results/fidelity_quick.md   # a quick look
    python scripts/fidelity.py --checkpoint runs/mq16/final --out results/fidelity_mq16.md
    python scripts/fidelity.py --limit 2000 --newest-limit 500 --perturbed-limit 300 --rerank-limit -1 ...  # facts
    python scripts/fidelity.py --oracle-only --surface-oracle results/surface_oracle.md   # the written form's oracle

Writes the markdown and a JSON beside it (same stem). Token accuracy / exact / BLEU / top-k use every headline of
the validation split (or --val-limit); BERTScore and paraphrase cosine (all-mpnet-base-v2, the slow part on 2 CPU
cores) the first --score-limit; the noise and compression studies --study-limit headlines (greedy); the int8
comparison --int8-limit headlines (beam 4, ONNX Runtime, exported into --work). The split (val_fraction, seed), the
newest-days hold-out and the training noise sigma come from the model's recipe (config.json info.recipe); every
decode arm scores the normalised text and the written form from the same ids, and the facts of the written form.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from invemb.errors import InvembError
from invemb.paths import checkout_root, display_command, display_path
from invemb.util import describe_machine

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
    ap.add_argument("--val-limit", "--limit", type=int, default=0, help="validation headlines (0: the whole split)")
    ap.add_argument("--newest-limit", type=int, default=0, help="newest-days headlines (0: all of them)")
    ap.add_argument("--perturbed-limit", type=int, default=500,
                    help="headlines of the perturbed-facts set, drawn from the (limited) validation split (0: skip)")
    ap.add_argument("--perturbed-seed", type=int, default=0)
    ap.add_argument("--distance-pairs", type=int, default=50,
                    help="pairs per kind of the one-change distance table (number / name / word; 0: skip)")
    ap.add_argument("--surface-oracle", default=None,
                    help="also write the written form's oracle round trip (training + validation) to this markdown")
    ap.add_argument("--oracle-only", action="store_true", help="only the oracle round trip (with --surface-oracle)")
    ap.add_argument("--score-limit", type=int, default=1000, help="headlines scored with BERTScore/paraphrase cos")
    ap.add_argument("--study-limit", type=int, default=500,
                    help="headlines of the noise/compression studies (0: skip)")
    ap.add_argument("--rerank-limit", type=int, default=0,
                    help="validation headlines of the re-ranking study (0: the whole split; -1: skip)")
    ap.add_argument("--int8-limit", type=int, default=1000, help="headlines of the ORT int8 vs fp32 check (0: skip)")
    ap.add_argument("--scorer", default="all-mpnet-base-v2", help="BERTScore / paraphrase model ('': skip both)")
    ap.add_argument("--work", default=str(REPO / "runs/fidelity"), help="export folder for the int8 check")
    ap.add_argument("--decoder", choices=("ort", "torch"), default="ort",
                    help="what decodes the vectors: ONNX Runtime over the model's fp32 export (top-k graphs; the "
                         "served texts, ~2x faster here) or PyTorch; ort also records its same-text rate with "
                         "PyTorch on --check-n headlines")
    ap.add_argument("--check-n", type=int, default=200)
    ap.add_argument("--beams", default="1,4", choices=("1,4", "4", "1"),
                    help="decode arms of the validation / newest sets (greedy and/or beam 4)")
    ap.add_argument("--render", default=None, help="only re-render the markdown from this fidelity JSON")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.out).write_text(render(res, res.get("seconds", 0.0)))
        return 0
    import torch
    from invemb.data import load_headlines, newest_cutoff, newest_records, split_records
    from invemb.fidelity import (compression_study, distance_table, full_evaluation, noise_study,
                                 ort_int8_study, perturbed_facts_study, rerank_study)
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
    recipe = meta.get("info", {}).get("recipe") or {}
    # the split and hold-out the model was trained with (a checkpoint without a recipe: the defaults, said so)
    split_cfg = {"val_fraction": float(recipe.get("val_fraction", 0.1)),
                 "seed": int(recipe.get("split_seed", recipe.get("seed", 0))),
                 "holdout_newest_days": int(recipe.get("holdout_newest_days", 0)),
                 "noise_sigma": recipe.get("noise_sigma"), "from_recipe": bool(recipe)}
    split = split_records(records, split_cfg["val_fraction"], split_cfg["seed"])
    train_texts = [r.text for r in split.train]
    val = [r.text for r in split.val][:args.val_limit or None]
    days = split_cfg["holdout_newest_days"] or 30
    newest = [r.text for r in newest_records(records, days)][:args.newest_limit or None]
    argv_shown = sys.argv if argv is None else ["scripts/fidelity.py", *argv]
    res: dict = {"command": "python " + display_command([str(a) for a in argv_shown]),
                 "model": display_path(ckpt), "split": split_cfg, "newest_days": days,
                 "machine": describe_machine(f"{torch.get_num_threads()} torch threads"),
                 "history": meta.get("info", {}).get("history", []), "curve": meta.get("info", {}).get("curve", [])}
    if args.surface_oracle:
        from invemb.fidelity import surface_oracle
        oracle = surface_oracle(model, {"training": train_texts, "validation": [r.text for r in split.val]},
                                train_texts)
        Path(args.surface_oracle).write_text(render_oracle(oracle, res))
        print(f"[fidelity] surface oracle: " + ", ".join(f"{k} {v['share']:.4%}" for k, v in oracle["sets"].items())
              + f" -> {display_path(args.surface_oracle)}", flush=True)
        if args.oracle_only:
            return 0
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
            # the pieces are the decoder's: compare the normalised texts (the written form's tags are the model's)
            same = sum(a == b for a, b in zip(decoder.decode(vec, beam_size=4, normalized=True),
                                              model.decode(vec, beam_size=4, normalized=True)))
            return {"n": len(texts), "beam": 4, "same_text_rate": same / max(1, len(texts))}
        res["decoder_check"] = stage("ORT vs PyTorch texts", check)
    res["decoder"] = ("ONNX Runtime fp32 export of the model (top-k graphs, the core search)" if decoder
                      else "PyTorch (the model itself)")
    from invemb.embedder import RERANK_MARGIN
    res["rerank_margin"] = RERANK_MARGIN  # decode's default ("auto"), what the beam rows below measure
    scorer = args.scorer or None
    beams = tuple(int(b) for b in args.beams.split(","))
    res["val"] = stage("validation", lambda: full_evaluation(model, val, beams, scorer, args.score_limit,
                                                             progress=True, decoder=decoder))
    res["newest"] = stage("newest month", lambda: full_evaluation(model, newest, beams, scorer,
                                                                  min(args.score_limit, 500), decoder=decoder))
    res["newest"]["from"] = str(newest_cutoff(records, days))
    if args.perturbed_limit > 0:
        res["perturbed"] = stage("perturbed facts", lambda: perturbed_facts_study(
            model, val, args.perturbed_limit, args.perturbed_seed, decoder=decoder))
    if args.distance_pairs > 0:
        res["distance"] = stage("one-change distances", lambda: distance_table(
            model, val, args.distance_pairs, 0, split_cfg["noise_sigma"]))
    study = val[:args.study_limit]
    if study:
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
        res[part].pop("_hyps", None), res[part].pop("_written", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res["seconds"] = time.time() - t_start
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.write_text(render(res, res["seconds"]))
    print(out.read_text())
    return 0


def _set_names(res: dict) -> tuple[str, str]:
    """The validation and newest-days labels, from the recipe recorded in the JSON (issue 33: never constants)."""
    sp = res.get("split") or {"val_fraction": 0.1, "seed": 0, "holdout_newest_days": 30}
    days = res.get("newest_days", 30)
    held = "held out of training" if sp.get("holdout_newest_days") else "NOT held out: the recipe holds none"
    new = res["newest"]
    return (f"validation (seed-{sp['seed']} {sp['val_fraction']:.0%})",
            f"newest {days} days (from {new.get('from')}, {held})")


FACT_COLS = ["number_recall", "name_recall", "numbers_all_right", "facts_all_right", "n_numbers", "n_names",
             "with_numbers", "with_facts"]


def render(res: dict, seconds: float) -> str:
    from invemb.fidelity import REPORT_ROWS
    val, new = res["val"], res["newest"]
    val_name, new_name = _set_names(res)
    hist = res["history"][-1] if res["history"] else {}
    from invemb.training.ship import gpu_minutes
    gpu_min = gpu_minutes(res["history"] or [])
    gpu = (f" plus {gpu_min:.1f} GPU minutes (the GPU runs of the model card's lineage: results/gpu_run.md)"
           if gpu_min else "")
    sp = res.get("split")
    split_line = (f"Split from the model's recipe: val_fraction {sp['val_fraction']}, seed {sp['seed']}, "
                  f"holdout_newest_days {sp['holdout_newest_days']}, training noise sigma {sp['noise_sigma']}."
                  if sp and sp.get("from_recipe") else "The checkpoint has no recipe: the default split (10%, seed 0).")
    from invemb.shipped import DEFAULT_MODEL
    title = "the shipped model" if res["model"] == f"models/{DEFAULT_MODEL}" else f"`{res['model']}`"
    lines = [f"# Fidelity of {title}", "",
             f"Model: `{res['model']}`; {hist.get('steps_cumulative', '?')} training steps, "
             f"{hist.get('cpu_hours_cumulative', '?')} CPU hours since scratch{gpu}. Machine: {res['machine']}. "
             f"Command: `{res['command']}` ({seconds / 60:.0f} min). {split_line if sp else ''}", "",
             "Normalised figures (token_acc, exact_match, bleu, BERTScore) compare with the inputs after the tokenizer "
             "(lower-cased WordPiece text: what a perfect normalised reconstruction reads). Written-form figures "
             "(raw_exact: case- and space-sensitive; caseless_exact; cased_bleu) compare the decoded text AS WRITTEN "
             "(the surface heads; a model without them gives its normalised text) with the original headline, "
             "whitespace collapsed; both forms come from the same generated ids. token_acc = generated-token "
             "positional accuracy (the report's 'token accuracy' is teacher-forced top-1, given in the top-k "
             f"table). BERTScore: {val.get('bertscore')}; paraphrase cosine: all-mpnet-base-v2.", "",
             f"Decoded by: {res.get('decoder', 'PyTorch (the model itself)')}"
             + (f"; its beam-4 texts equal PyTorch's on {res['decoder_check']['same_text_rate']:.1%} of the first "
                f"{res['decoder_check']['n']} validation headlines." if res.get("decoder_check") else ".")
             + (f" Beam rows are decode's default: the beam's candidates scored within {res['rerank_margin']} of the "
                "best, or whose numbers differ from the best's, are re-encoded and the one closest to the vector is "
                "kept (`rerank` auto; see the re-ranking table); greedy has no candidates to re-rank." if "rerank_margin" in res else
                " Beam rows are the beam's best (no re-ranking)."), "",
             "## Validation split and new headlines", ""]
    cols = ["set", "decode", "n", "token_acc", "exact_match", "bleu", "raw_exact", "caseless_exact", "cased_bleu",
            "bertscore_f1", "paraphrase_cos", "scored_n"]
    lines += _table(_mode_rows(val_name, val) + _mode_rows(new_name, new), cols)
    lines += _facts_section(res, val_name, new_name)
    lines += ["", "The reference report (FinBERT, GPU, 40 epochs; validation):", ""]
    lines += _table(REPORT_ROWS, ["model", "token_acc", "bertscore_f1"])
    lines += ["", "(the report's token accuracy is teacher-forced: compare with top1 below)", "",
              "## Teacher-forced top-k (validation)", ""]
    tf = val["teacher_forced"]
    lines += _table([{"set": "validation", **tf}, {"set": "newest 30 days", **new["teacher_forced"]}],
                    ["set"] + list(tf))
    if res.get("noise"):
        lines += ["", "## Noise study (greedy; sigma relative to each vector's RMS)", ""]
        lines += _table(res["noise"], ["sigma", "token_acc", "exact_match", "bleu"])
        lines += ["", "## Vector compression (greedy)", ""]
        lines += _table(res["compression"], ["compression", "bytes_per_headline", "cosine_to_fp32", "token_acc",
                                             "exact_match", "bleu"])
    if res.get("rerank"):
        rr = res["rerank"]
        lines += ["", f"## Round-trip re-ranking ({rr[0]['n']} validation headlines)", "",
                  "The beam's finished hypotheses (as many as the beam size) are re-encoded and the one whose vector "
                  "is closest (cosine) to the given vector is kept: the decoder's likelihood favours frequent "
                  "phrasings, the encoder checks which candidate says what the vector says. `rerank auto` (decode's "
                  "default) re-encodes only the candidates scored within the margin of the best or whose numbers "
                  "differ from the best's (rows with no such rival are not re-encoded); `rerank all` (`decode(..., rerank=True)`, `invemb decode --rerank`) "
                  "every one. encodes = candidates re-encoded per headline. The rows of a beam size come from one "
                  "search; seconds include the search.", ""]
        lines += _table(rr, ["decode", "token_acc", "exact_match", "bleu", "raw_exact", "cased_bleu", "number_recall",
                             "name_recall", "facts_all_right", "encodes", "seconds"])
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
    ex = [{k: e[k] for k in e if k != "beam4" or "beam4 (written)" not in e} for e in ex]  # written when it exists
    if ex:
        lines += ["", "## Examples (validation)", ""]
        keys = list(ex[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(e[k].replace("|", "\\|") for k in keys) + " |" for e in ex]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in res["timings_s"].items()), ""]
    return "\n".join(lines)


def _facts_section(res: dict, val_name: str, new_name: str) -> list[str]:
    """Facts of the written form (issue 29), the perturbed-facts set, the outside-vocabulary split (issue 33) and
    the one-change distance table."""
    val, new = res["val"], res["newest"]
    if not any("number_recall" in val.get(m, {}) for m in ("greedy", "beam4")):
        return []  # a JSON from before the fact metrics (--render of an old result)
    lines = ["", "## Facts (numbers and names of the original, found in the decoded text)", "",
             "number_recall: every number of the original with its separators, currency and unit (`$3.2 billion`, "
             "`5.5%`, `443,956`, `£3bn`; WordPiece spacing inside a number joined, case ignored) found in the decoded "
             "text; name_recall: capitalised words of the original other than its first, found as whole words (case, "
             "accents and curly quotes folded); numbers_all_right: share of the headlines holding a number "
             "(with_numbers) whose numbers all come back; facts_all_right: share of the headlines holding a number or "
             "a name (with_facts) whose numbers and names all come back (invemb.metrics.fact_metrics).", ""]
    rows = _mode_rows(val_name, val) + _mode_rows(new_name, new)
    pert = res.get("perturbed")
    if pert:
        for part in ("originals", "perturbed"):
            rows.append({"set": f"perturbed-facts set: {part}", "decode": f"beam{pert['beam']}", "n": pert["n"],
                         **pert[part]})
    lines += _table(rows, ["set", "decode", "n"] + FACT_COLS)
    if pert:
        lines += ["", f"Perturbed-facts set: the first {pert['n']} validation headlines (of the set above) that hold "
                  "a number or a simple name; every number replaced by a random number of the same shape (digits, "
                  "separators, unit), every simple capitalised word after the first by a name of another headline "
                  f"(invemb.facts.perturbed_facts_set, seed {pert['seed']}). The decoder's prior cannot guess these "
                  "facts: recall on the perturbed copies measures what the vector CARRIES.", ""]
        lines += _table(pert.get("examples", []), ["original", "perturbed", "decoded"])
    lines += ["", "## Headlines holding a WordPiece outside the compact vocabulary (normalised exact match)", ""]
    lines += _table([{"set": s, "decode": m, **r[m]} for s, r in ((val_name, val), (new_name, new))
                     for m in ("greedy", "beam4") if m in r and "n_with" in r[m]],
                    ["set", "decode", "n_with", "exact_with", "n_without", "exact_without"])
    dist = res.get("distance")
    if dist:
        sigma = dist.get("noise_sigma")
        lines += ["", "## One change, how far the vector moves (diagnostic)", "",
                  "||v(a) - v(b)|| / (RMS(v(a)) * sqrt(S)) for a validation headline a and b = a with ONE number's "
                  "digits redrawn (same shape) / one simple name swapped for another headline's / one ordinary "
                  f"lower-case word swapped (invemb.facts.one_change_pairs, seed {dist['seed']}). The training "
                  f"noise N(0, (sigma RMS)^2) moves a vector by sigma on this scale: sigma = {sigma} (the model's "
                  "recipe). A change the decoder must tell apart should move the vector well above it.", ""]
        lines += _table(dist["rows"], ["kind", "n", "mean", "min", "max", "closest"])
        if "number_mean_above_2x_noise" in dist:
            lines += ["", f"One-number mean above 2 x noise ({2 * sigma:.3f}): "
                      f"{'yes' if dist['number_mean_above_2x_noise'] else 'NO'}."]
    return lines


def render_oracle(oracle: dict, res: dict) -> str:
    """results/surface_oracle.md: the written form's oracle round trip per set, every failure listed."""
    lines = ["# The written form's oracle round trip", "",
             f"original -> decoder targets (pieces + case / space tags; invemb.surface.decoder_targets) -> render == "
             f"original, for the headlines of `{res['model']}`'s split (seed {res['split']['seed']}, val_fraction "
             f"{res['split']['val_fraction']}). Surface table: {oracle['table_from']} ({oracle['table_size']} pieces); "
             f"spell_numbers {oracle['spell_numbers']}. Command: `{res['command']}`. A failure cannot come back "
             "exactly whatever the decoder does.", ""]
    lines += _table([{"set": k, "n": v["n"], "share": v["share"], "failures": len(v["failures"])}
                     for k, v in oracle["sets"].items()], ["set", "n", "share", "failures"])
    for name, v in oracle["sets"].items():
        lines += ["", f"## Failures: {name} ({len(v['failures'])})", ""]
        lines += _table([{"original": a.replace("|", "\\|"), "rendered": b.replace("|", "\\|")}
                         for a, b in v["failures"]], ["original", "rendered"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
