"""Fidelity study of a model: what results/fidelity.md reports (scripts/fidelity.py writes it).

- the validation split (beam 1 and 4): generated token accuracy, exact match, BLEU, BERTScore (raw F1, scorer
  named), paraphrase cosine, teacher-forced top-k (1..100) -- beside the reference report's rows;
- new headlines: the newest 30 days of the data (held out of the shipped model's training);
- the noise study: N(0, (sigma * rms(v))^2) added to each vector;
- vector compression: float16, int8 with a per-vector scale, 1-bit sign (+ one float scale): bytes vs quality;
- the ONNX Runtime int8 variant vs float32 on the same headlines (same-text rate, BLEU);
- round-trip re-ranking: the beam's n-best re-ranked by re-encoding each candidate, vs the beam alone;
- facts (issue 29): the perturbed-facts set (perturbed_facts_study) and the one-change distance table
  (distance_table); the written form's oracle round trip (surface_oracle).
"""
from __future__ import annotations

import time

import numpy as np

from invemb.evaluate import evaluate
from invemb.losses import add_vector_noise
from invemb.metrics import bleu, exact_match, fact_metrics, positional_token_accuracy, surface_metrics
from invemb.surface import _spell  # digit_pieces spells numbers as the decoder's targets do

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


def score_ids(model, ids: list[list[int]], texts: list[str], vectors: np.ndarray | None = None) -> dict:
    """exact / BLEU / generated token accuracy of generated token ids (EOS excluded) against `texts`' references;
    with the `vectors` they were decoded from, also the written form (model.texts of the same ids) against the
    originals and its facts (number / name recall)."""
    from invemb.evaluate import _generated_targets
    from invemb.text import clean_texts
    hyps, refs = model.detokenize(ids), model.reference_texts(texts)
    ref_ids = [row + [model.eos_id] for row in _generated_targets(model, clean_texts(texts))]
    out = {"exact_match": exact_match(hyps, refs), "bleu": bleu(hyps, refs),
           "token_acc": positional_token_accuracy([h + [model.eos_id] for h in ids], ref_ids), "hyps": hyps}
    if vectors is not None:
        originals = clean_texts(texts)
        written = [w for i in range(0, len(ids), 64) for w in model.texts(vectors[i:i + 64], ids[i:i + 64])]
        out.update(surface_metrics(written, originals))
        out.update(fact_metrics(written, originals))
    return out


def decode_scores(model, vectors: np.ndarray, texts: list[str], beam_size: int = 1,
                  batch_size: int = 64, decoder=None) -> dict:
    """score_ids of decoding `vectors` (by `decoder`, default the model) against `texts`' references."""
    ids: list[list[int]] = []
    for i in range(0, len(vectors), batch_size):
        ids.extend((decoder or model).decode_ids(vectors[i:i + batch_size], beam_size=beam_size))
    return score_ids(model, ids, texts)


def rerank_study(model, texts: list[str], beams=(4, 16), decoder=None, batch_size: int = 64) -> list[dict]:
    """Per beam size: the beam's best hypothesis, decode's default re-ranking ("auto": the candidates scored within
    RERANK_MARGIN of the best or with other numbers re-encoded) and every candidate re-encoded (roundtrip_choice),
    all from ONE search (the first of the n-best is the search's best); encodes = candidates re-encoded per
    headline."""
    from invemb.embedder import RERANK_MARGIN
    dec = decoder or model
    vectors = dec.encode(texts)
    rows = []
    for beam in beams:
        t0 = time.time()
        nbest = []
        for i in range(0, len(vectors), batch_size):
            nbest.extend(dec.decode_nbest(vectors[i:i + batch_size], beam_size=beam))
        t_search = time.time() - t0
        for name, margin in (("", 0.0), (" + rerank auto (default)", RERANK_MARGIN), (" + rerank all", np.inf)):
            t1 = time.time()
            pick = dec.roundtrip_choice(vectors, nbest, margin) if margin > 0 else [0] * len(nbest)
            t_rerank = time.time() - t1
            rivals = dec.rerank_rivals(nbest, margin)[0] if margin > 0 else []
            r = score_ids(model, [hyps[i].tokens if hyps else [] for hyps, i in zip(nbest, pick)], texts, vectors)
            r.pop("hyps")
            rows.append({"decode": f"beam{beam}{name}", "n": len(texts), **r,
                         "encodes": float(np.mean([len(x) for x in rivals])) if rivals else 0.0,
                         "seconds": round(t_search + t_rerank, 1)})
    return rows


