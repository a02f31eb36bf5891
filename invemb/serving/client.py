"""gRPC client for the invemb Triton models: encode texts -> .npy, decode .npy -> texts, roundtrip texts.

    python serving/client.py --url 127.0.0.1:8001 encode headlines.txt --out vecs.npy
    python serving/client.py decode vecs.npy --out texts.txt                       # server-side beam_search
    python serving/client.py decode vecs.npy --mode client --export onnx/small      # beam search here
    python serving/client.py roundtrip headlines.txt [--mode client --export onnx/small]

Server-side decoding calls the `beam_search` model (BLS); client-side decoding runs the core's beam search
(invemb.generation.generate) here with `grpc_stepper`, whose start/step call `decoder_init`/`decoder_step` over
gRPC; both give the same texts. Requests run asynchronously with a bounded number in flight, a per-request
timeout, and retries with exponential backoff on UNAVAILABLE and on the two transient answers of a model whose
process crashed and is being reloaded by the server's stub watch (invemb.serving.launch.StubWatch): INTERNAL "Stub
process ... is not healthy" and NOT_FOUND "... has no available versions". A rejected request raises ClientError
carrying the server's message (CLI: one line on stderr, exit code 2).
"""
from __future__ import annotations

import argparse
import queue
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from invemb.errors import InvembError
from invemb.text import length_sorted_batches

RETRYABLE = ("UNAVAILABLE",)
# (status, message part): a model process crashed (until the server notices) / the model is being reloaded
RELOADING = (("INTERNAL", "is not healthy"), ("NOT_FOUND", "has no available versions"))
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


