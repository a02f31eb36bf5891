"""Fine-tuning losses on top of the teacher-forced reconstruction cross-entropy.

    obj = Objective(model, cfg)                 # cfg: TrainConfig (noise_sigma, sim_loss_weight, gumbel_tau, ...)
    out = obj(input_ids, attention_mask)        # {"loss", "ce", "sim", "para", "logits", "labels"}

- noise augmentation (`noise_sigma`): v + N(0, sigma * rms(v)) per vector, training mode only.
- sentence-similarity loss (`sim_loss_weight` = lambda): straight-through Gumbel-softmax (hard, tau) samples of the
  decoder's teacher-forced logits -> one-hot [B,T,V] @ the paraphrase model's input embedding matrix [V,H] ->
  paraphrase model(inputs_embeds) -> mean pool -> cosine with the same model's embedding of the real input (no
  grad). loss = ce + lambda * (1 - cos). The paraphrase model must share the decoder's vocabulary:
  all-MiniLM-L6-v2 (the default) uses the bert-base-uncased WordPiece vocab, the same as the MiniLM / FinBERT
  encoder tokenizers. A model with another vocab needs an explicit `id_map` (decoder id -> paraphrase-model id).
- separation term (`separation_weight`, `separation_margin`): for rows paired with a one-fact variant of their text
  (other digits / names, invemb.facts.variant_groups), weight * mean max(0, margin - ||v(a) - v(b)|| / ||v(a)||) on
  the clean pooled vectors (before noise): the vector must carry the digit the decoder is asked to write.
- paraphrase loss (`paraphrase_file`): ce(original) + min_i ce(paraphrase_i), per-example CE, the decoder
  conditioned on the ORIGINAL's vector and teacher-forced on each paraphrase; JSONL {"text", "paraphrases": [...]}.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from invemb.encoder import masked_mean
from invemb.errors import InvembError
from invemb.text import IGNORE


def per_example_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [...,T,V], labels [...,T] (IGNORE skipped) -> mean token CE per sequence [...]; empty rows -> 0."""
    tok = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    tok = tok.view(labels.shape)  # [...,T]
    n = (labels != IGNORE).sum(-1)  # [...]
    return tok.sum(-1) / n.clamp(min=1)


def min_paraphrase_ce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """logits [B,P,T,V], labels [B,P,T], valid [B,P] bool -> min over valid paraphrases of per-example CE [B].

    Rows with no valid paraphrase give 0 (they add nothing to the loss)."""
    ce = per_example_ce(logits, labels)  # [B,P]
    ce = ce.masked_fill(~valid, float("inf"))
    best = ce.min(dim=1).values  # [B]
    return torch.where(valid.any(1), best, torch.zeros_like(best))


def add_vector_noise(v, sigma: float, seed: int = 0):
    """v [B,S] + N(0, (sigma * rms(v_b))^2) per row b: sigma is relative to each vector's RMS scale.

    A torch tensor (training augmentation): noise from torch's global RNG, rms detached (the noise scale is not
    trained). A numpy array (evaluation, the noise study): noise from np.random.default_rng(seed), rms in float64,
    float32 out."""
    if sigma <= 0:
        return v
    if isinstance(v, np.ndarray):
        rms = np.sqrt((v.astype(np.float64) ** 2).mean(1, keepdims=True))  # [B,1]
        return (v + np.random.default_rng(seed).standard_normal(v.shape) * sigma * rms).astype(np.float32)
    rms = v.detach().float().pow(2).mean(-1, keepdim=True).sqrt()  # [B,1]
    return v + torch.randn_like(v) * (sigma * rms).to(v.dtype)


