"""Headline data: read the Kaggle "Financial News Headlines" folder (or any CSV / text file), split 90/10.

    records = load_headlines("../shared/data/financial-news-headlines")   # or env INVEMB_DATA
    split = split_records(records, val_fraction=0.1, seed=0)
"""
from __future__ import annotations

import csv
import datetime
import io
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from invemb.errors import InvembError

DATA_ENV = "INVEMB_DATA"
DATA_HELP = ("expected the Kaggle 'Financial News Headlines' folder (cnbc_headlines.csv, guardian_headlines.csv, "
             "reuters_headlines.csv; kaggle.com/datasets/notlucasp/financial-news-headlines), a CSV with a "
             "'Headlines' (or 'headline'/'text') column, or a .txt file with one headline per line; "
             f"pass --data PATH or set {DATA_ENV}")
TEXT_COLUMNS = ("headlines", "headline", "text", "title", "sentence")
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Record:
    text: str
    source: str  # file stem, e.g. "cnbc_headlines"
    date: datetime.date | None = None  # from a 'Time'/'date' column when the file has one


TIME_COLUMNS = ("time", "date", "published")
_MONTHS = {m: i + 1 for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                                           "nov", "dec"))}
_DATE_PATTERNS = (  # the three sources' formats: "7:51  PM ET Fri, 17 July 2020", "18-Jul-20", "Jul 18 2020"
    (re.compile(r"(\d{1,2}) ([A-Za-z]{3})[a-z]* (\d{4})\s*$"), ("d", "m", "Y")),
    (re.compile(r"^(\d{1,2})-([A-Za-z]{3})-(\d{2})$"), ("d", "m", "y")),
    (re.compile(r"^([A-Za-z]{3}) (\d{1,2}) (\d{4})$"), ("m", "d", "Y")),
    (re.compile(r"^(\d{4})-(\d{2})-(\d{2})"), ("Y", "n", "d")),
)


def parse_date(value: str) -> datetime.date | None:
    """A headline's date from the data set's Time formats (or ISO); None when it cannot be read."""
    value = " ".join(value.split())
    for pattern, order in _DATE_PATTERNS:
        m = pattern.search(value)
        if not m:
            continue
        parts = dict(zip(order, m.groups()))
        month = _MONTHS.get(parts["m"].lower()) if "m" in parts else int(parts["n"])
        year = int(parts["Y"]) if "Y" in parts else 2000 + int(parts["y"])
        try:
            return datetime.date(year, month, int(parts["d"])) if month else None
        except ValueError:
            return None
    return None


@dataclass
class Split:
    train: list[Record]
    val: list[Record]


def normalize(text: str) -> str:
    """Collapse all whitespace (including non-breaking spaces and CR/LF) to single spaces and strip."""
    return _WS.sub(" ", text.replace("\u00a0", " ")).strip()


def resolve_data_path(path: str | os.PathLike | None) -> Path:
    """`path`, else $INVEMB_DATA; raises InvembError saying what was expected when neither points to data."""
    raw = path if path not in (None, "") else os.environ.get(DATA_ENV, "")
    if not raw:
        raise InvembError(f"no data path given: {DATA_HELP}")
    p = Path(raw).expanduser()
    if not p.exists():
        raise InvembError(f"data path {str(p)!r} does not exist: {DATA_HELP}")
    return p


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvembError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _text_column(path: Path, header: list[str]) -> int:
    """Index of the headline-like column of a CSV header (TEXT_COLUMNS, case-insensitive), else an InvembError."""
    lower = [h.strip().lower() for h in header]
    col = next((lower.index(c) for c in TEXT_COLUMNS if c in lower), None)
    if col is None:
        raise InvembError(f"{path} has no headline column (looked for {TEXT_COLUMNS}, found {header})")
    return col


def read_file(path: Path) -> list[Record]:
    """Headlines of one .csv (a headline-like column) or .txt (one per line) file, normalised, empties dropped."""
    text = _read_text(path)
    if path.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if not header:
            raise InvembError(f"{path} is empty: {DATA_HELP}")
        col = _text_column(path, header)
        lower = [h.strip().lower() for h in header]
        tcol = next((lower.index(c) for c in TIME_COLUMNS if c in lower), None)
        out = []
        for r in reader:
            t = normalize(r[col]) if col < len(r) else ""
            if t:
                out.append(Record(t, path.stem, parse_date(r[tcol]) if tcol is not None and tcol < len(r) else None))
        return out
    return [Record(t, path.stem) for t in map(normalize, text.splitlines()) if t]


def load_headlines(path: str | os.PathLike | None = None, dedupe: bool = True) -> list[Record]:
    """All headlines under `path` (a folder of .csv/.txt files, or one file), in file order, de-duplicated."""
    p = resolve_data_path(path)
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".csv", ".txt")) if p.is_dir() else [p]
    if not files:
        raise InvembError(f"{p} holds no .csv or .txt files: {DATA_HELP}")
    records: list[Record] = []
    for f in files:
        records.extend(read_file(f))
    if dedupe:
        seen: set[str] = set()
        records = [r for r in records if not (r.text in seen or seen.add(r.text))]
    if not records:
        raise InvembError(f"no headlines found in {p}: {DATA_HELP}")
    return records


