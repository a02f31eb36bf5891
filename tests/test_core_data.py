"""Reading the Kaggle folder as it comes, other formats, the deterministic split, clear errors."""
import pytest

from invemb import InvembError
from invemb.data import load_headlines, load_split, normalize, read_texts, split_records


def test_reads_the_kaggle_folder_as_it_comes(data_dir):
    raw = load_headlines(data_dir, dedupe=False)
    assert len(raw) == 53370  # the README's count of non-empty headlines (CRLF + blank rows in cnbc handled)
    by_source = {}
    for r in raw:
        by_source[r.source] = by_source.get(r.source, 0) + 1
    assert by_source == {"cnbc_headlines": 2800, "guardian_headlines": 17800, "reuters_headlines": 32770}
    unique = load_headlines(data_dir)
    assert len(unique) == 53157 and len({r.text for r in unique}) == 53157
    assert all(r.text == normalize(r.text) and r.text for r in unique)


def test_split_is_deterministic_disjoint_90_10(data_dir):
    a, b = load_split(data_dir, seed=0), load_split(data_dir, seed=0)
    assert [r.text for r in a.val] == [r.text for r in b.val]
    assert len(a.val) == round(53157 * 0.1) and len(a.train) + len(a.val) == 53157
    assert not {r.text for r in a.train} & {r.text for r in a.val}
    c = load_split(data_dir, seed=1)
    assert [r.text for r in c.val] != [r.text for r in a.val]


def test_other_formats(tmp_path):
    (tmp_path / "h.txt").write_text("  Stocks  rally\u00a0today \n\n\nStocks rally today\nOil falls\r\n")
    assert [r.text for r in load_headlines(tmp_path / "h.txt")] == ["Stocks rally today", "Oil falls"]
    (tmp_path / "x.csv").write_text('id,headline\n1,"Fed holds, says ""wait"""\n3,Gold up\n')
    assert read_texts(tmp_path / "x.csv") == ['Fed holds, says "wait"', "Gold up"]


SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0c", "\x1c", "\x1d", "\x1e", "\x0b", "\r"]


@pytest.mark.parametrize("sep", SEPARATORS)
def test_user_text_files_keep_one_row_per_line(tmp_path, sep):
    """A Unicode line separator inside a line stays in that line (as a space): 3 lines -> 3 texts."""
    f = tmp_path / "t.txt"
    f.write_bytes(f"Oil falls{sep}again\nStocks rally\r\nGold up".encode())
    assert read_texts(f) == ["Oil falls again", "Stocks rally", "Gold up"]


def test_user_text_files_blank_or_bad_lines_name_the_line(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Oil falls\n\nStocks rally\n   \nGold up\n")
    with pytest.raises(InvembError, match=r"t.txt: line\(s\) 2, 4 are blank"):
        read_texts(f)
    f.write_bytes(b"Oil falls\nStocks \xff rally\n")
    with pytest.raises(InvembError, match=r"line\(s\) 2 are not UTF-8"):
        read_texts(f)
    c = tmp_path / "t.csv"
    c.write_text('id,headline\n1,Oil falls\n2,\n3,"multi\nline"\n\n4,Gold\n')
    with pytest.raises(InvembError, match=r"line\(s\) 3, 6 have a blank 'headline' cell"):
        read_texts(c)


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("INVEMB_DATA", raising=False)
    with pytest.raises(InvembError, match="no data path given.*INVEMB_DATA"):
        load_headlines(None)
    with pytest.raises(InvembError, match="does not exist.*cnbc_headlines.csv"):
        load_headlines(tmp_path / "nope")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InvembError, match="no headline column"):
        load_headlines(tmp_path / "bad.csv")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(InvembError, match="no headlines"):
        load_headlines(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvembError, match="not UTF-8"):
        load_headlines(tmp_path / "bin.txt")
    monkeypatch.setenv("INVEMB_DATA", str(tmp_path / "h.txt"))
    (tmp_path / "h.txt").write_text("one\ntwo\nthree\n")
    assert len(split_records(load_headlines(None)).val) == 1
    with pytest.raises(InvembError, match="too few"):
        split_records(load_headlines(tmp_path / "h.txt")[:1])


