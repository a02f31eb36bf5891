"""ONNX Runtime backend: `OnnxEmbedder` (text <-> vector from an export folder made by export/to_onnx.py, reading
only manifest.json, the graphs and tokenizer/); its decoder Stepper is the shared invemb.graph_stepper.GraphStepper,
its text/vector surface invemb.embedder.EmbedderBase (the torch model's).

    emb = OnnxEmbedder("onnx/small")            # or OnnxEmbedder("onnx/small", variant="int8")
    vecs = emb.encode(["Oil prices fall as OPEC output rises"])   # float32 [1,S]
    emb.decode(vecs, beam_size=4)                                 # same texts as InvertibleEmbedder.decode
    emb.decode(vecs, normalized=True)                             # lower-cased WordPiece text (surface models)
    OnnxEmbedder("onnx/small", threads=1, search_workers=2)        # 2 cores for small decode batches

No torch here; onnxruntime and transformers (tokenizer) are imported lazily.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from invemb.embedder import EmbedderBase
from invemb.errors import InvembError
from invemb.generation import GenerationConfig
from invemb.manifest import graph_files, load_export_surface, read_manifest

DEFAULT_THREADS = 2
# ORT's CPU SkipLayerNormalization kernel (onnxruntime 1.32) is ~8x slower than the Add + LayerNormalization it
# replaces (2.68 vs 0.34 ms at [64,25,384], 1 thread; 1.34 vs 0.17 ms on 2), so on the CPU provider the session
# does not fuse them (SkipLayerNormFusion re-fused one per graph at load) and optimize_encoder never writes one.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def disabled_optimizers(providers: Sequence) -> list[str]:
    """ORT graph transformers to skip for these providers: CPU_DISABLED_OPTIMIZERS when only the CPU runs the
    graph (a GPU provider has fast fused kernels and keeps them)."""
    names = [p if isinstance(p, str) else p[0] for p in providers]
    return list(CPU_DISABLED_OPTIMIZERS) if names == ["CPUExecutionProvider"] else []


def session_options(threads: int | None = None):
    """ORT session options: intra-op threads (default $INVEMB_ORT_THREADS or 2), one inter-op thread; with
    $INVEMB_ORT_PROFILE=DIR each session writes its profile under DIR."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or os.environ.get("INVEMB_ORT_THREADS", DEFAULT_THREADS))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    profile = os.environ.get("INVEMB_ORT_PROFILE")  # a folder, e.g. runs/profile (bench_export.py --profile)
    if profile:  # ORT's per-node timings, one JSON per session, there (never in the working directory)
        Path(profile).mkdir(parents=True, exist_ok=True)
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(profile) / "onnxruntime_profile")
    return opts


def make_session(path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None):
    import onnxruntime as ort
    path = Path(path)
    if not path.is_file():
        raise InvembError(f"ONNX graph {path} does not exist")
    try:
        providers = list(providers or ["CPUExecutionProvider"])
        return ort.InferenceSession(str(path), session_options(threads), providers=providers,
                                    disabled_optimizers=disabled_optimizers(providers))
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise InvembError(f"cannot load ONNX graph {path}: {str(e).splitlines()[0][:300]}") from None


class OnnxEmbedder(EmbedderBase):
    """Text <-> vector with ONNX Runtime from an export folder; same tokenization, search and detokenization as
    InvertibleEmbedder (so the texts are identical to the torch model's up to fp32 rounding)."""

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] | None = None, variant: str | None = None, search_workers: int = 1):
        from transformers import AutoTokenizer
        self.dir = Path(export_dir)
        self.manifest = m = read_manifest(self.dir)
        self.sentence_dim, self.max_length = int(m["sentence_dim"]), int(m["max_length"])
        ids = m["special_ids"]
        self.bos_id, self.eos_id, self.pad_id = int(ids["bos"]), int(ids["eos"]), int(ids["pad"])
        self.files = graph_files(m, variant, self.dir, hint="; make one with export/optimize.py")
        self.sessions = {name: make_session(self.dir / f, threads, providers) for name, f in self.files.items()}
        self.one_pass = "decoder_onepass" in self.sessions
        self.candidates = True  # searches fetch the graphs' top-k outputs, not [N, V] log_probs (same texts)
        # row slices decoded at once, threads sharing the sessions (ORT's run is thread-safe and releases the GIL);
        # at serving sizes 2 workers x 1 intra-op thread beat 1 x 2 threads (invemb.generation.split_search)
        self.set_search_workers(search_workers)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir / m["tokenizer_dir"]))
        except (OSError, ValueError) as e:
            raise InvembError(f"cannot load the tokenizer of {self.dir}: {str(e).splitlines()[0]}") from None
        # an export with surface heads: decode returns text as written (decoder_surface graph + surface.json)
        self.surface_table = load_export_surface(self.dir, m)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        from invemb.text import tokenize_texts
        return tokenize_texts(self.tokenizer, texts, self.max_length, return_tensors="np")

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        return self.sessions["encoder"].run(["sentence_embedding"], self.tokenize(texts))[0]  # [b,S]

    def run_graph(self, graph: str, feeds: dict, output_names: list) -> dict:
        """GraphStepper runner: one exported graph run by ONNX Runtime."""
        return dict(zip(output_names, self.sessions[graph].run(output_names, feeds)))

    def stepper(self, vectors: np.ndarray):
        """The Stepper over decoder_init/decoder_step: the same GraphStepper Triton BLS and the gRPC client use."""
        from invemb.graph_stepper import GraphStepper
        return GraphStepper(self.run_graph, self.manifest, vectors, self.candidates)

    _stepper = stepper

    def _surface_tags(self, vectors: np.ndarray, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        from invemb.graph_stepper import surface_tags
        return surface_tags(self.run_graph, self.manifest, vectors, ids)  # one decoder_surface run

    def _onepass_ids(self, vectors: np.ndarray, cfg: GenerationConfig) -> list[list[int]]:
        t = self.max_length - 1
        if cfg.max_length != t:
            raise InvembError(f"the one-pass graph decodes exactly {t} positions (max_length={cfg.max_length})")
        logits = self.sessions["decoder_onepass"].run(["logits"], {"sentence_embedding": vectors})[0]  # [N,T,V]
        return logits.argmax(-1).tolist()
