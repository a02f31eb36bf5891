"""Encode batching sweep: sentences/s of the fp32 and int8 encoder graphs of an export, 1 ONNX Runtime thread, for
batches sorted by characters vs by token count, and token-sorted batches capped at max_tokens padded tokens (how
invemb.embedder.ENCODE_MAX_TOKENS was chosen; results/encode_batching.md). Run it on an otherwise idle machine:

    python export/to_onnx.py --out onnx/shipped --triton-repo /tmp/repo   # also writes the int8 encoder
    python scripts/bench_encode_batching.py --onnx onnx/shipped --data ../shared/data/financial-news-headlines
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    import onnxruntime as ort

    from invemb.data import load_split
    from invemb.manifest import load_export_tokenizer, read_manifest
    from invemb.ort import make_session
    from invemb.text import clean_texts, length_sorted_batches, token_counts, tokenize_texts
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", required=True, help="export folder with encoder.onnx and the int8 variant")
    ap.add_argument("--data", required=True)
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--caps", default="0,2048,1024,512,384,256", help="max_tokens values (0: no cap)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each arm is kept")
    args = ap.parse_args(argv)
    manifest = read_manifest(args.onnx)
    tok, max_len = load_export_tokenizer(args.onnx, manifest), int(manifest["max_length"])
    texts = clean_texts([r.text for r in load_split(args.data).val[:args.n]])
    lengths = token_counts(tok, texts, max_len)
    variants = manifest.get("variants", {})
    int8 = variants.get("int8") or variants["int8_encoder"]  # a Triton export (--triton-repo) has int8_encoder
    files = {"fp32": manifest["graphs"]["encoder"]["file"], "int8": int8["files"]["encoder"]}
    sessions = {k: make_session(f"{args.onnx}/{f}", threads=1) for k, f in files.items()}
    arms = [("characters", None, None)] + [(f"tokens, max_tokens {int(c) or 'none'}", lengths, int(c) or None)
                                           for c in args.caps.split(",")]
    best: dict = {}
    for _ in range(args.rounds):
        for graph, sess in sessions.items():
            for name, lens, cap in arms:
                feeds = [tokenize_texts(tok, [texts[i] for i in b], max_len)
                         for b in length_sorted_batches(texts, args.batch_size, lens, cap)]
                t = time.perf_counter()
                for f in feeds:
                    sess.run(None, f)
                rate = len(texts) / (time.perf_counter() - t)
                best[(graph, name)] = max(best.get((graph, name), 0.0), rate)
    print(f"| batches (batch_size {args.batch_size}, {len(texts)} validation headlines, ORT {ort.__version__}, "
          "1 thread) | " + " | ".join(f"{g} sentences/s" for g in sessions) + " |")
    print("|---|" + "---|" * len(sessions))
    for name, _, _ in arms:
        print(f"| {name} | " + " | ".join(f"{best[(g, name)]:.1f}" for g in sessions) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
