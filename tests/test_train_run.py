"""train/run.py in plain-PyTorch mode on the toy recipe: run-folder outputs, kill + resume equivalence, bad input."""
from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from _train_fixtures import (FAST, REPO, RUN, TOY, assert_final_reproduces_examples, env, final_state, launch, records,
                             write_headlines)

from invemb.training import run as train_run

BERTSCORE = ["bertscore_subset=4", "bertscore_model=all-MiniLM-L6-v2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_headlines(tmp_path_factory.mktemp("data") / "headlines.txt")


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, *BERTSCORE])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_run_folder_has_config_metrics_plots_examples_and_final(uninterrupted):
    out = uninterrupted
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_steps"] == 6 and cfg["model"]["encoder"]["sentence_dim"] == 64
    assert (out / "config.yaml").is_file() and len((out / "git.txt").read_text().strip()) >= 7
    train, val = records(out, "train"), records(out, "val")
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in val] == [3, 6]
    for key in ("loss", "lr", "tokens_per_s", "samples_per_s", "top1", "top5"):
        assert all(r[key] >= 0 for r in train), key
    for key in ("val_loss", "val_top1", "val_top5", "val_bertscore", "train_bertscore"):
        assert all(0 <= r[key] < 20 for r in val), key
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("loss.png", "accuracy.png", "top5.png", "bertscore.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG", name
    table = (out / "examples.md").read_text().splitlines()
    assert table[0].startswith("| # | validation headline | greedy | beam 4 |") and len(table) >= 2 + 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_val"]["step"] == 6 and summary["engine"] == "plain"
    assert_final_reproduces_examples(out)


def test_killed_and_resumed_run_matches_uninterrupted(uninterrupted, data, tmp_path):
    out = tmp_path / "b"
    args = ["--config", TOY, "--data", data, "--out", out, *FAST, *BERTSCORE]
    p = launch(args + ["--stop-after-steps", "3"])  # step 3 is not a save_every step: saved because of the stop
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003" and not (out / "final").exists()
    p = launch(args + ["--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = records(uninterrupted, "val"), records(out, "val")
    assert [r["step"] for r in b] == [3, 6]  # nothing logged twice
    for key in ("val_loss", "val_top1", "val_top5", "val_bertscore", "lr"):
        assert b[-1][key] == pytest.approx(a[-1][key], abs=1e-5), key
    sa, sb = final_state(uninterrupted), final_state(out)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=1e-5, msg=k)


def _fails(capsys, argv: list, match: str, out=None) -> None:
    rc = train_run.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and match in err and "\n" not in err, err
    if out is not None:
        assert not out.exists()  # failed before any training output


def test_bad_input_fails_before_training(capsys, data, tmp_path, monkeypatch):
    out = tmp_path / "never"
    base = ["--config", TOY, "--out", out]
    _fails(capsys, base + ["--data", tmp_path / "missing"], "does not exist", out)
    (tmp_path / "empty.txt").write_text("\n  \n")
    _fails(capsys, base + ["--data", tmp_path / "empty.txt"], "no headlines found", out)
    _fails(capsys, base + ["--data", data, "bogus_key=1"], "unknown config key(s) in train: ['bogus_key']", out)
    _fails(capsys, base + ["--data", data, "model.decoder.bogus=1"], "unknown config key(s) in decoder", out)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("preset: toy\nlearning_rate: 0.1\n")
    _fails(capsys, ["--config", bad_yaml, "--out", out, "--data", data], "['learning_rate']", out)
    _fails(capsys, ["--config", tmp_path / "nope.yaml", "--data", data], "does not exist")
    _fails(capsys, base + ["--data", data, "train_limit=4"], "fewer than one optimizer step", out)
    _fails(capsys, base + ["--data", data, "deepspeed_config=train/ds_config/nope.json"], "nope.json", out)
    conflicting = tmp_path / "ds.json"
    conflicting.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}))
    _fails(capsys, base + ["--data", data, f"deepspeed_config={conflicting}"], "disagrees with the recipe", out)
    _fails(capsys, base + ["--data", data, "--resume"], "no checkpoint", out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _fails(capsys, base + ["--data", data, "batch_size=7", "deepspeed_config=train/ds_config/zero2.json"],
           "batch_size 7 is not divisible by the world size 2", out)
    _fails(capsys, base + ["--data", data], "need a deepspeed_config", out)


def test_resume_refuses_an_incompatible_checkpoint(capsys, uninterrupted, data, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    before = (out / "metrics.jsonl").read_text()
    base = ["--config", TOY, "--data", data, "--out", out, *FAST]
    _fails(capsys, base + ["--resume", "model.decoder.n_layers=1"], "different model config (decoder.n_layers: 2 -> 1)")
    _fails(capsys, base + ["--resume", "batch_size=4"], "batch_size was 8, now 4")
    _fails(capsys, base + ["--resume", "deepspeed_config=train/ds_config/zero2.json"], "engine was 'plain'")
    _fails(capsys, base, "already holds checkpoints")
    assert (out / "metrics.jsonl").read_text() == before


def test_float_literals_a_user_writes_are_floats(capsys, data, tmp_path):
    """`lr=2e-4` (YAML 1.1 reads a float without a dot, or with an unsigned exponent, as a string) and every other
    float form a user writes is a float, in the recipe file and in overrides; ints stay ints, strings strings."""
    recipe = tmp_path / "floats.yaml"
    recipe.write_text("preset: toy\nlr: 2e-4\nmin_lr: 1E-6\nweight_decay: .5\ngrad_clip: 1.0e3\nsim_model: 1e5x\n")
    cfg = train_run.load_config(str(recipe), [])
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.grad_clip) == (2e-4, 1e-6, 0.5, 1000.0)
    assert cfg.sim_model == "1e5x"
    cfg = train_run.load_config(str(TOY), ["lr=2e-4", "min_lr=1E-3", "noise_sigma=.5", "plateau_factor=-1.5e+3",
                                           "grad_clip=5.", "gumbel_tau=+3e2", "max_steps=12"])
    assert (cfg.lr, cfg.min_lr, cfg.noise_sigma, cfg.plateau_factor, cfg.grad_clip, cfg.gumbel_tau) == (
        2e-4, 1e-3, 0.5, -1500.0, 5.0, 300.0)
    assert cfg.max_steps == 12 and isinstance(cfg.max_steps, int)
    _fails(capsys, ["--config", TOY, "--data", data, "max_steps=1e3"], "train.max_steps must be int, got 1000.0")
    _fails(capsys, ["--config", TOY, "--data", data, "lr=[2e-4"], "override 'lr=[2e-4': the value is not valid YAML")


def test_cli_exit_code_and_one_line_error(data):
    p = subprocess.run([sys.executable, str(RUN), "--config", str(TOY), "--data", str(data), "nonsense=3"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "nonsense" in p.stderr, p.stderr


def test_fine_tuning_losses_train_end_to_end(data, tmp_path):
    """noise + Gumbel similarity (all-MiniLM-L6-v2) + min-over-paraphrases in the real loop; terms are logged."""
    texts = data.read_text().splitlines()
    para = tmp_path / "para.jsonl"
    para.write_text("".join(json.dumps({"text": t, "paraphrases": [t.lower() + " today", "markets move"]}) + "\n"
                            for t in texts))
    out = tmp_path / "ft"
    p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, "max_steps=2", "log_every=1",
                "noise_sigma=0.1", "sim_loss_weight=0.5", "gumbel_tau=0.5", f"paraphrase_file={para}"])
    assert p.returncode == 0, p.stderr[-3000:]
    train = records(out, "train")
    assert all(r["sim"] > 0 and r["para"] > 0 for r in train)
    assert all(r["loss"] == pytest.approx(r["ce"] + 0.5 * r["sim"] + r["para"], rel=1e-5) for r in train)
    assert (out / "final" / "model.safetensors").is_file()


def test_shipping_keeps_one_lineage_entry_per_run(uninterrupted, data, tmp_path):
    """ship(): a run continuing a shipped model (init_from) adds its steps, CPU hours and curve to the model's
    lineage; shipping the same run again (e.g. to add metrics) replaces its entry instead of counting it twice."""
    from invemb.training.ship import ship
    shipped = tmp_path / "models" / "toy-shipped"
    ship(uninterrupted, shipped)
    first = json.loads((shipped / "config.json").read_text())["info"]
    assert [h["steps"] for h in first["history"]] == [6] and len(first["curve"]) == 2  # val at steps 3, 6
    second_run = tmp_path / "b"
    p = launch(["--config", TOY, "--data", data, "--out", second_run, *FAST, f"init_from={shipped}"])
    assert p.returncode == 0, p.stderr[-3000:]
    for metrics in (None, {"bleu": 1.0}):  # shipped twice from the same run
        ship(second_run, shipped, metrics=metrics)
        info = json.loads((shipped / "config.json").read_text())["info"]
        assert [h["steps_cumulative"] for h in info["history"]] == [6, 12]
        assert [c["step"] for c in info["curve"]] == [3, 6, 9, 12]
        cpu = [h["cpu_hours_cumulative"] for h in info["history"]]
        assert cpu[1] == pytest.approx(cpu[0] + info["history"][1]["cpu_hours"], abs=2e-3)
    assert info["history"][1]["metrics"] == {"bleu": 1.0}
    from invemb.util import cpu_name
    assert all(h["machine"].startswith(cpu_name()) for h in info["history"])  # each run names its own CPU
    from invemb.training.ship import write_card
    card = write_card(shipped).read_text()
    assert card.count(f"| {cpu_name()}, ") == 2, card  # one machine cell per lineage row
    # the folder second_run started from now holds a later model (a third run shipped into it): shipping second_run
    # again keeps ITS lineage (recorded when it started), not the folder's new one
    third_run = tmp_path / "c"
    p = launch(["--config", TOY, "--data", data, "--out", third_run, *FAST, f"init_from={shipped}"])
    assert p.returncode == 0, p.stderr[-3000:]
    ship(third_run, shipped)
    assert [h["steps_cumulative"] for h in json.loads((shipped / "config.json").read_text())["info"]["history"]] == \
        [6, 12, 18]
    again = json.loads((ship(second_run, tmp_path / "models" / "again") / "config.json").read_text())["info"]
    assert [h["run"] for h in again["history"]] == [h["run"] for h in info["history"]]
    assert [h["steps_cumulative"] for h in again["history"]] == [6, 12]


def test_model_card_states_the_runs_own_data_and_recipe(uninterrupted, tmp_path):
    """The card's data set, split, seed, hold-out and recipe file come from the run (its config and the data facts
    its checkpoint recorded), not from constants of the shipped model's recipe."""
    from invemb.training.ship import card_metrics, ship, write_card
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    card = write_card(ship(run, tmp_path / "models" / "toy")).read_text()
    assert "`headlines.txt`, 240 headlines; seeded 90/10 train/validation split (seed 0: 216 / 24)" in card, card
    assert "no headlines held out by date" in card and "the first 96 training headlines only (train_limit)" in card
    assert "- Recipe: `train/configs/toy.yaml` (" in card and "--config train/configs/toy.yaml --out" in card
    assert 'from_pretrained("models/toy")' in card and "(the default model)" not in card  # not the default folder
    for constant in ("53,157", "30 days", "minilm-mq16", "Kaggle"):
        assert constant not in card, constant
    # another recipe (seed, split, hold-out) and data facts: the card follows them
    raw = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**raw, "split_seed": 7, "val_fraction": 0.2,
                                                 "holdout_newest_days": 14}))
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((ckpt / "invemb_state.json").read_text())
    state["data"].update(newest_from="2020-07-05", held_out_newest=12)
    (ckpt / "invemb_state.json").write_text(json.dumps(state))
    card = write_card(ship(run, tmp_path / "models" / "toy2")).read_text()
    assert "seeded 80/20 train/validation split (seed 7: 216 / 24)" in card, card
    assert "the newest 14 days (by the Time column, from 2020-07-05: 12 training-split headlines) held out" in card
    # the newest-headlines metrics are called held out only when the run's hold-out covers them
    fid = {"val": {"n": 24}, "newest": {"n": 5, "from": "2020-07-01", "greedy": {
        "token_acc": 0.5, "exact_match": 0.2, "bleu": 30.0, "bertscore_f1": 0.8, "scored_n": 5}}}
    assert list(card_metrics(fid, state["data"], raw)) == [
        "newest headlines (from 2020-07-01) (not all held out of training) (5), greedy"]
    assert list(card_metrics({**fid, "newest": {**fid["newest"], "from": "2020-07-09"}}, state["data"], raw)) == [
        "newest headlines (from 2020-07-09) (held out) (5), greedy"]


