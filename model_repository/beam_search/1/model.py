"""Triton python model `beam_search` (BLS): sentence_embedding [batch, S] -> text (BYTES), score [batch, 1].

Instead of vectors a request may send `source_text` (BYTES [batch, 1]): the texts are tokenized and encoded here with
the `encoder` graph (the file the `encoder` model serves, run by this instance's runner) and then decoded. The
`roundtrip` ensemble is that one step instead of three hops through Python stubs (tokenizer -> encoder ->
beam_search); results/bench_serving_encoder.md, 2-core EPYC, concurrency 1/4/16, Triton vs in-process: three hops
93% / 102% / 135%, one hop 96% / 108% / 142% (consecutive runs: a small gain, near the noise).

Runs the core's ONE search, `invemb.generation.generate`, with an `invemb.graph_stepper.GraphStepper` whose
start/step run the `decoder_init` / `decoder_step` graphs, then the core's detokenization
(`invemb.text.detokenize_ids`): output `normalized_text`. Output `text` is the text as written when the export has
surface heads (surface.json here; one run of the `decoder_surface` graph per search, by the same runner: the core's
EmbedderBase.texts), else the normalised text too. Parameter `decoder_runner`:
  onnxruntime (default) - this model instance holds its own ONNX Runtime sessions of the two graphs (the files
      Triton serves as the decoder_init / decoder_step models), so the KV cache and the [N, V] log-probs of every
      step never leave the process (no per-step round trip through the server);
  bls - one `pb_utils.InferenceRequest(...).exec()` per step to the decoder models (what a deployment wants when
      those models run elsewhere, e.g. on a GPU instance group, while the search runs on CPU).
Optional inputs, one value per request: `beam_size` and `max_length` (int32; defaults: parameter `default_beam_size`,
the manifest's generation max length), `rerank` (bool: true re-ranks every candidate, false none) and `rerank_margin`
(fp32 >= 0: re-rank the candidates scored within it of the best; wins over `rerank`); default: parameter
`default_rerank` (auto = the core's RERANK_MARGIN, all, off, or a margin). Re-ranking re-encodes the beam's n-best
with the `encoder` graph and keeps the one closest to the vector (the core's EmbedderBase.roundtrip_choice, through
invemb.graph_stepper.GraphEmbedder).
Requests the dynamic batcher hands over together with the same settings share one search. Parameter
`search_workers` (default 2, onnxruntime runner): that search's rows are decoded in up to that many slices at once,
in threads of this instance (the core's invemb.generation.split_search; same texts): a lone request uses both cores
of the box instead of one (1-thread decoder runs are too small for intra-op threads to help). Each slice holds one
of the box's cores, lock files shared by every search of the server (invemb.serving.triton_utils.CoreSlots): a
search splits only over cores no other search holds, and not at all within CONTENTION_MEMORY_S of finding one held
(under load, one slice per search is the faster use of the cores). results/bench_serving_roundtrip.md, 2-core
EPYC, Triton roundtrip / in-process (1 thread) at concurrency 1/4/16: 122% / 108% / 154% (1 worker: 91/109/154%).
Assets beside this file (written by export/to_onnx.py --triton-repo): manifest.json and tokenizer/.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# invemb: the installed package of the venv whose python3 runs the stub (serving/README.md)
from invemb.serving.triton_utils import CoreSlots, decode_texts, invalid_arg, load_model_assets, model_param


CONTENTION_MEMORY_S = 3.0  # after another search held a core, this long without splitting (see _search)


def bls_run(graph: str, feeds: dict, output_names: list) -> dict:
    """Runner for GraphStepper: one BLS call to the Triton model `graph`; outputs as numpy (CPU memory)."""
    kw = {}
    if hasattr(pb_utils, "PreferredMemory"):  # outputs in CPU memory even when the decoder runs on a GPU
        kw["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
    request = pb_utils.InferenceRequest(model_name=graph, requested_output_names=list(output_names),
                                        inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()],
                                        **kw)
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{graph}: {response.error().message()}")
    return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in output_names}


def session_runner(repository: Path, threads: int):
    """Runner for GraphStepper: ONNX Runtime sessions of the decoder graphs placed in the repository
    (<repository>/<graph>/<newest version>/model.onnx), held by this model instance."""
    import threading

    from invemb.ort import make_session
    lock = threading.Lock()  # search workers share the sessions (ORT's run is thread-safe); loading is not

    def load(graph: str):
        versions = sorted((int(p.name) for p in (repository / graph).iterdir() if p.name.isdigit()
                           and (p / "model.onnx").is_file()), reverse=True) if (repository / graph).is_dir() else []
        if not versions:
            raise RuntimeError(f"decoder_runner onnxruntime: no {repository / graph}/<version>/model.onnx "
                               "(export/to_onnx.py --triton-repo places it)")
        return make_session(repository / graph / str(versions[0]) / "model.onnx", threads)
    sessions = {graph: load(graph) for graph in ("decoder_init", "decoder_step")}

    def run(graph: str, feeds: dict, output_names: list) -> dict:
        if graph not in sessions:  # the encoder: loaded on the first encode / re-ranking request
            with lock:
                if graph not in sessions:
                    sessions[graph] = load(graph)
        return dict(zip(output_names, sessions[graph].run(list(output_names), feeds)))
    return run


class TritonPythonModel:
    def initialize(self, args):
        import logging

        from invemb.manifest import cache_plan
        config, self.manifest, self.tokenizer = load_model_assets(args)
        self.max_chars = int(model_param(config, "max_text_chars", 2000))
        logging.getLogger("invemb").setLevel(logging.ERROR)  # truncation warnings would flood the server log
        cache_plan(self.manifest)  # fails now (clear message) if the export has no decoder_init/decoder_step
        self.default_beam = int(model_param(config, "default_beam_size", 4))
        self.max_beam = int(model_param(config, "max_beam_size", 8))
        from invemb.embedder import rerank_margin
        given = model_param(config, "default_rerank", "auto").strip().lower()
        given = {"true": "all", "1": "all", "yes": "all", "false": "off", "0": "off", "no": "off"}.get(given, given)
        try:
            self.default_margin = rerank_margin(given if given in ("auto", "all", "off") else float(given))
        except ValueError:
            raise ValueError(f"parameter default_rerank must be auto, all, off or a margin >= 0, got {given!r}") \
                from None
        self.runner_kind = model_param(config, "decoder_runner", "onnxruntime")
        workers = model_param(config, "search_workers", "2")
        if not workers.isdigit() or int(workers) < 1:
            raise ValueError(f"parameter search_workers must be an integer >= 1, got {workers!r}")
        if self.runner_kind == "onnxruntime":
            threads = int(model_param(config, "intra_op_thread_count", 1))
            self.run_graph = session_runner(Path(args["model_repository"]).parent, threads)
        elif self.runner_kind == "bls":
            self.run_graph = bls_run
        else:
            raise ValueError(f"parameter decoder_runner must be onnxruntime or bls, got {self.runner_kind!r}")
        from invemb.graph_stepper import GraphEmbedder
        # encodes source_text and re-ranks (the encoder graph through run_graph); holds no per-request state
        from invemb.manifest import load_export_surface
        # surface.json beside the manifest (a model with surface heads): `text` as written, after the search one
        # decoder_surface run per group (that graph through run_graph); `normalized_text` the normalised form
        table = load_export_surface(Path(args["model_repository"]) / args["model_version"], self.manifest)
        self.embedder = GraphEmbedder(self.run_graph, self.manifest, self.tokenizer, surface_table=table)
        # BLS: one worker (the decoder models parallelise in their own instances)
        self.embedder.set_search_workers(int(workers) if self.runner_kind == "onnxruntime" else 1)
        self.cores = None
        if self.runner_kind == "onnxruntime":  # the box's cores, one lock file each, shared by every search of the
            import hashlib                      # server (the stubs are children of tritonserver)
            import os
            import tempfile
            repository = Path(args["model_repository"]).parent
            key = hashlib.sha1(f"{os.getppid()}:{repository}".encode()).hexdigest()[:16]
            self.cores = CoreSlots(Path(tempfile.gettempdir()) / f"invemb-cores-{key}", os.cpu_count() or 1)
        self.last_contention = float("-inf")  # when a search of this instance last found a core held by another

    def finalize(self):
        self.embedder.set_search_workers(1)  # stops the worker threads
        if self.cores is not None:
            self.cores.close(remove=True)

    def _search(self, search, vectors: np.ndarray, cfg):
        """search(vectors, cfg, workers): split over free cores (at most search_workers) when no other search has
        held a core for CONTENTION_MEMORY_S, else one slice. Why the memory: under load an instance that finds the
        other idle for a moment would take both cores, and the other's next search then runs beside its two
        slices (3 threads on 2 cores: at concurrency 4, 89% of in-process where 1 slice each gave 109%)."""
        import time
        if self.cores is None:
            return search(vectors, cfg, 1)
        now = time.monotonic()
        taken = self.cores.take(len(self.cores.fds))  # every free core: tells whether another search holds one
        if len(taken) < len(self.cores.fds):
            self.last_contention = now
        keep = self.embedder.search_workers if now - self.last_contention > CONTENTION_MEMORY_S else 1
        keep = min(keep, len(vectors))  # a one-row search holds one core, not two
        self.cores.release(taken[keep:])
        try:
            return search(vectors, cfg, max(1, min(keep, len(taken))))
        finally:
            self.cores.release(taken[:keep])

    def _settings(self, request) -> tuple[np.ndarray | list[str], int, int | None, float]:
        """Validated (vectors [B,S] or cleaned texts, beam_size, max_length, rerank margin) of one request; InvembError
        when bad. Texts are encoded later, one encoder call per group of requests (execute)."""
        from invemb.errors import InvembError
        from invemb.manifest import check_vectors, generation_config
        from invemb.text import clean_texts
        given = {n: pb_utils.get_input_tensor_by_name(request, n) for n in ("sentence_embedding", "source_text")}
        given = {n: t for n, t in given.items() if t is not None}
        if len(given) != 1:
            raise InvembError("send either sentence_embedding or source_text, got "
                              f"{' and '.join(given) or 'neither'}")
        if "source_text" in given:  # an empty text is this request's error, naming its row
            vectors = clean_texts(decode_texts(given["source_text"].as_numpy(), self.max_chars))
        else:
            vectors = check_vectors(self.manifest, given["sentence_embedding"].as_numpy())

        def scalar(name: str, kind=int):
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                return None
            values = np.unique(t.as_numpy())
            if values.size != 1:
                raise InvembError(f"{name} must hold one value per request, got {values.tolist()[:5]}")
            return kind(values[0])

        beam = scalar("beam_size")
        beam = self.default_beam if beam is None else beam
        if not 1 <= beam <= self.max_beam:
            raise InvembError(f"beam_size must be in [1, {self.max_beam}], got {beam}")
        max_length = scalar("max_length")
        generation_config(self.manifest, beam, max_length)  # validates max_length
        rerank, margin = scalar("rerank"), scalar("rerank_margin", float)
        if margin is not None and not margin >= 0:  # NaN too
            raise InvembError(f"rerank_margin must be >= 0, got {margin}")
        if margin is None:
            margin = self.default_margin if rerank is None else float("inf") if rerank else 0.0
        return vectors, beam, max_length, margin

    def execute(self, requests):
        from invemb.errors import InvembError
        from invemb.manifest import generation_config
        from invemb.text import detokenize_ids
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, np.ndarray | list[str]]]] = {}
        for r, request in enumerate(requests):
            try:
                vectors, beam, max_length, margin = self._settings(request)
                groups.setdefault((beam, max_length, margin if beam > 1 else 0.0), []).append((r, vectors))
            except InvembError as e:
                responses[r] = pb_utils.InferenceResponse(error=invalid_arg(f"beam_search: {e}"))
            except Exception as e:  # noqa: BLE001
                responses[r] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"beam_search: {type(e).__name__}: {str(e)[:300]}"))
        for (beam, max_length, margin), members in groups.items():
            try:
                texts = [t for _, v in members if isinstance(v, list) for t in v]  # every source_text row
                encoded = self.embedder.encode(texts) if texts else None  # [T,S], one call for the group
                parts, k = [], 0
                for _, v in members:
                    if isinstance(v, list):
                        parts.append(encoded[k:k + len(v)])
                        k += len(v)
                    else:
                        parts.append(v)
                vectors = np.concatenate(parts)  # [sum B, S]
                if margin > 0:  # the n-best, re-ranked by re-encoding (the core's choice, the encoder graph here)
                    cfg = generation_config(self.manifest, beam, max_length, num_return=beam)
                    nbest = self._search(self.embedder.nbest_search, vectors, cfg)
                    hyps = [h[i] for h, i in zip(nbest, self.embedder.roundtrip_choice(vectors, nbest, margin))]
                else:  # the core's search, its rows split over the free cores
                    hyps = self._search(self.embedder.search, vectors,
                                        generation_config(self.manifest, beam, max_length))
                ids = [h.tokens for h in hyps]
                normalized = detokenize_ids(self.tokenizer, ids)
                asked = [set(requests[r].requested_output_names()) if hasattr(requests[r], "requested_output_names")
                         else {"text"} for r, _ in members]
                texts = self.embedder.texts(vectors, ids) if any("text" in a for a in asked) else normalized
                start = 0
                for r, v in members:
                    rows = slice(start, start + len(v))
                    start += len(v)
                    text = np.array([t.encode("utf-8") for t in texts[rows]], dtype=np.object_).reshape(-1, 1)
                    norm = np.array([t.encode("utf-8") for t in normalized[rows]], dtype=np.object_).reshape(-1, 1)
                    score = np.array([h.score for h in hyps[rows]], dtype=np.float32).reshape(-1, 1)
                    responses[r] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor("text", text), pb_utils.Tensor("score", score),
                                        pb_utils.Tensor("normalized_text", norm)])
            except Exception as e:  # noqa: BLE001 - e.g. a decoder model failed: every request of the group
                msg = f"beam_search: {type(e).__name__}: {str(e)[:500]}"
                for r, _ in members:
                    responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))
        return responses
