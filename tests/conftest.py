"""Shared fixtures: offline mode, the data path, and a toy model that memorises 32 real headlines."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "financial-news-headlines"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared headlines: $INVEMB_DATA, else ../shared/data/financial-news-headlines beside the repo."""
    path = Path(os.environ.get("INVEMB_DATA") or DEFAULT_DATA)
    assert path.exists(), f"headline data not found at {path}: set INVEMB_DATA"
    return path


@pytest.fixture(scope="session")
def headlines32(data_dir) -> list[str]:
    from invemb.data import load_split
    return [r.text for r in load_split(data_dir).train[:32]]


def train_toy(texts: list[str], kind: str = "transformer", steps: int = 120, lr: float = 3e-3, seed: int = 0,
              encoder_overrides: dict | None = None, **decoder_overrides):
    """Full-batch AdamW on `texts` with the toy preset: enough steps to memorise 32 headlines."""
    import dataclasses

    import torch

    from invemb.config import preset
    from invemb.model import InvertibleEmbedder

    torch.manual_seed(seed)
    cfg = preset("toy").model
    cfg.decoder = dataclasses.replace(cfg.decoder, kind=kind, **decoder_overrides)
    cfg.encoder = dataclasses.replace(cfg.encoder, **(encoder_overrides or {}))
    model = InvertibleEmbedder(cfg)
    batch = model.tokenize(texts)
    if cfg.decoder.surface_heads or cfg.decoder.spell_numbers:  # the decoder's own targets + tags
        from invemb.surface import build_table
        model.surface_table = build_table(model.tokenizer, texts, model.max_length) if cfg.decoder.surface_heads \
            else None
        batch = model.training_batch(texts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def toy_model(headlines32):
    """Autoregressive toy model trained to memorise `headlines32`."""
    return train_toy(headlines32)


@pytest.fixture(scope="session")
def toy_checkpoint(toy_model, tmp_path_factory) -> Path:
    return toy_model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "toy")


@pytest.fixture(scope="session")
def every_lever_toy(headlines32):
    """The shipped design (+ fact slots) on a toy backbone, memorising headlines32[:16] (core and export tests)."""
    from test_core_invert import train_every_lever
    return train_every_lever(headlines32[:16])