def test_card_names_the_default_decode_of_beam_rows():
    """A fidelity JSON that records decode's re-ranking margin measured the default decode (re-ranking "auto"): the
    card says so for beam rows (greedy has nothing to re-rank); an older JSON keeps the plain mode name."""
    from invemb.training.ship import card_metrics
    row = {"token_acc": 0.5, "exact_match": 0.2, "bleu": 30.0, "bertscore_f1": 0.8, "scored_n": 5}
    fid = {"val": {"n": 24, "greedy": row, "beam4": row}, "newest": {"n": 5, "from": "2020-07-01"}}
    assert list(card_metrics({**fid, "rerank_margin": 0.0075})) == [
        "validation (24), greedy", "validation (24), beam4 + rerank auto"]
    assert list(card_metrics(fid)) == ["validation (24), greedy", "validation (24), beam4"]


def test_card_gives_the_facts_of_a_fidelity_run():
    """Issue 29's figures reach the card: each row's number / name recall and all-facts-right share, the perturbed
    set's recall beside its originals', and the one-change distances with the training noise; rows of an older
    fidelity JSON without facts keep their plain text."""
    from invemb.training.ship import card_metrics
    row = {"token_acc": 0.5, "exact_match": 0.2, "bleu": 30.0, "bertscore_f1": 0.8, "scored_n": 5}
    facts = {**row, "number_recall": 0.875, "name_recall": 0.9, "facts_all_right": 0.8125}
    fid = {"val": {"n": 24, "beam4": facts}, "newest": {"n": 5, "from": "2020-07-01", "beam4": row},
           "perturbed": {"n": 12, "beam": 4, "originals": {**facts, "number_recall": 0.95, "name_recall": 0.96},
                         "perturbed": {**facts, "number_recall": 0.5, "name_recall": 0.75}},
           "distance": {"noise_sigma": 0.0, "rows": [{"kind": "number", "mean": 0.4181},
                                                      {"kind": "name", "mean": 0.54}]}}
    card = card_metrics(fid)
    assert card["validation (24), beam4"].endswith("; facts: numbers 0.875, names 0.900, all facts right 0.812")
    assert "facts" not in card["newest headlines (from 2020-07-01) (not held out) (5), beam4"]
    assert card["perturbed facts (12 validation headlines, random numbers + swapped names), beam 4"] == \
        "numbers 0.500, names 0.750 (the originals: 0.950, 0.960)"
    assert card["one-change distance, mean (relative to the vector's size)"] == \
        "number 0.418, name 0.540 (training noise sigma 0.0)"


