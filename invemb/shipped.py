"""Where the model shipped with invemb lives: `models/<DEFAULT_MODEL>/` of the repository (env INVEMB_MODEL
overrides it). `InvertibleEmbedder.from_pretrained()`, every CLI verb without --checkpoint, export and serving
default to it."""
from __future__ import annotations

import os
from pathlib import Path

from invemb.errors import InvembError

DEFAULT_MODEL = "invemb-minilm-s768"
MODEL_ENV = "INVEMB_MODEL"


def models_dir() -> Path:
    from invemb.paths import checkout_root
    return checkout_root() / "models"


def default_model_path() -> Path:
    raw = os.environ.get(MODEL_ENV, "")
    p = Path(raw).expanduser() if raw else models_dir() / DEFAULT_MODEL
    if not (p / "config.json").is_file():
        raise InvembError(f"no shipped model at {p} ({'from $' + MODEL_ENV if raw else 'models/ of the checkout'}); "
                          "pass a checkpoint folder (--checkpoint DIR)")
    return p
