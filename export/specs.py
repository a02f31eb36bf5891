"""One declarative spec per ONNX graph: tensor names, dtypes, (symbolic) shapes and the parity tolerance.

Used by the exporter (input/output names, dynamic axes), by the validator and the tests (random inputs at
shapes other than the traced ones, tolerances) and written into manifest.json for servers (which never import
this module: they read the manifest). Torch-free; symbolic axis names: batch, sequence, past, new.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
class Dims:
    """The model sizes that fix the static axes (from the checkpoint config; stored in the manifest)."""
    decoder_kind: str
    sentence_dim: int
    vocab_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    memory_slots: int
    max_length: int  # encoder tokens incl. [CLS]/[SEP]; the decoder's positions; generation max = max_length - 1

    @property
    def d_model(self) -> int:
        return self.num_heads * self.head_dim


# Tolerances: fp32 ORT vs fp32 torch. Vectors/caches are O(1); log_probs are O(10) in magnitude.
ENCODER_TOL = Tolerance(atol=1e-4, rtol=1e-4)
CACHE_TOL = Tolerance(atol=1e-4, rtol=1e-4)
LOGPROB_TOL = Tolerance(atol=2e-4, rtol=1e-4)


def _f(name, *shape):
    return TensorSpec(name, "float32", tuple(shape))


def encoder_spec(d: Dims) -> GraphSpec:
    return GraphSpec("encoder",
                     (TensorSpec("input_ids", "int64", ("batch", "sequence")),
                      TensorSpec("attention_mask", "int64", ("batch", "sequence"))),
                     (_f("sentence_embedding", "batch", d.sentence_dim),), ENCODER_TOL,
                     "BERT backbone + pooler; sequence <= max_length tokens incl. [CLS]/[SEP]")


def _kv(prefix: str, d: Dims, length) -> tuple[TensorSpec, ...]:
    out = []
    for i in range(d.num_layers):
        out += [_f(f"{prefix}_key_{i}", "batch", d.num_heads, length, d.head_dim),
                _f(f"{prefix}_value_{i}", "batch", d.num_heads, length, d.head_dim)]
    return tuple(out)


def transformer_specs(d: Dims) -> list[GraphSpec]:
    log_probs = _f("log_probs", "batch", d.vocab_size)
    init = GraphSpec("decoder_init", (_f("sentence_embedding", "batch", d.sentence_dim),),
                     (log_probs,) + _kv("cross", d, d.memory_slots) + _kv("present", d, 1), LOGPROB_TOL,
                     "init_cache + step(BOS): log_softmax of the BOS position; present_* = self-attention cache")
    step = GraphSpec("decoder_step",
                     (TensorSpec("input_ids", "int64", ("batch", "new")),) + _kv("cross", d, d.memory_slots)
                     + _kv("past", d, "past"),
                     (log_probs,) + _kv("present", d, "past+new"), LOGPROB_TOL,
                     "log_softmax of the last new position; feed present_* back as past_*; past+new <= max_length")
    return [init, step]


def gru_specs(d: Dims) -> list[GraphSpec]:
    log_probs = _f("log_probs", "batch", d.vocab_size)
    hidden, context = _f("hidden", "batch", d.num_layers, d.d_model), _f("context", "batch", d.d_model)
    init = GraphSpec("decoder_init", (_f("sentence_embedding", "batch", d.sentence_dim),),
                     (log_probs, context, _f("present_hidden", "batch", d.num_layers, d.d_model)), LOGPROB_TOL,
                     "init_cache + step(BOS); feed present_hidden back as hidden")
    # torch.export specialises nn.GRU's sequence length: the GRU step graph takes one token per call.
    step = GraphSpec("decoder_step", (TensorSpec("input_ids", "int64", ("batch", 1)), hidden, context),
                     (log_probs, _f("present_hidden", "batch", d.num_layers, d.d_model)), LOGPROB_TOL,
                     "log_softmax of the last new position")
    return [init, step]


def onepass_specs(d: Dims) -> list[GraphSpec]:
    t = d.max_length - 1
    return [GraphSpec("decoder_onepass", (_f("sentence_embedding", "batch", d.sentence_dim),),
                      (_f("logits", "batch", t, d.vocab_size),), LOGPROB_TOL,
                      f"all {t} positions at once; text = argmax cut at the first EOS")]


def graph_specs(d: Dims) -> dict[str, GraphSpec]:
    """All graphs of one export, by name (encoder first)."""
    decoders = {"transformer": transformer_specs, "gru": gru_specs, "onepass": onepass_specs}[d.decoder_kind](d)
    return {g.name: g for g in [encoder_spec(d), *decoders]}

