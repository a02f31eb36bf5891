"""gRPC client for the invemb Triton models: encode texts -> .npy, decode .npy -> texts, roundtrip texts.

    python serving/client.py --url 127.0.0.1:8001 encode headlines.txt --out vecs.npy
    python serving/client.py decode vecs.npy --out texts.txt                       # server-side beam_search
    python serving/client.py decode vecs.npy --mode client --export onnx/small      # beam search here
    python serving/client.py decode vecs.npy --normalized     # lower-cased WordPiece text, not as written
    python serving/client.py roundtrip headlines.txt [--mode client --export onnx/small]

Server-side decoding calls the `beam_search` model (BLS); client-side decoding runs the core's beam search
(invemb.generation.generate) here with `grpc_stepper`, whose start/step call `decoder_init`/`decoder_step` over
gRPC; both give the same texts. Requests run asynchronously with a bounded number in flight, a per-request
timeout, and retries with exponential backoff on UNAVAILABLE and on the two transient answers of a model whose
process crashed or stalled and the server is being restarted by its supervisor (invemb.serving.supervise), over
a time budget (retry_budget, default RETRY_BUDGET_S). A rejected request raises ClientError carrying the server's
message, its rows rewritten into the caller's (a file's lines: label). The CLI is invemb.serving.client_cli.
"""
from __future__ import annotations

import queue
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from invemb.embedder import rerank_margin
from invemb.errors import InvembError
from invemb.limits import MAX_BATCH_SIZE, MAX_TEXT_CHARS, MAX_VECTOR_ABS
from invemb.serving.checks import problems_message, relabel, text_problems, vector_problems
from invemb.text import length_sorted_batches

# default seconds a request keeps retrying transient answers: spans a restart of the whole repository with room
# (seconds on an idle 2-core box, minutes beside a training run that has the cores: results/load_serving.md)
RETRY_BUDGET_S = 300.0
# (status, message part) of transient answers: the server is down or restarting (UNAVAILABLE: connection refused /
# reset, stream removed), a model process crashed or stalled and the supervisor has not restarted the server yet
# (INTERNAL "Stub process ... is not healthy"), a model not loaded yet (NOT_FOUND "... has no available versions"),
# and an ensemble whose INNER step lost an input while the server died (measured during a server kill, 2.51:
# "in ensemble 'encode', ... expected 2 inputs but got 1 inputs for model 'encoder'"): the user cannot cause that
# one, since a request that lacks an input of the ensemble itself is refused without the "in ensemble" prefix
TRANSIENT = (("UNAVAILABLE", ""), ("INTERNAL", "is not healthy"), ("NOT_FOUND", "has no available versions"),
             ("INTERNAL", "RST_STREAM"), ("CANCELLED", ""))
ENSEMBLE_STEP_LOST = re.compile(r"^in ensemble '[^']+', .*expected \d+ inputs but got \d+ inputs for model '[^']+'")
RELOADING = TRANSIENT[1:3]  # the earlier name of the model-process answers (scripts/load_serving.py)
NP_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
                np.dtype(np.object_): "BYTES", np.dtype(np.bool_): "BOOL"}


class ClientError(InvembError):
    """A request failed: the server's status and message, or an unreachable server."""


def text_tensor(texts: Sequence[str | bytes]) -> np.ndarray:
    """Texts -> BYTES [B,1] (str encoded as UTF-8; bytes sent as they are)."""
    return np.array([[t.encode("utf-8") if isinstance(t, str) else bytes(t)] for t in texts], dtype=np.object_)


def unsort(rows: list[np.ndarray], parts: list[np.ndarray]) -> np.ndarray:
    """Results of requests made from `rows` (index batches of length_sorted_batches) -> one array in input order."""
    order = np.concatenate(rows)
    out = np.empty((len(order),) + parts[0].shape[1:], dtype=parts[0].dtype)
    out[order] = np.concatenate(parts)
    return out


def _first_line(text) -> str:
    return (str(text or "").strip().splitlines() or [""])[0][:400]


