"""The client CLI (`python serving/client.py`): encode a texts file -> .npy, decode a .npy -> texts, roundtrip texts.

    python serving/client.py --url 127.0.0.1:8001 encode headlines.txt --out vecs.npy [--resume]
    python serving/client.py decode vecs.npy --out texts.txt                       # server-side beam_search
    python serving/client.py decode vecs.npy --mode client --export onnx/small      # beam search here
    python serving/client.py decode vecs.npy --normalized     # lower-cased WordPiece text, not as written
    python serving/client.py roundtrip headlines.txt --out pairs.tsv

Everything the server would refuse is found before sending and named by the user's file lines (.txt: line
numbers; .csv: the line a record ends on; .npy: row numbers), every bad line (the first 10 and a count). The
client's limits are the server's (read from its model configs): a --batch-size above a model's max_batch_size is
split to fit; a --beam-size above its max_beam_size is refused here. With --out, finished chunks of --chunk-size
rows are written beside the output as they come (invemb.serving.bulk); after a failure (the server down for longer
than --retry-budget) the same command with --resume continues from them. One `error: ...` line, exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

from invemb.errors import InvembError
from invemb.serving.bulk import ChunkStore, atomic_write, file_hash
from invemb.serving.client import RETRY_BUDGET_S, ClientError, TritonClient, load_export


def _joined(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers))


def read_input_texts(path: str) -> tuple[list[str], object]:
    """(texts, label): label(indices) names those texts by the user's file lines."""
    from invemb.data import read_texts
    texts = read_texts(path)
    name = Path(path).name
    if Path(path).suffix.lower() != ".csv":
        return texts, lambda rows: f"line(s) {_joined([r + 1 for r in rows])} of {name}"
    # a CSV record's line: where it ends (read_texts accepted the file: every record holds a text)
    reader = csv.reader(io.StringIO(Path(path).read_bytes().decode("utf-8-sig"), newline=""))
    next(reader, None)
    lines = [reader.line_num for row in reader if row]
    return texts, lambda rows: f"line(s) {_joined([lines[r] for r in rows])} of {name}"


def read_input_vectors(path: str) -> tuple[np.ndarray, object]:
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ClientError(f"cannot read {path} as a .npy array: {e}") from None
    if vectors.ndim != 2 or not len(vectors) or vectors.dtype.kind not in "fiu":
        raise ClientError(f"{path}: expected a numeric array [N, S] with N >= 1, got {vectors.dtype} "
                          f"{list(vectors.shape)}")
    name = Path(path).name
    return vectors.astype(np.float32), lambda rows: f"row(s) {_joined(rows)} of {name}"


def write_output(out: str | None, value) -> None:
    """Vectors -> exactly the path given (np.save would add .npy); texts -> lines (stdout without --out)."""
    if isinstance(value, np.ndarray):
        atomic_write(Path(out), lambda f: np.save(f, value))
        print(f"wrote {out}: {value.shape[0]} x {value.shape[1]} float32", file=sys.stderr)
        return
    text = "".join(f"{line}\n" for line in value)
    if out:
        atomic_write(Path(out), lambda f: f.write(text.encode("utf-8")))
        print(f"wrote {out}: {len(value)} lines", file=sys.stderr)
    else:
        sys.stdout.write(text)


