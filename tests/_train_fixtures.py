"""Helpers shared by tests/test_train_*.py: synthetic headlines, the launcher paths, a run-folder reader."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from invemb.util import free_port

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "train" / "run.py"
TOY = REPO / "train" / "configs" / "toy.yaml"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"  # the launcher of the running interpreter's environment
# few steps, small batches: seconds per run on 2 CPU cores
FAST = ["batch_size=8", "max_steps=6", "train_limit=96", "val_limit=16", "log_every=2", "eval_every=3",
        "save_every=2"]

_COMPANIES = ["apple", "tesla", "boeing", "exxon", "netflix", "ford", "intel", "pfizer", "amazon", "nike"]
_EVENTS = ["shares jump", "profit falls", "stock slides", "sales beat forecasts", "cuts jobs", "raises guidance"]
_REASONS = ["after earnings", "on china demand", "as oil rises", "amid rate fears", "on analyst upgrade"]


def write_headlines(path: Path, n: int = 240) -> Path:
    rows = [f"{c.title()} {e} {r}" for c, e, r in itertools.product(_COMPANIES, _EVENTS, _REASONS)][:n]
    path.write_text("\n".join(rows) + "\n")
    return path


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
             **extra)
    return e


def launch(args: list, ranks: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train/run.py ARGS` (ranks=0) or `deepspeed --num_gpus RANKS train/run.py ARGS`."""
    cmd = [sys.executable, str(RUN)] if not ranks else \
        [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), str(RUN)]
    return subprocess.run(cmd + [str(a) for a in args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def final_state(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "final" / "model.safetensors"))


def assert_final_reproduces_examples(run: Path) -> None:
    """examples.md row 1 (| 1 | headline | greedy | beam 4 |; " ✓" marks an exact one) was decoded by the training
    process from its final model; run/final loaded here must give the same greedy and beam-4 texts."""
    import re

    from invemb.model import InvertibleEmbedder
    row = (run / "examples.md").read_text().splitlines()[2]
    cells = [c.strip().removesuffix(" ✓").replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    model = InvertibleEmbedder.from_pretrained(run / "final")
    vec = model.encode([cells[1]])
    assert model.decode(vec, beam_size=1)[0] == cells[2] and model.decode(vec, beam_size=4)[0] == cells[3], cells