def test_fit_to_time_ends_the_cosine_at_the_deadline(monkeypatch):
    """fit_to_time: the schedule's length is the steps the pace so far fits before max_minutes (capped by
    max_steps), so the cosine reaches min_lr when time runs out instead of being cut off mid-way; a resumed
    schedule (from its checkpoint state) keeps the fitted end and the time already spent."""
    import types

    from invemb.config import preset
    from invemb.training import schedule
    clock = [1000.0]
    monkeypatch.setattr(schedule, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    cfg = preset("toy")
    cfg.max_minutes, cfg.fit_to_time, cfg.lr_schedule, cfg.warmup_steps = 2.0, True, "cosine", 0
    s = schedule.Schedule(cfg, 10 ** 6)
    s.start(40)
    clock[0] = 1030.0  # 100 steps in 30 s of a 120 s budget: 300 more fit
    s.fit(140)
    assert s.total == 440
    assert s.lr_at(440) == pytest.approx(cfg.min_lr)  # the cosine ends where the time does
    assert s.lr_at(439) - cfg.min_lr < 1e-4 * (cfg.lr - cfg.min_lr)  # the last step that fits: ~min_lr
    clock[0] = 1090.0  # slower since (200 steps in 90 s): the end moves closer
    assert s.after_step(240) is False and s.total == 440  # refitted every FIT_EVERY steps only
    s.fit(240)
    assert s.total == 240 + int(30 * 200 / 90)
    saved = s.state()
    assert saved == {"schedule_total": 306, "budget_spent_s": 90.0}
    clock[0] = 5000.0  # another process resumes the checkpoint of step 240
    r = schedule.Schedule(cfg, 10 ** 6, saved)
    r.start(240)
    assert r.total == 306 and r.lr_at(250) == s.lr_at(250)  # the same schedule, not max_steps'
    clock[0] = 5029.0
    assert not r.out_of_time()
    clock[0] = 5030.0  # 90 s before the checkpoint + 30 s now: the 2 minutes are spent
    assert r.out_of_time() and r.state()["budget_spent_s"] == 120.0
    clock[0] = 5020.0  # 60 steps in this process's 20 s, 10 s left: 30 more steps
    r.fit(300)
    assert r.total == 330
    r.cap = 310  # never beyond max_steps / epochs
    r.fit(300)
    assert r.total == 310
    r.cap, clock[0] = 10 ** 6, 9000.0  # past the deadline: the schedule ends at the next step
    r.fit(300)
    assert r.total == 301
    old = schedule.Schedule(cfg, 10 ** 6, {"step": 240, "wall_total_s": 90.0})  # a checkpoint from before these
    assert old.spent_before == 90.0 and old.total == 240 + int(30 * 240 / 90)  # fields: the run's wall time, pace
    cfg.fit_to_time = False  # without fit_to_time a checkpoint's total is not used: max_steps is the end
    assert schedule.Schedule(cfg, 500, saved).total == 500
    from invemb.config import TrainConfig
    from invemb.errors import InvembError
    for bad in ({"max_minutes": 0}, {"max_minutes": 5, "lr_schedule": "plateau"}):  # nothing to fit: an error
        with pytest.raises(InvembError, match="fit_to_time"):
            TrainConfig.from_dict({"preset": "toy", "lr_schedule": "cosine", "fit_to_time": True, **bad})


def test_a_gpu_runs_lineage_entry_names_its_gpu(uninterrupted, tmp_path):
    """A checkpoint taken on a GPU (its loop state names the accelerator): the lineage row names the GPU instead
    of this CPU, counts the run's wall hours as GPU hours, and the card sums the GPU minutes."""
    from invemb.training.ship import ship, write_card
    run = tmp_path / "gpu"
    shutil.copytree(uninterrupted, run)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((ckpt / "invemb_state.json").read_text())
    assert state["device"] == "cpu" and "accelerator" not in state  # what a CPU run records
    state.update(device="cuda", accelerator="NVIDIA H200", wall_total_s=600.0)
    (ckpt / "invemb_state.json").write_text(json.dumps(state))
    shipped = ship(run, tmp_path / "models" / "gpu-shipped")
    entry = json.loads((shipped / "config.json").read_text())["info"]["history"][-1]
    assert entry["machine"] == "1 x NVIDIA H200 (GPU)" and entry["gpu_hours"] == pytest.approx(600 / 3600, abs=1e-3)
    card = write_card(shipped).read_text()
    assert "| 1 x NVIDIA H200 (GPU) |" in card and "10.0 GPU minutes in all" in card, card


def test_the_written_form_recipe_trains_through_the_launcher(data, tmp_path):
    """The shipped recipe's decoder features through train/run.py: surface heads, spelled numbers, spelling
    practice, number and name swaps; the run writes its written-form table and the final model writes cased
    text; a resume with another spelling-practice rate is refused (other training targets)."""
    from invemb.model import InvertibleEmbedder
    out = tmp_path / "written"
    recipe = ["model.decoder.surface_heads=true", "model.decoder.spell_numbers=true", "augment_numbers=1",
              "augment_names=1", "compact_vocab=true"]
    p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, *recipe, "spell_practice=0.2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert isinstance(json.loads((out / "surface.json").read_text()), dict)  # mixed-case forms: none in this data
    val = records(out, "val")
    assert val and all(r["val_surface"] > 0 for r in val)
    model = InvertibleEmbedder.from_pretrained(out / "final")
    assert model.writes_surface and (out / "final" / "surface.json").is_file()
    p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, *recipe, "spell_practice=0.3", "--resume",
                "max_steps=8"])
    assert p.returncode == 2 and "spell_practice" in p.stderr, p.stderr[-2000:]


