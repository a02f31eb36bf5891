"""The written form: surface tags learned beside the pieces, spelled numbers, and every torch decode path."""
import numpy as np
import pytest

from conftest import train_toy
from invemb.surface import FIRST, LOWER, TABLE, UPPER, build_table, decoder_targets, render

WRITTEN = ["U.S.-China trade deal lifts Nestlé shares 5.5%", "McDonald's to cut 1,200 jobs in the UK",
           "Ben & Jerry's owner Unilever sees $3.2 billion hit", "iPhone sales beat forecasts – Apple",
           "Oil falls 587 points as OPEC meets in Vienna", "Oil falls 593 points as OPEC meets in Vienna",
           "‘Brexit’ fears weigh on sterling, says BoE", "Tesla’s Musk sells $1.1bn of stock"]


@pytest.fixture(scope="module")
def surface_toy():
    return train_toy(WRITTEN, steps=200, surface_heads=True, spell_numbers=True)


def test_targets_spell_numbers_and_tag_case(surface_toy):
    tok = surface_toy.tokenizer
    t = decoder_targets(tok, ["Oil falls 587 points at NYSE"], 40, spell_numbers=True)
    n = int(t["mask"][0].sum())
    pieces = tok.convert_ids_to_tokens(t["ids"][0, :n].tolist())
    assert pieces == ["[CLS]", "oil", "falls", "5", "##8", "##7", "points", "at", "ny", "##se", "[SEP]"]
    assert t["case"][0, 1:n - 1].tolist() == [FIRST, LOWER, LOWER, LOWER, LOWER, LOWER, LOWER, UPPER, UPPER]
    assert t["space"][0, 1:n - 1].tolist() == [0, 1, 1, 0, 0, 1, 1, 1, 0]
    plain = decoder_targets(tok, ["Oil falls 587 points"], 40)
    assert tok.convert_ids_to_tokens(plain["ids"][0, 3:5].tolist()) == ["58", "##7"]  # WordPiece's own split


def test_table_cases_come_back(surface_toy):
    tok = surface_toy.tokenizer
    table = build_table(tok, WRITTEN, 40)
    assert table["iphone"] == "iPhone" and any("é" in form for form in table.values())  # mixed case, accents
    t = decoder_targets(tok, WRITTEN, 40, spell_numbers=True)
    assert (t["case"] == TABLE).sum() >= 2
    for i, text in enumerate(WRITTEN):
        assert render(tok, t["ids"][i], t["case"][i], t["space"][i], table) == text


def test_toy_decodes_the_written_form(surface_toy, tmp_path):
    vecs = surface_toy.encode(WRITTEN)
    written = surface_toy.decode(vecs, beam_size=2)
    assert sum(w == t for w, t in zip(written, WRITTEN)) >= 7, written
    assert written[4] != written[5]  # two headlines that differ in one number each come back with their own
    normalised = surface_toy.decode(vecs, beam_size=2, normalized=True)
    assert normalised[1] == "mcdonald's to cut 1,200 jobs in the uk" or sum(
        n == r for n, r in zip(normalised, surface_toy.reference_texts(WRITTEN))) >= 7
    assert all(n == n.lower() for n in normalised)
    assert surface_toy.decode(vecs[:2], beam_size=2, rerank=True)[0] in (written[0], WRITTEN[0])
    # save / load keeps the heads and the table: same texts
    from invemb.model import InvertibleEmbedder
    again = InvertibleEmbedder.from_pretrained(surface_toy.save_pretrained(tmp_path / "m"))
    assert again.surface_table == surface_toy.surface_table
    assert again.decode(vecs, beam_size=2) == written


def test_tags_do_not_depend_on_padding(surface_toy):
    vecs = surface_toy.encode(WRITTEN[:3])
    ids = surface_toy.decode_ids(vecs, beam_size=1)
    case, space = surface_toy._surface_tags(vecs, ids)
    alone_case, alone_space = surface_toy._surface_tags(vecs[1:2], ids[1:2])
    n = len(ids[1])
    assert np.array_equal(case[1, :n], alone_case[0, :n]) and np.array_equal(space[1, :n], alone_space[0, :n])


def test_model_without_heads_keeps_the_normalised_form(toy_model, headlines32):
    vecs = toy_model.encode(headlines32[:4])
    assert not toy_model.writes_surface
    assert toy_model.decode(vecs, beam_size=1) == toy_model.decode(vecs, beam_size=1, normalized=True)


def test_pieces_outside_the_compact_vocabulary_are_spelled_not_unk(surface_toy):
    # issue 33 item 1: a piece the decoder cannot predict was trained as [UNK]; now its characters are the targets
    tok = surface_toy.tokenizer
    text = "Teladoc shares jump"
    whole = decoder_targets(tok, [text], 40)
    pieces = tok.convert_ids_to_tokens(whole["ids"][0, 1:int(whole["mask"][0].sum()) - 1].tolist())
    known = set(tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "[UNK]", "shares", "jump"]))
    known |= {i for p, i in tok.get_vocab().items() if len(p) == 1 or (p.startswith("##") and len(p) == 3)}
    t = decoder_targets(tok, [text], 40, known=known)
    ids = t["ids"][0, :int(t["mask"][0].sum())].tolist()
    assert tok.unk_token_id not in ids and all(i in known for i in ids)
    assert len(ids) > len(pieces) + 2  # "teladoc" is spelled one character a piece
    assert render(tok, t["ids"][0], t["case"][0], t["space"][0], {}) == text


def test_spelling_practice_spells_capitalised_pieces_by_seeded_chance(surface_toy):
    # issue 33 item 1: the decoder practises spelling on training texts (pieces it could predict whole), since
    # only spelled targets teach it what a piece outside its vocabulary needs
    tok = surface_toy.tokenizer
    texts = ["Apple and Microsoft shares jump in New York"] * 40
    plain = decoder_targets(tok, texts, 40)
    full = decoder_targets(tok, texts, 40, practice=1.0)
    n_plain, n_full = int(plain["mask"][0].sum()), int(full["mask"][0].sum())
    singles = tok.convert_ids_to_tokens(full["ids"][0, 1:n_full - 1].tolist())
    assert "shares" in singles and "jump" in singles  # lower-case words stay whole
    assert "apple" not in singles and n_full > n_plain + 10
    some = decoder_targets(tok, texts, 40, practice=0.3, seed=7)
    lengths = some["mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # each copy of a text gets its own draw
    assert np.array_equal(some["ids"], decoder_targets(tok, texts, 40, practice=0.3, seed=7)["ids"])  # seeded
    for t in (plain, full, some):
        for i in (0, 5):
            assert render(tok, t["ids"][i], t["case"][i], t["space"][i], {}) == texts[0]
