"""`InvertibleEmbedder`: text -> one vector -> text, with self-contained save/load.

    model = InvertibleEmbedder.from_pretrained("runs/small/final")
    vecs = model.encode(["Oil prices fall as OPEC output rises"])   # np.ndarray [1,S]
    model.decode(vecs, beam_size=4)                                  # ["oil prices fall as opec output rises"]

A checkpoint folder holds config.json, model.safetensors (no pickle) and the tokenizer files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from invemb.config import ModelConfig
from invemb.decoders import build_decoder
from invemb.embedder import ENCODE_MAX_TOKENS, EmbedderBase
from invemb.encoder import SentenceEncoder, load_backbone, load_tokenizer
from invemb.errors import InvembError
from invemb.generation import GenerationConfig, log_softmax, reorder_rows
from invemb.text import IGNORE, check_vectors, detokenize_ids, detokenize_spacing, tokenize_texts  # noqa: F401
from invemb.util import read_json

log = logging.getLogger("invemb")
FORMAT_VERSION = 1


class TorchStepper:
    """The generation Stepper for a torch step decoder (transformer or GRU)."""

    # Full rows only: the reference every other path (ORT/Triton top-k candidates) must reproduce exactly, and
    # torch.topk orders exact ties arbitrarily (the search's order is by lower id).
    max_candidates = 0

    def __init__(self, decoder: nn.Module, vectors: torch.Tensor, bos_id: int):
        self.decoder, self.vectors, self.bos_id = decoder, vectors, bos_id
        self.batch_size = vectors.shape[0]

    @torch.no_grad()
    def start(self, num_beams: int):
        cache = self.decoder.init_cache(self.vectors)  # rows [B]
        cache = reorder_rows(cache, torch.arange(self.batch_size).repeat_interleave(num_beams))  # [B*beams]
        bos = np.full(self.batch_size * num_beams, self.bos_id, dtype=np.int64)
        return self.step(bos, cache)

    @torch.no_grad()
    def step(self, tokens: np.ndarray, cache):
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.vectors.device).view(-1, 1)  # [N,1]
        logits, cache = self.decoder.step(ids, cache)  # [N,1,V]
        return log_softmax(logits[:, -1].float().cpu().numpy()), cache

    def reorder(self, cache, rows: np.ndarray):
        return reorder_rows(cache, torch.as_tensor(rows, dtype=torch.long, device=self.vectors.device))


class InvertibleEmbedder(nn.Module, EmbedderBase):
    """Encoder (backbone + pooling) -> one vector -> decoder; the text/vector surface is EmbedderBase's."""

    def __init__(self, config: ModelConfig, tokenizer=None, backbone: nn.Module | None = None):
        super().__init__()
        self.config = config.validate()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.encoder.model_name)
        self.encoder = SentenceEncoder(config.encoder, backbone if backbone is not None else load_backbone(
            config.encoder), self.tokenizer)
        tok = self.tokenizer
        self.bos_id, self.eos_id, self.pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
        if None in (self.bos_id, self.eos_id, self.pad_id):
            raise InvembError("the tokenizer needs [CLS]/[SEP]/[PAD]-style special tokens (a BERT-family model)")
        self.decoder = build_decoder(config.decoder, len(tok), config.encoder.sentence_dim,
                                     config.encoder.max_length)

    # ----------------------------------------------------------------------------------------------- inputs
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def sentence_dim(self) -> int:
        return self.config.encoder.sentence_dim

    @property
    def max_length(self) -> int:
        """Encoder tokens incl. [CLS]/[SEP] (the decoder's positions)."""
        return self.config.encoder.max_length

    @property
    def one_pass(self) -> bool:
        return not self.decoder.supports_step

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> input_ids/attention_mask [B,T]; empty texts are an error, long ones truncated with a warning."""
        return tokenize_texts(self.tokenizer, texts, self.config.encoder.max_length, return_tensors="pt")

    def reference_texts(self, texts: Sequence[str]) -> list[str]:
        """What a perfect reconstruction reads: the texts after tokenization (lower-cased, truncated)."""
        return self.detokenize(self.tokenize(texts)["input_ids"].tolist())

    # ----------------------------------------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                sentence_embedding: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None, sampled_negatives: int = 0,
                word_dropout: float = 0.0, target_ids: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None, case_tags: torch.Tensor | None = None,
                space_tags: torch.Tensor | None = None, surface_weight: float = 1.0,
                fact_tags: torch.Tensor | None = None, fact_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Teacher-forced pass. Decoder input = [CLS] tokens, labels = tokens [SEP] (pad -> -100), in the decoder's
        output ids (compact ids for a compact vocabulary). hidden_states [B,T,H]: cached backbone states.
        target_ids/target_mask [B,T'] (invemb.surface.decoder_targets: spelled numbers / unknown pieces): the
        decoder's sequence when it differs from the encoder's input_ids; case_tags/space_tags [B,T'] (-1: none)
        train the surface heads (loss += surface_weight * (CE case + CE space); `surface` in the output).
        sampled_negatives > 0 (training mode only): a sampled softmax over the batch's targets + that many random
        pieces; `logits`/`labels` are then over those candidates (evaluation always uses the full softmax).
        word_dropout > 0 (training mode only): that share of decoder inputs after [CLS] becomes [MASK], so the next
        piece must come from the vector more often than from the previous pieces (labels are unchanged; a dropped
        piece has no tag target: its tag heads cannot see it).
        fact_tags [B,T'] (1: a piece of a number or a name; decoder_targets) with fact_weight != 1: the loss's
        cross-entropy is the mean over pieces with those weighing fact_weight (invemb.losses.fact_weighted_ce, one
        pass over the logits); `ce` in the output is the plain mean either way."""
        if sentence_embedding is None:
            sentence_embedding = self.encoder(input_ids, attention_mask, hidden_states)  # [B,S]
        seq, seq_mask = (input_ids, attention_mask) if target_ids is None else (target_ids.long(), target_mask)
        dec_in = seq[:, :-1]  # [B,T-1]
        drop = None
        if word_dropout > 0 and self.training:
            drop = torch.rand(dec_in.shape, device=dec_in.device) < word_dropout  # [B,T-1]
            drop[:, 0] = False  # [CLS] stays: it starts every search
            dec_in = dec_in.masked_fill(drop, self.tokenizer.mask_token_id)
        labels = self.decoder.targets(seq[:, 1:].masked_fill(seq_mask[:, 1:] == 0, IGNORE))  # [B,T-1]
        sampled = sampled_negatives and self.training and hasattr(self.decoder, "sampled_logits")
        tags = case_tags is not None and getattr(self.decoder, "has_surface", False)
        states = None
        if tags:  # one decoder pass feeds the token logits and the tag heads
            states = self.decoder.states(sentence_embedding, dec_in)  # [B,T-1,d]
        if sampled:
            # logits over the batch's candidate pieces [B,T-1,C]; labels become positions among them
            logits, labels = (self.decoder.sampled_from_states(states, labels, sampled_negatives) if tags else
                              self.decoder.sampled_logits(sentence_embedding, dec_in, labels, sampled_negatives))
        else:
            logits = self.decoder.head(states) if tags else self.decoder(sentence_embedding, dec_in)  # [B,T-1,V]
        if fact_tags is not None and fact_weight != 1:
            from invemb.losses import fact_weighted_ce
            loss, ce = fact_weighted_ce(logits, labels, fact_tags[:, 1:], fact_weight)
        else:
            loss = ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        out = {"loss": loss, "ce": ce.detach(), "logits": logits, "labels": labels,
               "sentence_embedding": sentence_embedding}
        if tags:
            out["surface"] = self._surface_loss(states, dec_in, case_tags, space_tags, drop)
            out["loss"] = loss + surface_weight * out["surface"]
        return out

    def _surface_loss(self, states, dec_in, case_tags, space_tags, drop) -> torch.Tensor:
        # states [B,T-1,d] at the decoder inputs dec_in [B,T-1]; the tag of input position i is the tag of piece i
        # ([CLS]: none)
        case_logits, space_logits = self.decoder.surface_logits(states, dec_in)  # [B,T-1,4], [B,T-1,2]
        total = states.new_zeros(())
        for logits, tags in ((case_logits, case_tags), (space_logits, space_tags)):
            t = tags[:, :-1].long()  # [B,T-1]
            t = t.masked_fill(t < 0, IGNORE)
            if drop is not None:
                t = t.masked_fill(drop, IGNORE)
            if bool((t != IGNORE).any()):
                total = total + F.cross_entropy(logits.flatten(0, 1).float(), t.flatten(), ignore_index=IGNORE)
        return total

    # ----------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False,
               max_tokens: int | None = ENCODE_MAX_TOKENS) -> np.ndarray:
        """Texts -> float32 [B,S] (EmbedderBase.encode in eval mode, without autograd)."""
        self.eval()
        return super().encode(texts, batch_size, progress, max_tokens)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        batch = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}  # [b,T] x2
        return self.encoder(**batch).float().cpu().numpy()  # [b,S]

    @torch.no_grad()
    def decode_ids(self, vectors, beam_size: int = 4, max_length: int | None = None, **kw) -> list[list[int]]:
        self.eval()
        return super().decode_ids(vectors, beam_size, max_length, **kw)

    def _stepper(self, vectors: np.ndarray) -> TorchStepper:
        return TorchStepper(self.decoder, torch.as_tensor(vectors, device=self.device), self.bos_id)

    def _onepass_ids(self, vectors: np.ndarray, cfg: GenerationConfig) -> list[list[int]]:
        v = torch.as_tensor(vectors, device=self.device)  # [N,S]
        return self.decoder(v, length=cfg.max_length).argmax(-1).cpu().tolist()  # [N,T]

    @torch.no_grad()
    def _surface_tags(self, vectors: np.ndarray, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        from invemb.surface import tag_rows
        x, width = tag_rows(ids, self.bos_id, self.eos_id, self.max_length)  # [N,W]: [CLS] + pieces + [SEP]
        case, space = self.decoder.surface_tags(torch.as_tensor(vectors, device=self.device),
                                                torch.as_tensor(x, device=self.device))
        return case[:, 1:1 + width].cpu().numpy(), space[:, 1:1 + width].cpu().numpy()  # [N,T]

    def decoder_targets(self, texts: Sequence[str], practice: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
        """Cleaned texts -> the decoder's targets (invemb.surface.decoder_targets for this model's vocabulary;
        `practice`, `seed`: spelling practice on training texts, see there)."""
        from invemb.surface import decoder_targets
        known = self.decoder.vocab_ids.tolist() if getattr(self.decoder, "compact", False) else None
        return decoder_targets(self.tokenizer, texts, self.max_length, known, self.config.decoder.spell_numbers,
                               practice, seed)

    def training_batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> every input of `forward` for them: encoder ids/mask [B,T] and the decoder's own targets and
        tags [B,T'] (invemb.surface) — what a small fine-tuning loop (or a test) feeds `model(**batch)`."""
        from invemb.text import clean_texts
        texts = clean_texts(texts)
        batch = dict(self.tokenize(texts))
        t = self.decoder_targets(texts)
        batch.update(target_ids=torch.from_numpy(t["ids"]).long(), target_mask=torch.from_numpy(t["mask"]).long(),
                     case_tags=torch.from_numpy(t["case"]).long(), space_tags=torch.from_numpy(t["space"]).long())
        return batch

    # ----------------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, path: str | os.PathLike, backbone: bool = True, dtype: torch.dtype | None = None,
                        extra: dict | None = None) -> Path:
        """Write config.json + model.safetensors + tokenizer files atomically (temp folder, then rename).

        backbone=False leaves a frozen pretrained backbone out (it is loaded from its pip package / folder by name,
        the way the shipped model references MiniLM); dtype=torch.float16 stores floating weights in half precision
        (loaded back into float32). `extra` is stored in config.json under "info" (e.g. training provenance)."""
        from safetensors.torch import save_file, save_model
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            meta = {"format_version": FORMAT_VERSION, "invemb_model": self.config.to_dict(),
                    "backbone_config": {**self.encoder.backbone.config.to_dict(),  # named, not the machine's path
                                        "_name_or_path": self.config.encoder.model_name},
                    "vocab_size": len(self.tokenizer),
                    "special_ids": {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id},
                    "backbone_weights": "included" if backbone else "external"}
            if extra:
                meta["info"] = extra
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            if backbone and dtype is None:
                save_model(self, str(tmp / "model.safetensors"))
            else:
                tensors, seen = {}, set()
                for name, t in self.state_dict().items():
                    if (not backbone and name.startswith("encoder.backbone.")) or t.data_ptr() in seen:
                        continue  # the backbone by reference; a tied weight once (under its first name)
                    seen.add(t.data_ptr())
                    t = t.detach().cpu()
                    tensors[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
                save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(str(tmp))
            if self.surface_table is not None:
                from invemb.surface import save_table
                save_table(tmp, self.surface_table)
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a model folder is meant to be shared
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu") -> "InvertibleEmbedder":
        """Load a checkpoint folder; no path: the model shipped with invemb (`invemb.shipped.default_model_path`)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        if path is None:
            from invemb.shipped import default_model_path
            path = default_model_path()
        path = Path(path)
        meta = read_checkpoint_config(path)
        config = ModelConfig.from_dict(meta["invemb_model"])
        external = meta.get("backbone_weights") == "external"
        if external:  # the pretrained backbone from its pip package / folder, by name
            import dataclasses
            backbone = load_backbone(dataclasses.replace(config.encoder, random_init=False))
        else:
            bcfg = dict(meta["backbone_config"])
            backbone = AutoModel.from_config(AutoConfig.for_model(bcfg.pop("model_type"), **bcfg))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = cls(config, tokenizer, backbone)
        try:
            state = load_file(str(path / "model.safetensors"), device=str(device))
            missing, unexpected = model.load_state_dict(state, strict=False)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InvembError(f"{path / 'model.safetensors'} is corrupted or incompatible: "
                              f"{str(e).splitlines()[0][:300]}") from None
        tied = ({"decoder.head.weight", "decoder.tok.weight"} if config.decoder.tie_embeddings and
                ("decoder.head.weight" in state or "decoder.tok.weight" in state) else set())
        missing = [k for k in missing if k not in tied and not (external and k.startswith("encoder.backbone."))]
        if missing or unexpected:
            raise InvembError(f"{path} does not match its config.json: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
        if getattr(model.decoder, "has_surface", False):
            from invemb.surface import load_table
            model.surface_table = load_table(path) or {}
        return model.to(device).eval()


def read_checkpoint_config(path: Path) -> dict:
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise InvembError(f"{path} is not an invemb checkpoint (expected config.json and model.safetensors)")
    meta = read_json(path / "config.json")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "invemb_model" not in meta:
        raise InvembError(f"{path / 'config.json'} is not an invemb checkpoint config "
                          f"(format_version {FORMAT_VERSION} expected)")
    if not isinstance(meta["invemb_model"], dict):
        raise InvembError(f"{path / 'config.json'}: \"invemb_model\" must be a mapping of the model's config, got "
                          f"{type(meta['invemb_model']).__name__} {str(meta['invemb_model'])[:60]!r}")
    unknown = set(meta) - CONFIG_KEYS
    if unknown:
        raise InvembError(f"{path / 'config.json'}: unknown top-level key(s) {sorted(unknown)}; known: "
                          f"{sorted(CONFIG_KEYS)}")
    return meta


CONFIG_KEYS = {"format_version", "invemb_model", "backbone_config", "vocab_size", "special_ids", "backbone_weights",
               "info"}
