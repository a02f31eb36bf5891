"""`deepspeed --num_gpus 2 train/run.py` on CPU (2 gloo ranks): ZeRO-2 and ZeRO-3 (killed + resumed) agree, and
the consolidated final checkpoint loads with InvertibleEmbedder.from_pretrained and round-trips.

The first DeepSpeed start on a fresh machine JIT-builds a small shared-memory comm op (~1 min, then cached)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from _train_fixtures import (DEEPSPEED, FAST, TOY, assert_final_reproduces_examples, final_state, launch, records,
                             write_headlines)

pytestmark = pytest.mark.slow
ZERO = "deepspeed_config=train/ds_config/zero{}.json"
SHM_LEFT: dict[str, set[str]] = {}  # fixture -> DeepSpeed /dev/shm regions its runs left behind


def ds_regions() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    assert DEEPSPEED.is_file(), f"the deepspeed launcher is missing beside {DEEPSPEED.parent}/python"
    return write_headlines(tmp_path_factory.mktemp("data") / "headlines.txt")


@pytest.fixture(scope="module")
def zero2(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "zero2"
    before = ds_regions()
    p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, ZERO.format(2)], ranks=2)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    SHM_LEFT["zero2"] = ds_regions() - before
    assert p.stdout.count("done: 6 steps") == 1  # rank 0 alone prints
    return out


@pytest.fixture(scope="module")
def zero3_resumed(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "zero3"
    args = ["--config", TOY, "--data", data, "--out", out, *FAST, ZERO.format(3)]
    before = ds_regions()
    p = launch(args + ["--stop-after-steps", "3"], ranks=2)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert not (out / "final").exists()
    p = launch(args + ["--resume"], ranks=2)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    SHM_LEFT["zero3_resumed"] = ds_regions() - before
    return out


@pytest.mark.parametrize("run", ["zero2", "zero3_resumed"])
def test_final_checkpoint_loads_and_roundtrips(run, request):
    out = request.getfixturevalue(run)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["world_size"] == 2
    assert summary["zero_stage"] == (2 if run == "zero2" else 3)
    assert_final_reproduces_examples(out)  # consolidated from the ZeRO shards, loaded, decodes as in training
    assert (out / "plots" / "loss.png").is_file() and (out / "examples.md").is_file()


def test_zero3_killed_and_resumed_matches_zero2(zero2, zero3_resumed):
    """Same data order, seeds and fp32 math: only the reduction order differs between the stages."""
    a, b = records(zero2, "val"), records(zero3_resumed, "val")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for key in ("val_loss", "val_top1", "val_top5"):
        assert b[-1][key] == pytest.approx(a[-1][key], abs=1e-4), key
    sa, sb = final_state(zero2), final_state(zero3_resumed)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-4, rtol=1e-3, msg=k)


@pytest.mark.parametrize("run", ["zero2", "zero3_resumed"])
def test_ranks_remove_their_shm_allreduce_regions(run, request):
    """DeepSpeed's CPU allreduce makes one ~66 MB /dev/shm region per rank and never unlinks it; each rank of a
    run (also one stopped by --stop-after-steps and resumed) removes its own at exit."""
    request.getfixturevalue(run)
    assert SHM_LEFT[run] == set()
