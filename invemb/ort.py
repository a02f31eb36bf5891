"""ONNX Runtime backend: `OnnxEmbedder` (text <-> vector from an export folder made by export/to_onnx.py, reading
only manifest.json, the graphs and tokenizer/); its decoder Stepper is the shared invemb.graph_stepper.GraphStepper.

    emb = OnnxEmbedder("onnx/small")            # or OnnxEmbedder("onnx/small", variant="int8")
    vecs = emb.encode(["Oil prices fall as OPEC output rises"])   # float32 [1,S]
    emb.decode(vecs, beam_size=4)                                 # same texts as InvertibleEmbedder.decode

No torch here; onnxruntime and transformers (tokenizer) are imported lazily.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from invemb.errors import InvembError
from invemb.generation import GenerationConfig, generate

MANIFEST_VERSION = 1
DEFAULT_THREADS = 2


def read_manifest(export_dir: str | os.PathLike) -> dict:
    """manifest.json of an export folder; InvembError when absent, unreadable or of another format version."""
    path = Path(export_dir) / "manifest.json"
    if not path.is_file():
        raise InvembError(f"{export_dir} is not an invemb ONNX export (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvembError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != MANIFEST_VERSION:
        raise InvembError(f"{path}: unsupported manifest (format_version {MANIFEST_VERSION} expected)")
    return manifest


def session_options(threads: int | None = None):
    """ORT session options: intra-op threads (default $INVEMB_ORT_THREADS or 2), one inter-op thread."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or os.environ.get("INVEMB_ORT_THREADS", DEFAULT_THREADS))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    return opts


def make_session(path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None):
    import onnxruntime as ort
    path = Path(path)
    if not path.is_file():
        raise InvembError(f"ONNX graph {path} does not exist")
    try:
        return ort.InferenceSession(str(path), session_options(threads),
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise InvembError(f"cannot load ONNX graph {path}: {str(e).splitlines()[0][:300]}") from None


def cache_feed_name(output_name: str, step_inputs: Sequence[str]) -> str | None:
    """The decoder_step input an init/step output feeds: present_X -> past_X (or X); cross_*/context keep names."""
    if output_name in step_inputs:
        return output_name
    if output_name.startswith("present_"):
        base = output_name[len("present_"):]
        for cand in (f"past_{base}", base):
            if cand in step_inputs:
                return cand
    return None


class OnnxEmbedder:
    """Text <-> vector with ONNX Runtime from an export folder; same tokenization, search and detokenization as
    InvertibleEmbedder (so the texts are identical to the torch model's up to fp32 rounding)."""

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] | None = None, variant: str | None = None):
        from transformers import AutoTokenizer
        self.dir = Path(export_dir)
        self.manifest = m = read_manifest(self.dir)
        self.sentence_dim, self.max_length = int(m["sentence_dim"]), int(m["max_length"])
        ids = m["special_ids"]
        self.bos_id, self.eos_id, self.pad_id = int(ids["bos"]), int(ids["eos"]), int(ids["pad"])
        files = {name: g["file"] for name, g in m["graphs"].items()}
        if variant:
            if variant not in m.get("variants", {}):
                raise InvembError(f"{self.dir} has no {variant!r} variant (known: {sorted(m.get('variants', {}))}; "
                                  f"make one with export/optimize.py)")
            files.update(m["variants"][variant]["files"])
        self.files = files
        self.sessions = {name: make_session(self.dir / f, threads, providers) for name, f in files.items()}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir / m["tokenizer_dir"]))
        except (OSError, ValueError) as e:
            raise InvembError(f"cannot load the tokenizer of {self.dir}: {str(e).splitlines()[0]}") from None

    # ----------------------------------------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        from invemb.text import tokenize_texts
        return tokenize_texts(self.tokenizer, texts, self.max_length, return_tensors="np")

    def detokenize(self, ids: Sequence[Sequence[int]]) -> list[str]:
        from invemb.text import detokenize_ids
        return detokenize_ids(self.tokenizer, ids)

    def encode(self, texts: Sequence[str] | str, batch_size: int = 64) -> np.ndarray:
        """Texts -> float32 [B,S]."""
        from invemb.text import clean_texts, length_sorted_batches
        texts = clean_texts(texts)  # an empty text is an error naming its position in `texts`, not in a batch
        out = np.zeros((len(texts), self.sentence_dim), np.float32)
        for rows in length_sorted_batches(texts, batch_size):  # similar lengths together; order restored
            out[rows] = self.sessions["encoder"].run(["sentence_embedding"],
                                                     self.tokenize([texts[r] for r in rows]))[0]
        return out

    # ----------------------------------------------------------------------------------------------- vectors
    def check_vectors(self, vectors) -> np.ndarray:
        from invemb.text import check_vectors
        return check_vectors(vectors, self.sentence_dim)

    def generation_config(self, beam_size: int = 4, max_length: int | None = None, **kw) -> GenerationConfig:
        return GenerationConfig(beam_size=beam_size, eos_id=self.eos_id,
                                max_length=max_length or self.max_length - 1, **kw)

    def run_graph(self, graph: str, feeds: dict, output_names: list) -> dict:
        """GraphStepper runner: one exported graph run by ONNX Runtime."""
        return dict(zip(output_names, self.sessions[graph].run(output_names, feeds)))

    def stepper(self, vectors: np.ndarray):
        """The Stepper over decoder_init/decoder_step: the same GraphStepper Triton BLS and the gRPC client use."""
        from invemb.graph_stepper import GraphStepper
        return GraphStepper(self.run_graph, self.manifest, vectors)

    def decode_ids(self, vectors, beam_size: int = 4, max_length: int | None = None, **kw) -> list[list[int]]:
        v = self.check_vectors(vectors)
        cfg = self.generation_config(beam_size, max_length, **kw)
        if "decoder_onepass" in self.sessions:  # all positions at once, cut at the first EOS
            t = self.max_length - 1
            if cfg.max_length != t:
                raise InvembError(f"the one-pass graph decodes exactly {t} positions (max_length={cfg.max_length})")
            ids = self.sessions["decoder_onepass"].run(["logits"], {"sentence_embedding": v})[0].argmax(-1).tolist()
            return [row[:row.index(self.eos_id)] if self.eos_id in row else row for row in ids]
        return [h.tokens for h in generate(self.stepper(v), cfg)]

    def decode(self, vectors, beam_size: int = 4, max_length: int | None = None, batch_size: int = 64,
               **kw) -> list[str]:
        """Vectors [N,S] -> texts. beam_size=1 is greedy. kw: length_penalty, no_repeat_ngram_size."""
        v = self.check_vectors(vectors)
        ids: list[list[int]] = []
        for i in range(0, len(v), batch_size):
            ids.extend(self.decode_ids(v[i:i + batch_size], beam_size, max_length, **kw))
        return self.detokenize(ids)