class TritonClient:
    """A gRPC connection to the invemb model repository (see serving/README.md for the models).

    Transient answers (TRANSIENT) are retried with exponential backoff (backoff, doubling, at most max_backoff s
    apart) for up to `retry_budget` seconds from a request's first transient answer (and at most `retries` times
    when given); then one ClientError line says what happened. Requests are split to the server's limits (the
    max_batch_size, max_beam_size and max_text_chars of its model configs, read once)."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout: float = 120.0, retries: int | None = None,
                 backoff: float = 0.25, ready_timeout: float = 0.0, retry_budget: float = RETRY_BUDGET_S,
                 max_backoff: float = 4.0):
        import tritonclient.grpc as grpcclient
        self.grpc = grpcclient
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.retry_budget, self.max_backoff = retry_budget, max_backoff
        self.client = grpcclient.InferenceServerClient(url)
        self._configs: dict[str, dict] = {}
        if ready_timeout:
            self.wait_ready(ready_timeout)

    # ----------------------------------------------------------------------------------------------- plumbing
    def wait_ready(self, timeout: float = 30.0, models: Sequence[str] = ()) -> None:
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            try:
                if self.client.is_server_ready() and all(self.client.is_model_ready(m) for m in models):
                    return
                last = "server or models not ready"
            except Exception as e:  # noqa: BLE001 - connection refused while starting
                last = _first_line(e)
            time.sleep(0.5)
        raise ClientError(f"Triton at {self.url} is not ready after {timeout:.0f} s ({last})")

    def _inputs(self, feeds: dict[str, np.ndarray]):
        out = []
        for name, a in feeds.items():
            a = np.ascontiguousarray(a)
            t = self.grpc.InferInput(name, list(a.shape), NP_TO_TRITON.get(a.dtype, "FP32"))
            t.set_data_from_numpy(a)
            out.append(t)
        return out

    @staticmethod
    def _status(error) -> str:
        return str(error.status() or "").replace("StatusCode.", "") or "error"

    def _error(self, model: str, error, rows=None, label=None) -> ClientError:
        message = _first_line(error.message())
        if rows is not None and label is not None:
            message = relabel(message, rows, label)
        return ClientError(f"{model}: {self._status(error)}: {message}")

    def _gave_up(self, model: str, error, attempts: int, seconds: float) -> ClientError:
        return ClientError(f"{model}: {self._status(error)}: {_first_line(error.message())} -- still failing after "
                           f"{seconds:.0f} s and {attempts} retries (retry budget {self.retry_budget:g} s): the "
                           f"server at {self.url} is down or restarting for longer than that; its log says why")

    @staticmethod
    def _transient(error) -> bool:
        status, message = str(error.status() or ""), str(error.message() or "")
        if "INVALID_ARGUMENT" in status and ENSEMBLE_STEP_LOST.match(message):
            return True
        return any(code in status and part in message for code, part in TRANSIENT)

    def _retry_in(self, attempts: int, first_failure: float) -> float | None:
        """Seconds to wait before retry number attempts + 1, or None when the budget / retries are spent."""
        wait = min(self.max_backoff, self.backoff * 2 ** attempts)
        if self.retries is not None and attempts >= self.retries:
            return None
        return wait if time.monotonic() + wait - first_failure <= self.retry_budget else None

    def _call(self, model: str, fn):
        """fn() retried on transient answers within the budget."""
        from tritonclient.utils import InferenceServerException
        attempts, first = 0, None
        while True:
            try:
                return fn()
            except InferenceServerException as e:
                if not self._transient(e):
                    raise self._error(model, e) from None
                first = first if first is not None else time.monotonic()
                wait = self._retry_in(attempts, first)
                if wait is None:
                    raise self._gave_up(model, e, attempts, time.monotonic() - first) from None
                time.sleep(wait)
                attempts += 1

    def infer(self, model: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One synchronous request (retried on transient answers) -> {output name: array}."""
        def once():
            result = self.client.infer(model, self._inputs(feeds), client_timeout=self.timeout,
                                       outputs=[self.grpc.InferRequestedOutput(n) for n in outputs])
            return {n: result.as_numpy(n) for n in outputs}
        return self._call(model, once)

    def infer_many(self, model: str, requests: Sequence[dict[str, np.ndarray]], outputs: Sequence[str],
                   max_in_flight: int = 4, progress: bool = False, desc: str = "", rows=None,
                   label=None) -> list[dict[str, np.ndarray]]:
        """Asynchronous requests, at most `max_in_flight` at a time; results in request order. rows[i]: the user's
        indices of request i's rows and label(indices) their words, so that a rejected request's error names
        the user's lines (invemb.serving.checks.relabel) instead of the request's rows."""
        import heapq

        from tqdm.auto import tqdm
        done: queue.Queue = queue.Queue()
        results: list = [None] * len(requests)
        attempts, first = [0] * len(requests), [0.0] * len(requests)
        pending, waiting, in_flight = deque(range(len(requests))), [], 0  # waiting: heap of (retry time, i)
        requested = [self.grpc.InferRequestedOutput(n) for n in outputs]
        quiet_limit = self.timeout + 30  # no answer at all for this long: the connection is gone

        def submit(i: int) -> None:
            def callback(result=None, error=None):  # tritonclient calls it with keyword arguments
                done.put((i, result, error))
            self.client.async_infer(model, self._inputs(requests[i]), callback, outputs=requested,
                                    client_timeout=self.timeout)

        def fail(err: ClientError, in_flight: int) -> ClientError:
            while in_flight:  # let the others finish before raising (no callbacks into a dead loop)
                done.get(timeout=quiet_limit)
                in_flight -= 1
            return err

        last_answer = time.monotonic()
        with tqdm(total=len(requests), disable=not progress, desc=desc or model, unit="req") as bar:
            while pending or waiting or in_flight:
                now = time.monotonic()
                while waiting and waiting[0][0] <= now:
                    pending.append(heapq.heappop(waiting)[1])
                while pending and in_flight < max(1, max_in_flight):
                    submit(pending.popleft())
                    in_flight += 1
                if not in_flight:  # only retries waiting
                    time.sleep(max(0.0, waiting[0][0] - now))
                    continue
                try:
                    i, result, error = done.get(timeout=min(quiet_limit, max(0.01, waiting[0][0] - now))
                                                if waiting else quiet_limit)
                except queue.Empty:
                    if time.monotonic() - last_answer < quiet_limit:
                        continue
                    raise fail(ClientError(f"{model}: no answer from {self.url} within {quiet_limit:.0f} s"),
                               in_flight) from None
                in_flight, last_answer = in_flight - 1, time.monotonic()
                if error is not None:
                    if not self._transient(error):
                        raise fail(self._error(model, error, None if rows is None else rows[i], label), in_flight)
                    if not attempts[i]:
                        first[i] = last_answer
                    wait = self._retry_in(attempts[i], first[i] or last_answer)
                    if wait is None:
                        raise fail(self._gave_up(model, error, attempts[i], last_answer - first[i]), in_flight)
                    attempts[i] += 1
                    heapq.heappush(waiting, (last_answer + wait, i))
                    continue
                attempts[i] = 0
                results[i] = {n: result.as_numpy(n) for n in outputs}
                bar.update()
        return results

    # ----------------------------------------------------------------------------------------------- limits
    def config(self, model: str) -> dict:
        """The model's config as the server reports it (cached)."""
        if model not in self._configs:
            try:
                self._configs[model] = self._call(model, lambda: self.client.get_model_config(model, as_json=True))[
                    "config"]
            except ClientError as e:
                if "retry budget" in str(e):  # the server is down: say so
                    raise
                self._configs[model] = {}  # no such model on this server: no limits from it (its requests fail)
        return self._configs[model]

    def max_batch(self, model: str) -> int:
        return int(self.config(model).get("max_batch_size", 0)) or MAX_BATCH_SIZE

    def parameter(self, model: str, key: str, default: int) -> int:
        value = self.config(model).get("parameters", {}).get(key, {}).get("string_value", "")
        return int(value) if str(value).isdigit() else default

    def limits(self) -> dict[str, int]:
        """The server's limits the client keeps to (read from the model configs)."""
        return {"encode_batch": min(self.max_batch("encode"), self.max_batch("tokenizer")),
                "decode_batch": self.max_batch("beam_search"), "roundtrip_batch": self.max_batch("roundtrip"),
                "max_beam_size": self.parameter("beam_search", "max_beam_size", 8),
                "max_text_chars": self.parameter("tokenizer", "max_text_chars", MAX_TEXT_CHARS)}

    def check_texts(self, texts: Sequence[str], model: str = "tokenizer", label=None) -> None:
        """ClientError naming every text the server would refuse (nothing visible; over its max_text_chars)."""
        problems = text_problems(texts, self.parameter(model, "max_text_chars", MAX_TEXT_CHARS))
        if problems:
            raise ClientError(f"{problems_message(problems, label)}: nothing was sent")

    def check_vectors(self, vectors: np.ndarray, label=None) -> None:
        problems = vector_problems(vectors, MAX_VECTOR_ABS)
        if problems:
            raise ClientError(f"{problems_message(problems, label)}: nothing was sent")

    def run_graph(self, graph: str, feeds: dict, output_names: list) -> dict:
        """GraphStepper runner: one exported graph (decoder_init / decoder_step) served as a Triton model."""
        return self.infer(graph, feeds, output_names)

    # ----------------------------------------------------------------------------------------------- models
    def encode(self, texts: Sequence[str], batch_size: int = 32, max_in_flight: int = 4,
               progress: bool = False, label=None) -> np.ndarray:
        """Texts -> float32 [N,S] through the `encode` ensemble (tokenizer -> encoder). Requests hold texts of
        similar length (each pads to its own longest text), at most the server's max_batch_size; rows come back
        in the input order. label(indices): the caller's words for rows of `texts` in errors (e.g. file lines)."""
        if not len(texts):
            raise ClientError("no texts to encode")
        # bytes are sent as they are (invalid UTF-8 is the server's error, naming the row)
        self.check_texts([t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in texts], "tokenizer",
                         label)
        rows = length_sorted_batches(texts, min(batch_size, self.limits()["encode_batch"]))
        out = self.infer_many("encode", [{"text": text_tensor([texts[r] for r in b])} for b in rows],
                              ["sentence_embedding"], max_in_flight, progress, "encode", rows=rows, label=label)
        return unsort(rows, [o["sentence_embedding"] for o in out]).astype(np.float32)

    def decode(self, vectors: np.ndarray, beam_size: int = 4, max_length: int | None = None, batch_size: int = 16,
               max_in_flight: int = 4, progress: bool = False, mode: str = "server",
               manifest: dict | None = None, tokenizer=None, rerank=None, label=None,
               normalized: bool = False, surface_table: dict | None = None) -> list[str]:
        """Vectors [N,S] -> texts. mode "server": the `beam_search` model; "client": the core's beam search here
        over decoder_init/decoder_step (needs the export's manifest and tokenizer). rerank: the beam's n-best
        re-ranked by re-encoding them, as EmbedderBase.decode's rerank ("auto", "all" / True, "off" / False, a
        margin); None: the server's default_rerank (client mode: "auto"). Server mode: the `rerank` /
        `rerank_margin` inputs of beam_search; client mode: the search here, the candidates encoded by the
        server's `encoder` model. Texts are as written for a model with
        surface heads (server: output `text`; client mode: the served `decoder_surface` model, with the export's
        surface_table = invemb.manifest.load_export_surface(folder, manifest)); normalized=True: the lower-cased
        WordPiece text (output `normalized_text`)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ClientError(f"vectors must have shape [N, S] with N >= 1, got {list(vectors.shape)}")
        if mode not in ("server", "client"):
            raise ClientError(f"mode must be 'server' or 'client', got {mode!r}")
        if mode == "client" and (manifest is None or tokenizer is None):
            raise ClientError("client-side decoding needs the export's manifest and tokenizer (--export DIR)")
        self.check_vectors(vectors, label)
        if rerank is not None:
            try:
                margin = rerank_margin(rerank)
            except ValueError as e:
                raise ClientError(str(e)) from None
        top = self.limits()["max_beam_size"]
        if not 1 <= beam_size <= top:
            raise ClientError(f"beam size must be in [1, {top}] (the server's max_beam_size), got {beam_size}")
        starts = range(0, len(vectors), min(batch_size, self.limits()["decode_batch"]))
        rows = [np.arange(i, min(i + min(batch_size, self.limits()["decode_batch"]), len(vectors))) for i in starts]
        chunks = [vectors[r] for r in rows]  # [b,S] each
        if mode == "client":
            return self._decode_client(chunks, beam_size, max_length, max_in_flight, progress, manifest, tokenizer,
                                       rerank, normalized, surface_table)
        requests = []
        for c in chunks:
            feeds = {"sentence_embedding": c, "beam_size": np.full((len(c), 1), beam_size, np.int32)}
            if rerank is not None:  # else the server's default_rerank
                feeds["rerank_margin"] = np.full((len(c), 1), margin, np.float32)
            if max_length is not None:
                feeds["max_length"] = np.full((len(c), 1), max_length, np.int32)
            requests.append(feeds)
        name = "normalized_text" if normalized else "text"
        out = self.infer_many("beam_search", requests, [name], max_in_flight, progress, "decode", rows=rows,
                              label=label)
        return [t.decode("utf-8") for o in out for t in o[name].reshape(-1)]

    def _decode_client(self, chunks, beam_size, max_length, max_in_flight, progress, manifest, tokenizer,
                       rerank=None, normalized=False, surface_table=None):
        from tqdm.auto import tqdm

        from invemb.generation import generate
        from invemb.graph_stepper import GraphEmbedder
        from invemb.manifest import check_vectors, generation_config
        if manifest is None or tokenizer is None:
            raise ClientError("client-side decoding needs the export's manifest and tokenizer (--export DIR)")
        if "surface" in manifest and surface_table is None and not normalized:
            raise ClientError("client-side decoding of a model with surface heads needs the export's surface table "
                              "(surface.json of --export DIR), or normalized text (--normalized)")
        cfg = generation_config(manifest, beam_size, max_length)
        margin = rerank_margin("auto" if rerank is None else rerank)
        # texts of a chunk: as written through the served decoder_surface model (one call), or normalised
        emb = GraphEmbedder(self.run_graph, manifest, tokenizer, surface_table=surface_table)

        def one(chunk: np.ndarray) -> list[str]:
            chunk = check_vectors(manifest, chunk)
            if margin > 0 and beam_size > 1:  # the search here, candidates re-encoded by the server's encoder model
                ids = emb.rerank_ids(chunk, beam_size, max_length, margin=margin)
            else:
                ids = [h.tokens for h in generate(grpc_stepper(self, manifest, chunk), cfg)]
            return emb.texts(chunk, ids, normalized)

        with ThreadPoolExecutor(max(1, max_in_flight)) as pool:
            return [t for part in tqdm(pool.map(one, chunks), total=len(chunks), disable=not progress,
                                       desc="decode (client)", unit="req") for t in part]

    def roundtrip(self, texts: Sequence[str], batch_size: int = 16, max_in_flight: int = 4,
                  progress: bool = False, mode: str = "server", beam_size: int = 4, label=None,
                  normalized: bool = False, **decode_kw) -> list[str]:
        """Texts -> reconstructed texts (as written, or normalized=True: lower-cased WordPiece text; see decode):
        the `roundtrip` ensemble (server, default beam size of the model) or `encode` + client-side beam search."""
        if mode == "client":
            return self.decode(self.encode(texts, batch_size, max_in_flight, progress, label=label),
                               beam_size=beam_size, batch_size=batch_size, max_in_flight=max_in_flight,
                               progress=progress, mode="client", label=label, normalized=normalized, **decode_kw)
        if not len(texts):
            return []
        self.check_texts(texts, "beam_search", label)
        # similar lengths per request: less padding, and the beams of one request end together
        rows = length_sorted_batches(texts, min(batch_size, self.limits()["roundtrip_batch"]))
        name = "normalized_text" if normalized else "decoded_text"
        out = self.infer_many("roundtrip", [{"text": text_tensor([texts[r] for r in b])} for b in rows],
                              [name], max_in_flight, progress, "roundtrip", rows=rows, label=label)
        return [t.decode("utf-8") for t in unsort(rows, [o[name].reshape(-1) for o in out])]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "TritonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def grpc_stepper(client: TritonClient, manifest: dict, vectors: np.ndarray):
    """THE client-side Stepper: invemb.graph_stepper.GraphStepper whose graphs run as Triton models over gRPC."""
    from invemb.graph_stepper import GraphStepper
    return GraphStepper(client.run_graph, manifest, vectors)


def load_export(folder: str | Path) -> tuple[dict, object]:
    """(manifest, tokenizer) of an export folder (export/to_onnx.py --out) or a repo's beam_search/1 folder."""
    from invemb.manifest import load_export_tokenizer, read_manifest
    manifest = read_manifest(folder)
    return manifest, load_export_tokenizer(folder, manifest)
