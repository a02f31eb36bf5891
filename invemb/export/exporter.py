"""Export an invemb checkpoint to ONNX graphs + manifest.json + tokenizer: everything a server needs.

    python export/to_onnx.py --checkpoint runs/small/final --out onnx/small [--triton-repo model_repository]
    python export/to_onnx.py --triton-repo model_repository     # the shipped model -> onnx/shipped + the repository

Graphs (names, shapes, tolerances: invemb/manifest.py): encoder.onnx, and for a transformer/GRU decoder
decoder_init.onnx + decoder_step.onnx (KV cache in/out), for a one-pass decoder decoder_onepass.onnx; a model with
surface heads also decoder_surface.onnx (case / space tags of decoded pieces: text as written) + surface.json.
The decoders go through torch's dynamo exporter with dynamic_shapes; example sizes are >= 2 and pairwise distinct
because that exporter freezes example dimensions of size 0/1 (and would tie equal ones). The encoder goes through
the TorchScript exporter with eager attention (faster in ONNX Runtime: _export_torchscript; --encoder-exporter
dynamo is the other way).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from invemb.errors import InvembError
from invemb.export.placement import fresh_triton_repo, place_in_triton_repo, replace_dir, served_variant
from invemb.manifest import (SURFACE_GRAPH, GraphSpec, build_manifest, cache_output_names, graph_specs, model_dims,
                             present_outputs, read_manifest, write_manifest)

DEFAULT_OPSET = 18
# Example sizes used for tracing: >= 2 and distinct from each other (all are dynamic in the graphs).
EXAMPLE = {"batch": 3, "sequence": 7, "past": 5, "new": 2}
TRITON_ENCODERS = ("int8", "fp32")  # what export_checkpoint places in the repository's encoder/1/ (int8: default)


# ----------------------------------------------------------------------------------------------- wrappers
def _wrappers():
    """torch.nn.Module wrappers with flat tensor signatures (built lazily: no torch import at module load)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Encoder(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):  # [B,T] int64 x2 -> [B,S]
            return self.encoder(input_ids, attention_mask).float()

    def step(decoder, input_ids, cache):
        """decoder.step over the decoder's own output ids: a compact vocabulary's Vc logits, not the V-wide
        scatter (the GRU decoder has no compact vocabulary)."""
        if getattr(decoder, "compact", False):
            return decoder.step(input_ids, cache, full_vocab=False)
        return decoder.step(input_ids, cache)

    def scores(decoder, logits, top_k: int):
        """logits [B,t,Vo] (Vo = V, or Vc for a compact vocabulary) -> log_probs [B,V] of the last position,
        top_log_probs [B,K], top_ids [B,K] (TopK node). A compact vocabulary log-softmaxes and ranks its Vc columns
        only (18k of 30.5k for the shipped model); its vocab_ids are sorted, so TopK's ties (lower index first)
        stay lower tokenizer id first, and the V-wide log_probs is one gather (NEG_LOGIT for pieces outside)."""
        log_probs = F.log_softmax(logits[:, -1].float(), dim=-1)  # [B,Vo]
        top = torch.topk(log_probs, top_k, dim=-1, largest=True, sorted=True)
        if not getattr(decoder, "compact", False):
            return log_probs, top.values, top.indices
        full = decoder.to_full_vocab(log_probs[:, None])[:, 0]  # [B,V]
        return full, top.values, decoder.vocab_ids[top.indices]

    class DecoderInit(nn.Module):
        """sentence_embedding [B,S] -> log_probs [B,V] after BOS, then the cache tensors in `names` order."""

        def __init__(self, decoder, bos_id: int, names: list[str], top_k: int):
            super().__init__()
            self.decoder, self.bos_id, self.names, self.top_k = decoder, bos_id, names, top_k

        def forward(self, sentence_embedding):
            cache = self.decoder.init_cache(sentence_embedding)
            bos = torch.full_like(sentence_embedding[:, :1], self.bos_id, dtype=torch.long)  # [B,1]
            logits, cache = step(self.decoder, bos, cache)  # [B,1,Vo]
            out = {**cache, **present_outputs(cache)}  # cross_*/context as they are; past_X / hidden as present_*
            return scores(self.decoder, logits, self.top_k) + tuple(out[n] for n in self.names)

    class DecoderStep(nn.Module):
        """input_ids [B,t] + cache tensors (in `in_names` order) -> log_probs [B,V] of the last position + presents."""

        def __init__(self, decoder, in_names: list[str], out_names: list[str], top_k: int):
            super().__init__()
            self.decoder, self.in_names, self.out_names, self.top_k = decoder, in_names, out_names, top_k

        def forward(self, input_ids, *cache_tensors):
            cache = dict(zip(self.in_names, cache_tensors))
            logits, new = step(self.decoder, input_ids, cache)  # [B,t,Vo]
            new = present_outputs(new)
            return scores(self.decoder, logits, self.top_k) + tuple(new[n] for n in self.out_names)

    class OnePass(nn.Module):
        def __init__(self, decoder, length: int):
            super().__init__()
            self.decoder, self.length = decoder, length

        def forward(self, sentence_embedding):  # [B,S] -> logits [B,T,V]
            return self.decoder(sentence_embedding, length=self.length).float()

    class Surface(nn.Module):
        """sentence_embedding [B,S] + input_ids [B,t] ([CLS] + pieces) -> case_logits [B,t,4], space_logits [B,t,2]:
        the surface heads on one teacher-forced decoder pass (TransformerDecoder.surface_logits / states)."""

        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, sentence_embedding, input_ids):
            case, space = self.decoder.surface_logits(self.decoder.states(sentence_embedding, input_ids), input_ids)
            return case.float(), space.float()

    return Encoder, DecoderInit, DecoderStep, OnePass, Surface