class TritonClient:
    """A gRPC connection to the invemb model repository (see serving/README.md for the models)."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 0.5, ready_timeout: float = 0.0):
        import tritonclient.grpc as grpcclient
        self.grpc = grpcclient
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.client = grpcclient.InferenceServerClient(url)
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
                last = str(e).splitlines()[0]
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

    def _error(self, model: str, error) -> ClientError:
        status = str(error.status() or "").replace("StatusCode.", "")
        hint = (" (the server's model process crashed and did not come back within the retries: see the server "
                "log)" if self._reloading(error) else "")
        return ClientError(f"{model}: {status or 'error'}: {error.message()}{hint}")

    @staticmethod
    def _reloading(error) -> bool:
        status, message = str(error.status() or ""), str(error.message() or "")
        return any(code in status and part in message for code, part in RELOADING)

    @classmethod
    def _retryable(cls, error) -> bool:
        return any(code in str(error.status() or "") for code in RETRYABLE) or cls._reloading(error)

    def infer(self, model: str, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One synchronous request (retried on UNAVAILABLE / a reloading model) -> {output name: array}."""
        from tritonclient.utils import InferenceServerException
        for attempt in range(self.retries + 1):
            try:
                result = self.client.infer(model, self._inputs(feeds), client_timeout=self.timeout,
                                           outputs=[self.grpc.InferRequestedOutput(n) for n in outputs])
                return {n: result.as_numpy(n) for n in outputs}
            except InferenceServerException as e:
                if not self._retryable(e) or attempt == self.retries:
                    raise self._error(model, e) from None
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def infer_many(self, model: str, requests: Sequence[dict[str, np.ndarray]], outputs: Sequence[str],
                   max_in_flight: int = 4, progress: bool = False, desc: str = "") -> list[dict[str, np.ndarray]]:
        """Asynchronous requests, at most `max_in_flight` at a time; results in request order."""
        from tqdm.auto import tqdm
        done: queue.Queue = queue.Queue()
        results: list = [None] * len(requests)
        attempts = [0] * len(requests)
        pending, in_flight = deque(range(len(requests))), 0
        requested = [self.grpc.InferRequestedOutput(n) for n in outputs]

        def submit(i: int) -> None:
            def callback(result=None, error=None):  # tritonclient calls it with keyword arguments
                done.put((i, result, error))
            self.client.async_infer(model, self._inputs(requests[i]), callback, outputs=requested,
                                    client_timeout=self.timeout)

        with tqdm(total=len(requests), disable=not progress, desc=desc or model, unit="req") as bar:
            while pending or in_flight:
                while pending and in_flight < max(1, max_in_flight):
                    submit(pending.popleft())
                    in_flight += 1
                try:
                    i, result, error = done.get(timeout=self.timeout + 30)
                except queue.Empty:
                    raise ClientError(f"{model}: no answer from {self.url} within {self.timeout + 30:.0f} s") from None
                in_flight -= 1
                if error is not None:
                    if self._retryable(error) and attempts[i] < self.retries:
                        time.sleep(self.backoff * 2 ** attempts[i])
                        attempts[i] += 1
                        pending.appendleft(i)
                        continue
                    while in_flight:  # let the others finish before raising (no callbacks into a dead loop)
                        done.get(timeout=self.timeout + 30)
                        in_flight -= 1
                    raise self._error(model, error)
                results[i] = {n: result.as_numpy(n) for n in outputs}
                bar.update()
        return results

    def run_graph(self, graph: str, feeds: dict, output_names: list) -> dict:
        """GraphStepper runner: one exported graph (decoder_init / decoder_step) served as a Triton model."""
        return self.infer(graph, feeds, output_names)

    # ----------------------------------------------------------------------------------------------- models
    def encode(self, texts: Sequence[str | bytes], batch_size: int = 32, max_in_flight: int = 4,
               progress: bool = False) -> np.ndarray:
        """Texts -> float32 [N,S] through the `encode` ensemble (tokenizer -> encoder). Requests hold texts of
        similar length (each pads to its own longest text); rows come back in the input order."""
        if not len(texts):
            raise ClientError("no texts to encode")
        rows = length_sorted_batches(texts, batch_size)
        out = self.infer_many("encode", [{"text": text_tensor([texts[r] for r in b])} for b in rows],
                              ["sentence_embedding"], max_in_flight, progress, "encode")
        return unsort(rows, [o["sentence_embedding"] for o in out]).astype(np.float32)

    def decode(self, vectors: np.ndarray, beam_size: int = 4, max_length: int | None = None, batch_size: int = 16,
               max_in_flight: int = 4, progress: bool = False, mode: str = "server",
               manifest: dict | None = None, tokenizer=None, rerank: bool = False) -> list[str]:
        """Vectors [N,S] -> texts. mode "server": the `beam_search` model; "client": the core's beam search here
        over decoder_init/decoder_step (needs the export's manifest and tokenizer). rerank: the beam's n-best
        re-ranked by re-encoding them (server mode: the `rerank` input of beam_search; client mode: the search
        here, the candidates encoded by the server's `encoder` model)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ClientError(f"vectors must have shape [N, S] with N >= 1, got {list(vectors.shape)}")
        chunks = [vectors[i:i + batch_size] for i in range(0, len(vectors), batch_size)]
        if mode == "client":
            return self._decode_client(chunks, beam_size, max_length, max_in_flight, progress, manifest, tokenizer,
                                       rerank)
        if mode != "server":
            raise ClientError(f"mode must be 'server' or 'client', got {mode!r}")
        requests = []
        for c in chunks:
            feeds = {"sentence_embedding": c, "beam_size": np.full((len(c), 1), beam_size, np.int32),
                     "rerank": np.full((len(c), 1), bool(rerank))}
            if max_length is not None:
                feeds["max_length"] = np.full((len(c), 1), max_length, np.int32)
            requests.append(feeds)
        out = self.infer_many("beam_search", requests, ["text"], max_in_flight, progress, "decode")
        return [t.decode("utf-8") for o in out for t in o["text"].reshape(-1)]

    def _decode_client(self, chunks, beam_size, max_length, max_in_flight, progress, manifest, tokenizer,
                       rerank=False):
        from tqdm.auto import tqdm

        from invemb.generation import generate
        from invemb.graph_stepper import GraphEmbedder
        from invemb.manifest import check_vectors, generation_config
        from invemb.text import detokenize_ids
        if manifest is None or tokenizer is None:
            raise ClientError("client-side decoding needs the export's manifest and tokenizer (--export DIR)")
        cfg = generation_config(manifest, beam_size, max_length)

        def one(chunk: np.ndarray) -> list[list[int]]:
            chunk = check_vectors(manifest, chunk)
            if rerank and beam_size > 1:  # the search here, candidates re-encoded by the server's encoder model
                return GraphEmbedder(self.run_graph, manifest, tokenizer).rerank_ids(chunk, beam_size, max_length)
            return [h.tokens for h in generate(grpc_stepper(self, manifest, chunk), cfg)]

        with ThreadPoolExecutor(max(1, max_in_flight)) as pool:
            ids = [t for part in tqdm(pool.map(one, chunks), total=len(chunks), disable=not progress,
                                      desc="decode (client)", unit="req") for t in part]
        return detokenize_ids(tokenizer, ids)

    def roundtrip(self, texts: Sequence[str | bytes], batch_size: int = 16, max_in_flight: int = 4,
                  progress: bool = False, mode: str = "server", beam_size: int = 4, **decode_kw) -> list[str]:
        """Texts -> reconstructed texts: the `roundtrip` ensemble (server, default beam size of the model) or
        `encode` + client-side beam search."""
        if mode == "client":
            return self.decode(self.encode(texts, batch_size, max_in_flight, progress), beam_size=beam_size,
                               batch_size=batch_size, max_in_flight=max_in_flight, progress=progress, mode="client",
                               **decode_kw)
        if not len(texts):
            return []
        rows = length_sorted_batches(texts, batch_size)  # similar lengths per request: less padding, and beams
        out = self.infer_many("roundtrip", [{"text": text_tensor([texts[r] for r in b])} for b in rows],  # of one
                              ["decoded_text"], max_in_flight, progress, "roundtrip")  # request end together
        return [t.decode("utf-8") for t in unsort(rows, [o["decoded_text"].reshape(-1) for o in out])]

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


def _write_lines(lines: Sequence[str], out: str | None) -> None:
    text = "".join(f"{line}\n" for line in lines)
    if out:
        Path(out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE (exponential backoff)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--batch-size", type=int, default=16, help="texts / vectors per request")
    ap.add_argument("--no-progress", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="texts file (.txt one per line, or .csv) -> .npy [N,S]")
    enc.add_argument("texts")
    enc.add_argument("--out", required=True)
    for name, helptext in (("decode", ".npy [N,S] -> texts"), ("roundtrip", "texts -> reconstructed texts")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("input")
        p.add_argument("--out", default=None, help="output file (default: stdout)")
        p.add_argument("--mode", choices=("server", "client"), default="server",
                       help="beam search in the server (beam_search model) or here over decoder_init/step")
        p.add_argument("--export", default=None, help="export folder (manifest.json + tokenizer/), for --mode client")
        p.add_argument("--beam-size", type=int, default=4)
        p.add_argument("--max-length", type=int, default=None)
        if name == "decode":
            p.add_argument("--rerank", action="store_true",
                           help="re-rank the beam's candidates by re-encoding them (closest vector wins)")
    args = ap.parse_args(argv)
    from invemb.data import read_texts
    from invemb.limits import MAX_BATCH_SIZE, MAX_BEAM_SIZE, check_range
    try:
        check_range("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)
        check_range("--concurrency", args.concurrency, 1, 256)
        check_range("--retries", args.retries, 0, 100)
        if not args.timeout > 0:
            raise ClientError(f"--timeout must be > 0 seconds, got {args.timeout}")
        if hasattr(args, "beam_size"):
            check_range("--beam-size", args.beam_size, 1, MAX_BEAM_SIZE)
        if getattr(args, "max_length", None) is not None:
            check_range("--max-length", args.max_length, 1, 4096)
        client = TritonClient(args.url, args.timeout, args.retries, ready_timeout=min(30.0, args.timeout))
        common = dict(max_in_flight=args.concurrency, progress=not args.no_progress)
        manifest = tokenizer = None
        if getattr(args, "mode", "server") == "client":
            if not args.export:
                raise ClientError("--mode client needs --export DIR (the export's manifest.json + tokenizer/)")
            manifest, tokenizer = load_export(args.export)
        if args.command == "encode":
            vectors = client.encode(read_texts(args.texts), batch_size=args.batch_size, **common)
            np.save(args.out, vectors)
            print(f"wrote {args.out}: {vectors.shape[0]} x {vectors.shape[1]} float32", file=sys.stderr)
        elif args.command == "decode":
            try:
                vectors = np.load(args.input, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise ClientError(f"cannot read {args.input} as a .npy array: {e}") from None
            _write_lines(client.decode(vectors, args.beam_size, args.max_length, args.batch_size, mode=args.mode,
                                       manifest=manifest, tokenizer=tokenizer, rerank=args.rerank, **common),
                         args.out)
        else:
            texts = read_texts(args.input)
            if args.mode == "server" and (args.beam_size != 4 or args.max_length):
                raise ClientError("the roundtrip ensemble uses the beam_search defaults; use --mode client or "
                                  "encode + decode for other --beam-size / --max-length")
            out = client.roundtrip(texts, args.batch_size, mode=args.mode, beam_size=args.beam_size,
                                   **({"max_length": args.max_length, "manifest": manifest, "tokenizer": tokenizer}
                                      if args.mode == "client" else {}), **common)
            _write_lines([f"{a}\t{b}" for a, b in zip(texts, out)], args.out)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
