"""Ship a training run's checkpoint as the default model (models/invemb-minilm-s768, float16, <= 25 MB).

    python scripts/ship_model.py --run runs/mq16                       # latest checkpoint
    python scripts/ship_model.py --run runs/mq16 --tag step_00004000 --out models/invemb-minilm-s768
    python scripts/ship_model.py --run runs/mq16 --metrics results/fidelity.json   # card metrics from a fidelity run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from invemb.errors import InvembError
from invemb.util import read_json
from invemb.shipped import DEFAULT_MODEL, models_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="training run folder (train/run.py --out)")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    ap.add_argument("--out", default=str(models_dir() / DEFAULT_MODEL))
    ap.add_argument("--metrics", default=None, help="fidelity JSON whose headline numbers go into the card")
    args = ap.parse_args(argv)
    from invemb.training.ship import ship, write_card
    try:
        metrics = read_json(args.metrics, "--metrics") if args.metrics else None
        out = ship(Path(args.run), Path(args.out), args.tag, metrics)
        write_card(out)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = (out / "model.safetensors").stat().st_size / 2 ** 20
    print(f"shipped {out} ({size:.1f} MB float16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
