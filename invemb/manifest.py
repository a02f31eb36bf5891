"""The export contract, declared once: what an ONNX export folder holds and how its graphs fit together.

- Graph specs: one declarative spec per ONNX graph (tensor names, dtypes, (symbolic) shapes, parity tolerance),
  from the model sizes (`ModelDims`). Used by the exporter (names, dynamic axes), the validator and the tests
  (random inputs at untraced shapes, tolerances); written into manifest.json. Symbolic axes: batch, sequence,
  past, new.
- manifest.json: its format version, `build_manifest` / `write_manifest` / `read_manifest`, and `graph_files`
  (the graph files of the fp32 export or of a variant made by export/optimize.py).
- Cache tensor names: a step input `past_X` (or `X`, e.g. GRU `hidden`) is fed from the previous call's output
  `present_X`; every other cache input (`cross_key_<i>`, `cross_value_<i>`, GRU `context`) is the decoder_init
  output of the same name and never changes (`present_name`, `cache_feed_name`, `cache_plan`).
- What a server derives from a manifest: the generation config (`generation_config`), the vector check
  (`check_vectors`) and the export's tokenizer (`load_export_tokenizer`).

Used by the exporter (invemb.export), ONNX Runtime (invemb.ort), the Triton python models and the gRPC client.
Torch-free (numpy only, through invemb.generation / invemb.text); imports no other invemb backend module.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from invemb.errors import InvembError
from invemb.util import read_json

SYMBOLIC = ("batch", "sequence", "past", "new")  # dynamic axes; "past+new" appears in output shapes only


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" | "float32"
    shape: tuple  # ints and symbolic names, e.g. ("batch", 4, "past", 16)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float = 0.0

    def to_json(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Tolerance  # |ort - torch| <= atol + rtol * |torch| for every output element
    notes: str = ""
    file: str = field(default="")

    def __post_init__(self):
        if not self.file:
            object.__setattr__(self, "file", f"{self.name}.onnx")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per input: {axis: symbolic name} (what the exporter turns into torch.export.Dim objects)."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs}

    def to_json(self) -> dict:
        return {"file": self.file, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs], "tolerance": self.tolerance.to_json(),
                "notes": self.notes}


@dataclass(frozen=True)
class ModelDims:
    """The model sizes that fix the graphs' static axes (from the checkpoint config; stored in the manifest)."""
    decoder_kind: str
    sentence_dim: int
    vocab_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    memory_slots: int
    max_length: int  # encoder tokens incl. [CLS]/[SEP]; the decoder's positions; generation max = max_length - 1
    surface: bool = False  # the decoder has case / space tag heads (invemb.surface): a decoder_surface graph

    @property
    def d_model(self) -> int:
        return self.num_heads * self.head_dim


# Tolerances: fp32 ORT vs fp32 torch. Vectors/caches are O(1); log_probs are O(10) in magnitude.
ENCODER_TOL = Tolerance(atol=1e-4, rtol=1e-4)
CACHE_TOL = Tolerance(atol=1e-4, rtol=1e-4)
LOGPROB_TOL = Tolerance(atol=2e-4, rtol=1e-4)


def float_tensor(name: str, *shape) -> TensorSpec:
    """A float32 tensor spec of that name and shape."""
    return TensorSpec(name, "float32", tuple(shape))


def encoder_spec(d: ModelDims) -> GraphSpec:
    return GraphSpec("encoder",
                     (TensorSpec("input_ids", "int64", ("batch", "sequence")),
                      TensorSpec("attention_mask", "int64", ("batch", "sequence"))),
                     (float_tensor("sentence_embedding", "batch", d.sentence_dim),), ENCODER_TOL,
                     "BERT backbone + pooler; sequence <= max_length tokens incl. [CLS]/[SEP]")


def kv_tensors(prefix: str, d: ModelDims, length) -> tuple[TensorSpec, ...]:
    """<prefix>_key_<i>, <prefix>_value_<i> [batch, heads, length, head_dim] for every layer i (prefix: cross,
    past or present)."""
    out = []
    for i in range(d.num_layers):
        out += [float_tensor(f"{prefix}_key_{i}", "batch", d.num_heads, length, d.head_dim),
                float_tensor(f"{prefix}_value_{i}", "batch", d.num_heads, length, d.head_dim)]
    return tuple(out)


# Step graphs also end in TopK over log_probs: top_log_probs / top_ids [batch, K] are each row's K best log-probs,
# best first (ties: lower id first, ONNX TopK), K = 2 x MAX_BEAM_SIZE (capped at V). A search needs 2 x beam of
# them per row to rank exactly what it would rank over full rows (invemb.generation.Candidates), so a caller asks
# for these two outputs instead of log_probs and only 12 x K bytes per row leave the graph, not 4 x V.
SCORE_OUTPUTS = ("log_probs", "top_log_probs", "top_ids")


