"""Text as written through a REAL tritonserver: a toy model with surface heads (random weights, a small surface
table: tests/test_export_surface.py) exported into a fresh repository, which then serves `decoder_surface`; the
`beam_search` / `roundtrip` texts, the client-side search and the client CLI equal OnnxEmbedder's written texts,
and their `normalized` forms equal OnnxEmbedder.decode(normalized=True)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from invemb.serving.client import ClientError, TritonClient, load_export
from invemb.serving.launch import TritonServer

TEXTS = ["Oil prices fall as OPEC output rises", "U.S. stocks rise", "iPhone sales beat estimates",
         "Fed holds rates", "Ben & Jerry's owner Unilever cuts jobs"]


@pytest.fixture(scope="module")
def surface_repo(tmp_path_factory) -> tuple[Path, Path]:
    from test_export_surface import surface_toy

    from invemb.export import exporter, placement
    base = tmp_path_factory.mktemp("triton_surface")
    ckpt = surface_toy().save_pretrained(base / "ckpt")
    repo, export_dir = placement.fresh_triton_repo(base / "repo"), base / "onnx"
    with exporter.quiet_exporter():
        exporter.export_checkpoint(ckpt, export_dir, triton_repo=repo, triton_encoder="fp32")
    return repo, export_dir


@pytest.fixture(scope="module")
def surface_client(surface_repo):
    repo = surface_repo[0]
    with TritonServer(repo, startup_timeout=300, log_file=repo.parent / "server.log") as server:
        with TritonClient(server.grpc_url, timeout=120, ready_timeout=60) as c:
            yield c


@pytest.fixture(scope="module")
def local(surface_repo):
    """In-process ORT over the same export: vectors, written texts, normalised texts (beam 4)."""
    from invemb.ort import OnnxEmbedder
    emb = OnnxEmbedder(surface_repo[1], threads=1)
    vectors = emb.encode(TEXTS)
    written, normalized = emb.decode(vectors, beam_size=4), emb.decode(vectors, beam_size=4, normalized=True)
    assert written != normalized  # the heads change the text: every comparison below can fail
    return {"emb": emb, "vectors": vectors, "written": written, "normalized": normalized}


def test_placement_serves_the_surface_graph(surface_repo):
    repo, export_dir = surface_repo
    assert (repo / "decoder_surface" / "1" / "model.onnx").read_bytes() == \
        (export_dir / "decoder_surface.onnx").read_bytes()
    assert 'name: "decoder_surface"' in (repo / "decoder_surface" / "config.pbtxt").read_text()
    assert (repo / "beam_search" / "1" / "surface.json").read_bytes() == (export_dir / "surface.json").read_bytes()


def test_roundtrip_and_beam_search_return_the_written_text(surface_client, local):
    assert surface_client.roundtrip(TEXTS, batch_size=2) == local["written"]
    assert surface_client.roundtrip(TEXTS, batch_size=2, normalized=True) == local["normalized"]
    assert surface_client.decode(local["vectors"], beam_size=4, batch_size=3) == local["written"]
    assert surface_client.decode(local["vectors"], beam_size=4, normalized=True) == local["normalized"]
    out = surface_client.infer("beam_search", {"sentence_embedding": local["vectors"][:2]},
                               ["text", "normalized_text"])  # both forms of one search
    assert [t.decode() for t in out["text"].reshape(-1)] == local["written"][:2]
    assert [t.decode() for t in out["normalized_text"].reshape(-1)] == local["normalized"][:2]


def test_client_side_search_tags_through_the_served_graph(surface_client, local, surface_repo):
    from invemb.manifest import load_export_surface
    manifest, tokenizer = load_export(surface_repo[1])
    table = load_export_surface(surface_repo[1], manifest)
    kw = dict(beam_size=4, batch_size=2, mode="client", manifest=manifest, tokenizer=tokenizer)
    assert surface_client.decode(local["vectors"], surface_table=table, **kw) == local["written"]
    assert surface_client.decode(local["vectors"], normalized=True, **kw) == local["normalized"]
    with pytest.raises(ClientError, match="surface table"):  # never the normalised text by mistake
        surface_client.decode(local["vectors"], **kw)


def test_client_cli_prints_both_forms(surface_client, local, surface_repo, tmp_path):
    from invemb.serving.client_cli import main
    np.save(tmp_path / "v.npy", local["vectors"])
    url = surface_client.url
    for flag, want in (([], local["written"]), (["--normalized"], local["normalized"])):
        out = tmp_path / f"texts{len(flag)}.txt"
        assert main(["--url", url, "--no-progress", "decode", str(tmp_path / "v.npy"), "--out", str(out)] + flag) == 0
        assert out.read_text(encoding="utf-8").splitlines() == want
