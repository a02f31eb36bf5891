"""Average the weights of two shipped models of one lineage (b continues a): (1 - weight) * a + weight * b.

    python scripts/average_models.py --a models/invemb-minilm-s768 --b runs/facts6/sep/model --weight 0.5 \
        --out runs/facts6/soup50
    python scripts/average_models.py --a models/invemb-minilm-s768 --b runs/facts6/sep/model --weight 0.5 \
        --out models/invemb-minilm-s768 --metrics results/fidelity.json     # ship over a, with its card figures

invemb.training.soup has the logic and the lineage rule.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from invemb.errors import InvembError
from invemb.util import read_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="the earlier model folder")
    ap.add_argument("--b", required=True, help="a model folder whose lineage continues a's")
    ap.add_argument("--weight", type=float, default=0.5, help="b's share, in [0, 1] (default 0.5)")
    ap.add_argument("--out", required=True, help="the averaged model's folder")
    ap.add_argument("--metrics", default=None, help="fidelity JSON whose headline numbers go into the card")
    args = ap.parse_args(argv)
    from invemb.training.soup import average_models
    try:
        metrics = read_json(args.metrics, "--metrics") if args.metrics else None
        out = average_models(Path(args.a), Path(args.b), args.weight, Path(args.out), metrics)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"averaged {1 - args.weight:g} x {args.a} + {args.weight:g} x {args.b} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