def top_candidates(vocab_size: int) -> int:
    """K of the step graphs' TopK outputs."""
    from invemb.limits import MAX_BEAM_SIZE
    return min(2 * MAX_BEAM_SIZE, vocab_size)


def score_tensors(d: ModelDims) -> tuple[TensorSpec, ...]:
    """log_probs [batch, V] + top_log_probs [batch, K] + top_ids [batch, K] (the first outputs of a step graph)."""
    k = top_candidates(d.vocab_size)
    return (float_tensor("log_probs", "batch", d.vocab_size), float_tensor("top_log_probs", "batch", k),
            TensorSpec("top_ids", "int64", ("batch", k)))


def cache_output_names(spec: GraphSpec) -> list[str]:
    """A step graph's outputs after the score outputs: the cache tensors, in graph order."""
    return [n for n in spec.output_names if n not in SCORE_OUTPUTS]


def transformer_specs(d: ModelDims) -> list[GraphSpec]:
    scores = score_tensors(d)
    init = GraphSpec("decoder_init", (float_tensor("sentence_embedding", "batch", d.sentence_dim),),
                     scores + kv_tensors("cross", d, d.memory_slots) + kv_tensors("present", d, 1), LOGPROB_TOL,
                     "init_cache + step(BOS): log_softmax of the BOS position; present_* = self-attention cache")
    step = GraphSpec("decoder_step",
                     (TensorSpec("input_ids", "int64", ("batch", "new")),) + kv_tensors("cross", d, d.memory_slots)
                     + kv_tensors("past", d, "past"),
                     scores + kv_tensors("present", d, "past+new"), LOGPROB_TOL,
                     "log_softmax of the last new position; feed present_* back as past_*; past+new <= max_length")
    return [init, step]


def gru_specs(d: ModelDims) -> list[GraphSpec]:
    scores = score_tensors(d)
    hidden = float_tensor("hidden", "batch", d.num_layers, d.d_model)  # [batch, layers, d_model]
    present_hidden = float_tensor("present_hidden", "batch", d.num_layers, d.d_model)
    context = float_tensor("context", "batch", d.d_model)
    init = GraphSpec("decoder_init", (float_tensor("sentence_embedding", "batch", d.sentence_dim),),
                     scores + (context, present_hidden), LOGPROB_TOL,
                     "init_cache + step(BOS); feed present_hidden back as hidden")
    # torch.export specialises nn.GRU's sequence length: the GRU step graph takes one token per call.
    step = GraphSpec("decoder_step", (TensorSpec("input_ids", "int64", ("batch", 1)), hidden, context),
                     scores + (present_hidden,), LOGPROB_TOL, "log_softmax of the last new position")
    return [init, step]


def onepass_specs(d: ModelDims) -> list[GraphSpec]:
    t = d.max_length - 1
    return [GraphSpec("decoder_onepass", (float_tensor("sentence_embedding", "batch", d.sentence_dim),),
                      (float_tensor("logits", "batch", t, d.vocab_size),), LOGPROB_TOL,
                      f"all {t} positions at once; text = argmax cut at the first EOS")]


SURFACE_GRAPH = "decoder_surface"
SURFACE_TOL = Tolerance(atol=2e-4, rtol=1e-4)  # tag logits are O(1-10), like log_probs


def surface_spec(d: ModelDims) -> GraphSpec:
    """The tag heads of invemb.surface over a teacher-forced decoder pass: one call per decoded batch."""
    from invemb.surface import N_CASE, N_SPACE
    return GraphSpec(SURFACE_GRAPH,
                     (float_tensor("sentence_embedding", "batch", d.sentence_dim),
                      TensorSpec("input_ids", "int64", ("batch", "sequence"))),
                     (float_tensor("case_logits", "batch", "sequence", N_CASE),
                      float_tensor("space_logits", "batch", "sequence", N_SPACE)), SURFACE_TOL,
                     "input_ids = [CLS] + generated pieces (padded after: causal, so padding changes no tag); "
                     "position i tags piece i (argmax: invemb.surface case / space-before); sequence <= max_length")


def graph_specs(d: ModelDims) -> dict[str, GraphSpec]:
    """All graphs of one export, by name (encoder first; decoder_surface last, for models with surface heads)."""
    decoders = {"transformer": transformer_specs, "gru": gru_specs, "onepass": onepass_specs}[d.decoder_kind](d)
    surface = [surface_spec(d)] if d.surface and d.decoder_kind == "transformer" else []
    return {g.name: g for g in [encoder_spec(d), *decoders, *surface]}


