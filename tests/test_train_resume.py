"""Kill and resume with the shipped recipe's features (cosine fitted to a time budget, vector noise, word dropout,
crops and splices, the feature cache, buckets, compact vocabulary, sampled softmax, multi-query pooling + chunk
memory) on the toy model: the resumed run equals the uninterrupted one. And --resume refuses changed data.

The runs are in-process (train/run.py's main) so that the schedule's clock can be a fake one that advances 10 s per
training step: fit_to_time then fits the same schedule in every run, whatever the machine's speed."""
from __future__ import annotations

import json
import types

import pytest
import torch
from _train_fixtures import TOY, final_state, records, write_headlines

from invemb.training import loop, schedule
from invemb.training import run as train_run

RECIPE = ["batch_size=8", "train_limit=48", "val_limit=16", "log_every=1", "eval_every=3", "save_every=2",
          "max_steps=40", "lr_schedule=cosine", "warmup_steps=2", "fit_to_time=true", "max_minutes=1.5",
          "noise_sigma=0.1", "word_dropout=0.15", "augment_crops=1", "augment_splices=1", "splice_rounds=2",
          "model.encoder.freeze_backbone=true", "bucket_batches=true", "compact_vocab=true", "sampled_softmax=64",
          "model.encoder.pooling=multiquery", "model.encoder.pool_queries=4", "model.decoder.memory_mode=chunks",
          "model.decoder.memory_slots=4"]
STEP_SECONDS = 10.0  # of the fake clock: 1.5 min = 9 steps; fitted every 2 steps from step 2 on: 9 (not 40)


@pytest.fixture()
def step_clock(monkeypatch):
    """The schedule's clock advances STEP_SECONDS per training micro-batch (nothing else moves it)."""
    ticks = [0]
    monkeypatch.setattr(schedule, "time", types.SimpleNamespace(monotonic=lambda: STEP_SECONDS * ticks[0]))
    monkeypatch.setattr(schedule, "FIT_EVERY", 2)
    accumulate = loop.Trainer._accumulate

    def ticking(self, w, out):
        ticks[0] += 1
        return accumulate(self, w, out)
    monkeypatch.setattr(loop.Trainer, "_accumulate", ticking)
    return ticks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_headlines(tmp_path_factory.mktemp("data") / "headlines.txt")


def _state(run, tag):
    return json.loads((run / "checkpoints" / tag / "invemb_state.json").read_text())


def _main(argv: list) -> int:
    return train_run.main([str(a) for a in argv])


def test_killed_and_resumed_shipped_recipe_matches_uninterrupted(step_clock, data, tmp_path, capsys):
    base = ["--config", TOY, "--data", data, *RECIPE, f"feature_cache={tmp_path / 'cache'}"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _main(base + ["--out", a]) == 0
    assert _main(base + ["--out", b, "--stop-after-steps", "3"]) == 0  # killed after the fit at step 2
    killed = _state(b, "step_00000003")
    assert killed["schedule_total"] == 9 and killed["budget_spent_s"] == 3 * STEP_SECONDS
    step_clock[0] += 1000  # the resumed process starts at another time
    assert _main(base + ["--out", b, "--resume"]) == 0
    capsys.readouterr()
    train_a, train_b = records(a, "train"), records(b, "train")
    assert [r["step"] for r in train_a] == list(range(1, 10))  # the cosine was fitted to the 9 steps that fit
    assert [r["step"] for r in train_b] == list(range(1, 10))  # the resumed run stopped at the same deadline
    for ra, rb in zip(train_a, train_b):
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12), (ra["step"], ra["lr"], rb["lr"])
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
    # every step's lr is the cosine that ends at step 9 (its last step: ~min_lr), not at max_steps 40
    fitted = schedule.Schedule(train_run.load_config(str(TOY), RECIPE), 9)
    assert [r["lr"] for r in train_a] == pytest.approx([fitted.lr_at(i) for i in range(9)], rel=1e-12)
    val_a, val_b = records(a, "val"), records(b, "val")
    assert [r["step"] for r in val_b] == [r["step"] for r in val_a] == [3, 6, 9]
    for key in ("val_loss", "val_top1", "val_top5", "lr"):
        assert val_b[-1][key] == pytest.approx(val_a[-1][key], abs=1e-5), key
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=1e-5, msg=k)


def _refused(capsys, argv: list, match: str) -> None:
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot resume") and match in err and "\n" not in err, err


def test_resume_refuses_changed_data_unless_allowed(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--config", TOY, "--out", out, "batch_size=8", "train_limit=48", "val_limit=16", "max_steps=4",
            "log_every=2", "eval_every=2", "save_every=2", "augment_crops=1"]
    assert _main(base + ["--data", data, "--stop-after-steps", "2"]) == 0
    state = _state(out, "step_00000002")["data"]
    assert state["texts"] > 48 and len(state["sha256"]) == 64 and state["recipe"]["augment_crops"] == 1
    assert state["headlines"] == 240 and state["train_headlines"] == 48 and state["path"].endswith("headlines.txt")
    capsys.readouterr()
    # a recipe key that changes the texts or their order, named with its two values
    _refused(capsys, base + ["--data", data, "--resume", "augment_splices=1"], "augment_splices: 0 -> 1")
    _refused(capsys, base + ["--data", data, "--resume", "bucket_batches=true"], "bucket_batches: False -> True")
    _refused(capsys, base + ["--data", data, "--resume", "train_limit=40"], "train_limit: 48 -> 40")
    # the same recipe on another data set of as many headlines: another company's name in some of them
    other = tmp_path / "other.txt"
    other.write_text(data.read_text().replace("Apple", "Pear"))
    _refused(capsys, base + ["--data", other, "--resume"], "training texts differ")
    # a key that does not touch the data (the learning rate): resumed as before
    assert _main(base + ["--data", data, "--resume", "lr=2e-3"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert [r["step"] for r in records(out, "val")] == [2, 4]


def test_allow_data_change_resumes_on_the_new_data_with_a_warning(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--config", TOY, "--data", data, "--out", out, "batch_size=8", "train_limit=48", "val_limit=16",
            "max_steps=4", "log_every=2", "eval_every=2", "save_every=2"]
    assert _main(base + ["--stop-after-steps", "2"]) == 0
    capsys.readouterr()
    assert _main(base + ["--resume", "augment_crops=1", "--allow-data-change"]) == 0
    printed = capsys.readouterr().out
    assert "warning: resuming" in printed and "augment_crops: 0 -> 1" in printed
    assert _state(out, "step_00000004")["data"]["recipe"]["augment_crops"] == 1  # the new data from now on


def test_augmentation_keys_are_data_keys():
    """The data keys come from TrainConfig's fields (all but the listed non-data ones): every augmentation, split
    and hold-out key, including ones added after the list was written, is compared on --resume."""
    import dataclasses

    from invemb.config import TrainConfig
    from invemb.training.resume import NOT_DATA_KEYS, data_keys
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    keys = set(data_keys())
    # (fact_weight is the one fact_ key that is no data: a loss weight, in NOT_DATA_KEYS like separation_weight)
    assert {n for n in names if n.startswith(("augment_", "splice_", "crop_", "fact_", "holdout_"))
            and n != "fact_weight"} <= keys
    assert "fact_weight" in NOT_DATA_KEYS and "fact_rounds" in keys
    assert {"seed", "val_fraction", "train_limit", "bucket_batches", "paraphrase_file"} <= keys
    assert keys | (NOT_DATA_KEYS & set(names)) == set(names) and not keys & NOT_DATA_KEYS
