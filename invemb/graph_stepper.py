"""A generation `Stepper` over the exported decoder graphs, whoever runs them (Triton BLS, a gRPC client, ORT).

The graphs and their tensor names come from the export's manifest.json (the contract: invemb.manifest):
    decoder_init:  sentence_embedding [N,S] -> log_probs [N,V] (after BOS) | top_log_probs/top_ids [N,K] + caches
    decoder_step:  input_ids [N,1] + cache inputs -> log_probs [N,V] | top_log_probs/top_ids [N,K] + present_*
How outputs feed the next step's cache inputs is `invemb.manifest.cache_plan`. `run(graph, feeds, output_names)
-> {name: array}` is the only backend-specific part.

Torch-free (numpy only): usable inside a Triton python model and in clients.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from invemb.embedder import EmbedderBase
from invemb.generation import Candidates, reorder_rows
from invemb.manifest import cache_plan

Runner = Callable[[str, dict, list], dict]  # (graph name, feeds {name: np.ndarray}, output names) -> outputs


class GraphStepper:
    """Stepper (invemb.generation) for `vectors` [B,S] over decoder_init/decoder_step run by `run`.

    With graphs that end in TopK (exports since top_log_probs/top_ids) it offers top-k candidates
    (`max_candidates` = their K): the search then fetches [N, 2 x beam] candidates per step instead of the
    [N, V] log_probs. `candidates=False` keeps full rows (the reference path of benchmarks and tests)."""

    def __init__(self, run: Runner, manifest: dict, vectors: np.ndarray, candidates: bool = True):
        self.run, self.manifest = run, manifest
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [B,S]
        self.batch_size = self.vectors.shape[0]
        self.plan = cache_plan(manifest)
        self.max_candidates = self.plan.top_k if candidates else 0
        self.n = 0  # candidates per row the search asked for (0: full rows)

    def _scores(self, out: dict):
        """Full rows [N,V], or Candidates [N,n] from the graph's TopK outputs (sorted: the first n are the n best)."""
        if not self.n:
            return out["log_probs"]
        return Candidates(out["top_log_probs"][:, :self.n], out["top_ids"][:, :self.n].astype(np.int64, copy=False),
                          int(self.manifest["vocab_size"]))

    def start(self, num_beams: int, candidates: int = 0):
        if candidates > self.max_candidates:
            raise ValueError(f"{candidates} candidates asked, the graphs give {self.max_candidates}")
        self.n = candidates
        out = self.run("decoder_init", {"sentence_embedding": self.vectors},
                       self.plan.outputs("decoder_init", bool(self.n)))
        cache = {name: out[src] for name, src in self.plan.first.items()}  # rows [B]
        rows = np.repeat(np.arange(self.batch_size), num_beams)  # [B*beams]: item b's beams are rows b*beams..
        scores = self._scores(out)
        scores = scores.take(rows) if isinstance(scores, Candidates) else scores[rows]
        return scores, {**reorder_rows(cache, rows), ITEM: rows}

    def step(self, tokens: np.ndarray, cache: dict):
        feeds = {"input_ids": np.asarray(tokens, dtype=np.int64).reshape(-1, 1),  # [N,1]
                 **{k: v for k, v in cache.items() if k != ITEM}}
        out = self.run("decoder_step", feeds, self.plan.outputs("decoder_step", bool(self.n)))
        return self._scores(out), {**cache, **{name: out[src] for name, src in self.plan.carried.items()}}

    def reorder(self, cache: dict, rows: np.ndarray) -> dict:
        """Rows of the cache -> the rows `rows` [N'] of it. Entries that never change (cross_*, context) are the
        same for every beam of an item: while each new row keeps the item of the row it replaces (beam reordering
        within items, the common case), they are kept as they are instead of copied (6 x [N, heads, slots, dh]
        per step)."""
        rows = np.asarray(rows)
        item = cache[ITEM][rows]  # [N'] item of each new row
        same_items = item.shape == cache[ITEM].shape and np.array_equal(item, cache[ITEM])
        out = {ITEM: item}
        for k, v in cache.items():
            if k != ITEM:
                keep = same_items and k not in self.plan.carried
                out[k] = v if keep else np.ascontiguousarray(v[rows])
        return out


ITEM = "_item"  # cache entry (never fed to a graph): the batch item of each cache row


def surface_tags(run: Runner, manifest: dict, vectors: np.ndarray, ids: list[list[int]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Case / space tags [N,T] of generated ids (no specials; row i: the tags of its ids) from ONE run of the
    decoder_surface graph over invemb.surface.tag_rows ([CLS] + pieces + [SEP], [SEP] after). The torch model's
    InvertibleEmbedder._surface_tags, over the export."""
    from invemb.manifest import SURFACE_GRAPH
    from invemb.surface import tag_rows
    special = manifest["special_ids"]
    x, width = tag_rows(ids, int(special["bos"]), int(special["eos"]), int(manifest["max_length"]))  # [N,W]
    out = run(SURFACE_GRAPH, {"sentence_embedding": np.ascontiguousarray(vectors, dtype=np.float32), "input_ids": x},
              ["case_logits", "space_logits"])  # [N,W,4], [N,W,2]
    return out["case_logits"][:, 1:1 + width].argmax(-1), out["space_logits"][:, 1:1 + width].argmax(-1)  # [N,T]


class GraphEmbedder(EmbedderBase):
    """The shared encode/decode surface (invemb.embedder.EmbedderBase: n-best decoding, round-trip re-ranking,
    detokenization, text as written with a surface table) over exported graphs run by any runner, e.g. inside the
    Triton `beam_search` model (its own ORT sessions, or BLS calls to the `encoder` / decoder models). `run` must
    also run the `encoder` graph (input_ids/attention_mask [b,T] int64 -> sentence_embedding [b,S]) for
    encode/re-ranking, and decoder_surface for text as written."""

    def __init__(self, run: Runner, manifest: dict, tokenizer, candidates: bool = True,
                 surface_table: dict | None = None):
        self.run, self.manifest, self.tokenizer, self.candidates = run, manifest, tokenizer, candidates
        # the export's surface table (invemb.manifest.load_export_surface): decode returns text as written, with
        # `run` also running decoder_surface; None: the normalised text
        self.surface_table = surface_table
        self.sentence_dim, self.max_length = int(manifest["sentence_dim"]), int(manifest["max_length"])
        ids = manifest["special_ids"]
        self.bos_id, self.eos_id, self.pad_id = int(ids["bos"]), int(ids["eos"]), int(ids["pad"])
        self.one_pass = False

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        from invemb.text import tokenize_texts
        feeds = tokenize_texts(self.tokenizer, texts, self.max_length, return_tensors="np")
        feeds = {k: np.asarray(feeds[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
        return self.run("encoder", feeds, ["sentence_embedding"])["sentence_embedding"]  # [b,S]

    def _stepper(self, vectors: np.ndarray) -> GraphStepper:
        return GraphStepper(self.run, self.manifest, vectors, self.candidates)

    def _surface_tags(self, vectors: np.ndarray, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return surface_tags(self.run, self.manifest, vectors, ids)

    def generation_config(self, beam_size: int = 4, max_length: int | None = None, **kw):
        from invemb.manifest import generation_config
        return generation_config(self.manifest, beam_size, max_length, **kw)
