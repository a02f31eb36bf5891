"""What the decoder trains to write (invemb.training.loop.Trainer.setup): the surface heads and written-form table a
recipe asks for, the decoder's own targets (invemb.surface) for the training and validation texts, and the
paraphrases of the min-over-paraphrases loss as token tensors."""
from __future__ import annotations

from pathlib import Path

import torch

from invemb.config import TrainConfig

SURFACE_TABLE_TEXTS = 200_000  # training texts read for the written-form table (headlines first)
MAX_PARAPHRASES = 5


def add_surface(model, cfg: TrainConfig, train_texts: list[str], out: Path, main: bool) -> None:
    """Surface heads the recipe asks for and the start weights lack (new heads), and the written-form table of
    the training headlines (they come first in train_texts), saved into `out` by the main rank."""
    d, dec = cfg.model.decoder, model.decoder
    want = (d.surface_hidden, d.surface_pieces, d.surface_next)
    has = getattr(dec, "has_surface", False)
    if d.surface_heads and (not has or (dec.cfg.surface_hidden, dec.cfg.surface_pieces, dec.cfg.surface_next) != want):
        # the recipe asks for heads the start weights lack, or for heads that read more than theirs (run.py lets a
        # recipe only add to them): new heads from zero, or the run would train the old ones under the new config
        if has and main:
            print(f"the recipe's surface heads (hidden {want[0]}, pieces {want[1]}, next {want[2]}) differ from the "
                  "start weights': new heads, trained from zero", flush=True)
        dec.add_surface_heads(*want)
    if getattr(model.decoder, "has_surface", False):
        from invemb.surface import build_table, save_table
        model.surface_table = build_table(model.tokenizer, train_texts[:SURFACE_TABLE_TEXTS], model.max_length)
        if main:  # beside the checkpoints: the final model and scripts/ship_model.py read it from here
            save_table(out, model.surface_table)


def freeze_for(model, cfg: TrainConfig) -> None:
    """train_only: "surface" -> only the surface heads keep requires_grad: the pieces the model decodes stay exactly
    the start model's. The recipe's dropout, word dropout and vector noise still apply to the frozen decoder's states
    in training: without them the heads learned the training headlines' states by heart (runs/surface1: train tag
    loss 0.061 and falling, validation flat at 0.125; results/surface_heads.md)."""
    if cfg.train_only != "surface":
        return
    heads = {id(p) for h in (model.decoder.case_head, model.decoder.space_head) for p in h.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in heads)


def own_targets(cfg: TrainConfig) -> bool:
    """Whether the decoder trains on its own sequences (decoder_targets) instead of the encoder's ids: surface
    tags, spelled numbers, or a compact vocabulary (pieces outside it are spelled, not trained as [UNK])."""
    d = cfg.model.decoder
    return d.kind == "transformer" and (d.surface_heads or d.spell_numbers or bool(d.output_vocab))


def training_targets(model, cfg: TrainConfig, train_texts: list[str], val_texts: list[str]):
    """(train, val) decoder targets (invemb.surface.decoder_targets), or (None, None) when the decoder trains on
    the encoder's ids. Spelling practice (cfg.spell_practice) on the training texts only, seeded apart."""
    if not own_targets(cfg):
        return None, None
    return (model.decoder_targets(train_texts, cfg.spell_practice, cfg.seed + 2000),
            model.decoder_targets(val_texts))


def paraphrase_tensors(model, train_texts: list[str], paraphrases: dict[str, list[str]]):
    """(ids [R,L'], mask [R,L'] of every paraphrase, each training row's paraphrase rows [N,P] with -1: none)."""
    texts, index = [], []
    for t in train_texts:
        paras = paraphrases.get(t, [])[:MAX_PARAPHRASES]
        index.append(list(range(len(texts), len(texts) + len(paras))))
        texts.extend(paras)
    enc = model.tokenize(texts)
    p = max(len(i) for i in index)
    rows = torch.tensor([i + [-1] * (p - len(i)) for i in index], dtype=torch.long)
    return enc["input_ids"], enc["attention_mask"], rows
