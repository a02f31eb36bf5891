"""Decoders conditioned only on the sentence vector.

All share one interface:
    forward(sentence_embedding [B,S], input_ids [B,T]) -> logits [B,T,V]   (teacher forcing; one-pass uses T only)
Step decoders (transformer, gru) also have an explicit cache, a flat dict of tensors, batch on axis 0:
    init_cache(sentence_embedding [N,S]) -> cache
    step(input_ids [N,t], cache) -> (logits [N,t,V], cache)
Cache names match the ONNX graphs: cross_key_<i>/cross_value_<i> [N,h,k,dh] (computed once),
past_key_<i>/past_value_<i> [N,h,P,dh] (self-attention, grows by t each step); GRU: hidden [N,L,H].
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from invemb.config import DecoderConfig

Cache = dict[str, torch.Tensor]


class Memory(nn.Module):
    """Sentence vector [N,S] -> k memory slots [N,k,d], + slot embeddings, LayerNorm.

    mode "linear": one Linear(S, k*d) over the whole vector. mode "chunks": the vector is k chunks of S/k dims (what
    multi-query pooling makes, one chunk per query) and slot i is its own Linear(S/k, d) of chunk i."""

    def __init__(self, sentence_dim: int, d_model: int, slots: int, mode: str = "linear"):
        super().__init__()
        self.slots, self.d_model, self.mode = slots, d_model, mode
        if mode == "chunks":
            self.chunk_weight = nn.Parameter(torch.randn(slots, sentence_dim // slots, d_model) * 0.02)
            self.chunk_bias = nn.Parameter(torch.zeros(slots, d_model))
        else:
            self.proj = nn.Linear(sentence_dim, slots * d_model)
        self.slot_emb = nn.Parameter(torch.zeros(slots, d_model))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "chunks":
            chunks = v.view(v.shape[0], self.slots, -1)  # [N,k,S/k]
            x = torch.einsum("nkc,kcd->nkd", chunks, self.chunk_weight) + self.chunk_bias  # [N,k,d]
        else:
            x = self.proj(v).view(v.shape[0], self.slots, self.d_model)  # [N,k,d]
        return self.norm(x + self.slot_emb)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:  # [N,T,d] -> [N,h,T,dh]
    n, t, d = x.shape
    return x.view(n, t, n_heads, d // n_heads).transpose(1, 2)


def _attend(q, k, v, mask=None):  # q [N,h,T,dh], k/v [N,h,P,dh], mask [T,P] bool (True = keep)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [N,h,T,P]
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    out = torch.softmax(att, dim=-1) @ v  # [N,h,T,dh]
    n, h, t, dh = out.shape
    return out.transpose(1, 2).reshape(n, t, h * dh)


class DecoderLayer(nn.Module):
    """Pre-LN: causal self-attention (KV cache) -> cross-attention to memory slots -> GELU MLP."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d, self.h = cfg.d_model, cfg.n_heads
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.self_out = nn.Linear(d, d)
        self.q_cross = nn.Linear(d, d)
        self.kv_cross = nn.Linear(d, 2 * d)
        self.cross_out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, d))
        self.drop = nn.Dropout(cfg.dropout)

    def cross_kv(self, memory: torch.Tensor):  # memory [N,k,d] -> 2 x [N,h,k,dh]
        k, v = self.kv_cross(memory).chunk(2, dim=-1)
        return _heads(k, self.h), _heads(v, self.h)

    def forward(self, x, past_k, past_v, cross_k, cross_v):
        # x [N,t,d]; past_k/v [N,h,P,dh]; cross_k/v [N,h,k,dh] -> x [N,t,d], present_k/v [N,h,P+t,dh]
        t, p = x.shape[1], past_k.shape[2]
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        k = torch.cat([past_k, _heads(k, self.h)], dim=2)
        v = torch.cat([past_v, _heads(v, self.h)], dim=2)
        pos_q = torch.arange(t, device=x.device).unsqueeze(1) + p  # [t,1]
        causal = torch.arange(p + t, device=x.device).unsqueeze(0) <= pos_q  # [t,P+t]
        x = x + self.drop(self.self_out(_attend(_heads(q, self.h), k, v, causal)))
        x = x + self.drop(self.cross_out(_attend(_heads(self.q_cross(self.ln2(x)), self.h), cross_k, cross_v)))
        x = x + self.drop(self.mlp(self.ln3(x)))
        return x, k, v