def run_chunked(args, rows: int, job: dict, work) -> object:
    """work(start, stop) for every chunk of [0, rows) -> the assembled result; chunks kept beside --out."""
    if not args.out:
        return work(0, rows)
    store = ChunkStore(args.out, job, rows, args.chunk_size, args.resume)
    todo = store.todo()
    if len(todo) < store.count:
        print(f"resuming: {store.count - len(todo)} of {store.count} chunks already written in {store.dir}",
              file=sys.stderr)
    for k in todo:
        try:
            store.save(k, work(*store.span(k)))
        except InvembError as e:
            written = store.count - len(store.todo())
            raise ClientError(f"{e} [{written} of {store.count} chunks of this job are written in {store.dir}: "
                              "run the same command with --resume to continue]") from None
    result = store.assemble()
    write_output(args.out, result)
    store.remove()
    return None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--retry-budget", type=float, default=RETRY_BUDGET_S,
                    help="seconds a request keeps retrying while the server is down or restarting")
    ap.add_argument("--retries", type=int, default=None, help="at most this many retries (default: the budget's)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="texts / vectors per request (split further to the server's max_batch_size)")
    ap.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk written beside --out")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted job from its written chunks")
    ap.add_argument("--no-progress", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="texts file (.txt one per line, or .csv) -> .npy [N,S]")
    enc.add_argument("texts")
    enc.add_argument("--out", required=True)
    subs = [enc]
    for name, helptext in (("decode", ".npy [N,S] -> texts"), ("roundtrip", "texts -> reconstructed texts")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("input")
        p.add_argument("--out", default=None, help="output file (default: stdout)")
        subs.append(p)
        p.add_argument("--mode", choices=("server", "client"), default="server",
                       help="beam search in the server (beam_search model) or here over decoder_init/step")
        p.add_argument("--export", default=None, help="export folder (manifest.json + tokenizer/), for --mode client")
        p.add_argument("--beam-size", type=int, default=4)
        p.add_argument("--max-length", type=int, default=None)
        p.add_argument("--normalized", action="store_true",
                       help="lower-cased WordPiece text (the tokenizer's form) instead of the text as written "
                            "(models with surface heads)")
        if name == "decode":
            from invemb.embedder import parse_rerank
            p.add_argument("--rerank", nargs="?", const="all", default=None, type=parse_rerank, metavar="MODE",
                           help="re-rank the beam's candidates by re-encoding them (closest vector wins): auto, all "
                                "(also bare --rerank), off, or a score margin; default: the server's default_rerank "
                                "(auto in this repository; --mode client: auto)")
    for p in subs:  # also after the command (SUPPRESS: not given there, the value before it stays)
        p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                       help="continue an interrupted job from its written chunks")
    return ap


def check_args(args) -> None:
    from invemb.limits import MAX_BATCH_SIZE, check_range
    check_range("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)
    check_range("--chunk-size", args.chunk_size, 1, 10 ** 7)
    check_range("--concurrency", args.concurrency, 1, 256)
    if args.retries is not None:
        check_range("--retries", args.retries, 0, 10 ** 6)
    for name, value in (("--timeout", args.timeout), ("--retry-budget", args.retry_budget)):
        if not value > 0:
            raise ClientError(f"{name} must be > 0 seconds, got {value}")
    if getattr(args, "max_length", None) is not None:
        check_range("--max-length", args.max_length, 1, 4096)
    if getattr(args, "mode", "server") == "client" and not args.export:
        raise ClientError("--mode client needs --export DIR (the export's manifest.json + tokenizer/)")
    if getattr(args, "command", "") == "roundtrip" and args.mode == "server" and (args.beam_size != 4 or
                                                                                   args.max_length):
        raise ClientError("the roundtrip ensemble uses the beam_search defaults; use --mode client or "
                          "encode + decode for other --beam-size / --max-length")


def run(args) -> None:
    check_args(args)
    data = args.texts if args.command == "encode" else args.input
    if args.command == "decode":
        values, label = read_input_vectors(data)
    else:
        values, label = read_input_texts(data)
    client = TritonClient(args.url, args.timeout, args.retries, retry_budget=args.retry_budget,
                          ready_timeout=args.retry_budget)
    if args.command != "encode":
        top = client.limits()["max_beam_size"]
        if not 1 <= args.beam_size <= top:
            raise ClientError(f"--beam-size must be in [1, {top}] (the server's max_beam_size), got {args.beam_size}")
    manifest = tokenizer = table = None
    if getattr(args, "mode", "server") == "client":
        from invemb.manifest import load_export_surface
        manifest, tokenizer = load_export(args.export)
        table = load_export_surface(args.export, manifest)  # None: no surface heads (normalised text)
    normalized = getattr(args, "normalized", False)
    common = dict(max_in_flight=args.concurrency, progress=not args.no_progress)
    job = {"command": args.command, "input_sha256": file_hash(data),
           **{k: getattr(args, k, None) for k in ("mode", "beam_size", "max_length", "rerank", "normalized")}}

    def sub_label(start: int):
        return lambda rows: label([start + r for r in rows])

    # the whole input checked first: every bad line named before anything is sent
    if args.command == "decode":
        client.check_vectors(values, label)
    else:
        client.check_texts(values, "tokenizer" if args.command == "encode" else "beam_search", label)
    if args.command == "encode":
        def work(a, b):
            return client.encode(values[a:b], batch_size=args.batch_size, label=sub_label(a), **common)
    elif args.command == "decode":
        def work(a, b):
            return client.decode(values[a:b], args.beam_size, args.max_length, args.batch_size, mode=args.mode,
                                 manifest=manifest, tokenizer=tokenizer, rerank=args.rerank, label=sub_label(a),
                                 normalized=normalized, surface_table=table, **common)
    else:
        def work(a, b):
            out = client.roundtrip(values[a:b], args.batch_size, mode=args.mode, beam_size=args.beam_size,
                                   label=sub_label(a), normalized=normalized,
                                   **({"max_length": args.max_length, "manifest": manifest, "tokenizer": tokenizer,
                                       "surface_table": table} if args.mode == "client" else {}), **common)
            return [f"{t}\t{o}" for t, o in zip(values[a:b], out)]
    result = run_chunked(args, len(values), job, work)
    if result is not None:
        write_output(args.out, result)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
