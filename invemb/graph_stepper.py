"""A generation `Stepper` over the exported decoder graphs, whoever runs them (Triton BLS, a gRPC client, ORT).

The graphs and their tensor names come from the export's manifest.json (the contract: invemb.manifest):
    decoder_init:  sentence_embedding [N,S] -> log_probs [N,V] (after BOS) + cache outputs
    decoder_step:  input_ids [N,1] + cache inputs -> log_probs [N,V] + present_* outputs
How outputs feed the next step's cache inputs is `invemb.manifest.cache_plan`. `run(graph, feeds, output_names)
-> {name: array}` is the only backend-specific part.

Torch-free (numpy only): usable inside a Triton python model and in clients.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from invemb.generation import reorder_rows
from invemb.manifest import cache_plan

Runner = Callable[[str, dict, list], dict]  # (graph name, feeds {name: np.ndarray}, output names) -> outputs


class GraphStepper:
    """Stepper (invemb.generation) for `vectors` [B,S] over decoder_init/decoder_step run by `run`."""

    def __init__(self, run: Runner, manifest: dict, vectors: np.ndarray):
        self.run, self.manifest = run, manifest
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [B,S]
        self.batch_size = self.vectors.shape[0]
        self.plan = cache_plan(manifest)

    def start(self, num_beams: int):
        out = self.run("decoder_init", {"sentence_embedding": self.vectors}, self.plan.init_outputs)
        cache = {name: out[src] for name, src in self.plan.first.items()}  # rows [B]
        rows = np.repeat(np.arange(self.batch_size), num_beams)  # [B*beams]: item b's beams are rows b*beams..
        return out["log_probs"][rows], reorder_rows(cache, rows)

    def step(self, tokens: np.ndarray, cache: dict):
        feeds = {"input_ids": np.asarray(tokens, dtype=np.int64).reshape(-1, 1), **cache}  # [N,1]
        out = self.run("decoder_step", feeds, self.plan.step_outputs)
        return out["log_probs"], {**cache, **{name: out[src] for name, src in self.plan.carried.items()}}

    def reorder(self, cache: dict, rows: np.ndarray) -> dict:
        return {k: np.ascontiguousarray(v) for k, v in reorder_rows(cache, np.asarray(rows)).items()}