def test_word_crops_are_seeded_contiguous_spans_never_a_given_text():
    from invemb.data import word_crops
    texts = ["fed holds rates steady in june as inflation cools", "oil falls", "stocks rally on trade hopes"]
    crops = word_crops(texts, 3, seed=1, min_words=3, exclude=["holds rates steady"])
    assert crops == word_crops(texts, 3, seed=1, min_words=3, exclude=["holds rates steady"])  # seeded
    assert crops and len(set(crops)) == len(crops)
    for c in crops:
        words = c.split()
        assert len(words) >= 3 and c not in texts and c != "holds rates steady"
        assert any(f" {c} " in f" {t} " and len(words) < len(t.split()) for t in texts)  # a proper span
    assert not any(c in "oil falls" for c in crops)  # too short to crop
    assert word_crops(texts, 0) == []


def test_word_splices_join_a_prefix_to_another_texts_suffix_never_a_given_text():
    from invemb.data import word_splices
    texts = ["fed holds rates steady in june", "oil falls as opec output rises", "stocks rally on trade hopes",
             "gold"]
    banned = "fed holds rates output rises"
    splices = word_splices(texts, 4, seed=3, exclude=[banned])
    assert splices == word_splices(texts, 4, seed=3, exclude=[banned])  # seeded
    assert splices != word_splices(texts, 4, seed=4, exclude=[banned])
    assert splices and len(set(splices)) == len(splices)
    for s in splices:
        assert s not in texts and s != banned
        words = s.split()
        # some text's first i words (i >= 1), then the last words of a text: as long as the first text when the
        # other is long enough (the data's length distribution)
        heads = [t.split() for t in texts if len(t.split()) > 1]
        assert any(words[:i] == h[:i] and any(words[i:] == o[-len(words[i:]):] for o in map(str.split, texts))
                   for h in heads for i in range(1, len(h)) if len(words) <= len(h))
    assert not any(s.startswith("gold") for s in splices)  # one word: nothing to splice
    assert word_splices(texts, 0) == [] and word_splices(texts[:1], 3) == []


def test_training_augmentation_groups_cache_apart_and_never_hold_a_validation_text():
    from invemb.config import preset
    from invemb.training.run import augment
    train = ["fed holds rates steady in june", "oil falls as opec output rises", "stocks rally on trade hopes"]
    val = ["oil falls as opec output", "fed holds rates steady"]  # would be a crop / a splice of the training texts
    cfg = preset("toy")
    assert augment(cfg, train, train + val, False) == (train, [train + val])  # no augmentation: the data alone
    cfg.augment_crops, cfg.augment_splices = 3, 3
    texts, groups = augment(cfg, train, train + val, False)
    data, crops, splices = groups
    assert data == train + val and crops and splices
    assert texts == train + crops + splices  # training rows: headlines, then each group's texts in cache order
    assert not set(texts) & set(val) and not set(crops) & set(splices) and len(set(texts)) == len(texts)


def test_splice_rounds_add_fresh_draws_and_keep_round_zero():
    from invemb.config import preset
    from invemb.training.run import augment
    train = ["fed holds rates steady in june", "oil falls as opec output rises", "stocks rally on trade hopes",
             "gold climbs as dollar slips", "bank shares slide after earnings miss"]
    cfg = preset("toy")
    cfg.augment_crops, cfg.augment_splices = 1, 3
    _, one = augment(cfg, train, train, False)
    cfg.splice_rounds = 2
    texts, two = augment(cfg, train, train, False)
    assert len(two) == 4 and two[:3] == one  # round 0 (and so its cache) is unchanged by adding a round
    assert two[3] and not set(two[3]) & set(t for g in two[:3] for t in g)  # round 1: new texts only
    assert texts == train + [t for g in two[1:] for t in g] and len(set(texts)) == len(texts)
    cfg.splice_rounds = 0
    with pytest.raises(InvembError, match="splice_rounds"):
        type(cfg).from_dict(cfg.to_dict())