def test_a_new_seed_keeps_the_validation_split(uninterrupted, data, tmp_path):
    """`seed` draws augmentations and order; the split has its own split_seed, so continuing a model with another
    seed never trains on its validation headlines."""
    def val_heads(run):
        rows = (run / "examples.md").read_text().splitlines()[2:]
        return [r.split("|")[2].strip() for r in rows if r.startswith("|")]
    out = tmp_path / "seed3"
    p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, "max_steps=2", "seed=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert val_heads(out) == val_heads(uninterrupted) and len(val_heads(out)) >= 8
    out = tmp_path / "split3"
    p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, "max_steps=2", "split_seed=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert val_heads(out) != val_heads(uninterrupted)


def test_training_only_the_surface_heads_keeps_every_other_weight(uninterrupted, data, tmp_path):
    """train_only=surface on a model trained without surface heads: new heads (a hidden layer each, reading the
    final state and the embeddings of the piece read, the one before and the one after) learn the tags,
    every other weight stays bit for bit the start model's, so it decodes the same pieces; the recipe is refused
    without surface heads, and train_only takes no other value."""
    from invemb.model import InvertibleEmbedder
    out = tmp_path / "heads"
    recipe = [f"init_from={uninterrupted / 'final'}", "model.decoder.surface_heads=true",
              "model.decoder.surface_hidden=16", "model.decoder.surface_pieces=true", "model.decoder.surface_next=true", "train_only=surface"]
    p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, *recipe, "max_steps=24", "eval_every=12",
                "lr=0.01", "warmup_steps=0"])
    assert p.returncode == 0, p.stderr[-3000:]
    start, end = final_state(uninterrupted), final_state(out)
    heads = {k for k in end if ".case_head." in k or ".space_head." in k}
    assert {"decoder.case_head.0.weight", "decoder.case_head.2.weight"} <= heads and set(end) - heads == set(start)
    assert end["decoder.case_head.0.weight"].shape[1] == 4 * start["decoder.pos.weight"].shape[1]  # state + 3 pieces
    assert all(torch.equal(start[k], end[k]) for k in start), [k for k in start if not torch.equal(start[k], end[k])]
    val = records(out, "val")
    chance = math.log(4) + math.log(2)  # the new heads' loss before training (4 case tags, 2 space tags)
    assert val[-1]["val_surface"] <= val[0]["val_surface"] and val[-1]["val_surface"] < 0.5 * chance, val
    before, after = InvertibleEmbedder.from_pretrained(uninterrupted / "final"), InvertibleEmbedder.from_pretrained(
        out / "final")
    texts = data.read_text().splitlines()[:6]
    assert after.writes_surface and not before.writes_surface
    vec = before.encode(texts)
    assert after.decode_ids(vec, beam_size=4) == before.decode_ids(vec, beam_size=4)
    for bad, match in ((recipe[:1] + ["train_only=surface"], "surface_heads"),
                       (recipe[:3] + ["train_only=heads"], "train_only")):
        p = launch(["--config", TOY, "--data", data, "--out", tmp_path / "bad", *FAST, *bad])
        assert p.returncode == 2 and match in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def _number_headlines(tmp_path):
    kinds = itertools.product(["Apple", "Tesla", "Boeing", "Ford"], ["shares jump", "profit falls"],
                              ["after earnings", "on demand", "as oil rises"])
    rows = [f"{c} {e} {n}% {r}" for (c, e, r), n in zip(kinds, range(3, 99, 4))]  # 24 headlines, each a number
    data = tmp_path / "numbers.txt"
    data.write_text("\n".join(rows) + "\n")
    return data