def separation_loss(a: torch.Tensor, b: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge on the relative distance of paired vectors a, b [P,S]: mean max(0, margin - ||a - b|| / ||a||) (the
    scale of invemb.fidelity.relative_distance and of the training noise); 0 for P == 0. The small epsilon keeps
    the gradient finite where a == b."""
    if a.shape[0] == 0:
        return a.sum() * 0
    a, b = a.float(), b.float()
    d = ((a - b).pow(2).sum(-1) + 1e-12).sqrt() / (a.pow(2).sum(-1) + 1e-12).sqrt()  # [P]
    return F.relu(margin - d).mean()


class SentenceSimilarityLoss:
    """1 - cos(paraphrase-model embedding of the Gumbel-sampled reconstruction, embedding of the real input).

    Not an nn.Module on purpose: the frozen paraphrase model is never trained, checkpointed or sharded."""

    def __init__(self, decoder_tokenizer, model_name: str = "all-MiniLM-L6-v2", tau: float = 1.0,
                 id_map: torch.Tensor | None = None, model: nn.Module | None = None, tokenizer=None):
        from invemb.encoder import load_tokenizer, resolve_model_path
        if tau <= 0:
            raise InvembError(f"gumbel_tau must be > 0, got {tau}")
        self.tau, self.model_name = tau, model_name
        if model is None:
            from transformers import AutoModel
            try:
                model = AutoModel.from_pretrained(resolve_model_path(model_name))
            except (OSError, ValueError) as e:
                raise InvembError(f"cannot load paraphrase model {model_name!r}: {str(e).splitlines()[0]}") from None
        self.model = model.eval().requires_grad_(False)
        tok = tokenizer if tokenizer is not None else load_tokenizer(model_name)
        if id_map is None:
            if tok.get_vocab() != decoder_tokenizer.get_vocab():
                raise InvembError(f"paraphrase model {model_name!r} has a different vocabulary ({len(tok)} tokens) "
                                  f"than the decoder ({len(decoder_tokenizer)}); use a model with the decoder's "
                                  "vocab (e.g. all-MiniLM-L6-v2) or pass id_map (decoder id -> its id)")
        elif id_map.shape != (len(decoder_tokenizer),):
            raise InvembError(f"id_map must have shape [{len(decoder_tokenizer)}], got {list(id_map.shape)}")
        self.id_map = id_map
        self.cls_map = decoder_tokenizer.cls_token_id  # decoder-side id of the paraphrase model's [CLS]

    def to(self, device) -> "SentenceSimilarityLoss":
        self.model.to(device)
        if self.id_map is not None:
            self.id_map = self.id_map.to(device)
        return self

    def embedding_matrix(self) -> torch.Tensor:  # [V_dec,H]
        w = self.model.get_input_embeddings().weight
        return w if self.id_map is None else w[self.id_map]

    @torch.no_grad()
    def target(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embedding of the real input [B,H] (decoder ids; mapped when an id_map is set)."""
        ids = input_ids if self.id_map is None else self.id_map[input_ids]
        return masked_mean(self.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state, attention_mask)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        # logits [B,T,V] predict labels [B,T] (= input_ids[:,1:], pad -> IGNORE); returns the mean of 1 - cos
        w = self.embedding_matrix()  # [V,H]
        y = F.gumbel_softmax(logits.float(), tau=self.tau, hard=True, dim=-1)  # [B,T,V] one-hot fwd, soft grad
        soft = y @ w.float()  # [B,T,H]
        cls = w[self.cls_map].float().expand(soft.shape[0], 1, -1)  # [B,1,H]
        embeds = torch.cat([cls, soft], dim=1).to(w.dtype)  # [B,T+1,H]
        mask = torch.cat([torch.ones_like(labels[:, :1]), (labels != IGNORE).long()], dim=1)  # [B,T+1]
        pred = masked_mean(self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask)  # [B,H]
        ref = self.target(input_ids, attention_mask)  # [B,H]
        return (1 - F.cosine_similarity(pred.float(), ref.float(), dim=-1)).mean()


def load_paraphrases(path: str | Path) -> dict[str, list[str]]:
    """JSONL {"text": ..., "paraphrases": [...]} -> {normalised text: [paraphrases]}; bad lines are errors."""
    from invemb.data import normalize
    p = Path(path)
    if not p.is_file():
        raise InvembError(f"paraphrase_file {str(p)!r} does not exist (make it with scripts/make_paraphrases.py)")
    out: dict[str, list[str]] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text, paras = normalize(rec["text"]), [normalize(x) for x in rec["paraphrases"]]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise InvembError(f"{p}:{n}: expected a JSON object with 'text' and a 'paraphrases' list") from None
        out.setdefault(text, []).extend(x for x in paras if x and x != text)
    if not out:
        raise InvembError(f"paraphrase_file {p} holds no records")
    return out


def fact_weighted_ce(logits: torch.Tensor, labels: torch.Tensor, fact: torch.Tensor | None, weight: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted, plain) mean cross-entropy over the labelled pieces from one pass over the logits: weighted =
    sum(w * ce) / sum(w) with the pieces where `fact` is 1 weighing `weight` (the others 1), plain = the plain mean.
    logits [B,T,C], labels [B,T] (IGNORE: none), fact [B,T] 0/1 or None (weighted = plain)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                         reduction="none").view_as(labels)  # [B,T]
    valid = (labels != IGNORE).float()  # [B,T]
    plain = (ce * valid).sum() / valid.sum().clamp(min=1)
    if fact is None:
        return plain, plain
    w = valid * (1 + (weight - 1) * fact.float())
    return (ce * w).sum() / w.sum().clamp(min=1), plain


