"""Where a one-number change gets lost (issue 29): the frozen backbone's states vs the trained vector, with numbers
read as the tokenizer writes them ("587" -> "58 ##7") and as single digits ("5 ##8 ##7").

    python scripts/digit_states.py --data ../shared/data/financial-news-headlines \
        --pairs 150 --out results/digit_states          # the shipped model; ~30 s on 2 cores

Pairs: invemb.facts.one_change_pairs (one number of a validation headline redrawn, same shape; the fidelity
report's distance table), study: invemb.fidelity.backbone_number_study. Writes <out>.md and <out>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from invemb.errors import InvembError
from invemb.paths import display_command, display_path
from invemb.util import describe_machine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="the data set (default: env INVEMB_DATA)")
    ap.add_argument("--checkpoint", default=None, help="a model folder (default: the shipped model)")
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/digit_states")
    args = ap.parse_args(argv)
    try:
        import torch
        from invemb.data import load_split
        from invemb.facts import one_change_pairs
        from invemb.fidelity import backbone_number_study
        from invemb.model import InvertibleEmbedder
        torch.set_num_threads(2)
        model = InvertibleEmbedder.from_pretrained(args.checkpoint).eval()
        val = [r.text for r in load_split(args.data).val]
        res = backbone_number_study(model, one_change_pairs(val, args.pairs, args.seed)["number"])
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res.update(checkpoint=display_path(args.checkpoint) if args.checkpoint else "the shipped model",
               machine=describe_machine(), command=display_command(["python", "scripts/digit_states.py",
                                                                    *(sys.argv[1:] if argv is None else argv)]))
    lines = [f"# One number changed: the frozen backbone's states and the vector ({res['checkpoint']})", "",
             f"`{res['command']}`  ", f"{res['machine']}; {res['n']} validation pairs (one number redrawn, same shape)",
             "", "| numbers read as | pieces per text | mean state moves | one position moves at most "
             "| vector moves |", "|---|---|---|---|---|"]
    for reading, label in (("pieces", "WordPiece (\"58 ##7\", as trained)"), ("digits", "single digits")):
        r = res[reading]
        peak = "-" if r["max_position"] is None else f"{r['max_position']:.3f} ({r['aligned']} aligned)"
        vec = f"{r['vector']:.3f}" if reading == "pieces" else f"({r['vector']:.3f}: pooling not trained on it)"
        lines.append(f"| {label} | {r['pieces_per_text']:.1f} | {r['mean_state']:.3f} | {peak} | {vec} |")
    lines += ["", "Relative distances (invemb.fidelity.relative_distance: ||a - b|| / ||a||)."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
