"""Grow a shipped model's sentence vector S -> factor x S without changing what it decodes (function-preserving, the
Net2Net "wider" move), so a larger vector can be trained from the shipped weights instead of from zero.

    python scripts/grow_model.py --model models/invemb-minilm-s768-facts --factor 3 --out runs/grow/s2304

Multi-query pooling makes the vector Q chunks of c dims, chunk q = LayerNorm(GELU(pooled_q @ W_q + b_q)) [c], and
with `memory_mode: chunks` decoder memory slot q = LayerNorm(chunk_q @ M_q + m_q + slot_q) [d]. Growing:
- the pooler's W_q [H,c], b_q [c] and the chunk LayerNorm's gain/bias [c] are tiled factor times -> [H,c*f], [c*f]:
  the new chunk is [y, y, ..., y] (f copies of the old y), and LayerNorm over f equal copies has the old mean and
  variance, so each copy is exactly the old normalised chunk;
- the memory's M_q [c,d] becomes f stacked blocks a_1*M_q, ..., a_f*M_q with random elementwise shares a_i that sum
  to 1: [y,...,y] @ [a_1 M; ...; a_f M] = y @ M, so the memory slots, hence every logit, are unchanged.
The shares are random (not 1/f each) so the copies get different gradients and grow apart in training (with equal
shares and no vector noise they would stay copies forever). Only the vector's width changes; the decoder, the
surface heads and the tokenizer are the old ones. The lineage is kept, plus one row "grown" (0 steps, 0 CPU h).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from invemb.errors import InvembError
from invemb.paths import display_path

POOLER_TILED = ("encoder.pooler.weight", "encoder.pooler.bias", "encoder.pooler.norm.weight",
                "encoder.pooler.norm.bias")  # their last dim is the chunk c
MEMORY = "decoder.memory.chunk_weight"  # [Q,c,d]


def grow_state(state: dict[str, torch.Tensor], factor: int, spread: float = 0.5,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """The grown tensors (others kept). spread: the shares a_i = (1 + spread * z_i) / f with z_i standard normal,
    centred over i so that they sum to 1 exactly (up to float rounding)."""
    missing = [k for k in (*POOLER_TILED, MEMORY) if k not in state]
    if missing:
        raise InvembError(f"cannot grow this model: it lacks {missing} (growing needs multiquery pooling and "
                          "memory_mode chunks, the shipped architecture)")
    out = dict(state)
    for k in POOLER_TILED:
        t = state[k]
        out[k] = t.repeat(*([1] * (t.dim() - 1)), factor)  # [...,c] -> [...,c*f], copy i at [i*c:(i+1)*c]
    mem = state[MEMORY]  # [Q,c,d]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((factor, *mem.shape), generator=gen)  # [f,Q,c,d]
    shares = (1.0 + spread * (z - z.mean(0, keepdim=True))) / factor  # [f,Q,c,d], sum over f = 1
    blocks = shares * mem.float().unsqueeze(0)  # [f,Q,c,d]
    out[MEMORY] = blocks.permute(1, 0, 2, 3).reshape(mem.shape[0], factor * mem.shape[1], -1).to(mem.dtype)
    return out


def grow_model(src: Path, factor: int, out: Path, seed: int = 0) -> Path:
    """Write `src` with its vector grown factor-fold to `out` (a shipped model folder; float16 as shipped)."""
    src, out = Path(src), Path(out)
    if not isinstance(factor, int) or factor < 2:
        raise InvembError(f"--factor {factor!r}: must be an integer >= 2")
    meta, cfg = _source(src, out)
    if cfg.encoder.number_slots:
        raise InvembError(f"{display_path(src)} has number_slots; grow a model without them (then add them)")
    # the fp16 weights are grown in float32: the shares are then rounded once, when written
    grown = grow_state(_float_state(src), factor, seed=seed)
    old_s = cfg.encoder.sentence_dim
    meta["invemb_model"]["encoder"]["sentence_dim"] = old_s * factor
    return _write(src, out, meta, grown, f"grown: the vector of {display_path(src)} S={old_s} -> {old_s * factor} "
                  "(invemb.training.grow)", {"from": display_path(src), "factor": factor, "seed": seed})


def add_fact_slots(src: Path, number_slots: int, token_identity: bool, out: Path, seed: int = 0) -> Path:
    """Write `src` with K = number_slots number slots (and, with token_identity, queries that also read the pieces'
    input embeddings; invemb.encoder.MultiQueryPooling) to `out`. The old weights are kept; the new ones are drawn
    as a fresh model draws them (the identity weights are zero, so those alone change nothing); the decoder's
    memory gets K slots more (S = (Q+K) x c). The K new memory slots are new keys for the cross-attention, so the
    model's decoding moves a little until trained (measured on the shipped model: results/facts_campaign.md)."""
    from invemb.config import ModelConfig
    from invemb.encoder import load_tokenizer
    from invemb.model import InvertibleEmbedder
    src, out = Path(src), Path(out)
    if not isinstance(number_slots, int) or number_slots < 0 or (number_slots == 0 and not token_identity):
        raise InvembError(f"--number-slots {number_slots!r}: give an integer >= 1 (or 0 with --token-identity)")
    meta, cfg = _source(src, out)
    if cfg.encoder.number_slots or cfg.encoder.token_identity:
        raise InvembError(f"{display_path(src)} already has number_slots / token_identity")
    q, c = cfg.encoder.pool_queries, cfg.encoder.sentence_dim // cfg.decoder.memory_slots
    enc, dec = meta["invemb_model"]["encoder"], meta["invemb_model"]["decoder"]
    enc.update(number_slots=number_slots, token_identity=bool(token_identity), sentence_dim=(q + number_slots) * c)
    dec["memory_slots"] = q + number_slots
    new_cfg = ModelConfig.from_dict(meta["invemb_model"])  # the new config must be valid (limits, multiples)
    torch.manual_seed(seed)  # a fresh model of the new config: its new weights are the draw
    fresh = InvertibleEmbedder(new_cfg, load_tokenizer(str(src))).state_dict()
    state = _float_state(src)
    # the pooler's new tensors only (a tied head the file leaves out is not new)
    added = {k: v for k, v in fresh.items() if k not in state and k.startswith("encoder.pooler.")}
    state.update(added)
    for k in ("decoder.memory.chunk_weight", "decoder.memory.chunk_bias", "decoder.memory.slot_emb"):
        state[k] = torch.cat([state[k], fresh[k][q:].to(state[k].dtype)], 0)  # [Q,...] -> [Q+K,...]
    return _write(src, out, meta, state, f"fact slots: {display_path(src)} + {number_slots} number slots"
                  f"{' + token identity' if token_identity else ''} (invemb.training.grow)",
                  {"from": display_path(src), "number_slots": number_slots, "token_identity": bool(token_identity),
                   "new_tensors": sorted(added), "seed": seed})


