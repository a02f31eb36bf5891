"""`invemb` command line.

    invemb roundtrip "Oil prices fall as OPEC output rises"          # the shipped model (models/)
    invemb encode    [--checkpoint DIR] --input headlines.txt --output vectors.npy
    invemb decode    [--checkpoint DIR] --input vectors.npy [--output texts.txt] [--beam-size 4] [--rerank MODE]
    invemb evaluate  [--checkpoint DIR] [--data PATH] [--limit 500] [--output metrics.json]
    (decode / roundtrip / evaluate: texts as written, case and spacing from the model's surface heads;
     --normalized: the lower-cased WordPiece text, the form of models without them; --rerank auto (default):
     the beam's candidates scored within a margin of the best are re-encoded and the closest vector wins,
     --rerank / --rerank all: every candidate, --rerank off: the beam's best)
    invemb pipeline  [--data PATH] [--out runs/pipeline]      # train -> evaluate -> export -> serve -> roundtrip

Bad input (missing files, empty texts, wrong vector width, NaN/Inf, unknown model) prints one line
`invemb: error: ...` and exits with code 2; outputs are written atomically (nothing half-written).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from invemb.errors import InvembError


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path) then rename onto `path`, so a failure never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _load(args):
    from invemb.model import InvertibleEmbedder
    return InvertibleEmbedder.from_pretrained(args.checkpoint, device=args.device)


def cmd_encode(args) -> None:
    import numpy as np
    from invemb.data import read_texts
    texts = read_texts(args.input)
    model = _load(args)
    vectors = model.encode(texts, batch_size=args.batch_size, progress=True)
    def write(p):
        with open(p, "wb") as f:
            np.save(f, vectors)
    atomic_write(args.output, write)
    print(f"wrote {vectors.shape[0]} vectors of width {vectors.shape[1]} to {args.output}")


def _read_vectors(path: str):
    import numpy as np
    if not Path(path).is_file():
        raise InvembError(f"vectors file {path!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InvembError(f"{path} is not a .npy array: {e}") from None


def cmd_decode(args) -> None:
    model = _load(args)
    vectors = model.check_vectors(_read_vectors(args.input))
    texts = model.decode(vectors, beam_size=args.beam_size, batch_size=args.batch_size, progress=True,
                         rerank=args.rerank, normalized=args.normalized)
    if args.output:
        atomic_write(args.output, lambda p: Path(p).write_text("\n".join(texts) + "\n"))
        print(f"wrote {len(texts)} texts to {args.output}")
    else:
        print("\n".join(texts))


def cmd_roundtrip(args) -> None:
    from invemb.data import read_texts
    texts = list(args.texts) + (read_texts(args.input) if args.input else [])
    if not texts:
        raise InvembError("give texts as arguments or --input FILE")
    model = _load(args)
    decoded = model.decode(model.encode(texts), beam_size=args.beam_size, rerank=args.rerank,
                           normalized=args.normalized)
    width = min(60, max(len(t) for t in texts))
    form = "as written" if model.writes_surface and not args.normalized else "normalised"
    print(f"{'input':<{width}} | decoded (beam {args.beam_size}, {form})")
    print("-" * width + "-+-" + "-" * width)
    for t, d in zip(texts, decoded):
        print(f"{t:<{width}} | {d}")


def cmd_evaluate(args) -> None:
    from invemb.data import load_split
    from invemb.evaluate import evaluate, format_table
    split = load_split(args.data, seed=args.seed)
    records = split.val if args.split == "val" else split.train
    texts = [r.text for r in records[:args.limit or None]]
    model = _load(args)
    beams = tuple(int(b) for b in args.beam_sizes.split(","))
    result = evaluate(model, texts, beams, batch_size=args.batch_size,
                      scorer=None if args.scorer == "none" else args.scorer, noise_sigma=args.noise, progress=True,
                      rerank=args.rerank)
    result.update(checkpoint=str(args.checkpoint or "shipped"), split=args.split, rerank=args.rerank)
    result.pop("_hyps", None), result.pop("_written", None)
    if args.normalized:  # examples in the normalised form only (the metrics keep both forms)
        result["examples"] = [{k: v for k, v in ex.items() if not k.endswith("(written)")}
                              for ex in result.get("examples", [])]
    if args.output:
        atomic_write(args.output, lambda p: Path(p).write_text(json.dumps(result, indent=2)))
    print(format_table(result))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="invemb", description="Invertible sentence embeddings: text -> vector -> text")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, checkpoint=True):
        if checkpoint:
            sp.add_argument("--checkpoint", default=None,
                            help="folder written by save_pretrained / training (default: the shipped model, "
                                 "models/ of the checkout or $INVEMB_MODEL)")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--batch-size", type=int, default=64)
        return sp

    def normalized(sp, help_text: str = "lower-cased WordPiece text (the tokenizer's form) instead of the text "
                                        "as written (case and spacing from the model's surface heads)"):
        sp.add_argument("--normalized", action="store_true", help=help_text)

    def rerank(sp):
        from invemb.embedder import RERANK_MARGIN, parse_rerank
        sp.add_argument("--rerank", nargs="?", const="all", default="auto", type=parse_rerank, metavar="MODE",
                        help="re-rank the beam's candidates by re-encoding them (closest vector wins; beam > 1): "
                             f"auto (default: the candidates scored within {RERANK_MARGIN} of the best), all (also "
                             "bare --rerank), off (the beam's best), or a score margin")

    sp = common(sub.add_parser("encode", help="texts file (.txt/.csv) -> vectors .npy"))
    sp.add_argument("--input", required=True)
    sp.add_argument("--output", required=True)
    sp.set_defaults(func=cmd_encode)
    sp = common(sub.add_parser("decode", help="vectors .npy -> texts"))
    sp.add_argument("--input", required=True)
    sp.add_argument("--output")
    sp.add_argument("--beam-size", type=int, default=4)
    rerank(sp)
    normalized(sp)
    sp.set_defaults(func=cmd_decode)
    sp = common(sub.add_parser("roundtrip", help="text -> vector -> text, side by side"))
    sp.add_argument("texts", nargs="*")
    sp.add_argument("--input")
    sp.add_argument("--beam-size", type=int, default=4)
    rerank(sp)
    normalized(sp)
    sp.set_defaults(func=cmd_roundtrip)
    sp = common(sub.add_parser("evaluate", help="checkpoint + data -> metrics JSON + table"))
    sp.add_argument("--data", help="data folder/file (default: $INVEMB_DATA)")
    sp.add_argument("--split", choices=["val", "train"], default="val")
    sp.add_argument("--limit", type=int, default=0, help="first N headlines of the split (0: all)")
    sp.add_argument("--beam-sizes", default="1,4")
    sp.add_argument("--scorer", default="all-mpnet-base-v2", help="BERTScore/paraphrase model, or 'none'")
    sp.add_argument("--noise", type=float, default=0.0, help="sigma of N(0, sigma*rms(v)) added to vectors")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--output", help="metrics JSON path")
    rerank(sp)
    normalized(sp, "examples: only the lower-cased WordPiece texts (default: also as written, for a model with "
                   "surface heads; the metrics give both forms either way)")
    sp.set_defaults(func=cmd_evaluate)
    sub.add_parser("pipeline", help="train -> evaluate -> export -> serve -> roundtrip (see invemb pipeline -h)")
    return p


def check_args(args) -> None:
    """Sizes from the command line within invemb.limits: a one-line error naming the argument, before any work."""
    from invemb.limits import MAX_BATCH_SIZE, MAX_BEAM_SIZE, check_range
    if hasattr(args, "batch_size"):
        check_range("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)
    if hasattr(args, "beam_size"):
        check_range("--beam-size", args.beam_size, 1, MAX_BEAM_SIZE)
    if getattr(args, "limit", 0) < 0:
        raise InvembError(f"--limit must be >= 0, got {args.limit}")
    if hasattr(args, "beam_sizes"):
        try:
            beams = [int(b) for b in args.beam_sizes.split(",")]
        except ValueError:
            raise InvembError(f"--beam-sizes must be comma-separated integers, got {args.beam_sizes!r}") from None
        for b in beams:
            check_range("--beam-sizes", b, 1, MAX_BEAM_SIZE)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pipeline"]:
        from invemb.pipeline import main as pipeline_main
        try:
            return pipeline_main(argv[1:])
        except InvembError as e:
            print(f"invemb: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="invemb: warning: %(message)s")
    try:
        check_args(args)
        args.func(args)
    except InvembError as e:
        print(f"invemb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("invemb: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