class TransformerDecoder(nn.Module):
    """Autoregressive transformer decoder that cross-attends to k memory slots made from the vector.

    Compact output vocabulary (cfg.output_vocab = Vc > 0): the embedding and the output layer cover only Vc pieces
    (those of the training split + every special and single-character piece, so any text can still be spelled).
    Buffers `vocab_ids` [Vc] (compact -> tokenizer id) and `vocab_map` [V] (tokenizer id -> compact; pieces outside
    the compact vocabulary -> [UNK]'s compact id) travel in the weights. The interface stays in tokenizer ids:
    `step` takes tokenizer ids and returns logits over all V ids (pieces outside the vocabulary get NEG_LOGIT), so
    the search, the ONNX graphs and every server are unchanged; only training (`forward` + `targets`) sees the
    compact ids, which is where the output layer's cost is saved."""
    supports_step = True
    NEG_LOGIT = -1e9

    def __init__(self, cfg: DecoderConfig, vocab_size: int, sentence_dim: int, max_length: int):
        super().__init__()
        self.cfg, self.max_length, self.vocab_size = cfg, max_length, vocab_size
        self.compact = cfg.output_vocab > 0
        n_out = cfg.output_vocab or vocab_size
        self.tok = nn.Embedding(n_out, cfg.d_model)
        self.pos = nn.Embedding(max_length, cfg.d_model)
        self.memory = Memory(sentence_dim, cfg.d_model, cfg.memory_slots, cfg.memory_mode)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, n_out, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        if self.compact:
            self.register_buffer("vocab_ids", torch.arange(n_out, dtype=torch.long))
            self.register_buffer("vocab_map", torch.zeros(vocab_size, dtype=torch.long))
        if cfg.surface_heads:
            self.add_surface_heads()

    def add_surface_heads(self, hidden: int | None = None, pieces: bool | None = None,
                          after: bool | None = None) -> None:
        """The case / space-before tag heads of invemb.surface (new, N(0, 0.02)), e.g. on a model trained without.
        hidden (default cfg.surface_hidden): 0 -> one linear layer each; N -> Linear(in, N), GELU, Linear(N, tags).
        pieces (default cfg.surface_pieces): the heads also read the embeddings of the piece read and of the one
        before it, for heads trained on a frozen decoder whose last state, shaped to predict the NEXT piece, keeps
        the piece it read only faintly; after (default cfg.surface_next): and of the piece after it."""
        from invemb.surface import N_CASE, N_SPACE
        c = self.cfg
        c.surface_hidden = c.surface_hidden if hidden is None else hidden
        c.surface_pieces = c.surface_pieces if pieces is None else pieces
        c.surface_next = c.surface_next if after is None else after
        d = c.d_model * (1 + 2 * c.surface_pieces + c.surface_next)

        def head(n: int) -> nn.Module:
            h = c.surface_hidden
            return nn.Linear(d, n) if not h else nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, n))
        self.case_head, self.space_head = head(N_CASE), head(N_SPACE)
        for layer in (m for h in (self.case_head, self.space_head) for m in h.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(layer.weight, std=0.02), nn.init.zeros_(layer.bias)
        c.surface_heads = True

    @property
    def has_surface(self) -> bool:
        return getattr(self, "case_head", None) is not None

    def surface_logits(self, states: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final states [N,t,d] of the decoder inputs input_ids [N,t] (tokenizer ids; position i has READ piece i)
        -> case logits [N,t,4], space logits [N,t,2]. With cfg.surface_next the tag of piece i also reads piece
        i+1, so every caller ends each row with [SEP] (training: the targets' [SEP]; tagging a finished search:
        rows padded with [SEP], InvertibleEmbedder._surface_tags / invemb.graph_stepper.surface_tags)."""
        feats = [states]
        if self.cfg.surface_pieces or self.cfg.surface_next:
            e = self.tok(self.vocab_map[input_ids] if self.compact else input_ids)  # [N,t,d]
            zero = torch.zeros_like(e[:, :1])  # [N,1,d]
            if self.cfg.surface_pieces:
                feats += [e, torch.cat([zero, e[:, :-1]], dim=1)]  # piece i, piece i-1 (0 before the first)
            if self.cfg.surface_next:
                feats.append(torch.cat([e[:, 1:], zero], dim=1))  # piece i+1 (0 after the last column)
        x = torch.cat(feats, dim=-1) if len(feats) > 1 else states  # [N,t,d x features]
        return self.case_head(x), self.space_head(x)

    def states(self, sentence_embedding: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the final states [N,t,d] of decoder inputs [N,t] (tokenizer ids)."""
        return self.step(input_ids, self.init_cache(sentence_embedding), full_vocab=None)[0]

    def surface_tags(self, sentence_embedding: torch.Tensor, input_ids: torch.Tensor):
        """[CLS] + generated pieces [N,t] -> argmax case / space tags [N,t] (what `invemb.surface.render` reads)."""
        case, space = self.surface_logits(self.states(sentence_embedding, input_ids), input_ids)
        return case.argmax(-1), space.argmax(-1)

    def set_vocab(self, vocab_ids, unk_id: int) -> None:
        """Fill the compact-vocabulary buffers: vocab_ids [Vc] tokenizer ids (sorted, unique, incl. unk_id)."""
        ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        if ids.numel() != self.vocab_ids.numel():
            raise ValueError(f"compact vocabulary has {ids.numel()} ids, the decoder was built for "
                             f"{self.vocab_ids.numel()}")
        unk = int((ids == unk_id).nonzero()[0, 0])
        self.vocab_ids.copy_(ids)
        self.vocab_map.fill_(unk)
        self.vocab_map[ids] = torch.arange(ids.numel(), dtype=torch.long)

    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids [...] -> the ids the output layer predicts (compact ids; negative ids kept as they are)."""
        if not self.compact:
            return ids
        return torch.where(ids >= 0, self.vocab_map[ids.clamp(min=0)], ids)

    def to_full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        # logits [N,t,Vc] -> [N,t,V]: a gather from the compact logits + one NEG_LOGIT column for the pieces
        # outside the compact vocabulary (vocab_ids[vocab_map[i]] != i exactly for those)
        known = self.vocab_ids[self.vocab_map] == torch.arange(self.vocab_size, device=logits.device)  # [V]
        index = torch.where(known, self.vocab_map, torch.full_like(self.vocab_map, logits.shape[-1]))  # [V]
        padded = torch.cat([logits, torch.full_like(logits[..., :1], self.NEG_LOGIT)], dim=-1)  # [N,t,Vc+1]
        return padded.index_select(-1, index)

    def init_cache(self, sentence_embedding: torch.Tensor) -> Cache:
        mem = self.memory(sentence_embedding)  # [N,k,d]
        n, h = mem.shape[0], self.cfg.n_heads
        empty = mem.new_zeros(n, h, 0, self.cfg.d_model // h)
        cache: Cache = {}
        for i, layer in enumerate(self.layers):
            cache[f"cross_key_{i}"], cache[f"cross_value_{i}"] = layer.cross_kv(mem)
            cache[f"past_key_{i}"], cache[f"past_value_{i}"] = empty, empty
        return cache

    def step(self, input_ids: torch.Tensor, cache: Cache, full_vocab: bool | None = True
             ) -> tuple[torch.Tensor, Cache]:
        """input_ids [N,t] tokenizer ids -> logits [N,t,V] (full_vocab) or [N,t,Vc] (False: compact ids), or the
        final states [N,t,d] (None); and the new cache."""
        p = cache["past_key_0"].shape[2]
        pos = torch.arange(input_ids.shape[1], device=input_ids.device) + p  # [t]
        ids = self.vocab_map[input_ids] if self.compact else input_ids
        x = self.drop(self.tok(ids) + self.pos(pos))  # [N,t,d]
        new: Cache = {}
        for i, layer in enumerate(self.layers):
            ck, cv = cache[f"cross_key_{i}"], cache[f"cross_value_{i}"]
            x, new[f"past_key_{i}"], new[f"past_value_{i}"] = layer(
                x, cache[f"past_key_{i}"], cache[f"past_value_{i}"], ck, cv)
            new[f"cross_key_{i}"], new[f"cross_value_{i}"] = ck, cv
        if full_vocab is None:  # the final states, before the output layer (sampled softmax)
            return self.ln_f(x), new
        logits = self.head(self.ln_f(x))  # [N,t,Vc or V]
        return (self.to_full_vocab(logits) if self.compact and full_vocab else logits), new

    def forward(self, sentence_embedding: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits over the decoder's own output vocabulary (compact ids; see `targets`)."""
        return self.step(input_ids, self.init_cache(sentence_embedding), full_vocab=False)[0]

    def sampled_logits(self, sentence_embedding: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor,
                       negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing with a sampled softmax (training only): the output layer is evaluated for the batch's
        target pieces + `negatives` pieces drawn uniformly, not for the whole vocabulary (the output layer and its
        log-softmax are over half of a step's cost on CPU). targets [N,t] (output ids, -100 ignored) ->
        logits [N,t,C] over the C candidates and the targets' positions among them [N,t] (-100 kept)."""
        return self.sampled_from_states(self.states(sentence_embedding, input_ids), targets, negatives)

    def sampled_from_states(self, states: torch.Tensor, targets: torch.Tensor, negatives: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """sampled_logits from final states [N,t,d] already computed (shared with the surface heads)."""
        n_out = self.head.weight.shape[0]
        valid = targets >= 0
        draws = torch.randint(0, n_out, (negatives,), device=targets.device)
        cand = torch.unique(torch.cat([targets[valid], draws]))  # [C] sorted
        logits = states @ self.head.weight[cand].t()  # [N,t,C]
        pos = torch.searchsorted(cand, targets.clamp(min=0))  # [N,t]
        return logits, torch.where(valid, pos, targets)


class GRUDecoder(nn.Module):
    """RNN baseline: the vector initialises the GRU state (and is fed at every step)."""
    supports_step = True

    def __init__(self, cfg: DecoderConfig, vocab_size: int, sentence_dim: int, max_length: int):
        super().__init__()
        self.cfg, self.max_length = cfg, max_length
        d, layers = cfg.d_model, cfg.n_layers
        self.tok = nn.Embedding(vocab_size, d)
        self.init_h = nn.Linear(sentence_dim, layers * d)
        self.vec_in = nn.Linear(sentence_dim, d)
        self.gru = nn.GRU(2 * d, d, num_layers=layers, batch_first=True, dropout=cfg.dropout if layers > 1 else 0)
        self.head = nn.Linear(d, vocab_size)

    def init_cache(self, sentence_embedding: torch.Tensor) -> Cache:
        n = sentence_embedding.shape[0]
        h = torch.tanh(self.init_h(sentence_embedding)).view(n, self.cfg.n_layers, self.cfg.d_model)
        return {"hidden": h, "context": self.vec_in(sentence_embedding)}  # [N,L,d], [N,d]

    def step(self, input_ids: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        ctx = cache["context"]
        x = torch.cat([self.tok(input_ids), ctx.unsqueeze(1).expand(-1, input_ids.shape[1], -1)], dim=-1)
        out, h = self.gru(x, cache["hidden"].transpose(0, 1).contiguous())  # out [N,t,d], h [L,N,d]
        return self.head(out), {"hidden": h.transpose(0, 1), "context": ctx}

    def forward(self, sentence_embedding: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.step(input_ids, self.init_cache(sentence_embedding))[0]


class OnePassDecoder(nn.Module):
    """Non-autoregressive: vector + positional embeddings -> transformer encoder layers -> all positions at once."""
    supports_step = False

    def __init__(self, cfg: DecoderConfig, vocab_size: int, sentence_dim: int, max_length: int):
        super().__init__()
        self.cfg, self.max_length = cfg, max_length
        self.memory = Memory(sentence_dim, cfg.d_model, cfg.memory_slots)
        self.pos = nn.Embedding(max_length, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def forward(self, sentence_embedding: torch.Tensor, input_ids: torch.Tensor | None = None,
                length: int | None = None) -> torch.Tensor:
        t = input_ids.shape[1] if input_ids is not None else (length or self.max_length)
        mem = self.memory(sentence_embedding)  # [N,k,d]
        pos = self.pos(torch.arange(t, device=mem.device)).unsqueeze(0).expand(mem.shape[0], -1, -1)  # [N,t,d]
        x = self.body(torch.cat([mem, pos + mem.mean(1, keepdim=True)], dim=1))[:, mem.shape[1]:]
        return self.head(self.ln_f(x))  # [N,t,V]


DECODER_CLASSES = {"transformer": TransformerDecoder, "gru": GRUDecoder, "onepass": OnePassDecoder}


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def build_decoder(cfg: DecoderConfig, vocab_size: int, sentence_dim: int, max_length: int) -> nn.Module:
    decoder = DECODER_CLASSES[cfg.kind](cfg, vocab_size, sentence_dim, max_length)
    decoder.apply(_init_weights)  # GPT-style N(0, 0.02): small initial logits with tied embeddings
    if not hasattr(decoder, "targets"):
        decoder.targets = lambda ids: ids  # full-vocabulary decoders predict tokenizer ids
    return decoder