def graph_module(model, name: str, spec: GraphSpec):
    """The torch computation graph `name` is traced from, with a flat tensor signature (the exporter exports it;
    the validator compares ONNX Runtime against it)."""
    Encoder, DecoderInit, DecoderStep, OnePass, Surface = _wrappers()
    if name == "encoder":
        return Encoder(model.encoder)
    if name == SURFACE_GRAPH:
        return Surface(model.decoder)
    top_k = next((t.shape[-1] for t in spec.outputs if t.name == "top_ids"), 0)
    if name == "decoder_init":
        return DecoderInit(model.decoder, model.bos_id, cache_output_names(spec), top_k)
    if name == "decoder_step":
        return DecoderStep(model.decoder, spec.input_names[1:], cache_output_names(spec), top_k)
    return OnePass(model.decoder, model.config.encoder.max_length - 1)


# ----------------------------------------------------------------------------------------------- examples
def example_inputs(spec: GraphSpec, sizes: dict[str, int] | None = None, vocab: int = 1000, seed: int = 0,
                   max_length: int | None = None) -> dict:
    """Random numpy inputs for a spec; symbolic axes take `sizes` (defaults: EXAMPLE). Token ids avoid 0..999
    specials only loosely (ids in [1000, vocab)); attention masks are left-aligned with ragged lengths."""
    import numpy as np
    rng = np.random.default_rng(seed)
    sizes = {**EXAMPLE, **(sizes or {})}
    feeds = {}
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "attention_mask":
            lengths = rng.integers(1, shape[1] + 1, size=shape[0])
            lengths[0] = shape[1]  # the longest row fills the padded width, as the tokenizer produces
            feeds[t.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        elif t.dtype == "int64":
            feeds[t.name] = rng.integers(min(1000, vocab - 1), vocab, size=shape).astype(np.int64)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# ----------------------------------------------------------------------------------------------- export
def _export_torchscript(module, args: tuple, spec: GraphSpec, path: Path, opset: int) -> None:
    """The encoder through torch's TorchScript exporter with the backbone's eager attention. Measured on the shipped
    MiniLM (512 validation headlines, sorted batches of 64, 2 ORT threads, one interleaved run): x1.2 the dynamo
    export's speed in fp32 and x1.33 in smoothed int8 (187 vs 141 headlines/s); with 1 thread
    (results/bench_export.md) x1.49 / x1.18. A dynamo export with eager attention gained only x1.15 in int8.
    The decoders stay on dynamo (x2 faster steps than TorchScript: shared/notes/export-and-deepspeed.md)."""
    import torch
    backbone = module.encoder.backbone
    before = backbone.config._attn_implementation
    backbone.set_attn_implementation("eager")  # the graph measured above (sdpa under TorchScript was not measured)
    try:
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(), opset_version=opset)
    finally:
        backbone.set_attn_implementation(before)


