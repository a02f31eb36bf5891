"""What a checkpoint remembers of its training data, and the --resume check against it.

A resumed run skips the batches its checkpoint consumed, so it continues the same run only on the same training
texts in the same order. Every checkpoint's loop state holds "data" (`data_state`):
    texts, sha256   the number and a hash of the ordered training texts (headlines + augmentations), which any
                    change of the data set, the split, the hold-out or an augmentation changes;
    recipe          the recipe's data keys (`data_keys`: what decides the texts or their order), to name what changed;
    path, headlines, train_headlines, val_headlines, held_out_newest, newest_from
                    facts of the data the run read (the model card states them: invemb.training.ship).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from invemb.config import TrainConfig

# TrainConfig fields that change neither which texts are trained on nor their order (optimisation, schedule,
# losses, logging, evaluation, engine, where the cache lives). Every other field is a data key, so a recipe key
# added later counts as data until it is listed here: a resume is refused rather than continued on another order.
NOT_DATA_KEYS = frozenset({
    "preset", "epochs", "max_steps", "max_minutes", "fit_to_time", "lr", "weight_decay", "grad_clip",
    "plateau_patience", "plateau_factor", "min_lr", "val_limit", "eval_every", "save_every", "log_every",
    "noise_sigma", "sim_loss_weight", "gumbel_tau", "sim_model", "bertscore_subset", "decode_subset",
    "bertscore_model", "deepspeed_config", "feature_cache", "sampled_softmax", "train_acc_rows", "compact_vocab",
    "lr_schedule", "warmup_steps", "init_from", "word_dropout", "cpu_bf16", "gpu_bf16", "surface_weight", "train_only",
    "separation_weight", "separation_margin", "fact_weight",
    "model"})


def data_keys() -> list[str]:
    """The recipe keys that decide the training texts or their order: TrainConfig's fields but NOT_DATA_KEYS."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_DATA_KEYS]


def texts_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")  # a separator no headline holds: ["ab", "c"] and ["a", "bc"] differ
    return h.hexdigest()


def data_facts(cfg: TrainConfig, path: Path, split, train_headlines: int) -> dict:
    """Facts of the data a run read: `split` (invemb.data.Split) of the data set at `path`, and the training
    headlines left after the hold-out and train_limit (before augmentation)."""
    from invemb.data import newest_cutoff
    records = split.train + split.val
    cutoff = newest_cutoff(records, cfg.holdout_newest_days) if cfg.holdout_newest_days else None
    held = sum(1 for r in split.train if cutoff is not None and r.date is not None and r.date >= cutoff)
    return {"path": str(path), "headlines": len(records), "train_headlines": train_headlines,
            "val_headlines": len(split.val), "held_out_newest": held,
            "newest_from": cutoff.isoformat() if cutoff else None}


def data_state(cfg: TrainConfig, train: list[str], facts: dict | None = None) -> dict:
    """The checkpoint's "data": `facts` + the training texts' count and hash + the recipe's data keys."""
    return {**(facts or {}), "texts": len(train), "sha256": texts_hash(train),
            "recipe": {k: getattr(cfg, k) for k in data_keys()}}


def data_difference(saved: dict, now: dict) -> str:
    """What differs between a checkpoint's data state and this run's, as one line ("" when nothing does).

    A checkpoint from before data states: `saved` may hold only "recipe" (its run's config.json) and "texts"."""
    defaults = dataclasses.asdict(TrainConfig())
    old, diffs = saved.get("recipe", {}), []
    for key, value in now["recipe"].items():
        before = old.get(key, defaults.get(key))  # a key the checkpoint predates: it ran with the default
        if before != value:
            diffs.append(f"{key}: {before!r} -> {value!r}")
    if saved.get("texts") is not None and saved["texts"] != now["texts"]:
        diffs.append(f"{saved['texts']:,} -> {now['texts']:,} training texts")
    elif saved.get("sha256") and saved["sha256"] != now["sha256"]:
        diffs.append(f"the {now['texts']:,} training texts differ (other texts or another order)")
    return "; ".join(diffs)
