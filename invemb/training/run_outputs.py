"""What a training run writes on rank 0: metrics.jsonl + TensorBoard scalars (RunLogger), curve plots (PNG),
the reconstruction-example table (examples.md) and the git hash of the code (git.txt, summary.json)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

# file, title, (train record kind, key), (validation record kind, key)
CURVES = (("loss.png", "cross-entropy loss", ("train", "ce"), ("val", "val_loss")),
          ("accuracy.png", "token accuracy (teacher-forced top-1)", ("train", "top1"), ("val", "val_top1")),
          ("top5.png", "top-5 token accuracy (teacher-forced)", ("train", "top5"), ("val", "val_top5")),
          ("bertscore.png", "BERTScore F1 (greedy decode, raw)", ("val", "train_bertscore"),
           ("val", "val_bertscore")))


def git_hash() -> str:
    """HEAD of the checkout holding invemb (+ "-dirty" with uncommitted changes to tracked files), or "unknown"."""
    from invemb.paths import checkout_root
    repo = checkout_root()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Appends records to metrics.jsonl and TensorBoard; a no-op on ranks other than 0."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None = None):
        self.enabled, self.path, self.tb = enabled, out / "metrics.jsonl", None
        if not enabled:
            return
        if resume_step is not None:  # drop what a killed run logged after its last checkpoint
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is in the [train] extra; metrics.jsonl is always written
            self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record["kind"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def make_plots(metrics_path: Path, out_dir: Path, scorer: str = "") -> list[Path]:
    """The report's curves, train vs validation, one PNG each (skipped when a curve has no points)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, title, train, val in CURVES:
        series = []
        for label, (kind, key) in (("train", train), ("validation", val)):
            pts = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
            if pts:
                series.append((label, pts))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in series:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title}, {scorer}" if scorer and fname == "bertscore.png" else title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(out_dir / fname)
    return written


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def examples_table(model, texts: list[str], path: Path) -> Path:
    """Markdown table: validation headline (as tokenized) vs greedy and beam-4 reconstructions of its vector."""
    vecs = model.encode(texts)
    refs = model.reference_texts(texts)
    greedy, beam = model.decode(vecs, beam_size=1), model.decode(vecs, beam_size=4)
    lines = ["| # | validation headline | greedy | beam 4 |", "| --- | --- | --- | --- |"]
    for i, (r, g, b) in enumerate(zip(refs, greedy, beam), 1):
        mark = lambda h: f"{_cell(h)}{' ✓' if h == r else ''}"  # noqa: E731
        lines.append(f"| {i} | {_cell(r)} | {mark(g)} | {mark(b)} |")
    exact = sum(g == r for g, r in zip(greedy, refs)), sum(b == r for b, r in zip(beam, refs))
    lines += ["", f"Exact reconstructions: greedy {exact[0]}/{len(refs)}, beam-4 {exact[1]}/{len(refs)} "
                  "(references are the tokenizer's lower-cased, truncated form)."]
    path.write_text("\n".join(lines) + "\n")
    return path