def _dynamic_shapes(module, spec: GraphSpec) -> tuple:
    """The dynamo exporter's dynamic_shapes: one torch.export.Dim per symbolic axis name, shared across inputs."""
    from torch.export import Dim
    dims: dict[str, Dim] = {}
    dyn = tuple({axis: dims.setdefault(name, Dim(name)) for axis, name in axes.items()} or None
                for axes in spec.dynamic_axes().values())
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:  # forward(a, *rest): nest the rest
        dyn = dyn[:len(params) - 1] + (dyn[len(params) - 1:],)
    return dyn


def _export_graph(module, spec: GraphSpec, path: Path, opset: int, vocab: int, max_length: int | None = None,
                  exporter: str = "dynamo") -> None:
    import torch
    feeds = example_inputs(spec, vocab=vocab)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            _export_torchscript(module, args, spec, path, opset)
            add_limits_metadata(path, vocab, max_length)
            return
        program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=spec.input_names,
                                    output_names=spec.output_names, dynamic_shapes=_dynamic_shapes(module, spec),
                                    opset_version=opset, verbose=False, external_data=False)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=size > 1.8e9)  # protobuf's 2 GB limit
    if size <= 1.8e9:
        add_limits_metadata(path, vocab, max_length)


def add_limits_metadata(path: Path, vocab: int, max_length: int | None) -> None:
    """Record the input limits in the graph (metadata_props): servers validate requests against them, so an
    out-of-range token id or an over-long sequence is the sender's INVALID_ARGUMENT, not a failed batch."""
    import onnx
    model = onnx.load(str(path))
    props = {"invemb_vocab_size": str(vocab)}
    if max_length:
        props["invemb_max_length"] = str(max_length)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def check_graph(path: Path, spec: GraphSpec) -> None:
    """The saved graph's input/output names and ranks are exactly the spec's (servers rely on the names)."""
    import onnx
    g = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in g.initializer}
    got_in = [(i.name, len(i.type.tensor_type.shape.dim)) for i in g.input if i.name not in init]
    got_out = [(o.name, len(o.type.tensor_type.shape.dim)) for o in g.output]
    want_in = [(t.name, len(t.shape)) for t in spec.inputs]
    want_out = [(t.name, len(t.shape)) for t in spec.outputs]
    if got_in != want_in or got_out != want_out:
        raise RuntimeError(f"{path.name}: exported names/ranks {got_in} -> {got_out} differ from the spec "
                           f"{want_in} -> {want_out}")


def export_model(model, out_dir: str | os.PathLike, opset: int = DEFAULT_OPSET, source: str = "",
                 encoder_exporter: str = "torchscript") -> dict:
    """Export an in-memory InvertibleEmbedder (eval mode, CPU) to `out_dir` atomically; returns the manifest.
    encoder_exporter: "torchscript" (default, faster in ORT: _export_torchscript) or "dynamo"."""
    if encoder_exporter not in ("torchscript", "dynamo"):
        raise InvembError(f"encoder_exporter must be 'torchscript' or 'dynamo', not {encoder_exporter!r}")
    import torch
    import invemb
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    dims = model_dims(model)
    specs = graph_specs(dims)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        graphs = {}
        for name, spec in specs.items():
            path = tmp / spec.file
            exporter = "torchscript" if name == "encoder" and encoder_exporter == "torchscript" else "dynamo"
            _export_graph(graph_module(model, name, spec), spec, path, opset, dims.vocab_size, dims.max_length,
                          exporter)
            check_graph(path, spec)
            graphs[name] = {**spec.to_json(), "sha256": _sha256(path), "exporter": exporter}
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if SURFACE_GRAPH in graphs:  # the written forms the TABLE case tag reads (manifest "surface")
            from invemb.surface import save_table
            save_table(tmp, model.surface_table or {})
        manifest = build_manifest(
            dims, opset, graphs, special_ids={"bos": model.bos_id, "eos": model.eos_id, "pad": model.pad_id},
            source={"checkpoint": source, "invemb": invemb.__version__, "torch": torch.__version__,
                    "pooling": model.config.encoder.pooling, "backbone": model.config.encoder.model_name})
        write_manifest(tmp, manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, opset: int = DEFAULT_OPSET,
                      triton_repo: str | os.PathLike | None = None, one_call: bool = False,
                      encoder_exporter: str = "torchscript", triton_encoder: str = "int8") -> dict:
    """Load a checkpoint (InvembError when missing/corrupted/incompatible), export it (+ the one-call beam search
    graph), optionally place it in a Triton model repository. Returns the manifest.
    triton_encoder: the encoder graph the repository serves. "int8" (the CPU serving default): the smoothed int8
    encoder with fixed activation ranges (export/optimize.py's int8_encoder variant; decoders stay fp32): faster,
    a vector independent of its batch, its cost in BLEU measured in results/fidelity.md (serving/README.md);
    "fp32": the exported graph itself, vectors equal to the torch model's within 1e-5 (a GPU deployment's choice)."""
    if triton_encoder not in TRITON_ENCODERS:
        raise InvembError(f"triton_encoder must be one of {', '.join(TRITON_ENCODERS)}, not {triton_encoder!r}")
    from invemb.model import InvertibleEmbedder
    model = InvertibleEmbedder.from_pretrained(checkpoint_dir)
    manifest = export_model(model, out_dir, opset, source=str(Path(checkpoint_dir).resolve()),
                            encoder_exporter=encoder_exporter)
    if one_call:
        from invemb.export.beam_graph import build_one_call_graph
        build_one_call_graph(out_dir)
        manifest = read_manifest(out_dir)
    if triton_repo:
        variant = None
        if triton_encoder == "int8":
            from invemb.export.optimize import make_variants
            make_variants(out_dir, ("int8",), encoder_only=True)
            manifest, variant = read_manifest(out_dir), "int8_encoder"
        place_in_triton_repo(out_dir, triton_repo, variant)
    return manifest


