"""The `invemb` CLI end to end on a saved toy checkpoint; bad input exits 2 with one line, nothing half-written."""
import json
import subprocess
import sys

import numpy as np
import pytest

from invemb.cli import main


def test_encode_decode_roundtrip(toy_checkpoint, toy_model, headlines32, tmp_path, capsys):
    texts = tmp_path / "in.txt"
    texts.write_text("\n".join(headlines32[:5]) + "\n")
    assert main(["encode", "--checkpoint", str(toy_checkpoint), "--input", str(texts),
                 "--output", str(tmp_path / "v.npy")]) == 0
    v = np.load(tmp_path / "v.npy")
    np.testing.assert_allclose(v, toy_model.encode(headlines32[:5]), atol=1e-6)
    assert main(["decode", "--checkpoint", str(toy_checkpoint), "--input", str(tmp_path / "v.npy"),
                 "--output", str(tmp_path / "out.txt")]) == 0
    assert (tmp_path / "out.txt").read_text().splitlines() == toy_model.reference_texts(headlines32[:5])
    assert main(["decode", "--checkpoint", str(toy_checkpoint), "--input", str(tmp_path / "v.npy"), "--rerank",
                 "--beam-size", "3", "--output", str(tmp_path / "rr.txt")]) == 0
    assert (tmp_path / "rr.txt").read_text().splitlines() == toy_model.decode(v, beam_size=3, rerank=True)
    for mode, want in (("off", "off"), ("0.05", 0.05), ("auto", "auto")):
        assert main(["decode", "--checkpoint", str(toy_checkpoint), "--input", str(tmp_path / "v.npy"), "--rerank",
                     mode, "--beam-size", "3", "--output", str(tmp_path / "rr.txt")]) == 0
        assert (tmp_path / "rr.txt").read_text().splitlines() == toy_model.decode(v, beam_size=3, rerank=want)
    with pytest.raises(SystemExit) as e:
        main(["decode", "--checkpoint", str(toy_checkpoint), "--input", str(tmp_path / "v.npy"), "--rerank", "-1"])
    assert e.value.code == 2 and "--rerank: expected auto, all, off or a score margin >= 0, got '-1'" in \
        capsys.readouterr().err
    capsys.readouterr()
    assert main(["roundtrip", "--checkpoint", str(toy_checkpoint), headlines32[0]]) == 0
    out = capsys.readouterr().out
    assert headlines32[0] in out and toy_model.reference_texts(headlines32[:1])[0] in out