def test_the_separation_term_trains_through_the_launcher(tmp_path):
    """separation_weight > 0: rows with a one-fact variant among the training texts (here the number swaps of
    headlines that hold a number) are paired in each batch and the hinge is logged and added to the loss."""
    data = _number_headlines(tmp_path)
    out = tmp_path / "sep"
    p = launch(["--config", TOY, "--data", data, "--out", out, "batch_size=8", "max_steps=3", "val_limit=4",
                "log_every=1", "eval_every=3", "save_every=3", "augment_numbers=2", "separation_weight=0.5",
                "separation_margin=5.0"])  # a margin no pair reaches: every paired row adds to the hinge
    assert p.returncode == 0, p.stderr[-3000:]
    assert "one-fact variant" in p.stdout
    train = records(out, "train")
    assert train and all(r["sep"] > 0 and 0 < r["paired"] <= 1 for r in train)
    assert all(r["loss"] == pytest.approx(r["ce"] + r["surface"] + 0.5 * r["sep"], rel=1e-5) for r in train)
    p = launch(["--config", TOY, "--data", data, "--out", tmp_path / "bad", "separation_margin=0"])
    assert p.returncode == 2 and "separation_margin" in p.stderr
    from invemb.training.card import recipe_line
    recipe = json.loads((out / "config.json").read_text())
    assert "separation term 0.5 x max(0, 5.0 - the relative distance" in recipe_line(recipe, None, "run", True)