def place_export(export_dir: str | os.PathLike, repo: str | os.PathLike,
                 checkpoint: str | os.PathLike | None = None, one_call: bool = False,
                 triton_encoder: str = "int8") -> str | None:
    """A fresh Triton model repository at `repo` (the checkout's model_repository/ template) serving a new export of
    `checkpoint` (default: the shipped model) written to `export_dir`: what the pipeline's export stage and
    scripts/load_serving.py run. Progress prints silenced; InvembError on a bad checkpoint. Returns the served
    variant (served_variant(repo): "int8_encoder" by default, None for the fp32 graphs)."""
    if checkpoint is None:
        from invemb.shipped import default_model_path
        checkpoint = default_model_path()
    repo = fresh_triton_repo(repo)
    with quiet_exporter():
        export_checkpoint(checkpoint, export_dir, triton_repo=repo, one_call=one_call, triton_encoder=triton_encoder)
    return served_variant(repo)


# ----------------------------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- CLI
@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporter's progress prints and registration warnings (errors still raise)."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "torch._export",
             "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="invemb checkpoint folder (config.json, model.safetensors); "
                    "default: the shipped model (models/ of the checkout or $INVEMB_MODEL)")
    ap.add_argument("--out", default="onnx/shipped", help="output folder (replaced atomically; default onnx/shipped)")
    ap.add_argument("--triton-repo", default=None, help="also place the files in this Triton model repository")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    ap.add_argument("--encoder-exporter", choices=("torchscript", "dynamo"), default="torchscript",
                    help="torch exporter of the encoder graph (torchscript: faster in ONNX Runtime; the decoders "
                         "always use dynamo)")
    ap.add_argument("--one-call", action="store_true",
                    help="also write beam_search_op.onnx: the whole beam search as one ONNX Runtime BeamSearch op "
                         "(invemb.export.beam_graph; transformer decoders)")
    ap.add_argument("--triton-encoder", choices=TRITON_ENCODERS, default="int8",
                    help="encoder graph placed in --triton-repo: int8 (default, CPU serving: smoothed int8 with "
                         "fixed activation ranges, serving/README.md) or fp32 (vectors == torch within 1e-5; GPU)")
    args = ap.parse_args(argv)
    try:
        if args.checkpoint is None:
            from invemb.shipped import default_model_path
            args.checkpoint = str(default_model_path())
        with quiet_exporter():
            manifest = export_checkpoint(args.checkpoint, args.out, args.opset, args.triton_repo, args.one_call,
                                         args.encoder_exporter, args.triton_encoder)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = ", ".join([g["file"] for g in manifest["graphs"].values()]
                      + ([manifest["one_call"]["file"]] if "one_call" in manifest else []))
    print(f"exported {manifest['decoder_kind']} model to {args.out}: {files}, manifest.json, tokenizer/"
          + (f"; placed in {args.triton_repo} ({args.triton_encoder} encoder)" if args.triton_repo else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
