"""decode's re-ranking margin, measured: the beam's best, re-ranking at each margin with and without the numbers rule,
and every candidate, on the first N validation headlines (one beam search, every candidate encoded once;
invemb.fidelity.rerank_sweep). What chose invemb.embedder.RERANK_MARGIN; the cost side (headlines/s at a margin)
is scripts/bench_models.py --margins.

    python scripts/sweep_rerank.py --data ../shared/data/financial-news-headlines --limit 2000 \
        --out results/rerank_margin

Writes <out>.md and <out>.json (machine, versions, command). PyTorch decodes (the model itself).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from invemb.paths import display_command, display_path
from invemb.util import cpu_isa, cpu_name

COLS = ["arm", "encodes", "exact_match", "bleu", "raw_exact", "cased_bleu", "number_recall", "name_recall",
        "facts_all_right"]


def to_markdown(res: dict) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) and abs(v) >= 10 else f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["# Re-ranking margin: what each margin buys and costs (one search)", "",
             f"Command: `{res['command']}` ({res['seconds'] / 60:.0f} min). Model: `{res['model']}`; first "
             f"{res['n']} validation headlines, beam {res['beam']}, PyTorch. Machine: {res['machine']}.", "",
             "Every arm picks, among its rivals, the candidate whose re-encoded vector is closest (cosine) to the "
             "given vector; rivals = the candidates scored (length-normalised log-probability) within the margin of "
             "the beam's best, and with `+ numbers` also every candidate whose numbers differ from the best's. A "
             "row with no rival is not re-encoded. encodes = candidates re-encoded per headline (the cost; decode "
             f"speed at a margin: results/bench_models.md). decode's default (`rerank=\"auto\"`): margin "
             f"{res['default_margin']:g} + numbers.", "",
             "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLS) + " |" for r in res["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--data", default=None, help="headlines (default: $INVEMB_DATA)")
    ap.add_argument("--limit", type=int, default=2000, help="first N validation headlines")
    ap.add_argument("--margins", type=float, nargs="+", default=[0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05])
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--out", default="results/rerank_margin")
    args = ap.parse_args(argv)
    from invemb.data import load_split
    from invemb.embedder import RERANK_MARGIN
    from invemb.errors import InvembError
    from invemb.fidelity import rerank_sweep
    from invemb.model import InvertibleEmbedder
    from invemb.shipped import default_model_path
    t0 = time.time()
    try:
        model = InvertibleEmbedder.from_pretrained(args.checkpoint)
        texts = [r.text for r in load_split(args.data).val][:args.limit]
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = rerank_sweep(model, texts, tuple(args.margins), args.beam)
    res = {"command": display_command(["python", "scripts/sweep_rerank.py", *(sys.argv[1:] if argv is None else argv)]),
           "model": display_path(args.checkpoint or default_model_path()), "n": len(texts), "beam": args.beam,
           "machine": f"{cpu_name()} ({cpu_isa()}), Python {platform.python_version()}",
           "default_margin": RERANK_MARGIN, "rows": rows, "seconds": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2, default=float))
    Path(f"{args.out}.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