def test_roundtrip_as_a_console_command(toy_checkpoint):
    exe = [sys.executable, "-m", "invemb.cli"]
    r = subprocess.run(exe + ["roundtrip", "--checkpoint", str(toy_checkpoint), "Oil prices fall as OPEC output rises"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Oil prices fall as OPEC output rises |" in r.stdout


def test_evaluate_writes_metrics(toy_checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(toy_checkpoint), "--data", str(data_dir), "--limit", "8",
                 "--scorer", "none", "--output", str(out), "--beam-sizes", "1,2"]) == 0
    m = json.loads(out.read_text())
    assert m["n"] == 8 and set(m) >= {"greedy", "beam2", "teacher_forced", "examples"}
    assert 0 <= m["greedy"]["token_acc"] <= 1 and "top100" in m["teacher_forced"]
    assert "| greedy |" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_ckpt", "wrong_width", "nan", "empty_text", "missing_input", "no_data"])
def test_bad_input_exit_2(case, toy_checkpoint, tmp_path, capsys, monkeypatch):
    ck = str(toy_checkpoint)
    out = tmp_path / "out.npy"
    if case == "missing_ckpt":
        args = ["roundtrip", "--checkpoint", str(tmp_path / "nope"), "x"]
    elif case in ("wrong_width", "nan"):
        v = np.zeros((2, 7 if case == "wrong_width" else 64), np.float32)
        v[1, 0] = np.nan
        np.save(tmp_path / "v.npy", v)
        args = ["decode", "--checkpoint", ck, "--input", str(tmp_path / "v.npy"), "--output", str(tmp_path / "t.txt")]
    elif case == "empty_text":
        args = ["roundtrip", "--checkpoint", ck, "fine", "   "]
    elif case == "missing_input":
        args = ["encode", "--checkpoint", ck, "--input", str(tmp_path / "none.txt"), "--output", str(out)]
    else:
        monkeypatch.delenv("INVEMB_DATA", raising=False)
        args = ["evaluate", "--checkpoint", ck, "--scorer", "none"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("invemb: error: ")
    assert not out.exists() and not (tmp_path / "t.txt").exists()


BAD_ARGS = {
    "batch_negative": (["encode", "--batch-size", "-1"], "--batch-size must be in [1,"),
    "batch_zero": (["decode", "--batch-size", "0"], "--batch-size must be in [1,"),
    "beam_zero": (["decode", "--beam-size", "0"], "--beam-size must be in [1,"),
    "beam_absurd": (["roundtrip", "--beam-size", "100000"], "--beam-size must be in [1,"),
    "beam_sizes_text": (["evaluate", "--beam-sizes", "1,x"], "--beam-sizes must be comma-separated"),
    "limit_negative": (["evaluate", "--limit", "-5"], "--limit must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments_are_one_line_errors(case, toy_checkpoint, tmp_path, capsys):
    extra, message = BAD_ARGS[case]
    (tmp_path / "t.txt").write_text("Oil falls\n")
    np.save(tmp_path / "v.npy", np.zeros((1, 64), np.float32))
    io = {"encode": ["--input", str(tmp_path / "t.txt"), "--output", str(tmp_path / "o.npy")],
          "decode": ["--input", str(tmp_path / "v.npy"), "--output", str(tmp_path / "o.txt")],
          "roundtrip": ["Oil falls"], "evaluate": ["--scorer", "none"]}[extra[0]]
    assert main(extra[:1] + ["--checkpoint", str(toy_checkpoint)] + extra[1:] + io) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "o.txt").exists()


@pytest.mark.parametrize("case", ["empty_npy", "huge_vector", "blank_line"])
def test_bad_files_are_one_line_errors(case, toy_checkpoint, tmp_path, capsys):
    ck = ["--checkpoint", str(toy_checkpoint)]
    if case == "empty_npy":
        (tmp_path / "v.npy").write_bytes(b"")
        args, message = ["decode", *ck, "--input", str(tmp_path / "v.npy")], "is not a .npy array"
    elif case == "huge_vector":
        v = np.zeros((3, 64), np.float32)
        v[2, 5] = 3.4e38
        np.save(tmp_path / "v.npy", v)
        args, message = ["decode", *ck, "--input", str(tmp_path / "v.npy")], "row(s) [2] have components beyond"
    else:
        (tmp_path / "t.txt").write_text("Oil falls\n\nGold up\n")
        args = ["encode", *ck, "--input", str(tmp_path / "t.txt"), "--output", str(tmp_path / "o.npy")]
        message = "line(s) 2 are blank"
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.npy").exists()


CONFIG_DAMAGE = {
    "max_length_huge": (("encoder", "max_length"), 10 ** 9, "encoder.max_length must be in [3, 512]"),
    "negative_width": (("decoder", "d_model"), -64, "decoder.d_model must be in [1,"),
    "zero_heads": (("decoder", "n_heads"), 0, "decoder.n_heads must be in [1,"),
    "string_number": (("decoder", "n_layers"), "2", "decoder.n_layers must be int"),
    "unknown_top_level": ((None, "surprise"), 1, "unknown top-level key(s) ['surprise']"),
    "model_as_string": ((None, "invemb_model"), "minilm", '"invemb_model" must be a mapping'),  # issue 31 item 8
    "decoder_as_list": (("decoder", None), [1, 2], "config section decoder must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_DAMAGE))
def test_absurd_checkpoint_config_values_are_one_line_errors(case, toy_checkpoint, tmp_path, capsys):
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(toy_checkpoint, ck)
    (part, key), value, message = CONFIG_DAMAGE[case]
    meta = json.loads((ck / "config.json").read_text())
    if key is None:
        meta["invemb_model"][part] = value
    else:
        (meta["invemb_model"][part] if part else meta)[key] = value
    (ck / "config.json").write_text(json.dumps(meta))
    assert main(["roundtrip", "--checkpoint", str(ck), "Oil falls"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
