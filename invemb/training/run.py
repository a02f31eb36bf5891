"""Train an InvertibleEmbedder from a YAML recipe: plain PyTorch (one process) or DeepSpeed ZeRO 0-3.

    # one process, plain PyTorch (configs without deepspeed_config), seconds on CPU:
    python train/run.py --config train/configs/toy.yaml --data ../shared/data/financial-news-headlines
    # the CPU pipeline recipe (MiniLM frozen, ~10 min on 2 cores):
    python train/run.py --config train/configs/small.yaml --out runs/small
    # DeepSpeed, 2 ranks (GPUs, or gloo CPU ranks on a machine without one), ZeRO-2 (bf16 where supported):
    deepspeed --num_gpus 2 train/run.py --config train/configs/toy.yaml deepspeed_config=train/ds_config/zero2.json
    deepspeed --num_gpus 8 train/run.py --config train/configs/report-768-attention.yaml --out runs/r768
    # (port 29500 taken by another job? add --master_port 29511 after --num_gpus)
    # continue a killed run from its latest checkpoint (same data order, same world size; changed training texts
    # or data keys of the recipe are refused, --allow-data-change goes on; max_minutes counts the time before):
    deepspeed --num_gpus 2 train/run.py --config train/configs/report-768-attention.yaml --out runs/r768 --resume
    # overrides: key=value (YAML values), model.<encoder|decoder>.<key>=value for the model
    python train/run.py --config train/configs/toy.yaml max_steps=20 model.decoder.n_layers=1

The data path: --data, else $INVEMB_DATA. A run folder (--out, default runs/<config name>) receives config.yaml /
config.json (resolved recipe), git.txt, metrics.jsonl, tensorboard/, checkpoints/, final/ (save_pretrained format),
plots/*.png, examples.md and summary.json. Bad input fails with one line (exit 2) before any training.

Trust: --resume of a DeepSpeed run folder unpickles its checkpoint files (DeepSpeed's own torch.load with
weights_only=False); resume only run folders you made or trust. Plain-PyTorch checkpoints are safetensors + an
optimizer state read with weights_only=True.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

# Nothing here imports torch at module load: main() sets OMP_NUM_THREADS for DeepSpeed ranks first.
from invemb.config import TrainConfig
from invemb.errors import InvembError


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="recipe YAML (train/configs/*.yaml)")
    ap.add_argument("--data", default=None, help="headlines folder/CSV/TXT (default: $INVEMB_DATA)")
    ap.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("--allow-data-change", action="store_true",
                    help="--resume even though the training texts or the recipe's data keys changed (a new order)")
    ap.add_argument("--stop-after-steps", type=int, default=0,
                    help="debug: checkpoint and exit after this many optimizer steps (simulates a kill)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    ap.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    return ap.parse_intermixed_args(argv)


def load_config(path: str, overrides: list[str]) -> TrainConfig:
    """The recipe file + key=value overrides (YAML values; every float literal a user writes, `2e-4` included,
    is a float: invemb.training.recipe)."""
    import yaml

    from invemb.training.recipe import load_yaml
    p = Path(path)
    if not p.is_file():
        raise InvembError(f"config {path!r} does not exist (see train/configs/)")
    try:
        raw = load_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise InvembError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InvembError(f"config {p} must be a mapping of recipe keys")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvembError(f"override {item!r} must look like key=value")
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvembError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = load_yaml(value) if value else ""
        except yaml.YAMLError as e:
            raise InvembError(f"override {item!r}: the value is not valid YAML: {str(e).splitlines()[0]}") from None
    return TrainConfig.from_dict(raw)


def check_resume(out: Path, resume: bool, cfg: TrainConfig, world: int, stage: int, data: dict | None = None,
                 allow_data_change: bool = False):
    """Validate the run folder against the request; returns (tag, state) to resume from, or None. data: this
    run's data state (invemb.training.resume.data_state), refused when it differs from the checkpoint's unless
    allow_data_change (then a warning)."""
    from invemb.training.engine import read_state
    found = read_state(out / "checkpoints")
    if not resume:
        if found:
            raise InvembError(f"{out} already holds checkpoints: pass --resume to continue it, or another --out")
        return None
    if not found:
        raise InvembError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    old = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    diffs = [f"{part}.{k}: {v!r} -> {cfg.model.to_dict()[part].get(k)!r}"
             for part in ("encoder", "decoder") for k, v in old.get("model", {}).get(part, {}).items()
             if cfg.model.to_dict()[part].get(k) != v]
    if diffs or not old:
        detail = "; ".join(diffs) or f"no config.json in {out}"
        raise InvembError(f"cannot resume {out}: its checkpoint has a different model config ({detail})")
    state = found[1]
    for key, now in (("world_size", world), ("batch_size", cfg.batch_size), ("grad_accum", cfg.grad_accum),
                     ("seed", cfg.seed), ("engine", "deepspeed" if cfg.deepspeed_config else "plain"),
                     ("zero_stage", stage)):
        if state.get(key) != now:
            raise InvembError(f"cannot resume {out}: {key} was {state.get(key)!r}, now {now!r} (the data order and "
                              "ZeRO shards depend on it; start a new --out or consolidate the weights first)")
    if data is not None:
        from invemb.training.resume import data_difference
        # a checkpoint from before data states: its run's config.json and training-text count
        saved = state.get("data") or {"recipe": old, "texts": state.get("train_headlines")}
        change = data_difference(saved, data)
        if change and not allow_data_change:
            raise InvembError(f"cannot resume {out}: the training data differs from its checkpoint's ({change}); "
                              "the resumed order would not be the run's: start a new --out, or pass "
                              "--allow-data-change to go on anyway")
        if change:
            print(f"warning: resuming {out} on changed training data ({change}; --allow-data-change)", flush=True)
    return found


def prepare_model_config(cfg: TrainConfig, train: list[str]):
    """Settle what the recipe leaves to the data: the compact vocabulary's size (returns its ids, or None), and the
    model config of `init_from` (which must agree with the recipe's)."""
    from invemb.config import ModelConfig
    if cfg.init_from:
        from invemb.model import read_checkpoint_config
        from invemb.paths import resolve_path
        init = ModelConfig.from_dict(read_checkpoint_config(resolve_path(cfg.init_from))["invemb_model"])
        cfg.model.decoder.output_vocab = init.decoder.output_vocab if cfg.compact_vocab else 0
        a, b = cfg.model.to_dict(), init.to_dict()
        # the recipe may add what the start weights lack: surface heads (new, trained from zero) and spelled numbers
        grow = {("decoder", "surface_heads"), ("decoder", "spell_numbers"), ("decoder", "surface_hidden"),
                ("decoder", "surface_pieces"), ("decoder", "surface_next")}
        diffs = [f"{part}.{k}: {b[part].get(k)!r} (init_from) vs {a[part][k]!r} (recipe)"
                 for part in ("encoder", "decoder") for k in a[part] if a[part][k] != b[part].get(k)
                 and not ((part, k) in grow and a[part][k] and not b[part].get(k))]
        if diffs:
            raise InvembError(f"init_from {cfg.init_from}: model config differs from the recipe: {'; '.join(diffs)}")
        return None  # the compact vocabulary comes with the weights
    if not cfg.compact_vocab:
        return None
    from invemb.encoder import load_tokenizer
    from invemb.vocab import compact_vocab_ids
    tok = load_tokenizer(cfg.model.encoder.model_name)
    ids = compact_vocab_ids(tok, tok(train, truncation=True, max_length=cfg.model.encoder.max_length)["input_ids"])
    cfg.model.decoder.output_vocab = len(ids)
    return ids


def augment(cfg: TrainConfig, train: list[str], data: list[str], log: bool) -> tuple[list[str], list[list[str]]]:
    """The training texts with the recipe's augmentations (word-span crops, splices of two headlines; made from
    training headlines only, never equal to a validation/held-out text), and the feature cache's groups: the
    whole data set, then each augmentation's texts (cached apart, so adding one never rebuilds the others)."""
    from invemb.data import word_crops, word_splices
    groups = [data]
    if cfg.augment_crops:
        groups.append(word_crops(train, cfg.augment_crops, cfg.seed, cfg.crop_min_words, exclude=data))
    # Each splice round is a fresh draw (seed + r) excluding everything before it, so round 0 is the same texts
    # (and the same cache) whatever the number of rounds: adding a round only builds that round's cache.
    for r in range(cfg.splice_rounds if cfg.augment_splices else 0):
        groups.append(word_splices(train, cfg.augment_splices, cfg.seed + r, exclude=[t for g in groups for t in g]))
    # number / name swaps (invemb.facts): copies whose facts differ from every real headline, so the decoder must
    # read digits and names from the vector instead of guessing the frequent ones; fresh draws each round
    if cfg.augment_numbers or cfg.augment_names:
        from invemb.facts import fact_variants, name_pool
        pool = name_pool(train)
        for r in range(cfg.fact_rounds):
            for kind, per in (("numbers", cfg.augment_numbers), ("names", cfg.augment_names)):
                if per:
                    groups.append(fact_variants(train, per, cfg.seed + 1000 + 2 * r + (kind == "names"), kind, pool,
                                                exclude=[t for g in groups for t in g]))
    extra = [t for g in groups[1:] for t in g]
    if log and extra:
        rounds = f" x {cfg.splice_rounds} rounds" if cfg.augment_splices and cfg.splice_rounds > 1 else ""
        print(f"augmentation: {' + '.join(str(len(g)) for g in groups[1:])} texts from {len(train)} training "
              f"headlines (crops {cfg.augment_crops}, splices {cfg.augment_splices} per headline{rounds}; number "
              f"swaps {cfg.augment_numbers}, name swaps {cfg.augment_names} x {cfg.fact_rounds} rounds)", flush=True)
    return train + extra, groups


def main(argv=None) -> int:
    args = parse_args(argv)
    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
    if world > 1 and "OMP_NUM_THREADS" not in env:  # ranks sharing the cores: no thread oversubscription
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local_world))
    from invemb.training.engine import load_ds_config  # imports torch (after OMP_NUM_THREADS is set)
    try:
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out or f"runs/{Path(args.config).stem}")
        ds_config = load_ds_config(cfg, world) if cfg.deepspeed_config else None
        if ds_config is not None and importlib.util.find_spec("deepspeed") is None:
            raise InvembError("deepspeed_config is set but deepspeed is not installed (pip install 'invemb[train]'); "
                              "or run plain PyTorch with deepspeed_config=")
        if world > 1 and ds_config is None:
            raise InvembError(f"{world} processes need a deepspeed_config (plain PyTorch mode is one process)")
        if cfg.batch_size % world:
            raise InvembError(f"batch_size {cfg.batch_size} is not divisible by the world size {world}")
        if cfg.max_steps < 0 or cfg.epochs < 1:
            raise InvembError("epochs must be >= 1 and max_steps >= 0")
        from invemb.data import load_split, newest_records
        split = load_split(args.data, cfg.val_fraction, cfg.split_seed)
        held = {r.text for r in newest_records(split.train + split.val, cfg.holdout_newest_days)} \
            if cfg.holdout_newest_days else set()
        train = [r.text for r in split.train if r.text not in held][:cfg.train_limit or None]
        val = [r.text for r in split.val][:cfg.val_limit or None]
        if len(train) < cfg.batch_size * cfg.grad_accum:
            raise InvembError(f"{len(train)} training headline(s): fewer than one optimizer step "
                              f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum})")
        paraphrases = None
        if cfg.paraphrase_file:
            from invemb.losses import load_paraphrases
            from invemb.paths import resolve_path
            paraphrases = load_paraphrases(resolve_path(cfg.paraphrase_file))
            if not any(t in paraphrases for t in train):
                raise InvembError(f"paraphrase_file {cfg.paraphrase_file}: no training headline has paraphrases")
        from invemb.data import resolve_data_path
        from invemb.training.resume import data_facts, data_state
        facts = data_facts(cfg, resolve_data_path(args.data), split, len(train))  # before augmentation
        vocab_ids = prepare_model_config(cfg, train)
        from invemb.training.targets import own_targets
        if cfg.fact_weight != 1 and not own_targets(cfg):  # the fact tags come with the decoder's own targets
            raise InvembError("fact_weight needs the decoder's own targets (their fact tags): model.decoder."
                              "surface_heads, spell_numbers or a compact output vocabulary")
        train, cache_groups = augment(cfg, train, [r.text for r in split.train + split.val], rank == 0)
        stage = int(ds_config["zero_optimization"].get("stage", 0)) if ds_config else 0
        data = data_state(cfg, train, facts)  # the training texts' fingerprint: the checkpoints hold it
        resume = check_resume(out, args.resume, cfg, world, stage, data, args.allow_data_change)
    except InvembError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from invemb.training.loop import Trainer
    Trainer(cfg, args, out, ds_config, train, val, paraphrases, resume, vocab_ids, cache_groups, data).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
