"""Grow a shipped model's sentence vector S -> factor x S without changing what it decodes (then train it on), or
add fact slots to it (K number slots, queries that read the pieces' input embeddings).

    python scripts/grow_model.py --model models/invemb-minilm-s768-facts --factor 3 --out runs/grow/s2304
    python scripts/grow_model.py --model models/invemb-minilm-s768-facts --number-slots 6 --token-identity \
        --out runs/grow/slots6

invemb.training.grow has the logic (why the grown model decodes exactly as the old one).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from invemb.errors import InvembError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the shipped model folder to grow")
    ap.add_argument("--factor", type=int, default=3, help="the new S is factor x the old one (default 3)")
    ap.add_argument("--out", required=True, help="the grown model's folder (a new one)")
    ap.add_argument("--number-slots", type=int, default=None,
                    help="instead of --factor: add this many number slots (invemb.encoder.MultiQueryPooling)")
    ap.add_argument("--token-identity", action="store_true",
                    help="instead of --factor: the queries also read the pieces' input embeddings (zero-initialised)")
    ap.add_argument("--seed", type=int, default=0, help="draws the memory's random shares / new weights (default 0)")
    args = ap.parse_args(argv)
    from invemb.training.grow import add_fact_slots, grow_model
    slots = args.number_slots is not None or args.token_identity
    try:
        if slots:
            out = add_fact_slots(Path(args.model), args.number_slots or 0, args.token_identity, Path(args.out),
                                 args.seed)
        else:
            out = grow_model(Path(args.model), args.factor, Path(args.out), args.seed)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'fact slots added to' if slots else 'grown'} {args.model} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
