"""Training from the feature cache: the same run as with the live frozen backbone (plain PyTorch), and under
DeepSpeed ZeRO-2 on 2 CPU ranks with the shipped recipe's levers (compact vocabulary, buckets, sampled softmax,
cosine); the final checkpoint loads and round-trips."""
from __future__ import annotations

import pytest
from _train_fixtures import DEEPSPEED, FAST, TOY, assert_final_reproduces_examples, launch, records, write_headlines

FROZEN = ["model.encoder.freeze_backbone=true"]
LEVERS = ["compact_vocab=true", "bucket_batches=true", "sampled_softmax=64", "lr_schedule=cosine",
          "warmup_steps=2", "model.encoder.pooling=multiquery", "model.encoder.pool_queries=4",
          "model.decoder.memory_mode=chunks", "model.decoder.memory_slots=4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_headlines(tmp_path_factory.mktemp("data") / "headlines.txt")


def test_cached_features_train_like_the_live_backbone(data, tmp_path):
    runs = {}
    for name, extra in (("live", []), ("cached", [f"feature_cache={tmp_path / 'cache'}"])):
        out = tmp_path / name
        p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, *FROZEN, *extra])
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        runs[name] = records(out, "val")
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())
    a, b = runs["live"][-1], runs["cached"][-1]
    assert a["step"] == b["step"] == 6
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=2e-2)  # float16 cache: not bit-identical


def test_augmentations_train_from_caches_built_once_per_group(data, tmp_path):
    cache = tmp_path / "cache"
    base = ["--config", TOY, "--data", data, *FAST, *FROZEN, f"feature_cache={cache}", "augment_crops=1"]
    p = launch([*base, "--out", tmp_path / "crops"])
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    first = {f.name: (f / "states.f16").stat().st_mtime_ns for f in cache.iterdir()}
    assert len(first) == 2  # the data set, its crops
    p = launch([*base, "augment_splices=2", "--out", tmp_path / "splices"])
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "augmentation: " in p.stdout and "splices 2 per headline" in p.stdout
    after = {f.name: (f / "states.f16").stat().st_mtime_ns for f in cache.iterdir()}
    assert len(after) == 3 and all(after[k] == v for k, v in first.items())  # only the splices were built
    assert records(tmp_path / "splices", "val")[-1]["step"] == 6


@pytest.mark.slow
def test_cached_recipe_under_deepspeed_zero2(data, tmp_path):
    from invemb.model import InvertibleEmbedder
    assert DEEPSPEED.is_file()
    out = tmp_path / "ds"
    p = launch(["--config", TOY, "--data", data, "--out", out, *FAST, *FROZEN, *LEVERS,
                f"feature_cache={tmp_path / 'cache'}", "deepspeed_config=train/ds_config/zero2.json"], ranks=2)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert [r["step"] for r in records(out, "val")] == [3, 6]
    model = InvertibleEmbedder.from_pretrained(out / "final")
    assert model.config.decoder.output_vocab > 0 and model.config.encoder.pooling == "multiquery"
    assert_final_reproduces_examples(out)  # the consolidated ZeRO-2 weights decode as the training process did
