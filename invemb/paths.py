"""Where the source checkout is, declared once: the folder holding this package (an editable install, the way
scripts/setup.sh installs invemb). The shipped model (models/), the recipes (train/configs/), the DeepSpeed JSON
(train/ds_config/), the Triton model repository (model_repository/) and the git hash of a run are found from here.
"""
from __future__ import annotations

from pathlib import Path


def checkout_root() -> Path:
    """The folder that holds the `invemb/` package (the repository root of a source checkout)."""
    return Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> Path:
    """A config-relative path: absolute, else relative to the working directory, else to the checkout."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else checkout_root() / p
