"""The facts of a headline: its numbers (with separators, currency and unit) and its names (capitalised words),
found in text, and perturbed for training (number / name swaps) and for the perturbed-facts evaluation set.

    find_numbers("Tesla up 5.5% after $3.2 billion deal")  -> ["5.5%", "$3.2 billion"]
    find_names("Uber picks Melbourne for flying taxis")     -> ["Melbourne"]
    perturb_numbers("Boeing finds debris in 737 MAX jets", random.Random(0))  -> "... 587 MAX jets"

A number keeps its SHAPE when perturbed: every digit is replaced by a random digit (a leading digit stays
non-zero), separators, currency and unit stay. A name swap replaces a simple capitalised word ("Melbourne", not the
headline's first word, not an all-caps acronym) by another such word of a name pool (other headlines' names).
Pure Python, no torch: used by invemb.metrics, the training augmentation and the evaluation sets alike.
"""
from __future__ import annotations

import random
import re
from typing import Iterable, Sequence

# a currency sign, digits with , or . groups, and a unit: "%", "bn", "m", "pct", " billion", "-year" is not a unit
_UNIT = r"(?:\s?%|\s?(?:per\s?cent|percent|pct|bps|bn|billion|million|mln|trillion|thousand|tn|[mkb])\b)"
NUMBER_RE = re.compile(r"(?<![\w.])(?:[$£€¥]\s?)?\d+(?:[.,]\d+)*" + _UNIT + r"?(?![\w])", re.IGNORECASE)
_DIGIT_RUN = re.compile(r"\d+")
# a simple capitalised word: one upper-case letter then lower-case letters (names, places, companies)
_SIMPLE_NAME = re.compile(r"^[A-Z][a-z]+$")
# a simple name with punctuation glued to it: "(Reuters)", "Melbourne,"
_GLUED_NAME = re.compile(r"^([(\"'‘“]?)([A-Z][a-z]+)([)\"'’”,.:;!?]?)$")
# a word: letters (accented ones too: "Nestlé"), with ' ’ . & - inside ("McDonald's", "U.S", "Horta-Osório")
_WORD = re.compile(r"[^\W\d_](?:[^\W\d_]|['’.&-])*[^\W\d_]|[^\W\d_]")


def find_numbers(text: str) -> list[str]:
    """The numbers of a text as written, each with its currency sign and unit ("$3.2 billion", "5.5%", "443,956")."""
    return [m.group(0) for m in NUMBER_RE.finditer(text)]


def number_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in NUMBER_RE.finditer(text)]


def find_names(text: str) -> list[str]:
    """Capitalised words other than the text's first word ("Melbourne", "OPEC", "McDonald's", "U.S"); words of a
    headline written in all caps are not names (nothing tells them apart), nor are single letters ("Q" of "Q3",
    "A" of a title-cased headline)."""
    words = _WORD.findall(text)
    if sum(w.isupper() for w in words) > 0.6 * max(1, len(words)):
        return []
    return [w for w in words[1:] if w[0].isupper() and len(w) > 1]


# WordPiece detokenized text spaces the inside of a number ("$90, 000", "5. 5 %", "$ 3. 2bn"): joined back before
# numbers are read. A comma joins only before a 3-digit group (a list "5, 10" stays two numbers).
_JOINS = [(re.compile(r"(\d)\s*\.\s*(?=\d)"), r"\1."), (re.compile(r"(\d)\s*,\s*(?=\d{3}(?!\d))"), r"\1,"),
          (re.compile(r"([$£€¥])\s+(?=\d)"), r"\1"), (re.compile(r"(\d)\s+%"), r"\1%")]
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"'})


def fold(text: str) -> str:
    """Lower-cased, accents and curly quotes folded ("Nestlé’s" -> "nestle's"): the uncased encoder loses both."""
    import unicodedata
    text = unicodedata.normalize("NFKD", text.translate(_QUOTES))
    return "".join(c for c in text if not unicodedata.combining(c)).lower()


def number_keys(text: str) -> list[str]:
    """The numbers of `text` as comparison keys: WordPiece spacing inside a number joined, whitespace dropped,
    lower-cased ("$3.2 billion" -> "$3.2billion"; "$ 90, 000" -> "$90,000"; "5. 5 %" -> "5.5%")."""
    for pat, rep in _JOINS:
        text = pat.sub(rep, text)
    return ["".join(n.split()).lower() for n in find_numbers(text)]