def rerank_sweep(model, texts: list[str], margins=(0.0075, 0.015, 0.03), beam: int = 4, decoder=None,
                 batch_size: int = 64) -> list[dict]:
    """decode's re-ranking at each margin, with and without the numbers rule (EmbedderBase.rerank_rivals), beside
    the beam's best and every candidate: one search, every candidate encoded once, each arm picking the closest
    vector among its rivals. encodes = candidates an arm re-encodes per headline (its cost)."""
    dec = decoder or model
    vectors = dec.encode(texts)  # [N,S]
    nbest = []
    for i in range(0, len(vectors), batch_size):
        nbest.extend(dec.decode_nbest(vectors[i:i + batch_size], beam_size=beam))
    # every hypothesis of a row with more than one, so a row's cosines are indexed by hypothesis
    cos = dec.candidate_cosines(vectors, dec.rerank_rivals(nbest, np.inf, numbers=False)[1])  # [n_i] per row
    arms = [("beam only", 0.0, False), *((f"margin {m:g}{' + numbers' if n else ''}", m, n)
                                         for m in margins for n in (False, True)), ("every candidate", np.inf, False)]
    rows = []
    for name, margin, numbers in arms:
        rivals = dec.rerank_rivals(nbest, margin, numbers)[0] if margin > 0 else [[] for _ in nbest]
        pick = [r[int(np.argmax(cos[row][r]))] if r else 0 for row, r in enumerate(rivals)]
        m = score_ids(model, [hyps[i].tokens if hyps else [] for hyps, i in zip(nbest, pick)], texts, vectors)
        m.pop("hyps")
        rows.append({"arm": name, "margin": margin, "numbers": numbers, "n": len(texts),
                     "encodes": float(np.mean([len(r) for r in rivals])), **m})
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
        hyps[variant] = emb.decode(emb.encode(texts), beam_size=beam_size, normalized=True)  # refs: normalised
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


# ------------------------------------------------------------------------------------------------ facts (issue 29)
def perturbed_facts_study(model, texts: list[str], n: int, seed: int = 0, beam_size: int = 4, decoder=None) -> dict:
    """The perturbed-facts set (invemb.facts.perturbed_facts_set over `texts`): the originals and their perturbed
    copies decoded at `beam_size`, each scored against itself (facts, exact, written form). Recall on the originals
    may come from the decoder's prior; on the perturbed copies only the vector can carry the facts."""
    from invemb.evaluate import evaluate
    from invemb.facts import perturbed_facts_set
    pairs = perturbed_facts_set(texts, n, seed)
    out: dict = {"n": len(pairs), "seed": seed, "beam": beam_size,
                 "examples": [{"original": a, "perturbed": b} for a, b in pairs[:5]]}
    for name, part in (("originals", [a for a, _ in pairs]), ("perturbed", [b for _, b in pairs])):
        res = evaluate(model, part, (beam_size,), scorer=None, with_teacher_forced=False, decoder=decoder)
        out[name] = res[f"beam{beam_size}" if beam_size > 1 else "greedy"]
        if name == "perturbed":
            written = res["_written"][f"beam{beam_size}" if beam_size > 1 else "greedy"]
            out["examples"] = [{**e, "decoded": w} for e, w in zip(out["examples"], written)]
    return out


