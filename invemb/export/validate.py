"""Validate an ONNX export against its PyTorch checkpoint.

    python export/validate.py --checkpoint runs/small/final --onnx onnx/small [--data PATH] [-n 50]

1. Graph parity: every graph on random inputs at shapes OTHER than the traced ones (batch 1 and 7; sequence /
   past lengths from 0-1 up to max_length), ONNX Runtime vs the same torch computation, within the tolerance
   stated in invemb/manifest.py (and the manifest).
2. Beam search parity: N real validation headlines through the full ORT pipeline (OnnxEmbedder: ORT encoder +
   the core beam search over the ORT GraphStepper) and through the ORT decoder from torch vectors must give exactly the
   texts InvertibleEmbedder.decode gives (as written for a model with surface heads: then also its tags, ORT
   decoder_surface vs torch, and the normalised texts). Prints a table; exit 1 on any failure, 2 on bad input.
"""
from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from invemb.errors import InvembError
from invemb.export.exporter import example_inputs, graph_module
from invemb.manifest import GraphSpec, Tolerance, graph_specs, model_dims, read_manifest


@dataclass
class Row:
    check: str
    case: str
    value: str  # max |ort - torch| (parity) or exact-match count (beam search)
    limit: str
    ok: bool


def validation_shapes(spec: GraphSpec, max_length: int) -> list[dict[str, int]]:
    """Shapes to check a graph at: batch 1 and 7 (traced: 3) x sequence/past/new lengths (traced: 7/5/2)."""
    axes = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    lengths: list[dict[str, int]] = [{}]
    if "sequence" in axes:
        lengths = [{"sequence": s} for s in (1, 2, 13, max_length)]
    elif "past" in axes:
        pn = [(0, 1), (1, 1), (8, 1), (max_length - 1, 1)] + ([(4, 3)] if "new" in axes else [])
        lengths = [{"past": p, "new": n} for p, n in pn]
    return [{"batch": b, **ln} for b in (1, 7) for ln in lengths]


def compare(ort_outs: list[np.ndarray], torch_outs: list[np.ndarray], tol: Tolerance) -> tuple[float, bool]:
    """Max abs error over all outputs, and whether every element is within atol + rtol * |torch|."""
    worst, ok = 0.0, True
    for a, b in zip(ort_outs, torch_outs):
        if a.shape != b.shape:
            return float("inf"), False
        err = np.abs(a.astype(np.float64) - b)
        worst = max(worst, float(err.max(initial=0.0)))
        ok &= bool((err <= tol.atol + tol.rtol * np.abs(b)).all())
    return worst, ok


def consistent_top(log_probs: np.ndarray, top_values: np.ndarray, top_ids: np.ndarray) -> bool:
    """top_ids/top_log_probs [N,K] are exactly the K best of log_probs [N,V] per row, best first, ties by lower
    id (what the search needs to rank candidates as it ranks full rows)."""
    want = np.argsort(-log_probs, axis=1, kind="stable")[:, :top_ids.shape[1]]
    return bool(np.array_equal(top_ids, want)
                and np.array_equal(top_values, np.take_along_axis(log_probs, top_ids, axis=1)))


def graph_parity(model, export_dir: str | Path, threads: int = 1, seed: int = 0,
                 sessions: dict | None = None) -> list[Row]:
    import torch
    from invemb.ort import make_session
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    specs = graph_specs(model_dims(model.cpu().eval()))
    rows = []
    for name, g in manifest["graphs"].items():
        spec = specs[name]
        sess = (sessions or {}).get(name) or make_session(export_dir / g["file"], threads)
        module = graph_module(model, name, spec).eval()
        for i, sizes in enumerate(validation_shapes(spec, manifest["max_length"])):
            feeds = example_inputs(spec, sizes, vocab=manifest["vocab_size"], seed=seed + i)
            if "input_ids" in feeds and name != "encoder":  # decoder tokens: any id, BOS included
                feeds["input_ids"][:, 0] = manifest["special_ids"]["bos"]
            got = dict(zip(spec.output_names, sess.run(spec.output_names, feeds)))
            with torch.no_grad():
                ref = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
            ref = dict(zip(spec.output_names, (r.float().numpy() for r in (ref if isinstance(ref, tuple) else (ref,)))))
            # top_ids: near-ties may rank differently under fp32 rounding, so ids are checked against ORT's own
            # log_probs (consistent_top); their values (top_log_probs) are compared with torch like any output.
            names = [n for n in spec.output_names if n != "top_ids"]
            err, ok = compare([got[n] for n in names], [ref[n] for n in names], spec.tolerance)
            if "top_ids" in got:
                ok &= consistent_top(got["log_probs"], got["top_log_probs"], got["top_ids"])
            rows.append(Row(name, " ".join(f"{k}={v}" for k, v in sizes.items()), f"{err:.2e}",
                            f"{spec.tolerance.atol:g}+{spec.tolerance.rtol:g}|x|", ok))
    return rows


