"""Training throughput: plain PyTorch vs DeepSpeed ZeRO-2 (bf16 where the GPU has it) on one recipe.

    # CPU (2 cores: plain = one process with every core, zero2 = 2 gloo ranks x 1 thread):
    python scripts/bench_train.py --config train/configs/small.yaml --data ../shared/data/financial-news-headlines
    # several recipes in one report:  --config train/configs/toy.yaml --config train/configs/small.yaml
    # GPU, one command (writes results/bench_train_gpu.md):
    python scripts/bench_train.py --config train/configs/report-768-attention.yaml --data DATA --steps 60 --ranks 1

Each mode runs train/run.py for --steps optimizer steps (validation, BERTScore and checkpoints reduced to the
minimum) and reads tokens/s and samples/s from its metrics.jsonl, skipping the first logged window (warm-up).
Tokens are the non-padding decoder tokens (+1 per row). MFU = tokens/s x FLOPs per token / peak, with FLOPs per
token ~ 6 x trainable matmul parameters + 2 x frozen ones (the tied output head counts, embedding lookups and
attention scores don't). Peak: the GPU's dense bf16 (or fp32 without bf16) datasheet number, or on CPU the
measured fp32 matmul rate of this machine (so CPU MFU is relative to what torch reaches here).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from invemb.paths import checkout_root, display_command
from invemb.util import cpu_name
from invemb.util import free_port

REPO = checkout_root()

# dense TFLOP/s (bf16, fp32 non-tensor-core) from the datasheets
GPU_PEAK = {"H100 SXM": (989.4, 67.0), "H100 PCIe": (756.0, 51.0), "H100": (989.4, 67.0), "H200": (989.4, 67.0),
            "A100": (312.0, 19.5), "L40S": (362.0, 91.6), "A10": (125.0, 31.2)}


def flops_per_token(cfg) -> tuple[float, int, int]:
    """(FLOPs per training token, trainable matmul params, frozen matmul params) of the recipe's model."""
    from invemb.model import InvertibleEmbedder
    model = InvertibleEmbedder(cfg.model)
    trainable = frozen = 0
    tied = model.config.decoder.tie_embeddings and model.config.decoder.kind == "transformer"
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once, as decoder.tok
        lookup = "embeddings" in name or name.startswith(("decoder.pos", "decoder.memory.slot_emb")) or (
            name == "decoder.tok.weight" and not tied)
        if p.dim() < 2 or lookup:
            continue  # biases/norms and embedding lookups (a tied decoder.tok doubles as the output head: counted)
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return 6.0 * trainable + 2.0 * frozen, trainable, frozen


def cpu_peak_flops(trials: int = 3, seconds: float = 1.0) -> float:
    """Best of `trials` timed runs of a 2048x2048 fp32 matmul with all threads (FLOP/s)."""
    import torch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        best = max(best, n * 2 * 2048 ** 3 / (time.perf_counter() - t0))
    return best


def machine() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count()}
    info["cpu"] = cpu_name()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["bf16"] = torch.cuda.is_bf16_supported()
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        info["deepspeed"] = None
    return info


def gpu_peak(name: str, bf16: bool) -> float | None:
    for key, (b, f) in GPU_PEAK.items():
        if key.lower() in name.lower():
            return (b if bf16 else f) * 1e12
    return None


