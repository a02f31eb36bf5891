"""Fidelity study of a model: what results/fidelity.md reports (scripts/fidelity.py writes it).

- the validation split (beam 1 and 4): generated token accuracy, exact match, BLEU, BERTScore (raw F1, scorer
  named), paraphrase cosine, teacher-forced top-k (1..100) -- beside the reference report's rows;
- new headlines: the newest 30 days of the data (held out of the shipped model's training);
- the noise study: N(0, (sigma * rms(v))^2) added to each vector;
- vector compression: float16, int8 with a per-vector scale, 1-bit sign (+ one float scale): bytes vs quality;
- the ONNX Runtime int8 variant vs float32 on the same headlines (same-text rate, BLEU);
- round-trip re-ranking: the beam's n-best re-ranked by re-encoding each candidate, vs the beam alone.
"""
from __future__ import annotations

import time

import numpy as np

from invemb.evaluate import evaluate
from invemb.losses import add_vector_noise
from invemb.metrics import bleu, exact_match, positional_token_accuracy

REPORT_ROWS = [  # the reference report's validation numbers (its table; no exact match / BLEU reported)
    {"model": "report: FinBERT + attention pooling, S=768, transformer decoder", "token_acc": 0.502},
    {"model": "report: FinBERT + attention pooling, S=2560, transformer decoder", "token_acc": 0.552},
    {"model": "report: best, beam search", "bertscore_f1": 0.70},
]


def compress(vectors: np.ndarray, kind: str) -> tuple[np.ndarray, int]:
    """(vectors after a compress -> decompress round trip, bytes per vector) for kind fp32|fp16|int8|sign1."""
    v = vectors.astype(np.float32)
    s = v.shape[1]
    if kind == "fp32":
        return v, 4 * s
    if kind == "fp16":
        return v.astype(np.float16).astype(np.float32), 2 * s
    if kind == "int8":  # symmetric, one float32 scale per vector
        scale = np.abs(v).max(1, keepdims=True) / 127.0
        q = np.clip(np.round(v / np.maximum(scale, 1e-12)), -127, 127).astype(np.int8)
        return q.astype(np.float32) * scale, s + 4
    if kind == "sign1":  # one bit per dimension + the mean |v| as one float32
        scale = np.abs(v).mean(1, keepdims=True)
        bits = np.packbits(v >= 0, axis=1)
        signs = np.unpackbits(bits, axis=1)[:, :s].astype(np.float32) * 2 - 1
        return signs * scale, bits.shape[1] + 4
    raise ValueError(f"unknown compression {kind!r}")


def score_ids(model, ids: list[list[int]], texts: list[str]) -> dict:
    """exact / BLEU / generated token accuracy of generated token ids (EOS excluded) against `texts`' references."""
    hyps, refs = model.detokenize(ids), model.reference_texts(texts)
    enc = model.tokenize(texts)["input_ids"].tolist()
    special = {model.bos_id, model.eos_id, model.pad_id}
    ref_ids = [[t for t in row if t not in special] + [model.eos_id] for row in enc]
    return {"exact_match": exact_match(hyps, refs), "bleu": bleu(hyps, refs),
            "token_acc": positional_token_accuracy([h + [model.eos_id] for h in ids], ref_ids), "hyps": hyps}


def decode_scores(model, vectors: np.ndarray, texts: list[str], beam_size: int = 1,
                  batch_size: int = 64, decoder=None) -> dict:
    """score_ids of decoding `vectors` (by `decoder`, default the model) against `texts`' references."""
    ids: list[list[int]] = []
    for i in range(0, len(vectors), batch_size):
        ids.extend((decoder or model).decode_ids(vectors[i:i + batch_size], beam_size=beam_size))
    return score_ids(model, ids, texts)


