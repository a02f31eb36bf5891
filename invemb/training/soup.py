"""Weight averaging ("model soup") of two shipped models of one lineage: out = (1 - w) * a + w * b, parameter by
parameter, written as a shipped model folder (float16 safetensors + config + tokenizer + card).

    python scripts/average_models.py --a models/invemb-minilm-s768 --b runs/facts6/sep/model --weight 0.5 \
        --out runs/facts6/soup50

Why it works here: b is a continuation of a (b's lineage has a's as its start), so both sit in one basin of the
loss and their average is a model too, between them in what it learned (Wortsman et al. 2022, "Model soups").
The facts campaign uses it to keep most of what a fact-weighted continuation put into the vector while taking
back the ordinary words it cost. The lineage rule keeps the card honest: the average's CPU hours are b's (a's
are part of them); two models of unrelated lineages are refused.
"""
from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import torch

from invemb.errors import InvembError
from invemb.paths import display_path

SAME_FILES = ("tokenizer.json", "tokenizer_config.json", "surface.json")  # must be equal in a and b (if present)


def _history(meta: dict) -> list[dict]:
    return list(meta.get("info", {}).get("history", []))


def _check_same(a: Path, b: Path, meta_a: dict, meta_b: dict) -> None:
    """The two models must be one architecture with one tokenizer and surface table: only weights may differ."""
    ma, mb = meta_a["invemb_model"], meta_b["invemb_model"]
    if ma != mb:
        keys = sorted({k for part in ("encoder", "decoder") for k in set(ma.get(part, {})) | set(mb.get(part, {}))
                       if ma.get(part, {}).get(k) != mb.get(part, {}).get(k)})
        raise InvembError(f"{display_path(a)} and {display_path(b)} are different models (config differs in: "
                          f"{', '.join(keys) or 'its layout'}); only models of one architecture can be averaged")
    for name in SAME_FILES:
        fa, fb = a / name, b / name
        if fa.is_file() != fb.is_file() or (fa.is_file() and fa.read_bytes() != fb.read_bytes()):
            raise InvembError(f"{name} differs between {display_path(a)} and {display_path(b)}: the average would "
                              "decode with only one of them")


def untrained_row(last: dict, run: str, checkpoint: str, **extra) -> dict:
    """A lineage row for weights made without training (averaged, grown) after the row `last`: 0 steps and 0 CPU h,
    its cumulative figures and recipe/data kept; `extra` names how the weights were made."""
    return {**{k: last.get(k) for k in ("recipe_file", "data", "init_from")}, "machine": "none (no training)",
            "date": datetime.date.today().isoformat(), "run": run, "checkpoint": checkpoint, "steps": 0,
            "steps_cumulative": last.get("steps_cumulative", 0), "epochs_this_run": 0, "wall_hours": 0.0,
            "cpu_hours": 0.0, "cpu_hours_cumulative": last.get("cpu_hours_cumulative", 0.0), "gpu_hours": 0.0,
            "val_teacher_forced": None, **extra}


def copy_side_files(src: Path, out: Path) -> None:
    """The files of model folder `src` other than its weights, config and card (tokenizer, surface table) -> `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "README.md", "config.json"):
            shutil.copy2(f, out / f.name)


def average_state(sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """(1 - weight) * sa + weight * sb for every floating tensor, in float32, cast back to sa's dtype; other tensors
    (integer buffers) must be equal and are kept."""
    if sa.keys() != sb.keys():
        raise InvembError(f"the weights differ in their tensors: {sorted(set(sa) ^ set(sb))[:5]}")
    out = {}
    for k, ta in sa.items():
        tb = sb[k]
        if ta.shape != tb.shape:
            raise InvembError(f"tensor {k}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
        if ta.is_floating_point():
            out[k] = ((1.0 - weight) * ta.float() + weight * tb.float()).to(ta.dtype)
        elif torch.equal(ta, tb):
            out[k] = ta
        else:
            raise InvembError(f"tensor {k} (not floating point) differs between the two models")
    return out


def average_models(a: Path, b: Path, weight: float, out: Path, metrics: dict | None = None) -> Path:
    """Write (1 - weight) * a + weight * b to `out` (a shipped model folder; b's files and lineage + one entry for
    the average). a's lineage must be the start of b's. metrics: a fidelity JSON for the card."""
    from safetensors.torch import load_file, save_file
    from invemb.model import InvertibleEmbedder, read_checkpoint_config
    from invemb.training.ship import card_metrics, write_card
    a, b, out = Path(a), Path(b), Path(out)
    if not 0.0 <= weight <= 1.0:
        raise InvembError(f"--weight {weight}: must be within [0, 1] (the share of b)")
    for p in (a, b):
        if not (p / "model.safetensors").is_file():
            raise InvembError(f"{display_path(p)} is not a shipped model folder (no model.safetensors)")
    meta_a, meta_b = read_checkpoint_config(a), read_checkpoint_config(b)  # b's is written out, with one row more
    _check_same(a, b, meta_a, meta_b)
    ha, hb = _history(meta_a), _history(meta_b)
    key = [(h.get("run"), h.get("steps_cumulative")) for h in ha]
    if not hb or [(h.get("run"), h.get("steps_cumulative")) for h in hb[:len(ha)]] != key:
        raise InvembError(f"{display_path(b)} does not continue {display_path(a)} (its lineage does not start with "
                          f"a's {len(ha)} runs): the average's training time would be unknown")
    state = average_state(load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors")), weight)
    if out.resolve() != b.resolve():
        copy_side_files(b, out)
    label = lambda p, h: f"{display_path(p)} ({h[-1]['steps_cumulative']:,} steps)" if h else display_path(p)
    entry = untrained_row(hb[-1], f"average {1 - weight:g} x {label(a, ha)} + {weight:g} x {label(b, hb)}",
                          "weights averaged",
                          averaged={"a": display_path(a), "b": display_path(b), "weight_b": weight,
                                    "a_steps_cumulative": ha[-1]["steps_cumulative"] if ha else 0})
    info = meta_b.setdefault("info", {})
    if metrics:
        entry["metrics"] = card_metrics(metrics, entry["data"], info.get("recipe"))
    info["history"] = hb + [entry]
    (out / "config.json").write_text(json.dumps(meta_b, indent=2))
    save_file(state, str(out / "model.safetensors"), metadata=_metadata(b))
    write_card(out)
    InvertibleEmbedder.from_pretrained(out)  # it must load offline
    return out


def _metadata(folder: Path) -> dict | None:
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.metadata()