def split_records(records: list[Record], val_fraction: float = 0.1, seed: int = 0) -> Split:
    """Deterministic seeded random split (the report's 90/10 protocol): same records + seed -> same split."""
    if not 0.0 < val_fraction < 1.0:
        raise InvembError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * val_fraction))
    if n_val >= len(records):
        raise InvembError(f"only {len(records)} headline(s): too few to split into train and validation")
    return Split(train=[records[i] for i in order[n_val:]], val=[records[i] for i in order[:n_val]])


def load_split(path=None, val_fraction: float = 0.1, seed: int = 0) -> Split:
    return split_records(load_headlines(path), val_fraction, seed)


def newest_cutoff(records: list[Record], days: int = 30) -> datetime.date | None:
    """First day of the newest `days` days of dated records (the 'new headlines' hold-out); None if undated."""
    dates = [r.date for r in records if r.date is not None]
    return max(dates) - datetime.timedelta(days=days - 1) if dates else None


def newest_records(records: list[Record], days: int = 30) -> list[Record]:
    """Records of the newest `days` days (by their Time column): held out of training by `holdout_newest_days`."""
    cut = newest_cutoff(records, days)
    return [r for r in records if cut is not None and r.date is not None and r.date >= cut]


def word_crops(texts: Sequence[str], per_text: int, seed: int = 0, min_words: int = 3,
               exclude: Iterable[str] = ()) -> list[str]:
    """Training-data augmentation: `per_text` random contiguous word spans of each text (min_words .. all but one
    word; texts with fewer than min_words + 1 words give none), deduplicated, never a text of `texts` or `exclude`
    (e.g. the validation headlines). "fed holds rates steady in june" -> "rates steady in", "fed holds rates"...
    Seeded: same texts + seed -> same crops, in the same order."""
    rng = random.Random(seed)
    banned = set(texts) | set(exclude)
    out: list[str] = []
    for text in texts:
        words = text.split()
        n = len(words)
        for _ in range(per_text if n > min_words else 0):
            k = rng.randint(min_words, n - 1)  # span length in words
            start = rng.randint(0, n - k)
            crop = " ".join(words[start:start + k])
            if crop not in banned:
                banned.add(crop)
                out.append(crop)
    return out


def word_splices(texts: Sequence[str], per_text: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """Training-data augmentation: `per_text` splices of each text with another random text of `texts`, the first
    i words of this one + the last n-i words of the other (n: this text's word count, so lengths keep the data's
    distribution; texts of one word give none), deduplicated, never a text of `texts` or `exclude`. Novel word
    sequences that a language-model prior cannot guess at the seam: the decoder must read them from the vector.
    "fed holds rates steady in june" + "oil falls as opec output rises" -> "fed holds rates opec output rises".
    Seeded: same texts + seed -> same splices, in the same order."""
    rng = random.Random(seed)
    banned = set(texts) | set(exclude)
    words = [t.split() for t in texts]
    out: list[str] = []
    for a in words:
        n = len(a)
        for _ in range(per_text if n > 1 and len(words) > 1 else 0):
            b = words[rng.randrange(len(words))]
            i = rng.randint(1, n - 1)  # words kept from this text; the rest come from the end of the other
            splice = " ".join(a[:i] + b[-(n - i):])
            if splice not in banned:
                banned.add(splice)
                out.append(splice)
    return out


def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts for the CLI and the client: ONE row per line of the user's file, never a row lost or added.

    .txt: lines end with "\n" or "\r\n" only (Unicode line/paragraph separators, NEL, form feed... stay inside
    their line, as spaces); a blank or whitespace-only line, or one that is not UTF-8, is an InvembError naming
    its line number(s). .csv: the headline-like column, one row per record; a blank cell is an error naming the
    record's line. Nothing is returned (so nothing is written) when any line is bad."""
    p = Path(path)
    if not p.is_file():
        raise InvembError(f"texts file {str(p)!r} does not exist")
    raw = p.read_bytes()
    if p.suffix.lower() == ".csv":
        return _read_csv_texts(p, raw)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":  # the newline that ends the last line
        lines.pop()
    texts, blank, undecodable = [], [], []
    for no, line in enumerate(lines, 1):
        line = line[:-1] if line.endswith(b"\r") else line
        try:
            text = normalize(line.decode("utf-8"))
        except UnicodeDecodeError:
            undecodable.append(no)
            continue
        (texts.append(text) if text else blank.append(no))
    if undecodable:
        raise InvembError(f"{p}: line(s) {_lines(undecodable)} are not UTF-8 text; nothing was read")
    if blank:
        raise InvembError(f"{p}: line(s) {_lines(blank)} are blank (one text per line is expected; remove them)")
    if not texts:
        raise InvembError(f"{p} holds no texts")
    return texts


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:10]))
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")


def _read_csv_texts(p: Path, raw: bytes) -> list[str]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InvembError(f"{p}: line {line} is not UTF-8 text ({e.reason}); nothing was read") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise InvembError(f"{p} is empty: expected a header row with a headline column {TEXT_COLUMNS}")
    col = _text_column(p, header)
    texts, blank = [], []
    for row in reader:
        if not row:  # a blank physical line between records
            blank.append(reader.line_num)
            continue
        t = normalize(row[col]) if col < len(row) else ""
        (texts.append(t) if t else blank.append(reader.line_num))
    if blank:
        raise InvembError(f"{p}: line(s) {_lines(blank)} have a blank {header[col]!r} cell (one text per record "
                          "is expected)")
    if not texts:
        raise InvembError(f"{p} holds no texts")
    return texts