class Objective(nn.Module):
    """The training loss around an InvertibleEmbedder (the only registered submodule: `model`)."""

    def __init__(self, model: nn.Module, noise_sigma: float = 0.0, sim_loss_weight: float = 0.0,
                 sim_loss: SentenceSimilarityLoss | None = None, sampled_negatives: int = 0,
                 word_dropout: float = 0.0, surface_weight: float = 1.0, separation_weight: float = 0.0,
                 separation_margin: float = 0.5, fact_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.fact_weight = fact_weight
        self.separation_weight, self.separation_margin = separation_weight, separation_margin
        self.surface_weight = surface_weight
        self.word_dropout = word_dropout
        self.sampled_negatives = sampled_negatives
        self.noise_sigma, self.sim_loss_weight = noise_sigma, sim_loss_weight
        if sampled_negatives and sim_loss_weight > 0:
            raise InvembError("sim_loss_weight > 0 needs the full softmax (sampled_softmax: 0)")
        if sim_loss_weight > 0 and getattr(model.decoder, "compact", False):
            raise InvembError("sim_loss_weight > 0 needs the full output vocabulary (decoder.output_vocab: 0)")
        if sim_loss_weight > 0 and sim_loss is None:
            raise InvembError("sim_loss_weight > 0 needs a SentenceSimilarityLoss")
        self.sim_loss = sim_loss  # plain attribute: not a submodule

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                para_ids: torch.Tensor | None = None, para_mask: torch.Tensor | None = None,
                para_valid: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None, pair_of: torch.Tensor | None = None,
                pair_ids: torch.Tensor | None = None, pair_mask: torch.Tensor | None = None,
                pair_hidden_states: torch.Tensor | None = None, **targets) -> dict[str, torch.Tensor]:
        # input_ids/attention_mask [B,T]; para_ids/para_mask [B,P,T'], para_valid [B,P] (optional);
        # hidden_states [B,T,H]: the frozen backbone's cached states (the encoder then runs only its pooler);
        # pair_of [P] (rows of the batch) + pair_ids/pair_mask [P,T''] (+ pair_hidden_states [P,T'',H]): the
        # one-fact variants those rows are separated from (training only);
        # targets: the decoder's own sequence and tags (target_ids, target_mask, case_tags, space_tags [B,T']),
        # fact_tags [B,T'] (training, fact_weight != 1: 1 at the pieces of numbers and names)
        if not (self.training and self.fact_weight != 1):
            targets.pop("fact_tags", None)  # evaluation: the plain mean, comparable across recipes
        vec = self.model.encoder(input_ids, attention_mask, hidden_states)  # [B,S]
        sep = None
        if self.training and self.separation_weight > 0 and pair_of is not None and pair_of.numel():
            other = self.model.encoder(pair_ids, pair_mask, pair_hidden_states)  # [P,S]
            sep = separation_loss(vec[pair_of], other, self.separation_margin)
        if self.training:
            vec = add_vector_noise(vec, self.noise_sigma)
        out = self.model(input_ids, attention_mask, sentence_embedding=vec,
                         sampled_negatives=self.sampled_negatives if self.training else 0,
                         word_dropout=self.word_dropout, surface_weight=self.surface_weight,
                         fact_weight=self.fact_weight, **targets)
        loss, zero = out["loss"], out["loss"].detach() * 0
        surface = out.get("surface", zero).detach()
        out["sim"], out["para"] = zero, zero  # out["ce"]: the model's plain mean cross-entropy
        out["surface"], out["sep"] = surface, zero if sep is None else sep.detach()
        out["pairs"] = 0 if sep is None else int(pair_of.numel())
        if sep is not None:
            loss = loss + self.separation_weight * sep
        if self.sim_loss_weight > 0 and self.training:
            sim = self.sim_loss(out["logits"], out["labels"], input_ids, attention_mask)
            loss = loss + self.sim_loss_weight * sim
            out["sim"] = sim.detach()
        if para_ids is not None and para_valid is not None and bool(para_valid.any()):
            b, p, t = para_ids.shape
            vecs = vec.repeat_interleave(p, dim=0)  # [B*P,S]
            flat = self.model(para_ids.view(b * p, t), para_mask.view(b * p, t), sentence_embedding=vecs)
            para = min_paraphrase_ce(flat["logits"].view(b, p, t - 1, -1), flat["labels"].view(b, p, t - 1),
                                     para_valid)  # [B]
            para = para.sum() / para_valid.any(1).sum().clamp(min=1)
            loss = loss + para
            out["para"] = para.detach()
        out["loss"] = loss
        return out
