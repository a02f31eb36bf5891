"""A generation `Stepper` over the exported decoder graphs, whoever runs them (Triton BLS, a gRPC client, ORT).

The graphs and their tensor names come from the export's manifest.json (export/specs.py):
    decoder_init:  sentence_embedding [N,S] -> log_probs [N,V] (after BOS) + cache outputs
    decoder_step:  input_ids [N,1] + cache inputs -> log_probs [N,V] + present_* outputs
A step input named `past_X` (or `X`, e.g. GRU `hidden`) is fed from the previous call's output `present_X`; every
other cache input (cross_key_<i>, cross_value_<i>, GRU `context`) is the decoder_init output of the same name and
never changes. `run(graph, feeds, output_names) -> {name: array}` is the only backend-specific part.

Torch-free (numpy only): usable inside a Triton python model and in clients.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from invemb.errors import InvembError
from invemb.generation import GenerationConfig, reorder_rows
from invemb.text import check_vectors as _check_vectors
from invemb.ort import cache_feed_name, read_manifest  # noqa: F401 (read_manifest re-exported for servers)

Runner = Callable[[str, dict, list], dict]  # (graph name, feeds {name: np.ndarray}, output names) -> outputs
STEP_GRAPHS = ("decoder_init", "decoder_step")


def graph_io(manifest: dict, graph: str) -> tuple[list[str], list[str]]:
    g = manifest.get("graphs", {}).get(graph)
    if g is None:
        raise InvembError(f"the export has no {graph!r} graph (decoder_kind={manifest.get('decoder_kind')!r}; "
                          f"graphs: {sorted(manifest.get('graphs', {}))}): step decoding needs "
                          f"{' + '.join(STEP_GRAPHS)}")
    return [t["name"] for t in g["inputs"]], [t["name"] for t in g["outputs"]]


def cache_plan(manifest: dict) -> tuple[dict[str, str], dict[str, str], list[str], list[str]]:
    """-> (carried {step input: step output feeding it next time}, first {step input: decoder_init output},
    init output names, step output names); the name mapping is invemb.ort.cache_feed_name's."""
    _, init_out = graph_io(manifest, "decoder_init")
    step_in, step_out = graph_io(manifest, "decoder_step")
    first = {cache_feed_name(n, step_in): n for n in init_out[1:] if cache_feed_name(n, step_in)}
    carried = {cache_feed_name(n, step_in): n for n in step_out[1:] if cache_feed_name(n, step_in)}
    missing = set(step_in) - {"input_ids"} - set(first)
    if init_out[:1] != ["log_probs"] or step_out[:1] != ["log_probs"] or missing:
        raise InvembError(f"decoder_init/decoder_step graphs of the manifest do not fit together "
                          f"(unfed step inputs {sorted(missing)})")
    return carried, first, init_out, step_out


def generation_config(manifest: dict, beam_size: int = 4, max_length: int | None = None, **kw) -> GenerationConfig:
    """The same defaults as InvertibleEmbedder.generation_config: max_length = encoder max_length - 1 tokens."""
    limit = int(manifest.get("generation_max_length", manifest["max_length"] - 1))
    if max_length is not None and not 1 <= max_length <= limit:
        raise InvembError(f"max_length must be in [1, {limit}] (the decoder's positions), got {max_length}")
    if beam_size < 1:
        raise InvembError(f"beam_size must be >= 1, got {beam_size}")
    return GenerationConfig(beam_size=beam_size, eos_id=int(manifest["special_ids"]["eos"]),
                            max_length=max_length or limit, **kw)


def check_vectors(manifest: dict, vectors) -> np.ndarray:
    """float32 [N,S] with S = manifest sentence_dim and finite values, else InvembError (the core's check)."""
    return _check_vectors(vectors, int(manifest["sentence_dim"]))


class GraphStepper:
    """Stepper (invemb.generation) for `vectors` [B,S] over decoder_init/decoder_step run by `run`."""

    def __init__(self, run: Runner, manifest: dict, vectors: np.ndarray):
        self.run, self.manifest = run, manifest
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [B,S]
        self.batch_size = self.vectors.shape[0]
        self.carried, self.first, self.init_out, self.step_out = cache_plan(manifest)

    def start(self, num_beams: int):
        out = self.run("decoder_init", {"sentence_embedding": self.vectors}, self.init_out)
        cache = {name: out[src] for name, src in self.first.items()}  # rows [B]
        cache = reorder_rows(cache, np.repeat(np.arange(self.batch_size), num_beams))  # [B*beams]
        return out["log_probs"][np.repeat(np.arange(self.batch_size), num_beams)], cache

    def step(self, tokens: np.ndarray, cache: dict):
        feeds = {"input_ids": np.asarray(tokens, dtype=np.int64).reshape(-1, 1), **cache}  # [N,1]
        out = self.run("decoder_step", feeds, self.step_out)
        return out["log_probs"], {**cache, **{name: out[src] for name, src in self.carried.items()}}

    def reorder(self, cache: dict, rows: np.ndarray) -> dict:
        return {k: np.ascontiguousarray(v) for k, v in reorder_rows(cache, np.asarray(rows)).items()}


def load_export_tokenizer(folder, manifest: dict):
    """The tokenizer saved beside the manifest (folder/<tokenizer_dir>), loaded offline."""
    from pathlib import Path

    from transformers import AutoTokenizer
    tok_dir = Path(folder) / manifest.get("tokenizer_dir", "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir if tok_dir.is_dir() else folder))
    except (OSError, ValueError) as e:
        raise InvembError(f"cannot load the tokenizer saved in {tok_dir}: {str(e).splitlines()[0]}") from None