def name_count(name: str, text: str) -> int:
    """How often `name` stands in `text` as a whole word, folded (case, accents, quotes), punctuation inside it
    allowed to be spaced ("U.S" in "u. s. stocks", "McDonald's" in "mcdonald ' s"); never inside a longer word
    ("Mel" is not in "Melbourne")."""
    parts = [re.escape(c) if c.isalnum() else r"\s*" + re.escape(c) + r"\s*" for c in fold(name)]
    return len(re.findall(r"(?<![^\W_])" + "".join(parts) + r"(?![^\W_])", fold(text)))


def _random_digits(run: str, rng: random.Random) -> str:
    out = [str(rng.randrange(10)) for _ in run]
    if len(run) > 1 and run[0] != "0":  # keep the magnitude: no new leading zero
        out[0] = str(rng.randrange(1, 10))
    return "".join(out)


def perturb_numbers(text: str, rng: random.Random) -> str:
    """Every digit of every number replaced by a random digit (same shape); a text without numbers unchanged."""
    def one(m: re.Match) -> str:
        return _DIGIT_RUN.sub(lambda d: _random_digits(d.group(0), rng), m.group(0))
    return NUMBER_RE.sub(one, text)


def name_pool(texts: Iterable[str]) -> list[str]:
    """The simple capitalised words (not first words) of `texts`, each once, in first-seen order."""
    seen: dict[str, None] = {}
    for t in texts:
        for w in t.split()[1:]:
            if _SIMPLE_NAME.match(w):
                seen.setdefault(w, None)
    return list(seen)


def swap_names(text: str, rng: random.Random, pool: Sequence[str]) -> str:
    """Each simple capitalised word after the first word replaced by a random word of `pool` (never itself);
    punctuation glued to a word ("Melbourne," "(Reuters)") stays where it was."""
    words = text.split(" ")
    for i in range(1, len(words)):
        m = _GLUED_NAME.match(words[i])
        if m and pool:
            new = pool[rng.randrange(len(pool))]
            if new != m.group(2):
                words[i] = m.group(1) + new + m.group(3)
    return " ".join(words)


def fact_variants(texts: Sequence[str], per_text: int, seed: int, kind: str, pool: Sequence[str] = (),
                  exclude: Iterable[str] = ()) -> list[str]:
    """Training augmentation: up to `per_text` perturbed copies of each text that holds a fact of `kind`
    ("numbers": perturb_numbers; "names": swap_names with `pool`), deduplicated, never a text of `texts` or
    `exclude`. Seeded: same texts + seed -> same variants in the same order."""
    rng = random.Random(seed)
    banned = set(texts) | set(exclude)
    out: list[str] = []
    for t in texts:
        has = NUMBER_RE.search(t) if kind == "numbers" else any(_SIMPLE_NAME.match(w) for w in t.split()[1:])
        if not has:
            continue
        for _ in range(per_text):
            v = perturb_numbers(t, rng) if kind == "numbers" else swap_names(t, rng, pool)
            if v not in banned:
                banned.add(v)
                out.append(v)
    return out


# ------------------------------------------------------------------------------------------------ evaluation sets
def _redraw(m: re.Match, rng: random.Random) -> str:
    """One number match with new random digits of the same shape, different from the old one (up to 50 draws:
    a one-digit "0" or "5" would otherwise stay itself one time in ten)."""
    new = m.group(0)
    for _ in range(50):
        new = _DIGIT_RUN.sub(lambda d: _random_digits(d.group(0), rng), m.group(0))
        if new != m.group(0):
            break
    return new


def perturb_every_number(text: str, rng: random.Random) -> str:
    """perturb_numbers, but every number is guaranteed to change (redrawn while it reads as before)."""
    return NUMBER_RE.sub(lambda m: _redraw(m, rng), text)


def _simple_names(text: str) -> set[str]:
    """The simple names swap_names would replace (not the first word; glued punctuation allowed)."""
    return {m.group(2) for w in text.split(" ")[1:] if (m := _GLUED_NAME.match(w))}