def model_dims(model) -> ModelDims:
    """The dims of an InvertibleEmbedder (read from its config and tokenizer; no torch needed here)."""
    enc, dec = model.config.encoder, model.config.decoder
    return ModelDims(decoder_kind=dec.kind, sentence_dim=enc.sentence_dim, vocab_size=len(model.tokenizer),
                     num_layers=dec.n_layers, num_heads=dec.n_heads, head_dim=dec.d_model // dec.n_heads,
                     memory_slots=dec.memory_slots, max_length=enc.max_length,
                     surface=bool(getattr(model.decoder, "has_surface", False)))


# ----------------------------------------------------------------------------------------------- manifest.json
# 2: an export of a model with surface heads (decoder_surface graph + surface.json: text as written); such exports
# say 2 so that a reader of 1 refuses them instead of serving the normalised text. Exports without say 1.
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"


def build_manifest(dims: ModelDims, opset: int, graphs: dict, special_ids: dict, source: dict) -> dict:
    """The manifest.json of an export: `graphs` {name: spec.to_json() + sha256}, special_ids {bos, eos, pad};
    `surface` {graph, table} when the model has surface heads (its table: surface.json beside the manifest)."""
    surface = SURFACE_GRAPH in graphs
    return {
        "format_version": MANIFEST_VERSION if surface else 1, "opset": opset, "decoder_kind": dims.decoder_kind,
        "sentence_dim": dims.sentence_dim, "vocab_size": dims.vocab_size, "num_layers": dims.num_layers,
        "num_heads": dims.num_heads, "head_dim": dims.head_dim, "memory_slots": dims.memory_slots,
        "max_length": dims.max_length, "generation_max_length": dims.max_length - 1,
        "special_ids": special_ids, "graphs": graphs, "variants": {}, "tokenizer_dir": "tokenizer",
        "source": source,
        **({"surface": {"graph": SURFACE_GRAPH, "table": "surface.json"}} if surface else {}),
    }


def write_manifest(export_dir: str | os.PathLike, manifest: dict) -> None:
    """Write manifest.json atomically (a temp file renamed into place)."""
    export_dir = Path(export_dir)
    tmp = export_dir / f".{MANIFEST_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, export_dir / MANIFEST_FILE)


