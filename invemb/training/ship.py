"""Ship a training run as the model invemb uses by default: `models/<name>/` = config.json + float16 safetensors
(pooling + decoder only; the frozen MiniLM backbone is referenced by name, loaded from its pip package) +
tokenizer files + README.md (the model card). The previous shipped files are replaced (one copy, not a pile).

    python scripts/ship_model.py --run runs/mq16                 # latest checkpoint of the run
    python scripts/ship_model.py --run runs/mq16 --tag step_00004000

The card's lineage: a run that started from the shipped model (`init_from`) adds its steps and CPU time to the
shipped model's history, so the card reads cumulative CPU hours since training from scratch.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch

from invemb.errors import InvembError
from invemb.paths import display_path, resolve_path
from invemb.training.card import gpu_minutes, write_card  # noqa: F401 (the model card: scripts/ship_model.py)
from invemb.util import cpu_name, describe_machine

MAX_BYTES = 25 * 2 ** 20
INIT_INFO = "init_info.json"  # in a run: the lineage of its init_from model when the run started


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run_checkpoint(run: Path, tag: str | None = None):
    """(InvertibleEmbedder with the checkpoint's weights, run config dict, loop state dict, tag)."""
    from safetensors.torch import load_file
    from invemb.config import TrainConfig
    from invemb.model import InvertibleEmbedder
    run = Path(run)
    if not (run / "config.json").is_file():
        raise InvembError(f"{run} is not a training run folder (no config.json)")
    latest = run / "checkpoints" / "latest"
    if tag is None and latest.is_file():
        tag = latest.read_text().strip()
    if not tag:
        raise InvembError(f"{run} has no checkpoint yet (checkpoints/latest missing)")
    ckpt = run / "checkpoints" / tag
    if not (ckpt / "model.safetensors").is_file():
        raise InvembError(f"{ckpt} holds no model.safetensors (a plain-PyTorch checkpoint is expected)")
    raw = json.loads((run / "config.json").read_text())
    cfg = TrainConfig.from_dict(raw)
    model = InvertibleEmbedder(cfg.model)
    state = {k[len("model."):]: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
             if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("decoder.head.weight", "decoder.tok.weight")]
    if missing or unexpected:
        raise InvembError(f"{ckpt} does not match {run / 'config.json'}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    if getattr(model.decoder, "has_surface", False):  # the written-form table the run made (invemb.surface)
        from invemb.surface import load_table
        model.surface_table = load_table(run) or {}
    loop_state = json.loads((ckpt / "invemb_state.json").read_text())
    return model.eval(), raw, loop_state, tag


def ship(run: Path, out: Path, tag: str | None = None, metrics: dict | None = None) -> Path:
    """Write the shipped model folder from a run's checkpoint; returns `out`."""
    from invemb.model import InvertibleEmbedder
    run, out = Path(run), Path(out)
    model, raw, state, tag = load_run_checkpoint(run, tag)
    vals = [r for r in _read_jsonl(run / "metrics.jsonl") if r["kind"] == "val" and r["step"] <= state["step"]]
    init_from = raw.get("init_from") or ""
    # continuing a shipped model: carry its history (cumulative CPU hours) as it was when the run started (the
    # folder may since hold another model: a later ship into it); runs from before the record: the folder as it is
    recorded = run / INIT_INFO
    prev_info = json.loads(recorded.read_text()) if recorded.is_file() else _init_info(init_from)
    history, prev_curve = list(prev_info.get("history", [])), list(prev_info.get("curve", []))
    if history and history[-1].get("run") == str(run) and history[-1].get("init_from") == (init_from or None):
        # (runs from before the record only: a record is taken before its run ships anything)
        # the model being replaced came from this same run (shipped again: a later checkpoint, or to add the
        # fidelity metrics): replace its entry and its part of the curve instead of counting the run twice
        shipped_before = history.pop()
        history_points = sum(1 for r in _read_jsonl(run / "metrics.jsonl")
                             if r["kind"] == "val" and r["step"] <= shipped_before["steps"])
        prev_curve = prev_curve[:len(prev_curve) - history_points]
    base_cpu = history[-1]["cpu_hours_cumulative"] if history else 0.0
    base_steps = history[-1]["steps_cumulative"] if history else 0
    gpu = state.get("accelerator")  # set by a checkpoint taken on a GPU
    cpu_h = float(state.get("cpu_total_s", 0.0)) / 3600
    wall_h = float(state.get("wall_total_s", 0.0)) / 3600
    n_train = state.get("train_headlines")
    epochs = round(state["step"] * raw["batch_size"] * raw.get("grad_accum", 1) / n_train, 2) if n_train else None
    entry = {"date": datetime.date.today().isoformat(), "run": str(run), "checkpoint": tag, "steps": state["step"],
             "steps_cumulative": base_steps + state["step"], "epochs_this_run": epochs,
             "wall_hours": round(wall_h, 3), "cpu_hours": round(cpu_h, 3),
             "cpu_hours_cumulative": round(base_cpu + cpu_h, 3), "init_from": init_from or None,
             # each run's own CPU: a lineage spans machines (CPU hours on an AMX Xeon and an EPYC differ in worth);
             # a GPU run names its GPU, and its wall hours are GPU hours (cpu_hours: its host process's CPU time)
             "machine": f"1 x {gpu} (GPU)" if gpu else f"{cpu_name()}, {os.cpu_count()} cores",
             "gpu_hours": round(wall_h, 3) if gpu else 0.0,
             "val_teacher_forced": {k: vals[-1][k] for k in ("val_top1", "val_top5", "val_loss")} if vals else None,
             # what the card states of the run: its recipe file, its data (invemb.training.resume.data_facts, the
             # path as results name it), whether bf16 autocast was on; absent in checkpoints from before them
             "recipe_file": display_path(state["recipe_file"]) if state.get("recipe_file") else None,
             "data": _data_facts(state.get("data")), "bf16": state.get("bf16")}
    if metrics:
        entry["metrics"] = card_metrics(metrics, entry["data"], raw)
    history.append(entry)
    info = {"recipe": raw, "history": history, "machine": describe_machine(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"), "curve": [
                {"step": base_steps + r["step"], "cpu_hours_cumulative": round(
                    base_cpu + r.get("cpu_total_s", 0.0) / 3600, 4), "val_top1": r["val_top1"],
                 "val_loss": r["val_loss"], **{k: r[k] for k in ("val_greedy_bleu", "val_greedy_exact") if k in r}}
                for r in vals]}
    if history[:-1]:
        info["curve"] = prev_curve + info["curve"]
    enc = model.config.encoder  # a frozen pretrained backbone is referenced (its pip package), any other stored
    model.save_pretrained(out, backbone=not (enc.freeze_backbone and not enc.random_init), dtype=torch.float16,
                          extra=info)
    size = (out / "model.safetensors").stat().st_size
    if size > MAX_BYTES:
        raise InvembError(f"{out / 'model.safetensors'} is {size / 2 ** 20:.1f} MB (> 25 MB)")
    InvertibleEmbedder.from_pretrained(out)  # it must load offline
    return out


def _data_facts(data: dict | None) -> dict | None:
    """A checkpoint's data state without its fingerprint, the data path as results name it (display_path)."""
    if not data:
        return None
    facts = {k: v for k, v in data.items() if k not in ("recipe", "sha256")}
    if facts.get("path"):
        facts["path"] = display_path(facts["path"])
    return facts


def newest_label(newest: dict, data: dict | None = None, recipe: dict | None = None) -> str:
    """The card's name of the "newest headlines" set of a fidelity JSON: its days (or first day) as the
    measurement names them, and "held out" only when the run's hold-out covers that set (its first day on or
    before the set's, else its days at least the set's)."""
    days, first = newest.get("days"), newest.get("from")
    label = f"newest {days} days" if days else f"newest headlines (from {first})" if first else "newest headlines"
    run_days, cut = int((recipe or {}).get("holdout_newest_days") or 0), (data or {}).get("newest_from")
    if cut and first:
        held = cut <= first  # ISO dates
    elif run_days and days:
        held = run_days >= days
    else:
        return label + (f" (the run held out its newest {run_days} days)" if run_days else " (not held out)")
    return label + (" (held out)" if held else " (not all held out of training)")


def card_metrics(metrics: dict, data: dict | None = None, recipe: dict | None = None) -> dict:
    """The model card's headline numbers: from a scripts/fidelity.py JSON (val / newest / int8 sections) one line
    per set and decode; any other dict is kept as it is. data / recipe: the run's data facts and recipe (whether
    the newest headlines were held out of its training)."""
    if not all(k in metrics for k in ("val", "newest")):
        return metrics
    out = {}
    for key, name in (("val", "validation"), ("newest", newest_label(metrics["newest"], data, recipe))):
        res = metrics[key]
        for mode in ("greedy", "beam4"):
            m = res.get(mode)
            if m:  # beam rows of a fidelity run that records it are decode's default: re-ranking "auto"
                label = f"{mode} + rerank auto" if mode != "greedy" and "rerank_margin" in metrics else mode
                out[f"{name} ({res['n']:,}), {label}"] = (
                    f"token acc {m['token_acc']:.3f}, exact {m['exact_match']:.3f}, BLEU {m['bleu']:.1f}, "
                    f"BERTScore {m['bertscore_f1']:.3f} (first {m['scored_n']})"
                    + (f"; as written: exact {m['raw_exact']:.3f}, cased BLEU {m['cased_bleu']:.1f}"
                       if "raw_exact" in m else "") + _facts(m))
    pert = metrics.get("perturbed") or {}
    if "perturbed" in pert and "originals" in pert:  # does the vector CARRY the facts, or does the prior guess them
        out[f"perturbed facts ({pert['n']:,} validation headlines, random numbers + swapped names), "
            f"beam {pert.get('beam', 4)}"] = (
            f"numbers {pert['perturbed']['number_recall']:.3f}, names {pert['perturbed']['name_recall']:.3f} "
            f"(the originals: {pert['originals']['number_recall']:.3f}, {pert['originals']['name_recall']:.3f})")
    rows = {r["kind"]: r for r in (metrics.get("distance") or {}).get("rows", [])}
    if rows:
        out["one-change distance, mean (relative to the vector's size)"] = ", ".join(
            f"{kind} {r['mean']:.3f}" for kind, r in rows.items()) + \
            f" (training noise sigma {metrics['distance'].get('noise_sigma', '?')})"
    tf = metrics["val"].get("teacher_forced", {})
    if tf:
        out["teacher-forced top-1 / top-5 / top-100 (validation)"] = \
            f"{tf['top1']:.3f} / {tf['top5']:.3f} / {tf['top100']:.3f}"
    int8 = metrics.get("int8") or {}
    if "fp32" in int8 and "int8" in int8:
        out[f"ORT int8 vs fp32 ({int8.get('n', '?')}, beam 4)"] = (
            f"same text {int8.get('same_text_rate', float('nan')):.3f}; BLEU {int8['int8']['bleu']:.1f} vs "
            f"{int8['fp32']['bleu']:.1f}")
    for row in metrics.get("rerank") or []:  # the n-best re-ranked by re-encoding (decode(..., rerank=True))
        if row["decode"].endswith(("rerank", "rerank all")):
            out[f"validation ({row['n']:,}), {row['decode']}"] = (
                f"token acc {row['token_acc']:.3f}, exact {row['exact_match']:.3f}, BLEU {row['bleu']:.1f}")
    return out


def _facts(m: dict) -> str:
    """A metrics row's facts (invemb.metrics.fact_metrics), when the fidelity run measured them."""
    if "number_recall" not in m:
        return ""
    return (f"; facts: numbers {m['number_recall']:.3f}, names {m['name_recall']:.3f}, "
            f"all facts right {m['facts_all_right']:.3f}")


def record_init_info(out: Path, init_from: str, main: bool = True) -> None:
    """At a run's start: the lineage ("info") of the model it starts from, kept in the run (INIT_INFO) for ship();
    a resumed run keeps the record its first start wrote."""
    path = Path(out) / INIT_INFO
    if main and not path.exists():
        path.write_text(json.dumps(_init_info(init_from)))


def _init_info(init_from: str) -> dict:
    """The "info" (history, curve) of the model a run started from; {} for a run from scratch or an unreadable one."""
    from invemb.model import read_checkpoint_config
    if not init_from:
        return {}
    try:  # resolved as the trainer resolves init_from to load it
        return dict(read_checkpoint_config(resolve_path(init_from)).get("info", {}))
    except InvembError:
        return {}
