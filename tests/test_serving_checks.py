"""The client-side pieces that need no server: what counts as an empty text, how every bad row is listed and
renamed into the user's lines, and the chunk store behind --resume."""
from __future__ import annotations

import numpy as np
import pytest

from invemb.errors import InvembError
from invemb.serving.bulk import ChunkStore
from invemb.serving.checks import invisible_only, problems_message, relabel, text_problems, vector_problems


@pytest.mark.parametrize("text,empty", [("", True), (" \t", True), ("\u200b", True), ("\ufeff", True),
                                        ("\x00", True), ("\u200b \u2060\u00a0", True), ("a\u200b", False),
                                        ("\u00e9", False), ("0", False), ("\u200d\U0001f600", False)])
def test_invisible_only(text, empty):
    assert invisible_only(text) is empty


def test_every_bad_row_is_listed_first_ten_and_a_count():
    texts = ["ok"] * 30
    for i in (2, 5, 7, 8, 11, 13, 17, 19, 23, 24, 25, 29):
        texts[i] = "\u200b"
    texts[0] = "x" * 21
    problems = text_problems(texts, max_chars=20)
    assert problems[0][1] == [2, 5, 7, 8, 11, 13, 17, 19, 23, 24, 25, 29] and problems[1][1] == [0]
    message = problems_message(problems, lambda rows: "line(s) " + ", ".join(str(r + 1) for r in rows))
    assert message.startswith("line(s) 3, 6, 8, 9, 12, 14, 18, 20, 24, 25 and 2 more hold(s) no visible text")
    assert "; line(s) 1 hold(s) more than 20 characters" in message


def test_vector_problems_name_nan_and_huge_rows():
    v = np.zeros((25, 4), np.float32)  # [25,4]
    v[20, 1], v[3, 0], v[7] = np.nan, -np.inf, 3.4e38
    (nan_what, nan_rows), (huge_what, huge_rows) = vector_problems(v, 1e4)
    assert nan_rows == [3, 20] and "NaN" in nan_what and huge_rows == [7]


def test_relabel_renames_request_rows_into_the_users_lines():
    rows = np.array([40, 3, 17])  # the request's row i is the user's text rows[i] (a length-sorted request)

    def label(idx):
        return "line(s) " + ", ".join(str(i + 1) for i in idx) + " of f.txt"
    assert relabel("text at row 2 has 9 characters", rows, label) == "text at line(s) 18 of f.txt has 9 characters"
    assert relabel("at position(s) [0, 1]", rows, label) == "at line(s) 4, 41 of f.txt"
    assert relabel("vector(s) at row(s) [2] contain NaN", rows, label) == "vector(s) at line(s) 18 of f.txt contain NaN"
    assert relabel("row 9 is beyond the request", rows, label) == "row 9 is beyond the request"  # left as it was


def test_chunk_store_keeps_finished_chunks_and_resumes_only_the_same_job(tmp_path):
    out, job = tmp_path / "v.npy", {"command": "encode", "input_sha256": "abc"}
    store = ChunkStore(out, job, rows=10, chunk_rows=4, resume=False)
    assert store.count == 3 and store.todo() == [0, 1, 2] and store.span(2) == (8, 10)
    store.save(0, np.full((4, 2), 0.0, np.float32))
    store.save(2, np.full((2, 2), 2.0, np.float32))
    with pytest.raises(InvembError, match="add --resume"):
        ChunkStore(out, job, rows=10, chunk_rows=4, resume=False)
    with pytest.raises(InvembError, match="differs in: input_sha256"):
        ChunkStore(out, {**job, "input_sha256": "def"}, rows=10, chunk_rows=4, resume=True)
    with pytest.raises(InvembError, match="differs in: chunk_rows"):
        ChunkStore(out, job, rows=10, chunk_rows=5, resume=True)
    again = ChunkStore(out, job, rows=10, chunk_rows=4, resume=True)
    assert again.todo() == [1]
    with pytest.raises(InvembError, match="3 results for 4 rows"):
        again.save(1, np.ones((3, 2), np.float32))
    again.save(1, np.full((4, 2), 1.0, np.float32))
    np.testing.assert_array_equal(again.assemble()[:, 0], [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    again.remove()
    assert not again.dir.exists()
    texts = ChunkStore(tmp_path / "t.txt", {"command": "decode"}, rows=3, chunk_rows=2, resume=False)
    texts.save(0, ["a", "b"])
    texts.save(1, ["c\td"])
    assert texts.assemble() == ["a", "b", "c\td"]


class _Answer:
    def __init__(self, status: str, message: str):
        self._status, self._message = status, message

    def status(self):
        return self._status

    def message(self):
        return self._message


@pytest.mark.parametrize("status,message,transient", [
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", True),
    ("StatusCode.INTERNAL", "Stub process 'tokenizer_0_0' is not healthy.", True),
    # an inner step of an ensemble lost an input while the server died: not the user's doing
    ("StatusCode.INVALID_ARGUMENT", "in ensemble 'encode', [request id: <id_unknown>] expected 2 inputs but got 1 "
     "inputs for model 'encoder'. Got input(s) ['input_ids']", True),
    # the user's own request lacking an input of the ensemble: refused at once, never retried
    ("StatusCode.INVALID_ARGUMENT", "[request id: <id_unknown>] expected 1 inputs but got 0 inputs for model "
     "'encode'", False),
    ("StatusCode.INVALID_ARGUMENT", "in ensemble 'encode', text row 3 is empty", False),
])
def test_which_answers_the_client_retries(status, message, transient):
    from invemb.serving.client import TritonClient
    assert TritonClient._transient(_Answer(status, message)) is transient