def read_manifest(export_dir: str | os.PathLike) -> dict:
    """manifest.json of an export folder; InvembError when absent, unreadable or of another format version."""
    path = Path(export_dir) / MANIFEST_FILE
    if not path.is_file():
        raise InvembError(f"{export_dir} is not an invemb ONNX export (no manifest.json)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_VERSIONS:
        raise InvembError(f"{path}: unsupported manifest (format_version {' or '.join(map(str, READABLE_VERSIONS))} "
                          "expected)")
    return manifest


def load_export_surface(folder, manifest: dict) -> dict | None:
    """The surface table (piece -> written form) saved beside the manifest, or None for an export without surface
    heads (its texts are the normalised ones); InvembError when the manifest names a table that is not there."""
    entry = manifest.get("surface")
    if not entry:
        return None
    path = Path(folder) / entry["table"]
    try:
        return json.loads(path.read_text(encoding="utf-8"))["table"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvembError(f"{path}: the export's surface table is missing or unreadable ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None


def graph_files(manifest: dict, variant: str | None = None, where: str | os.PathLike = "", hint: str = ""
                ) -> dict[str, str]:
    """{graph name: file} of the fp32 export, with a variant's files (export/optimize.py) in place of those it
    replaces. An unknown variant is an InvembError naming `where` (the folder) and the known ones (+ `hint`)."""
    files = {name: g["file"] for name, g in manifest["graphs"].items()}
    if variant:
        known = manifest.get("variants", {})
        if variant not in known:
            raise InvembError(f"{where} has no {variant!r} variant (known: {sorted(known)}{hint})")
        files.update(known[variant]["files"])
    return files


# ----------------------------------------------------------------------------------------------- cache names
PAST_PREFIX, PRESENT_PREFIX = "past_", "present_"
CARRIED_UNPREFIXED = ("hidden",)  # cache entries fed back without a past_ prefix (the GRU state)
STEP_GRAPHS = ("decoder_init", "decoder_step")


def present_name(cache_name: str) -> str | None:
    """The graph output carrying a cache entry to the next step: past_X -> present_X, hidden -> present_hidden;
    None for entries that never change (cross_*, context: fed back under their own names)."""
    if cache_name.startswith(PAST_PREFIX):
        return PRESENT_PREFIX + cache_name[len(PAST_PREFIX):]
    if cache_name in CARRIED_UNPREFIXED:
        return PRESENT_PREFIX + cache_name
    return None


def present_outputs(cache: dict) -> dict:
    """{present name: value} of a decoder cache's carried entries (what init/step graphs output as present_*)."""
    return {present_name(k): v for k, v in cache.items() if present_name(k)}


def cache_feed_name(output_name: str, step_inputs: Sequence[str]) -> str | None:
    """The decoder_step input an init/step output feeds: present_X -> past_X (or X); cross_*/context keep names."""
    if output_name in step_inputs:
        return output_name
    if output_name.startswith(PRESENT_PREFIX):
        base = output_name[len(PRESENT_PREFIX):]
        for cand in (f"{PAST_PREFIX}{base}", base):
            if cand in step_inputs:
                return cand
    return None


def graph_io(manifest: dict, graph: str) -> tuple[list[str], list[str]]:
    """(input names, output names) of a graph of the manifest; InvembError when the export lacks it."""
    g = manifest.get("graphs", {}).get(graph)
    if g is None:
        raise InvembError(f"the export has no {graph!r} graph (decoder_kind={manifest.get('decoder_kind')!r}; "
                          f"graphs: {sorted(manifest.get('graphs', {}))}): step decoding needs "
                          f"{' + '.join(STEP_GRAPHS)}")
    return [t["name"] for t in g["inputs"]], [t["name"] for t in g["outputs"]]


class CachePlan(NamedTuple):
    """How decoder_init/decoder_step outputs become the next decoder_step's cache inputs."""
    carried: dict[str, str]  # {step input: the step output feeding it at the next call} (past_X <- present_X)
    first: dict[str, str]  # {step input: the decoder_init output feeding it} (every cache input)
    init_outputs: list[str]  # decoder_init output names (log_probs first)
    step_outputs: list[str]  # decoder_step output names (log_probs first)
    top_k: int = 0  # K of both graphs' top_log_probs/top_ids outputs; 0: the export has none (made before them)

    def outputs(self, graph: str, candidates: bool) -> list[str]:
        """What to fetch from `graph`: log_probs (or top_log_probs + top_ids) first, then every cache output."""
        names = self.init_outputs if graph == "decoder_init" else self.step_outputs
        head = ["top_log_probs", "top_ids"] if candidates else ["log_probs"]
        return head + [n for n in names if n not in SCORE_OUTPUTS]


def _top_k(manifest: dict, graph: str) -> int:
    """K of a graph's top_ids output in the manifest (0 when absent)."""
    for t in manifest["graphs"][graph]["outputs"]:
        if t["name"] == "top_ids":
            return int(t["shape"][-1])
    return 0


def cache_plan(manifest: dict) -> CachePlan:
    """The CachePlan of a manifest's step graphs; InvembError when they do not fit together."""
    _, init_out = graph_io(manifest, "decoder_init")
    step_in, step_out = graph_io(manifest, "decoder_step")
    first = {cache_feed_name(n, step_in): n for n in init_out[1:] if cache_feed_name(n, step_in)}
    carried = {cache_feed_name(n, step_in): n for n in step_out[1:] if cache_feed_name(n, step_in)}
    missing = set(step_in) - {"input_ids"} - set(first)
    if init_out[:1] != ["log_probs"] or step_out[:1] != ["log_probs"] or missing:
        raise InvembError(f"decoder_init/decoder_step graphs of the manifest do not fit together "
                          f"(unfed step inputs {sorted(missing)})")
    return CachePlan(carried, first, init_out, step_out,
                     min(_top_k(manifest, "decoder_init"), _top_k(manifest, "decoder_step")))


# ----------------------------------------------------------------------------------------------- servers
def generation_limit(manifest: dict) -> int:
    """Most tokens a search may generate: the decoder's positions after BOS (encoder max_length - 1)."""
    return int(manifest.get("generation_max_length", manifest["max_length"] - 1))


def generation_config(manifest: dict, beam_size: int = 4, max_length: int | None = None, **kw):
    """The core's generation defaults (invemb.generation.generation_config) for the manifest's model."""
    from invemb.generation import generation_config as make
    return make(int(manifest["special_ids"]["eos"]), generation_limit(manifest), beam_size, max_length, **kw)


def check_vectors(manifest: dict, vectors) -> np.ndarray:
    """float32 [N,S] with S = manifest sentence_dim and finite values, else InvembError (the core's check)."""
    from invemb.text import check_vectors as check
    return check(vectors, int(manifest["sentence_dim"]))


def load_export_tokenizer(folder, manifest: dict):
    """The tokenizer saved beside the manifest (folder/<tokenizer_dir>), loaded offline."""
    from transformers import AutoTokenizer
    tok_dir = Path(folder) / manifest.get("tokenizer_dir", "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir if tok_dir.is_dir() else folder))
    except (OSError, ValueError) as e:
        raise InvembError(f"cannot load the tokenizer saved in {tok_dir}: {str(e).splitlines()[0]}") from None