def rerank_study(model, texts: list[str], beams=(4, 16), decoder=None, batch_size: int = 64) -> list[dict]:
    """Per beam size: the beam's best hypothesis vs its n-best re-ranked by re-encoding (roundtrip_choice), both
    from ONE search (the first of the n-best is what decode() returns)."""
    dec = decoder or model
    vectors = dec.encode(texts)
    rows = []
    for beam in beams:
        t0 = time.time()
        nbest = []
        for i in range(0, len(vectors), batch_size):
            nbest.extend(dec.decode_nbest(vectors[i:i + batch_size], beam_size=beam))
        t_search = time.time() - t0
        picks = {"": [0] * len(nbest), " + rerank": dec.roundtrip_choice(vectors, nbest)}
        t_rerank = time.time() - t0 - t_search
        for name, pick in picks.items():
            r = score_ids(model, [hyps[i].tokens if hyps else [] for hyps, i in zip(nbest, pick)], texts)
            r.pop("hyps")
            rows.append({"decode": f"beam{beam}{name}", "n": len(texts), **r,
                         "seconds": round(t_search + (t_rerank if name else 0.0), 1)})
    return rows


def noise_study(model, texts: list[str], sigmas=(0.0, 0.05, 0.1, 0.2, 0.5), beam_size: int = 1,
                decoder=None) -> list[dict]:
    vectors = model.encode(texts)
    rows = []
    for sigma in sigmas:
        r = decode_scores(model, add_vector_noise(vectors, sigma, seed=0), texts, beam_size, decoder=decoder)
        r.pop("hyps")
        rows.append({"sigma": sigma, **r})
    return rows


def compression_study(model, texts: list[str], kinds=("fp32", "fp16", "int8", "sign1"),
                      beam_size: int = 1, decoder=None) -> list[dict]:
    vectors = model.encode(texts)
    rows = []
    for kind in kinds:
        v, nbytes = compress(vectors, kind)
        r = decode_scores(model, v, texts, beam_size, decoder=decoder)
        r.pop("hyps")
        cos = float(np.mean((v * vectors).sum(1) /
                            (np.linalg.norm(v, axis=1) * np.linalg.norm(vectors, axis=1) + 1e-12)))
        rows.append({"compression": kind, "bytes_per_headline": nbytes, "cosine_to_fp32": cos, **r})
    return rows


def ort_int8_study(export_dir, texts: list[str], refs: list[str], beam_size: int = 4, threads: int = 2) -> dict:
    """fp32 vs int8 ONNX Runtime variants on the same headlines: same-text rate, exact match and BLEU of each, plus
    "int8_encoder" (the int8 encoder graph, fp32 decoder graphs): where the int8 loss comes from, and whether
    encoding alone (the text -> vector service) can run int8."""
    from invemb.ort import OnnxEmbedder
    embs = {v: OnnxEmbedder(export_dir, variant=None if v == "fp32" else v, threads=threads)
            for v in ("fp32", "int8", "int8_encoder")}
    out, hyps = {}, {}
    for variant, emb in embs.items():
        t0 = time.time()
        hyps[variant] = emb.decode(emb.encode(texts), beam_size=beam_size)
        out[variant] = {"seconds": round(time.time() - t0, 1), "exact_match": exact_match(hyps[variant], refs),
                        "bleu": bleu(hyps[variant], refs)}
    out["same_text_rate"] = float(np.mean([a == b for a, b in zip(hyps["fp32"], hyps["int8"])]))
    out["int8_encoder_same_text_rate"] = float(np.mean([a == b for a, b in zip(hyps["fp32"], hyps["int8_encoder"])]))
    out["n"] = len(texts)
    return out


def full_evaluation(model, texts: list[str], beam_sizes=(1, 4), scorer: str | None = None,
                    score_limit: int = 0, progress: bool = False, decoder=None) -> dict:
    """evaluate() on all texts for exact/BLEU/token accuracy/top-k; BERTScore + paraphrase cosine on the first
    score_limit texts (0: all) -- the mpnet scorer is the slowest part on 2 CPU cores."""
    res = evaluate(model, texts, beam_sizes, scorer=None, progress=progress, decoder=decoder)
    if scorer:
        from invemb.metrics import text_metrics
        k = score_limit or len(texts)
        refs = model.reference_texts(texts[:k])
        for beam in beam_sizes:
            name = "greedy" if beam == 1 else f"beam{beam}"
            hyps = res["_hyps"][name][:k]
            m = text_metrics(hyps, refs, scorer)
            res[name].update(bertscore_f1=m["bertscore_f1"], paraphrase_cos=m["paraphrase_cos"],
                             scored_n=k)
        res["scorer"], res["bertscore"] = scorer, f"{scorer} raw F1 (no baseline rescaling)"
    return res