def run_mode(mode: str, a, workdir: Path, log) -> dict:
    out = workdir / mode
    shutil.rmtree(out, ignore_errors=True)
    log_every = max(1, a.steps // 6)
    over = [f"max_steps={a.steps}", f"log_every={log_every}", "eval_every=0", "save_every=0", "val_limit=32",
            "bertscore_subset=0", f"train_limit={a.steps * a.batch_size}", f"batch_size={a.batch_size}", "epochs=1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if mode == "plain":
        cmd = [sys.executable, str(REPO / "train/run.py")]
        over.append("deepspeed_config=")  # the report recipes name zero2.json
    else:
        port = free_port()  # not the launcher's default 29500: other jobs may hold it
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(a.ranks), "--master_port", str(port),
               str(REPO / "train/run.py")]
        over.append(f"deepspeed_config={REPO / 'train/ds_config/zero2.json'}")
        if a.ranks > 1 and not a.gpu:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // a.ranks))
    cmd += ["--config", a.recipe, "--out", str(out), *(["--data", a.data] if a.data else []), *over, *a.override]
    log(f"$ {display_command(cmd)}")  # paths as the repository names them (invemb.paths.display_command)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{mode} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"][1:] or [r for r in recs if r["kind"] == "train"]
    summary = json.loads((out / "summary.json").read_text())
    tok = sum(r["tokens_per_s"] for r in train) / len(train)
    smp = sum(r["samples_per_s"] for r in train) / len(train)
    return {"mode": mode, "ranks": 1 if mode == "plain" else a.ranks, "bf16": summary["bf16"], "tokens_per_s": tok,
            "samples_per_s": smp,
            "step_s": a.batch_size / smp, "wall_s": time.time() - t0, "final_loss": train[-1]["loss"]}


def bench_config(config: str, a, info: dict, log) -> list[str]:
    """Run every mode on one recipe; returns its markdown section."""
    from invemb.training.run import load_config
    cfg = load_config(config, a.override)
    a.recipe, a.batch_size = config, a.batch_size_arg or cfg.batch_size
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if "zero2" in modes and info["deepspeed"] is None:
        log("deepspeed is not installed: zero2 skipped")
        modes.remove("zero2")
    fpt, n_train, n_frozen = flops_per_token(cfg)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results = []
    for m in modes:  # best of --repeats (by samples/s): the least disturbed run on a shared machine
        tries = [run_mode(m, a, Path(a.workdir) / Path(config).stem, log) for _ in range(a.repeats)]
        results.append(max(tries, key=lambda r: r["samples_per_s"]))
    if a.gpu:
        peaks = {r["mode"]: gpu_peak(info["gpu"], r["bf16"]) for r in results}
        peak_note = f"{info['gpu']} datasheet dense peak per GPU (bf16 where used, else fp32)"
    else:
        peaks = {r["mode"]: a.cpu_peak for r in results}
        peak_note = (f"fp32 matmul rate of this CPU measured before the runs: {a.cpu_peak / 1e9:.1f} GFLOP/s "
                     "(2048x2048, all threads, best of 3); on a shared machine both sides vary with the load")
    rows = ["| mode | ranks | bf16 | samples/s | tokens/s | s/step | MFU | final train loss |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        peak = peaks[r["mode"]] * (r["ranks"] if a.gpu and r["mode"] != "plain" else 1)  # CPU ranks share cores
        mfu = f"{100 * r['tokens_per_s'] * fpt / peak:.1f}%" if peak else "n/a"
        rows.append(f"| {r['mode']} | {r['ranks']} | {r['bf16']} | {r['samples_per_s']:.1f} | "
                    f"{r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {mfu} | {r['final_loss']:.3f} |")
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("\n".join(rows))
    return [f"## {Path(config).name}", "",
            f"Global batch {a.batch_size}, {a.steps} steps per mode (best of {a.repeats} run(s)), first logged "
            "window skipped. Model: "
            f"{n_train / 1e6:.1f}M trainable + {n_frozen / 1e6:.1f}M frozen matmul parameters -> "
            f"{fpt / 1e6:.0f} MFLOP per token (6 x trainable + 2 x frozen). 1-min load average before/after: "
            f"{load0:.1f} / {load1:.1f}.", "", *rows, "", f"MFU peak: {peak_note}.", ""]


def main(argv=None) -> int:
    import torch
    from invemb.errors import InvembError
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", help="recipe(s); repeat for several (default: small.yaml)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", dest="batch_size_arg", type=int, default=0, help="global batch (default: recipe)")
    ap.add_argument("--ranks", type=int, default=0, help="DeepSpeed ranks (default: GPUs, or 2 on CPU)")
    ap.add_argument("--modes", default="plain,zero2")
    ap.add_argument("--repeats", type=int, default=1, help="runs per mode; the fastest is reported")
    ap.add_argument("--out", default=None, help="markdown report (default results/bench_train[_gpu].md)")
    ap.add_argument("--workdir", default=str(REPO / "runs/bench_train"))
    ap.add_argument("override", nargs="*", help="extra recipe overrides key=value")
    a = ap.parse_args(argv)
    a.gpu = torch.cuda.is_available()
    a.ranks = a.ranks or (torch.cuda.device_count() if a.gpu else 2)
    info = machine()
    a.cpu_peak = None if a.gpu else cpu_peak_flops()
    lines: list[str] = []
    log = lambda s: (print(s, file=sys.stderr), lines.append(s))  # noqa: E731
    sections: list[str] = []
    try:
        for config in a.config or [str(REPO / "train/configs/small.yaml")]:
            sections += bench_config(config, a, info, log)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out or REPO / ("results/bench_train_gpu.md" if a.gpu else "results/bench_train.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = display_command(["python", "scripts/bench_train.py", *(argv if argv is not None else sys.argv[1:])])
    text = ["# Training throughput: plain PyTorch vs DeepSpeed ZeRO-2", "",
            f"Measured {time.strftime('%Y-%m-%d')} with `{cmd}`.", "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".", "",
            "plain = one process (all cores / one GPU, bf16 autocast where supported); zero2 = `deepspeed` ranks "
            "(on CPU: gloo ranks with OMP_NUM_THREADS = cores / ranks). tokens = non-padding decoder tokens + 1 "
            "per row; MFU = tokens/s x FLOPs per token / peak.", "", *sections,
            "Commands run:", "", "```", *lines, "```", ""]
    out.write_text("\n".join(text))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