def _source(src: Path, out: Path):
    from invemb.config import ModelConfig
    from invemb.model import read_checkpoint_config
    if not (src / "model.safetensors").is_file():
        raise InvembError(f"{display_path(src)} is not a shipped model folder (no model.safetensors)")
    if out.resolve() == src.resolve():
        raise InvembError(f"--out {display_path(out)} is the model grown; write the grown model to a new folder")
    meta = read_checkpoint_config(src)
    cfg = ModelConfig.from_dict(meta["invemb_model"])
    if cfg.encoder.pooling != "multiquery" or cfg.decoder.memory_mode != "chunks":
        raise InvembError(f"{display_path(src)}: growing needs multiquery pooling and memory_mode chunks (it has "
                          f"{cfg.encoder.pooling} pooling, memory_mode {cfg.decoder.memory_mode})")
    return meta, cfg


def _float_state(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(src / "model.safetensors")).items()}


def _write(src: Path, out: Path, meta: dict, state: dict, what: str, how: dict) -> Path:
    """The new model folder: config (validated), lineage + one untrained row, float16 weights, side files, card."""
    from safetensors.torch import save_file
    from invemb.config import ModelConfig
    from invemb.model import InvertibleEmbedder
    from invemb.training.ship import write_card
    from invemb.training.soup import copy_side_files, untrained_row
    ModelConfig.from_dict(meta["invemb_model"])
    info = meta.setdefault("info", {})
    hist = list(info.get("history", []))
    hist.append(untrained_row(hist[-1] if hist else {}, what, "weights grown", grown=how))
    info["history"] = hist
    copy_side_files(src, out)  # tokenizer, surface table (config and card are written below)
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in out.iterdir():
        os.chmod(f, 0o644)  # a model folder is meant to be shared (save_file writes 0600)
    write_card(out)
    InvertibleEmbedder.from_pretrained(out)  # it must load offline
    return out