def beam_parity(model, export_dir: str | Path, texts: list[str], beam_size: int = 4, threads: int = 1,
                embedder=None) -> tuple[list[Row], dict]:
    """Torch texts vs ORT texts (full ORT pipeline; ORT decoder on torch vectors). Returns rows and details."""
    from invemb.ort import OnnxEmbedder
    onnx = embedder or OnnxEmbedder(export_dir, threads=threads)
    vec_torch = model.encode(texts)
    ref = model.decode(vec_torch, beam_size=beam_size)
    vec_ort = onnx.encode(texts)
    full = onnx.decode(vec_ort, beam_size=beam_size)
    dec = onnx.decode(vec_torch, beam_size=beam_size)
    n = len(texts)
    same_full = sum(a == b for a, b in zip(ref, full))
    same_dec = sum(a == b for a, b in zip(ref, dec))
    exact = sum(a == b for a, b in zip(ref, model.reference_texts(texts)))
    rows = [Row(f"beam{beam_size} texts", "ORT encoder + ORT decoder", f"{same_full}/{n} equal", f"{n}/{n}",
                same_full == n),
            Row(f"beam{beam_size} texts", "torch vectors, ORT decoder", f"{same_dec}/{n} equal", f"{n}/{n}",
                same_dec == n)]
    if model.writes_surface:  # the texts above are as written: also the tags themselves, and the normalised texts
        rows += surface_rows(model, onnx, vec_torch, beam_size)
    details = {"torch": ref, "ort": full, "ort_decoder": dec, "torch_exact_match": exact / max(1, n),
               "vector_max_abs_diff": float(np.abs(vec_torch - vec_ort).max(initial=0.0))}
    return rows, details


def surface_rows(model, onnx, vectors: np.ndarray, beam_size: int) -> list[Row]:
    """decoder_surface (ORT) vs the torch heads: tags of torch's pieces for torch vectors, row by row, and the
    normalised texts (decode(normalized=True)) of both."""
    ids = model.decode_ids(vectors, beam_size=beam_size)
    (case_t, space_t), (case_o, space_o) = model._surface_tags(vectors, ids), onnx._surface_tags(vectors, ids)
    same = sum(np.array_equal(case_t[i, :len(r)], case_o[i, :len(r)]) and
               np.array_equal(space_t[i, :len(r)], space_o[i, :len(r)]) for i, r in enumerate(ids))
    norm = sum(a == b for a, b in zip(model.detokenize(ids), onnx.decode(vectors, beam_size, normalized=True)))
    n = len(ids)
    return [Row("surface tags", "torch pieces + vectors, ORT decoder_surface", f"{same}/{n} rows equal", f"{n}/{n}",
                same == n),
            Row(f"beam{beam_size} texts", "normalized=True, ORT decoder", f"{norm}/{n} equal", f"{n}/{n}", norm == n)]


def print_table(rows: list[Row], file=None) -> None:
    file = file or sys.stdout
    head = ("check", "case", "value", "limit", "ok")
    cells = [head] + [(r.check, r.case, r.value, r.limit, "PASS" if r.ok else "FAIL") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for j, c in enumerate(cells):
        print(" | ".join(x.ljust(w) for x, w in zip(c, widths)), file=file)
        if j == 0:
            print("-+-".join("-" * w for w in widths), file=file)


def render_report(rows: list[Row], details: dict, argv: list[str]) -> str:
    """The printed result (what results/validate_export.txt keeps): the command, with its paths as the repository
    names them (invemb.paths.display_command), the table, the texts that differ, the verdict."""
    from invemb.paths import display_command
    buf = io.StringIO()
    print(f"# {display_command(['python', 'export/validate.py', *argv])}", file=buf)
    print_table(rows, buf)
    if details:
        print(f"\nencoder vectors max |ort - torch| = {details['vector_max_abs_diff']:.2e}; torch exact match "
              f"vs inputs = {details['torch_exact_match']:.1%}", file=buf)
        for t, o in zip(details["torch"], details["ort"]):
            if t != o:
                print(f"  differs: torch {t!r}\n           ort   {o!r}", file=buf)
    failed = sum(not r.ok for r in rows)
    print(f"\n{'FAILED' if failed else 'OK'}: {len(rows) - failed}/{len(rows)} checks passed", file=buf)
    return buf.getvalue()


def validation_texts(data: str | None, n: int, seed: int = 0) -> list[str]:
    from invemb.data import load_split
    val = load_split(data, seed=seed).val
    return [r.text for r in val[:n]]


def validate(checkpoint: str, onnx_dir: str, data: str | None = None, n: int = 50, beam_size: int = 4,
             threads: int = 1) -> tuple[list[Row], dict]:
    from invemb.model import InvertibleEmbedder
    model = InvertibleEmbedder.from_pretrained(checkpoint)
    rows = graph_parity(model, onnx_dir, threads)
    details = {}
    if n > 0:
        beam_rows, details = beam_parity(model, onnx_dir, validation_texts(data, n), beam_size, threads)
        rows += beam_rows
    return rows, details


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--onnx", required=True, help="folder written by export/to_onnx.py")
    ap.add_argument("--data", default=None, help="headlines (default: $INVEMB_DATA)")
    ap.add_argument("-n", type=int, default=50, help="validation headlines for the beam-search check (0: skip)")
    ap.add_argument("--beam-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    args = ap.parse_args(argv)
    try:
        rows, details = validate(args.checkpoint, args.onnx, args.data, args.n, args.beam_size, args.threads)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_report(rows, details, sys.argv[1:] if argv is None else argv), end="")
    failed = sum(not r.ok for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
