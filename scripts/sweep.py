"""Recipe levers at equal wall clock: each arm trains `--minutes` on an otherwise idle machine from the feature
cache, then results/sweep.md (+ .json, curves PNG) compares validation top-1 at equal minutes and per-step cost.

    python scripts/sweep.py --data ../shared/data/financial-news-headlines --minutes 12 --arms sampled4096,full
    python scripts/sweep.py --report-only --arms sampled4096,full        # re-read runs/sweep/<arm>/ and report
    python scripts/sweep.py --data ../shared/data/financial-news-headlines --minutes 11 \
        --arms continue,crops2,word-drop0.15 --root runs/sweep2 --out results/sweep_continue.md \
        init_from=models/invemb-minilm-s768 lr=5.0e-4 warmup_steps=100 max_steps=6000 decode_subset=128 eval_every=200

Arms are overrides of train/configs/minilm-mq16.yaml (one lever each); add one in ARMS. Run nothing else beside
a sweep: a busy neighbour slows a 2-core run several-fold and the comparison with it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from invemb.paths import checkout_root, display_command

REPO = checkout_root()
CONFIG = REPO / "train/configs/minilm-mq16.yaml"
NO_LEVERS = ["augment_crops=0", "word_dropout=0.0"]  # the recipe before round 2 added crops + word dropout
ARMS = {  # name -> recipe overrides of the shipped model's recipe; each arm changes one lever of its round's base
    # round 1 (from scratch)
    "sampled4096": NO_LEVERS,
    "full": NO_LEVERS + ["sampled_softmax=0"],
    "single-query": NO_LEVERS + ["model.encoder.pooling=attention", "model.decoder.memory_mode=linear",
                                 "model.decoder.memory_slots=4"],
    "full-vocab": NO_LEVERS + ["compact_vocab=false"],
    "no-bucketing": NO_LEVERS + ["bucket_batches=false"],
    "lr3e-3": NO_LEVERS + ["lr=3.0e-3"],
    "d384x4": NO_LEVERS + ["model.decoder.d_model=384", "model.decoder.n_layers=4", "model.decoder.n_heads=6",
                           "model.decoder.d_ff=1536"],
    # round 2 (continuing the shipped model, which overfits: train loss 0.26 vs val 1.47 at step 4000)
    "continue": NO_LEVERS,
    "crops2": ["augment_crops=2", "word_dropout=0.0"],
    "word-drop0.15": ["augment_crops=0", "word_dropout=0.15"],
    # round 3 (continuing the 15,200-step shipped model: crops 2 + word dropout 0.15; train loss 0.2 vs val 1.21)
    "r3-base": [],
    "crops4": ["augment_crops=4"],
    "noise0.1": ["noise_sigma=0.1"],
    # round 4 (continuing the 32,200-step shipped model: crops 4 + noise 0.1; train loss 0.08 vs val 1.125)
    "r4-base": [],
    "splices4": ["augment_splices=4"],
    # round 5 (continuing the 44,450-step shipped model: + splices 4; train loss 0.17 vs val 0.82, data-limited)
    "r5-base": [],
    "splice-rounds2": ["splice_rounds=2"],
    # round 6 (issue 29: facts; continuing the shipped 102,200-step model + surface heads, live backbone;
    # results/sweep_facts3.md): number + name swaps without vector noise, then + the separation term
    "control": [],
    "swaps": ["augment_numbers=3", "augment_names=2", "noise_sigma=0"],
    "sep": ["augment_numbers=3", "augment_names=2", "noise_sigma=0", "separation_weight=1.0",
            "separation_margin=0.5"],
    # round 7 (continuing the candidate models/invemb-minilm-s768-facts = round 6's sep, 1.63 CPU h on; its hinge
    # averaged 0.02: most one-fact pairs were already beyond 0.5 apart; results/sweep_facts4.md): a wider margin,
    # and the facts' pieces weighted in the cross-entropy
    "sep-m0.8": ["augment_numbers=3", "augment_names=2", "noise_sigma=0", "separation_weight=1.0",
                 "separation_margin=0.8"],
    "sep-fw3": ["augment_numbers=3", "augment_names=2", "noise_sigma=0", "separation_weight=1.0",
                "separation_margin=0.5", "fact_weight=3.0"],  # + the pieces of numbers and names weigh 3 in the CE
    # round 8 (continuing the default = round 7's sep-fw3, 108,614 steps; results/sweep_facts5.md): sep-fw3 again as
    # the control, against the facts' pieces weighing 6
    "sep-fw6": ["augment_numbers=3", "augment_names=2", "noise_sigma=0", "separation_weight=1.0",
                "separation_margin=0.5", "fact_weight=6.0"],
    # round 9 (continuing round 8's candidate models/invemb-minilm-s768-facts = sep-fw6, 110,212 steps, which broke
    # the word floors; results/sweep_facts6.md): "sep" (the facts' weight back to 1, swaps + separation kept) as the
    # end of a fact-weight schedule, against sep-fw6 continued; sep won, and its average with the default
    # (scripts/average_models.py --weight 0.5) took back the words: results/facts_campaign.md, round 9
    # round 10 (continuing round 9's sep = models/invemb-minilm-s768-facts, 111,812 steps; results/sweep_facts7.md):
    # sep continued as the control, against a larger share of swapped texts (numbers 3 -> 8, names 2 -> 5 copies per
    # headline: 17% -> 35% of the training texts; the perturbed-facts set is exactly such texts); the facts stayed flat
    # in both arms, sep-swaps8 read better, and its average with round 7's model is the default since round 10
    "sep-swaps8": ["augment_numbers=8", "augment_names=5", "noise_sigma=0", "separation_weight=1.0",
                   "separation_margin=0.5"],
    # round 11 (capacity, results/sweep_facts8.md): the same recipe with a 3x wider vector, S=768 -> 2304, grown from
    # round 10's sep-swaps8 without changing what it decodes (scripts/grow_model.py; invemb.training.grow), so the
    # arm starts where its control (sep-swaps8 continued) starts. Run it with init_from=<the grown model>. Facts flat
    # in both at 40 min (whole-split perturbed numbers 0.610 -> 0.623 / 0.615 of 454): not shipped
    "sep-swaps8-s2304": ["augment_numbers=8", "augment_names=5", "noise_sigma=0", "separation_weight=1.0",
                         "separation_margin=0.5", "model.encoder.sentence_dim=2304"],
    # round 12 (fact slots, results/sweep_facts9.md): the same recipe on a model with 6 number slots (the k-th
    # chunk = the text's k-th piece holding a digit) and queries that also read the pieces' input embeddings
    # (invemb.encoder.MultiQueryPooling), added to models/invemb-minilm-s768-facts by scripts/grow_model.py
    # --number-slots 6 --token-identity. Run it with init_from=<that model>. 70 min: whole-split perturbed numbers
    # 0.615 -> 0.705 (models/invemb-minilm-s768-facts; not the default yet: results/facts_campaign.md)
    "sep-swaps8-slots6": ["augment_numbers=8", "augment_names=5", "noise_sigma=0", "separation_weight=1.0",
                          "separation_margin=0.5", "model.encoder.sentence_dim=1056", "model.encoder.number_slots=6",
                          "model.encoder.token_identity=true", "model.decoder.memory_slots=22"],
}


def read_curve(run: Path) -> list[dict]:
    """Validation records with the wall-clock minutes at which they were taken (interpolated from train logs for
    runs written before val records carried wall_total_s)."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [(r["step"], r.get("wall_total_s", r.get("elapsed_s"))) for r in recs if r["kind"] == "train"]
    out = []
    for r in recs:
        if r["kind"] != "val":
            continue
        wall = r.get("wall_total_s")
        if wall is None:
            before = [w for s, w in train if s <= r["step"]]
            wall = before[-1] if before else 0.0
        out.append({"step": r["step"], "minutes": round(wall / 60, 2), "val_top1": r["val_top1"],
                    "val_loss": r["val_loss"], **{k: r[k] for k in ("val_greedy_bleu", "val_greedy_exact")
                                                  if k in r}})
    return out


