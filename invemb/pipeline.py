"""The main job in one command: [train ->] evaluate -> export -> serve -> roundtrip, in one run folder.

    .venv/bin/python scripts/pipeline.py --data ../shared/data/financial-news-headlines     # the shipped model, minutes
    .venv/bin/python scripts/pipeline.py --data ... --train                                 # train first (small recipe)
    .venv/bin/python scripts/pipeline.py --data ... --train --config train/configs/minilm-mq16.yaml \
        --ranks 1 init_from=models/invemb-minilm-s768 max_steps=2000     # continue the shipped model's training
    .venv/bin/python scripts/pipeline.py --out runs/pipeline --resume                       # skip finished stages
    .venv/bin/invemb pipeline --data ...                                                    # the same

By default the pipeline runs on the model shipped in models/ (no training: real reconstructions in minutes);
--checkpoint DIR runs it on another model folder; --train trains one first (the `small` recipe by default:
`deepspeed --num_gpus 2 train/run.py`, 2 gloo ranks on CPU, ZeRO-2, ~15 min and a weak model).

Stages (each logs to <out>/logs/<stage>.log and leaves <out>/<stage>.done when it finished):
  train     (--train only) `deepspeed --num_gpus 2 train/run.py --config ...` -> <out>/train/final
  evaluate  `invemb evaluate` on the validation split (greedy + beam 4, BERTScore/paraphrase cos with all-mpnet-base-v2)
  export    `place_export` (invemb.export.exporter; what `export/to_onnx.py --triton-repo` does) into <out>/onnx and a
            fresh Triton model repository <out>/model_repository (the CPU serving default: the static int8 encoder,
            fp32 decoders)
  serve     starts the real Triton server, round-trips 10 validation headlines through the `roundtrip` ensemble,
            prints them (as written, for a model with surface heads) beside the originals and the metrics table,
            stops the server
A failing stage says which and why (log tail) and keeps what earlier stages produced.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from invemb.errors import InvembError
from invemb.paths import checkout_root, display_path

STAGES = ("train", "evaluate", "export", "serve")
BIN = Path(sys.executable).parent


def source_file(rel: str) -> Path:
    """A file of the source checkout the stages run or copy (train/run.py, export/to_onnx.py, model_repository/,
    recipes); InvembError when invemb is not installed from a checkout."""
    p = checkout_root() / rel
    if not p.exists():
        raise InvembError(f"`invemb pipeline` needs the source checkout (pip install -e .); {rel} not found")
    return p


def model_dir(a, out: Path) -> Path:
    """The model the later stages use: the trained one (--train), --checkpoint, or the shipped model."""
    if a.train:
        return out / "train/final"
    if a.checkpoint:
        return Path(a.checkpoint).resolve()
    from invemb.shipped import default_model_path
    return default_model_path()


class StageError(RuntimeError):
    pass


def _run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run a stage command, its output to `log` (tqdm bars included) and a compact live view to the console."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=checkout_root(),
                                env={**os.environ, **(env or {})}, text=True, bufsize=1)
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if line.startswith(("step", "epoch", "val", "[rank0]", "|", "wrote", "invemb:")) or "error" in line.lower():
                print("    " + line.rstrip()[:160], flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise StageError(f"exit code {rc}; last lines of {log}:\n{tail}")


def stage_train(a, out: Path) -> None:
    from invemb.util import free_port
    run = source_file("train/run.py")
    cmd = [BIN / "deepspeed", "--num_gpus", str(a.ranks), "--master_port", str(free_port()), run] \
        if a.ranks > 1 else [sys.executable, run]
    cmd += ["--config", a.config, "--data", a.data, "--out", out / "train"]
    if (out / "train/checkpoints").is_dir() and any((out / "train/checkpoints").iterdir()):
        cmd.append("--resume")  # an interrupted training stage continues from its latest checkpoint
    if a.ranks > 1:
        cmd.append(f"deepspeed_config={source_file('train/ds_config/zero2.json')}")
    cmd += a.override
    _run(cmd, out / "logs/train.log", {"OMP_NUM_THREADS": "1"} if a.ranks > 1 else None)
    if not (out / "train/final/model.safetensors").is_file():
        raise StageError(f"training finished without {out / 'train/final'}")


def stage_evaluate(a, out: Path) -> None:
    cmd = [sys.executable, "-m", "invemb.cli", "evaluate", "--checkpoint", model_dir(a, out), "--data", a.data,
           "--limit", str(a.eval_limit), "--beam-sizes", "1,4", "--scorer", a.scorer,
           "--output", out / "eval/metrics.json"]
    _run(cmd, out / "logs/evaluate.log")


def stage_export(a, out: Path) -> None:
    from invemb.export.exporter import place_export
    log = out / "logs/export.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stderr(f):
        f.write(f"place_export({out / 'onnx'}, {out / 'model_repository'}, {model_dir(a, out)})\n")
        variant = place_export(out / "onnx", out / "model_repository", model_dir(a, out))
        f.write(f"exported to {out / 'onnx'}; placed in {out / 'model_repository'} ({variant or 'fp32'} graphs)\n")


def stage_serve(a, out: Path) -> None:
    from invemb.data import load_split
    from invemb.serving.client import TritonClient
    from invemb.serving.launch import TritonServer

    texts = [r.text for r in load_split(a.data).val[:a.n_roundtrip]]
    log = out / "logs/serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(out / "model_repository", log_file=log) as server:
        print(f"    Triton ready: grpc {server.grpc_url}, http {server.http_url}", flush=True)
        decoded = TritonClient(server.grpc_url).roundtrip(texts)
    rows = [{"original": t, "roundtrip": d} for t, d in zip(texts, decoded)]
    (out / "serve").mkdir(exist_ok=True)
    (out / "serve/roundtrip.json").write_text(json.dumps(rows, indent=2))
    width = max(len(t) for t in texts)
    from invemb.export.placement import served_variant
    encoder = "int8 encoder" if served_variant(out / "model_repository") == "int8_encoder" else "encoder"
    print(f"\n  {'original (validation)':<{width}} | roundtrip through Triton (tokenizer -> {encoder} -> beam_search; "
          f"{served_form(out) or 'form unknown'})")
    for r in rows:
        print(f"  {r['original']:<{width}} | {r['roundtrip']}")


def served_form(out: Path) -> str:
    """How the served texts read: as written (a model with surface heads: case and spacing from its tag heads) or
    the normalised lower-cased WordPiece text (the `roundtrip` ensemble's decoded_text either way)."""
    from invemb.manifest import read_manifest
    try:
        surface = "surface" in read_manifest(out / "model_repository" / "beam_search" / "1")
    except InvembError:  # no repository (yet): say nothing
        return ""
    return "as written" if surface else "normalised: lower-cased WordPiece"


def summary(out: Path, times: dict) -> str:
    from invemb.evaluate import format_table
    lines = ["# invemb pipeline run", "", f"model: {times.get('_model', '?')}", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {t:.0f} |" for s, t in times.items() if not s.startswith("_")]
    if (out / "eval/metrics.json").is_file():
        m = json.loads((out / "eval/metrics.json").read_text())
        lines += ["", f"## Validation metrics ({m['n']} headlines; BERTScore: {m.get('bertscore')})", "",
                  format_table(m)]
    if (out / "serve/roundtrip.json").is_file():
        rows = json.loads((out / "serve/roundtrip.json").read_text())
        form = served_form(out)
        lines += ["", "## Round trip through Triton", "", f"| original | roundtrip{f' ({form})' if form else ''} |",
                  "|---|---|"]
        lines += [f"| {r['original']} | {r['roundtrip']} |" for r in rows]
    return "\n".join(lines) + "\n"


def run_pipeline(a) -> None:
    from invemb.data import resolve_data_path
    a.data = str(resolve_data_path(a.data).resolve())  # fail fast, one line, before any work
    out = Path(a.out).resolve()
    stages = STAGES if a.train else STAGES[1:]
    if not a.train:
        model_dir(a, out)  # a missing shipped model / checkpoint fails here, before any work
    out.mkdir(parents=True, exist_ok=True)
    times_file = out / "stage_times.json"
    times = json.loads(times_file.read_text()) if a.resume and times_file.is_file() else {}
    times.pop("_model", None)
    if not a.train:
        print(f"model: {model_dir(a, out)} (pass --train to train one first)", flush=True)
    for i, stage in enumerate(stages, 1):
        done = out / f"{stage}.done"
        if a.resume and done.is_file():
            print(f"[{i}/{len(stages)}] {stage}: already done (--resume), skipped", flush=True)
            continue
        for later in stages[i - 1:]:  # this stage's outputs change: later stages must run again
            (out / f"{later}.done").unlink(missing_ok=True)
        print(f"[{i}/{len(stages)}] {stage}: running (log: {out / 'logs' / (stage + '.log')})", flush=True)
        t0 = time.time()
        try:
            globals()[f"stage_{stage}"](a, out)
        except (StageError, InvembError, RuntimeError, OSError) as e:
            print(f"[{i}/{len(stages)}] {stage}: FAILED after {time.time() - t0:.0f} s: {e}", file=sys.stderr)
            print(f"earlier stages' outputs are kept in {out}; rerun with --resume to continue", file=sys.stderr)
            raise SystemExit(1)
        times[stage] = time.time() - t0
        times_file.write_text(json.dumps(times, indent=2))
        done.write_text(f"{times[stage]:.1f}\n")
        print(f"[{i}/{len(stages)}] {stage}: done in {times[stage]:.0f} s", flush=True)
    (out / "summary.md").write_text(summary(out, {**times, "_model": display_path(model_dir(a, out))}))
    if (out / "eval/metrics.json").is_file():
        from invemb.evaluate import format_table
        m = json.loads((out / "eval/metrics.json").read_text())
        m.pop("examples", None)
        print("\nValidation metrics:\n" + format_table(m))
    print(f"\nall stages done in {sum(times.values()):.0f} s; everything is in {out} (summary.md)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="train -> evaluate -> export -> serve -> roundtrip")
    ap.add_argument("--data", default=None, help="headlines folder/file (default: $INVEMB_DATA)")
    ap.add_argument("--out", default="runs/pipeline", help="run folder")
    ap.add_argument("--train", action="store_true", help="train a model first (--config) instead of using the "
                    "shipped one")
    ap.add_argument("--checkpoint", default=None, help="model folder to evaluate/export/serve (default: shipped)")
    ap.add_argument("--config", default=str(checkout_root() / "train/configs/small.yaml"), help="recipe of --train")
    ap.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (CPU: gloo); 1 = plain PyTorch")
    ap.add_argument("--eval-limit", type=int, default=200, help="validation headlines to evaluate")
    ap.add_argument("--scorer", default="all-mpnet-base-v2", help="BERTScore/paraphrase model, or 'none'")
    ap.add_argument("--n-roundtrip", type=int, default=10, help="headlines sent through Triton")
    ap.add_argument("--resume", action="store_true", help="skip stages that already finished")
    ap.add_argument("override", nargs="*", help="training recipe overrides key=value (e.g. max_steps=100)")
    return ap


def check_args(a) -> None:
    if a.override and not a.train:
        raise InvembError(f"recipe overrides {a.override} need --train")
    if a.train and a.checkpoint:
        raise InvembError("--checkpoint and --train exclude each other (--train makes the model)")
    for name in ("ranks", "eval_limit", "n_roundtrip"):
        if getattr(a, name) < (1 if name != "eval_limit" else 0):
            raise InvembError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        run_pipeline(args)
    except InvembError as e:
        print(f"invemb: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
