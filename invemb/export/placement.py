"""Triton placement: the files of an export (graphs, manifest.json, tokenizer/) in a Triton model repository.

The export package reads one way: exporter.py (graphs) -> optimize.py (variants) -> placement.py (a repository).
This module imports neither of the others; export_checkpoint / exporter.place_export and export/optimize.py
--triton-repo call into it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from invemb.errors import InvembError
from invemb.manifest import graph_files, read_manifest, write_manifest

TRITON_GRAPHS = ("encoder", "decoder_init", "decoder_step", "decoder_onepass")
TRITON_ASSET_MODELS = ("tokenizer", "beam_search")  # models that get manifest.json + tokenizer/ (+ surface.json)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, replacing an existing `dst` (old one moved aside first, removed after)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old.{os.getpid()}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp.{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def fresh_triton_repo(dst: str | os.PathLike) -> Path:
    """dst/ = a clean copy of the checkout's committed model_repository/ (config.pbtxt + Python models; no
    generated graphs): the folder that place_in_triton_repo then fills. An existing dst is replaced (never the
    checkout's model_repository/ itself: that is the template)."""
    from invemb.paths import checkout_root
    src, dst = checkout_root() / "model_repository", Path(dst)
    if not src.is_dir():
        raise InvembError(f"model_repository/ not found in {checkout_root()} (invemb must be installed from a "
                          "source checkout: pip install -e .)")
    if dst.resolve() == src.resolve():
        raise InvembError(f"{dst} is the checkout's model_repository/ template; a fresh repository goes elsewhere")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    return dst


def place_in_triton_repo(export_dir: str | os.PathLike, repo: str | os.PathLike,
                         variant: str | None = None) -> list[Path]:
    """Copy graphs to R/<graph>/1/model.onnx and manifest.json + tokenizer/ to R/tokenizer/1/, R/beam_search/1/.
    `variant` (e.g. "int8_encoder", made by export/optimize.py) places that variant's graph files instead; the
    manifest copies record it as "served_variant" (served_variant(repo) reads it back).
    Only these files are replaced (config.pbtxt and model.py files written by the serving side stay)."""
    src, repo = Path(export_dir), Path(repo)
    manifest = read_manifest(src)
    files = graph_files(manifest, variant, src)
    placed = []
    for name, file in files.items():
        if name in TRITON_GRAPHS:
            dst = repo / name / "1" / "model.onnx"
            copy_atomic(src / file, dst)
            placed.append(dst)
    for name in TRITON_ASSET_MODELS:
        ver = repo / name / "1"
        ver.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=ver))
        shutil.copytree(src / manifest["tokenizer_dir"], tmp, dirs_exist_ok=True)
        replace_dir(tmp, ver / manifest["tokenizer_dir"])
        write_manifest(ver, {**manifest, "served_variant": variant})
        placed += [ver / "manifest.json", ver / manifest["tokenizer_dir"]]
        if "surface" in manifest:  # the surface table beside the manifest (invemb.manifest.load_export_surface)
            copy_atomic(src / manifest["surface"]["table"], ver / manifest["surface"]["table"])
            placed.append(ver / manifest["surface"]["table"])
    placed += _place_surface(src, repo, manifest, files)
    if "one_call" in manifest:  # the one-call beam search graph: a generated model of its own (config included)
        from invemb.export.beam_graph import triton_config
        dst = repo / "beam_search_op" / "1" / "model.onnx"
        copy_atomic(src / manifest["one_call"]["file"], dst)
        (repo / "beam_search_op" / "config.pbtxt").write_text(triton_config(manifest))
        placed.append(dst)
    elif (repo / "beam_search_op").is_dir():  # left by an earlier export: it would serve other weights
        shutil.rmtree(repo / "beam_search_op")
    return placed


def _place_surface(src: Path, repo: Path, manifest: dict, files: dict[str, str]) -> list[Path]:
    """decoder_surface as a generated Triton model of its own (config included, not committed: only exports of
    models with surface heads have it): beam_search runs it after its search (its own session or BLS) and a
    client-side search over gRPC too. Removed when this export has none (it would tag with other weights)."""
    from invemb.manifest import SURFACE_GRAPH
    model = repo / SURFACE_GRAPH
    if SURFACE_GRAPH not in files:
        if model.is_dir():
            shutil.rmtree(model)
        return []
    dst = model / "1" / "model.onnx"
    copy_atomic(src / files[SURFACE_GRAPH], dst)
    (model / "config.pbtxt").write_text(surface_config(manifest))
    return [dst]


def surface_config(manifest: dict) -> str:
    """config.pbtxt of the `decoder_surface` Triton model (inputs/outputs auto-completed from 1/model.onnx)."""
    s, t = manifest["sentence_dim"], manifest["max_length"]
    return f"""# Generated by export/to_onnx.py --triton-repo (invemb/export/placement.py) (surface heads);
# not committed. sentence_embedding [batch, {s}] + input_ids [batch, T] ([CLS] + generated pieces, padded
# after; T <= {t}) -> case_logits [batch, T, 4], space_logits [batch, T, 2]: the tags that give the decoded
# text as written (invemb.surface). One call per decoded batch, after the search. I/O auto-completed.
name: "decoder_surface"
backend: "onnxruntime"
max_batch_size: 512
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
dynamic_batching {{ }}
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
parameters {{ key: "inter_op_thread_count" value: {{ string_value: "1" }} }}
"""


def served_variant(repo: str | os.PathLike) -> str | None:
    """The export variant whose graphs a repository filled by place_in_triton_repo serves (None: the fp32 graphs),
    so that an in-process reference (OnnxEmbedder(export_dir, variant=...)) runs the same graphs."""
    return read_manifest(Path(repo) / "beam_search" / "1").get("served_variant")