def perturbed_facts_set(texts: Sequence[str], n: int, seed: int) -> list[tuple[str, str]]:
    """The perturbed-facts set: (original, perturbed) for the first `n` (0: all) of `texts` that hold a number or a
    simple name; in the perturbed copy every number is replaced by a random number of the same shape
    (perturb_every_number) and every simple name by a name of the OTHER texts (swap_names with name_pool of
    `texts`, less words they also write lower-case, less the headline's own names). The decoder's prior cannot guess these facts: only the vector can
    carry them. Seeded: same texts + seed -> same set."""
    rng = random.Random(seed)
    lower = {w for t in texts for w in t.split()}
    # names only: a capitalised word the texts never write lower-case ("Dow", not "Watch" of "Watch: ...")
    pool = [w for w in name_pool(texts) if w.lower() not in lower]
    out: list[tuple[str, str]] = []
    for t in texts:
        if n and len(out) >= n:
            break
        own = _simple_names(t)
        if not NUMBER_RE.search(t) and not own:
            continue
        v = perturb_every_number(t, rng)
        v = swap_names(v, rng, [w for w in pool if w not in own])
        if v != t:
            out.append((t, v))
    return out


_ORDINARY = re.compile(r"^[a-z]{4,}$")  # a plain lower-case word ("falls", "profit"): the 'one word' kind


def one_change_pairs(texts: Sequence[str], per_kind: int, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Pairs (text, the text with ONE thing changed) for the distance diagnostic, `per_kind` of each kind:
    "number" (one number's digits redrawn, same shape), "name" (one simple name, not the first word, replaced by
    another text's name), "word" (one ordinary lower-case word of 4+ letters replaced by another text's). Texts are
    drawn in a seeded order; a text serves each kind at most once."""
    rng = random.Random(seed)
    order = list(texts)
    rng.shuffle(order)
    names = name_pool(order)
    words = list(dict.fromkeys(w for t in order for w in t.split()[1:] if _ORDINARY.match(w)))
    out: dict[str, list[tuple[str, str]]] = {"number": [], "name": [], "word": []}
    for t in order:
        toks = t.split(" ")
        spans = number_spans(t)
        if spans and len(out["number"]) < per_kind:
            a, b = spans[rng.randrange(len(spans))]
            out["number"].append((t, t[:a] + _redraw(NUMBER_RE.match(t, a, b), rng) + t[b:]))
        for kind, ok, pool in (("name", _SIMPLE_NAME.match, names), ("word", _ORDINARY.match, words)):
            slots = [i for i in range(1, len(toks)) if ok(toks[i])]
            if slots and len(out[kind]) < per_kind and len(pool) > 1:
                i = slots[rng.randrange(len(slots))]
                new = toks[i]
                while new == toks[i]:
                    new = pool[rng.randrange(len(pool))]
                out[kind].append((t, " ".join(toks[:i] + [new] + toks[i + 1:])))
        if all(len(v) >= per_kind for v in out.values()):
            break
    return out


# ------------------------------------------------------------------------------------------------ separation pairs
def variant_key(text: str) -> str:
    """`text` with every digit written 0 and every simple name (what swap_names replaces) written N: texts that
    differ ONLY in their numbers' digits or their simple names share a key ("Dow up 212 points in Tokyo" and
    "Dow up 587 points in Lagos": "Dow up 000 points in N")."""
    text = _DIGIT_RUN.sub(lambda d: "0" * len(d.group(0)), text)
    words = text.split(" ")
    for i in range(1, len(words)):
        if m := _GLUED_NAME.match(words[i]):
            words[i] = m.group(1) + "N" + m.group(3)
    return " ".join(words)


def variant_groups(texts: Sequence[str]) -> list[list[int]]:
    """Indices of `texts` grouped by variant_key, groups of two or more only, each in index order, groups in the
    order of their first member: a headline with its number- and name-swapped copies (and real headlines that
    differ from it in those facts only). The separation term of training pushes the vectors of a group apart, so a
    text written twice is kept once (its copies could never be apart)."""
    by_key: dict[str, dict[str, int]] = {}
    for i, t in enumerate(texts):
        by_key.setdefault(variant_key(t), {}).setdefault(t, i)
    return [list(g.values()) for g in by_key.values() if len(g) > 1]
