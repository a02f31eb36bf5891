"""The main job in one command: train -> evaluate -> export -> serve -> roundtrip, in one run folder.

    .venv/bin/python scripts/pipeline.py --data ../shared/data/financial-news-headlines            # ~15-20 min, 2 CPUs
    .venv/bin/python scripts/pipeline.py --out runs/pipeline --resume                              # skip finished stages
    .venv/bin/invemb pipeline --data ...                                                           # the same

Stages (each logs to <out>/logs/<stage>.log and leaves <out>/<stage>.done when it finished):
  train     `deepspeed --num_gpus 2 train/run.py --config train/configs/small.yaml` (2 gloo ranks on CPU, ZeRO-2)
  evaluate  `invemb evaluate` on the validation split (greedy + beam 4, BERTScore/paraphrase cos with all-mpnet-base-v2)
  export    `export/to_onnx.py` into <out>/onnx and a Triton model repository <out>/model_repository
  serve     starts the real Triton server, round-trips 10 validation headlines through the `roundtrip` ensemble,
            prints them beside the originals and the metrics table, stops the server
A failing stage says which and why (log tail) and keeps what earlier stages produced.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from invemb.errors import InvembError  # noqa: E402

STAGES = ("train", "evaluate", "export", "serve")
BIN = Path(sys.executable).parent


class StageError(RuntimeError):
    pass


def _run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run a stage command, its output to `log` (tqdm bars included) and a compact live view to the console."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
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


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_train(a, out: Path) -> None:
    cmd = [BIN / "deepspeed", "--num_gpus", str(a.ranks), "--master_port", str(_free_port()),
           REPO / "train/run.py"] if a.ranks > 1 else [sys.executable, REPO / "train/run.py"]
    cmd += ["--config", a.config, "--data", a.data, "--out", out / "train"]
    if (out / "train/checkpoints").is_dir() and any((out / "train/checkpoints").iterdir()):
        cmd.append("--resume")  # an interrupted training stage continues from its latest checkpoint
    if a.ranks > 1:
        cmd.append(f"deepspeed_config={REPO / 'train/ds_config/zero2.json'}")
    cmd += a.override
    _run(cmd, out / "logs/train.log", {"OMP_NUM_THREADS": "1"} if a.ranks > 1 else None)
    if not (out / "train/final/model.safetensors").is_file():
        raise StageError(f"training finished without {out / 'train/final'}")


def stage_evaluate(a, out: Path) -> None:
    cmd = [sys.executable, "-m", "invemb.cli", "evaluate", "--checkpoint", out / "train/final", "--data", a.data,
           "--limit", str(a.eval_limit), "--beam-sizes", "1,4", "--scorer", a.scorer,
           "--output", out / "eval/metrics.json"]
    _run(cmd, out / "logs/evaluate.log")


def stage_export(a, out: Path) -> None:
    repo = out / "model_repository"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(REPO / "model_repository", repo, ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    _run([sys.executable, REPO / "export/to_onnx.py", "--checkpoint", out / "train/final", "--out", out / "onnx",
          "--triton-repo", repo], out / "logs/export.log")


def stage_serve(a, out: Path) -> None:
    from invemb.data import load_split
    from serving.client import TritonClient
    from serving.launch import TritonServer

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
    print(f"\n  {'original (validation)':<{width}} | roundtrip through Triton (tokenizer -> encoder -> beam_search)")
    for r in rows:
        print(f"  {r['original']:<{width}} | {r['roundtrip']}")


def summary(out: Path, times: dict) -> str:
    from invemb.evaluate import format_table
    lines = ["# invemb pipeline run", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {t:.0f} |" for s, t in times.items()]
    if (out / "eval/metrics.json").is_file():
        m = json.loads((out / "eval/metrics.json").read_text())
        lines += ["", f"## Validation metrics ({m['n']} headlines; BERTScore: {m.get('bertscore')})", "",
                  format_table(m)]
    if (out / "serve/roundtrip.json").is_file():
        rows = json.loads((out / "serve/roundtrip.json").read_text())
        lines += ["", "## Round trip through Triton", "", "| original | roundtrip |", "|---|---|"]
        lines += [f"| {r['original']} | {r['roundtrip']} |" for r in rows]
    return "\n".join(lines) + "\n"


def run_pipeline(a) -> None:
    from invemb.data import resolve_data_path
    a.data = str(resolve_data_path(a.data).resolve())  # fail fast, one line, before any work
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    times_file = out / "stage_times.json"
    times = json.loads(times_file.read_text()) if a.resume and times_file.is_file() else {}
    for i, stage in enumerate(STAGES, 1):
        done = out / f"{stage}.done"
        if a.resume and done.is_file():
            print(f"[{i}/{len(STAGES)}] {stage}: already done (--resume), skipped", flush=True)
            continue
        for later in STAGES[i - 1:]:  # this stage's outputs change: later stages must run again
            (out / f"{later}.done").unlink(missing_ok=True)
        print(f"[{i}/{len(STAGES)}] {stage}: running (log: {out / 'logs' / (stage + '.log')})", flush=True)
        t0 = time.time()
        try:
            globals()[f"stage_{stage}"](a, out)
        except (StageError, InvembError, RuntimeError, OSError) as e:
            print(f"[{i}/{len(STAGES)}] {stage}: FAILED after {time.time() - t0:.0f} s: {e}", file=sys.stderr)
            print(f"earlier stages' outputs are kept in {out}; rerun with --resume to continue", file=sys.stderr)
            raise SystemExit(1)
        times[stage] = time.time() - t0
        times_file.write_text(json.dumps(times, indent=2))
        done.write_text(f"{times[stage]:.1f}\n")
        print(f"[{i}/{len(STAGES)}] {stage}: done in {times[stage]:.0f} s", flush=True)
    (out / "summary.md").write_text(summary(out, times))
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
    ap.add_argument("--config", default=str(REPO / "train/configs/small.yaml"))
    ap.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (CPU: gloo); 1 = plain PyTorch")
    ap.add_argument("--eval-limit", type=int, default=200, help="validation headlines to evaluate")
    ap.add_argument("--scorer", default="all-mpnet-base-v2", help="BERTScore/paraphrase model, or 'none'")
    ap.add_argument("--n-roundtrip", type=int, default=10, help="headlines sent through Triton")
    ap.add_argument("--resume", action="store_true", help="skip stages that already finished")
    ap.add_argument("override", nargs="*", help="training recipe overrides key=value (e.g. max_steps=100)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_pipeline(args)
    except InvembError as e:
        print(f"invemb: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