def step_seconds(run: Path) -> float | None:
    """Median seconds per step of the logged windows (samples_per_s -> s/step at the recipe's batch)."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    batch = json.loads((run / "config.json").read_text())["batch_size"]
    rates = sorted(batch / r["samples_per_s"] for r in recs if r["kind"] == "train" and r.get("samples_per_s"))
    return rates[len(rates) // 2] if rates else None


def report(arms: list[str], root: Path, out: Path, minutes: float, command: str) -> str:
    rows, curves = [], {}
    for arm in arms:
        run = root / arm
        if not (run / "metrics.jsonl").is_file():
            continue
        curve = read_curve(run)
        curves[arm] = curve
        within = [p for p in curve if p["minutes"] <= minutes + 0.5]  # the arm's budget (a run continued later
        last = (within or curve or [{}])[-1]                             # keeps its curve, not its table row)
        rows.append({"arm": arm, "overrides": " ".join(ARMS.get(arm, [])) or "(base recipe)",
                     "median s/step": step_seconds(run), "steps": last.get("step"),
                     "minutes": last.get("minutes"), "val top-1": last.get("val_top1"),
                     "val loss": last.get("val_loss")})
    cached = [bool(json.loads((root / a / "config.json").read_text()).get("feature_cache")) for a in curves]
    states = "feature cache" if all(cached) else "live frozen backbone" if not any(cached) else "see each run's config"
    lines = ["# Sweep at equal wall clock", "", f"Command: `{command}`; base recipe `train/configs/minilm-mq16.yaml`;"
             f" {minutes} min per arm on the 2-core box (plain PyTorch, 2 threads, {states}).", "",
             "| arm | overrides | median s/step | steps | minutes | val top-1 (512, teacher-forced) | val loss |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    lines += ["", "Curves (step, minutes, val top-1):", ""]
    for arm, c in curves.items():
        lines.append(f"- {arm}: " + ", ".join(f"({p['step']}, {p['minutes']}, {p['val_top1']:.3f})" for p in c))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, c in curves.items():
            ax.plot([p["minutes"] for p in c], [p["val_top1"] for p in c], marker="o", label=arm)
        ax.set_xlabel("minutes of training (wall clock, 2 cores)")
        ax.set_ylabel("validation top-1 (teacher-forced)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
        lines += ["", f"![curves]({out.with_suffix('.png').name})"]
    except ImportError:
        pass
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "curves": curves}, indent=2))
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--arms", default="sampled4096,full")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--root", default=str(REPO / "runs/sweep"))
    ap.add_argument("--out", default=str(REPO / "results/sweep.md"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("extra", nargs="*", help="overrides applied to every arm (e.g. max_steps=8000)")
    args = ap.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: unknown arm(s) {unknown}; known: {sorted(ARMS)}", file=sys.stderr)
        return 2
    root = Path(args.root)
    if not args.report_only:
        for arm in arms:
            cmd = [sys.executable, str(REPO / "train/run.py"), "--config", str(CONFIG), "--out", str(root / arm),
                   *(["--data", args.data] if args.data else []), f"max_minutes={args.minutes}", *ARMS[arm],
                   *args.extra]
            print("$ " + " ".join(cmd), flush=True)
            (root / arm).parent.mkdir(parents=True, exist_ok=True)
            with open(root / f"{arm}.log", "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
                                    ).returncode
            if rc != 0:
                print(f"arm {arm} failed (exit {rc}); see {root / (arm + '.log')}", file=sys.stderr)
    command = display_command(["python", "scripts/sweep.py", *(sys.argv[1:] if argv is None else argv)])
    print(report(arms, root, Path(args.out), args.minutes, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
