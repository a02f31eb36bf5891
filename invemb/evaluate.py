"""Evaluate a model on texts: teacher-forced top-k, then decode (greedy / beam) and score the texts.

    result = evaluate(model, texts, beam_sizes=(1, 4))
    print(format_table(result))

Reference texts are the inputs after tokenization (lower-cased, WordPiece-normalised, truncated to max_length):
that is what a perfect reconstruction reads, so exact match 1.0 is reachable. Beside them, from the SAME generated
ids: the written form (EmbedderBase.texts; the normalised text for a model without surface heads) against the
original headlines (raw / caseless exact, cased BLEU), the facts (number / name recall, invemb.metrics.fact_metrics)
and the exact match of headlines holding a WordPiece outside the decoder's compact vocabulary vs the rest.
"""
from __future__ import annotations

import torch

from invemb.losses import add_vector_noise
from invemb.metrics import (DEFAULT_SCORER, TopKAccumulator, exact_split, fact_metrics, positional_token_accuracy,
                            surface_metrics, text_metrics)
from invemb.text import IGNORE, clean_texts


@torch.no_grad()
def teacher_forced(model, texts: list[str], batch_size: int = 64) -> dict[str, float]:
    """Mean CE loss and top-k positional accuracy of the next-token logits (top1 = the report's token accuracy)."""
    model.eval()
    acc, loss_sum, n_tok = TopKAccumulator(), 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = dict(model.tokenize(texts[i:i + batch_size]))
        if _own_targets(model):  # the decoder's own sequence (spelled numbers); no tags: `loss` stays the pieces' CE
            t = model.decoder_targets(clean_texts(texts[i:i + batch_size]))
            batch.update(target_ids=torch.from_numpy(t["ids"]).long(), target_mask=torch.from_numpy(t["mask"]).long())
        out = model(**{k: v.to(model.device) for k, v in batch.items()})
        m = int((out["labels"] != IGNORE).sum())
        loss_sum, n_tok = loss_sum + float(out["loss"]) * m, n_tok + m
        acc.update(out["logits"], out["labels"])
    return {"loss": loss_sum / max(1, n_tok), **acc.result()}


def evaluate(model, texts: list[str], beam_sizes=(1, 4), batch_size: int = 64, scorer: str | None = DEFAULT_SCORER,
             paraphrase_model: str | None = None, noise_sigma: float = 0.0, seed: int = 0, n_examples: int = 10,
             progress: bool = False, with_teacher_forced: bool = True, decoder=None, rerank="auto") -> dict:
    """Full metric set on `texts`. `scorer=None` skips BERTScore and paraphrase cosine (fast). `decoder`: what
    decodes the vectors (an EmbedderBase, e.g. an OnnxEmbedder of the same model's export; default the model
    itself), with decode's re-ranking `rerank` (default "auto": what users get); encoding, references and teacher
    forcing stay the model's."""
    decoder = decoder or model
    texts = clean_texts(texts)  # the originals as the encoder reads them (whitespace collapsed)
    refs = model.reference_texts(texts)
    outside = outside_vocab(model, texts)
    ref_ids = [ids + [model.eos_id] for ids in _generated_targets(model, texts)]
    result: dict = {"n": len(texts), "noise_sigma": noise_sigma, "scorer": scorer,
                    "bertscore": f"{scorer} raw F1 (no baseline rescaling)" if scorer else None}
    if with_teacher_forced:
        result["teacher_forced"] = teacher_forced(model, texts, batch_size)
    vectors = add_vector_noise(model.encode(texts, batch_size, progress=progress), noise_sigma, seed)
    examples = {"reference": refs[:n_examples]}
    # every decoded text per mode, normalised and as written (callers pop them before writing a small JSON)
    result["_hyps"], result["_written"] = {}, {}
    for beam in beam_sizes:
        name = "greedy" if beam == 1 else f"beam{beam}"
        ids: list[list[int]] = []
        written: list[str] = []
        for i in range(0, len(vectors), batch_size):
            part = decoder.default_ids(vectors[i:i + batch_size], beam_size=beam, rerank=rerank)
            ids.extend(part)
            # case / space tags: the model's own teacher-forced pass over the decoder's ids (same ids, both forms)
            written.extend(model.texts(vectors[i:i + batch_size], part, normalized=False))
        hyps = model.detokenize(ids)
        metrics = {"token_acc": positional_token_accuracy([h + [model.eos_id] for h in ids], ref_ids)}
        metrics.update(text_metrics(hyps, refs, scorer, paraphrase_model))
        metrics.update(surface_metrics(written, texts))
        metrics.update(fact_metrics(written, texts))
        metrics.update(exact_split(hyps, refs, outside))
        result[name] = metrics
        result["_hyps"][name], result["_written"][name] = hyps, written
        examples[name] = hyps[:n_examples]
        if model.writes_surface:
            examples[f"{name} (written)"] = written[:n_examples]
    result["examples"] = [dict(zip(examples, row)) for row in zip(*examples.values())]
    return result


def outside_vocab(model, texts: list[str]) -> list[bool]:
    """Per text: whether it holds a WordPiece outside the decoder's compact output vocabulary (decoder.vocab_ids;
    a decoder over the full vocabulary: never). The shipped model was trained on such pieces as [UNK] (issue 33)."""
    if not getattr(model.decoder, "compact", False):
        return [False] * len(texts)
    known = set(int(i) for i in model.decoder.vocab_ids.tolist())
    return [any(t not in known for t in row) for row in _content_ids(model, texts)]


def _own_targets(model) -> bool:
    """Whether the decoder generates its own sequence (invemb.surface.decoder_targets: spelled numbers, tags)
    rather than the encoder's WordPiece ids."""
    d = model.config.decoder
    return bool(getattr(d, "spell_numbers", False) or getattr(d, "surface_heads", False))


def _generated_targets(model, texts: list[str]) -> list[list[int]]:
    """The ids a perfect generation reads (no specials): the decoder's own targets where it has them."""
    if not _own_targets(model):
        return _content_ids(model, texts)
    t = model.decoder_targets(texts)
    special = {model.bos_id, model.eos_id, model.pad_id}
    return [[int(x) for x, m in zip(row, mask) if m and x not in special] for row, mask in zip(t["ids"], t["mask"])]


def _content_ids(model, texts: list[str]) -> list[list[int]]:
    enc = model.tokenize(texts)
    special = {model.bos_id, model.eos_id, model.pad_id}
    return [[t for t in row if t not in special] for row in enc["input_ids"].tolist()]


def format_table(result: dict) -> str:
    """Markdown: one row per decoding mode, plus the teacher-forced top-k row and examples."""
    lines = []
    modes = [k for k in result if k == "greedy" or k.startswith("beam")]
    if modes:
        cols = list(result[modes[0]])
        lines += ["| decode | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for m in modes:
            lines.append(f"| {m} | " + " | ".join(f"{result[m][c]:.4f}" if c != "bleu" else f"{result[m][c]:.2f}"
                                                   for c in cols) + " |")
    if "teacher_forced" in result:
        tf = result["teacher_forced"]
        lines += ["", "| teacher-forced | " + " | ".join(tf) + " |", "|---" * (len(tf) + 1) + "|",
                  "| val | " + " | ".join(f"{v:.4f}" for v in tf.values()) + " |"]
    if result.get("examples"):
        keys = list(result["examples"][0])
        lines += ["", "| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
        for ex in result["examples"]:
            lines.append("| " + " | ".join(ex[k].replace("|", "\\|") for k in keys) + " |")
    return "\n".join(lines)