def relative_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a - b|| / (RMS(a) * sqrt(S)) per row of [N,S] (= ||a - b|| / ||a||): on the scale of the training noise
    sigma, whose N(0, (sigma * RMS)^2) per dimension moves a vector by sigma * RMS * sqrt(S) on average."""
    rms = np.sqrt((a.astype(np.float64) ** 2).mean(1))  # [N]
    return np.linalg.norm(a.astype(np.float64) - b, axis=1) / (rms * np.sqrt(a.shape[1]) + 1e-12)


def distance_table(model, texts: list[str], per_kind: int = 50, seed: int = 0, noise_sigma: float | None = None
                   ) -> dict:
    """How far ONE change moves the vector (invemb.facts.one_change_pairs: one number / name / ordinary word),
    relative_distance mean/min/max per kind, beside the training noise sigma: a fact the vector must carry needs
    a move well above the noise the decoder was trained to ignore (issue 29: the number kind's mean above 2x)."""
    from invemb.facts import one_change_pairs
    rows = []
    for kind, pairs in one_change_pairs(texts, per_kind, seed).items():
        if not pairs:
            continue
        d = relative_distance(model.encode([a for a, _ in pairs]), model.encode([b for _, b in pairs]))  # [n]
        i = int(np.argmin(d))
        rows.append({"kind": kind, "n": len(pairs), "mean": float(d.mean()), "min": float(d.min()),
                     "max": float(d.max()), "closest": f"{pairs[i][0]} -> {pairs[i][1]}"})
    out: dict = {"rows": rows, "seed": seed, "noise_sigma": noise_sigma}
    num = next((r for r in rows if r["kind"] == "number"), None)
    if noise_sigma is not None and num:
        out["number_mean_above_2x_noise"] = bool(num["mean"] > 2 * noise_sigma)
    return out


def digit_pieces(tokenizer, text: str, max_length: int, vocab: dict | None = None) -> list[int]:
    """[CLS] + `text`'s WordPiece ids with every piece that holds a digit written one character a piece + [SEP]
    ("587" -> "58 ##7" as the tokenizer reads it -> "5 ##8 ##7"): the encoder's input if numbers were single digits."""
    vocab, ids = vocab or tokenizer.get_vocab(), []  # vocab: tokenizer.get_vocab(), built once by a caller of many
    for tok in tokenizer.tokenize(text):
        cont = tok.startswith("##")
        body = tok[2:] if cont else tok
        spelled = _spell(body, cont, body, vocab, None) if len(body) > 1 and any(c.isdigit() for c in body) else None
        ids += [i for i, _ in spelled] if spelled else [vocab.get(tok, tokenizer.unk_token_id)]
    ids = ids[:max_length - 2]
    return [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]


def backbone_number_study(model, pairs: list[tuple[str, str]]) -> dict:
    """Where a one-number change gets lost (issue 29): how far it moves the FROZEN backbone's token states and how
    far the trained pooling's vector, with the input read as the tokenizer writes numbers ("58 ##7") and as single
    digits (digit_pieces). Per reading: `mean_state` = relative_distance of the masked mean of the states (the
    whole sentence), `max_position` = the largest relative change of one position's state (pairs whose inputs have
    the same length; positions align), `vector` = relative_distance of the model's vectors (only meaningful for the
    reading the model was trained on, "pieces")."""
    import torch
    enc, tok, L = model.encoder, model.tokenizer, model.max_length
    vocab = tok.get_vocab()  # once, for digit_pieces

    def run(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # [N,T]
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        with torch.no_grad():
            return enc.token_states(ids, mask).float(), mask, enc(ids, mask).float().numpy()  # [N,T,H], [N,T], [N,S]

    out = {"n": len(pairs)}
    for reading in ("pieces", "digits"):
        rows = [[tok(t, truncation=True, max_length=L)["input_ids"] if reading == "pieces" else
                 digit_pieces(tok, t, L, vocab) for t in side] for side in zip(*pairs)]
        (ha, ma, va), (hb, mb, vb) = run(rows[0]), run(rows[1])
        mean_a = ((ha * ma[..., None]).sum(1) / ma.sum(1, keepdim=True)).numpy()  # [N,H]
        mean_b = ((hb * mb[..., None]).sum(1) / mb.sum(1, keepdim=True)).numpy()
        peaks = []
        for i, (a, b) in enumerate(zip(*rows)):
            if len(a) == len(b):
                d = (ha[i, :len(a)] - hb[i, :len(a)]).norm(dim=-1) / ha[i, :len(a)].norm(dim=-1)  # [T]
                peaks.append(float(d.max()))
        out[reading] = {"mean_state": float(relative_distance(mean_a, mean_b).mean()),
                        "max_position": float(np.mean(peaks)) if peaks else None, "aligned": len(peaks),
                        "vector": float(relative_distance(va, vb).mean()),
                        "pieces_per_text": float(np.mean([len(r) for r in rows[0]]))}
    return out


def surface_oracle(model, sets: dict[str, list[str]], table_texts: list[str]) -> dict:
    """The written form's oracle round trip (invemb.surface.oracle_roundtrip: original -> decoder targets -> render
    == original) per named set of texts, with the model's surface table (a model without surface heads: the table
    build_table makes from `table_texts`, as training would) and vocabulary; every failure listed."""
    from invemb.surface import build_table, oracle_roundtrip
    from invemb.text import clean_texts
    table = model.surface_table if model.writes_surface else build_table(model.tokenizer, table_texts,
                                                                          model.max_length)
    known = model.decoder.vocab_ids.tolist() if getattr(model.decoder, "compact", False) else None
    spell = bool(getattr(model.config.decoder, "spell_numbers", False))
    out: dict = {"table_from": "the model" if model.writes_surface else "build_table(training headlines)",
                 "table_size": len(table), "spell_numbers": spell, "sets": {}}
    for name, texts in sets.items():
        share, fails = oracle_roundtrip(model.tokenizer, clean_texts(texts), model.max_length, table, known, spell)
        out["sets"][name] = {"n": len(texts), "share": share, "failures": [list(f) for f in fails]}
    return out
