"""Where the source checkout is, declared once: the folder holding this package (an editable install, the way
scripts/setup.sh installs invemb). The shipped model (models/), the recipes (train/configs/), the DeepSpeed JSON
(train/ds_config/), the Triton model repository (model_repository/) and the git hash of a run are found from here.
"""
from __future__ import annotations

import os
from pathlib import Path


def checkout_root() -> Path:
    """The folder that holds the `invemb/` package (the repository root of a source checkout)."""
    return Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> Path:
    """A config-relative path: absolute, else relative to the working directory, else to the checkout."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else checkout_root() / p


def display_path(path: str | os.PathLike) -> str:
    """How a result names a file or folder: relative to the checkout when inside it (`models/invemb-minilm-s768`),
    else by its own name (a data set outside the repository: `financial-news-headlines`; a temporary run folder:
    its last part), never an absolute path of the machine that measured it. A word that is no path stays as is."""
    p = Path(path).expanduser()
    for full in (Path(os.path.abspath(p)), p.resolve()):  # as written, then with links followed
        try:
            return full.relative_to(checkout_root()).as_posix() or "."
        except ValueError:
            pass
    return p.name or str(path)


def display_command(argv: list[str]) -> str:
    """A command line as a result shows it: each absolute path (alone, `--opt=PATH` or `key=PATH`) through
    display_path, so `python /repo/scripts/x.py --data /home/me/financial-news-headlines` reads
    `python scripts/x.py --data financial-news-headlines`; relative paths stay as typed."""
    import shlex

    def one(arg: str) -> str:
        key, sep, value = arg.rpartition("=") if "=" in arg else ("", "", arg)
        if os.path.isabs(value):
            value = display_path(value)
        return key + sep + value
    return shlex.join(one(str(a)) for a in argv)