def test_fact_weight_trains_through_the_launcher(tmp_path):
    """fact_weight > 1: the pieces of numbers (and names) weigh more in the training loss; the logged ce stays the
    plain mean, so the loss differs from ce + surface by the weighting alone."""
    data, out = _number_headlines(tmp_path), tmp_path / "facts"
    p = launch(["--config", TOY, "--data", data, "--out", out, "batch_size=8", "max_steps=3", "val_limit=4",
                "log_every=1", "eval_every=3", "save_every=3", "fact_weight=3.0", "model.decoder.surface_heads=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    train = records(out, "train")
    assert train and all(r["loss"] != pytest.approx(r["ce"] + r["surface"], rel=1e-4) for r in train)
    assert all(math.isfinite(r["loss"]) for r in train)
    for bad, match in (("fact_weight=0.5", "fact_weight must be >= 1"),
                       ("fact_weight=2", "fact_weight needs the decoder's own targets")):  # toy: no tags to weigh
        p = launch(["--config", TOY, "--data", data, "--out", tmp_path / "bad", "max_steps=1", bad])
        assert p.returncode == 2 and match in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    from invemb.training.card import recipe_line
    recipe = json.loads((out / "config.json").read_text())
    assert "the pieces of numbers and names weigh 3.0 in the cross-entropy" in recipe_line(recipe, None, "run", True)


def test_average_of_a_model_and_its_continuation(uninterrupted, data, tmp_path):
    """invemb.training.soup: (1 - w) * a + w * b tensor by tensor (w = 0 and 1 give a and b back), a loadable
    model whose lineage is b's plus one averaged row at b's CPU hours; models of unrelated lineages are refused."""
    from safetensors.torch import load_file
    from invemb.errors import InvembError
    from invemb.model import InvertibleEmbedder
    from invemb.training.ship import ship
    from invemb.training.soup import average_models
    a = ship(uninterrupted, tmp_path / "a")
    run_b = tmp_path / "run_b"
    p = launch(["--config", TOY, "--data", data, "--out", run_b, *FAST, f"init_from={a}", "lr=5e-2"])
    assert p.returncode == 0, p.stderr[-3000:]
    b = ship(run_b, tmp_path / "b")
    wa, wb = (load_file(str(m / "model.safetensors")) for m in (a, b))
    moved = [k for k in wa if wa[k].is_floating_point() and not torch.equal(wa[k], wb[k])]
    assert moved  # the continuation changed weights: the average is not trivially either model
    for w, want in ((0.0, wa), (1.0, wb)):
        got = load_file(str(average_models(a, b, w, tmp_path / f"w{w}") / "model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in want)
    mid = average_models(a, b, 0.25, tmp_path / "mid", metrics={"bleu": 1.0})
    got = load_file(str(mid / "model.safetensors"))
    for k in moved:
        assert got[k].dtype == wa[k].dtype
        torch.testing.assert_close(got[k].float(), 0.75 * wa[k].float() + 0.25 * wb[k].float(), atol=2e-3, rtol=2e-3)
    hist_b = json.loads((b / "config.json").read_text())["info"]["history"]
    hist = json.loads((mid / "config.json").read_text())["info"]["history"]
    assert hist[:-1] == hist_b and hist[-1]["averaged"]["weight_b"] == 0.25
    assert hist[-1]["cpu_hours_cumulative"] == hist_b[-1]["cpu_hours_cumulative"] and hist[-1]["metrics"] == {"bleu": 1.0}
    assert "average 0.75 x" in (mid / "README.md").read_text()
    model = InvertibleEmbedder.from_pretrained(mid)
    assert model.encode(["Oil prices fall"]).shape[-1] == 64
    with pytest.raises(InvembError, match="does not continue"):
        average_models(b, a, 0.5, tmp_path / "backwards")  # a does not continue b
    with pytest.raises(InvembError, match="within"):
        average_models(a, b, 1.5, tmp_path / "bad")
    bad = subprocess.run([sys.executable, str(REPO / "scripts/average_models.py"), "--a", str(a), "--b",
                          str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a shipped model folder" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, str(REPO / "scripts/average_models.py"), "--a", str(a), "--b", str(b),
                          "--out", str(tmp_path / "x"), "--metrics", str(tmp_path / "none.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--metrics" in bad.stderr and "does not exist" in bad.stderr, bad.stderr


def test_card_continue_line_gives_the_settings_init_from_needs():
    """The model card's "continue training" command must run: train/run.py refuses a recipe whose model differs from
    the start weights', so the card lists each setting where the model differs from its recipe file (the fact-slot
    model: number slots, width, memory, surface heads), and with them the recipe accepts the weights."""
    import json

    from invemb.errors import InvembError
    from invemb.training.card import _model_overrides
    from invemb.training.run import load_config, prepare_model_config
    model = REPO / "models" / "invemb-minilm-s768-facts"
    meta = json.loads((model / "config.json").read_text())
    line = _model_overrides(meta["invemb_model"], "train/configs/minilm-mq16.yaml")
    overrides = line.split()
    assert "model.encoder.number_slots=6" in overrides and "model.decoder.surface_heads=true" in overrides
    assert not any("output_vocab" in o for o in overrides)  # settled by the weights, not the recipe
    cfg = load_config(str(REPO / "train/configs/minilm-mq16.yaml"), overrides + [f"init_from={model}"])
    assert prepare_model_config(cfg, []) is None  # accepted (no "model config differs" error)
    with pytest.raises(InvembError, match="differs from the recipe"):
        prepare_model_config(load_config(str(REPO / "train/configs/minilm-mq16.yaml"), [f"init_from={model}"]), [])
    assert (model / "README.md").read_text().count(line.strip()) == 1  # the card says it


def test_recipe_asking_for_richer_surface_heads_gets_new_ones(tmp_path, headlines32):
    """Start weights with surface heads that do not read the next piece + a recipe with surface_next: the heads are
    rebuilt (reading it), not the old ones trained under a config that claims it (a model that would not load)."""
    import dataclasses

    from invemb.config import TrainConfig, preset
    from invemb.model import InvertibleEmbedder
    from invemb.training.targets import add_surface
    cfg = preset("toy").model
    cfg.decoder = dataclasses.replace(cfg.decoder, surface_heads=True, surface_pieces=True)
    model = InvertibleEmbedder(cfg)
    old = model.decoder.case_head
    recipe = TrainConfig()
    recipe.model = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, surface_next=True))
    add_surface(model, recipe, headlines32[:8], tmp_path, True)
    dec = model.decoder
    assert dec.cfg.surface_next and dec.case_head is not old
    first = dec.case_head if isinstance(dec.case_head, torch.nn.Linear) else dec.case_head[0]
    assert first.in_features == cfg.decoder.d_model * 4  # state + piece read + piece before + piece after
    out = model(**model.training_batch(headlines32[:8]))
    assert torch.isfinite(out["loss"]) and "surface" in out
    same = TrainConfig()
    same.model = recipe.model
    kept = dec.case_head
    add_surface(model, same, headlines32[:8], tmp_path, True)  # equal settings: the heads are kept
    assert model.decoder.case_head is kept
