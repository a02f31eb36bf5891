"""invemb.graph_stepper without a server: the manifest-driven Stepper over a GRU export (hidden/context cache)
equals the torch model's decode; manifests without step graphs and bad vectors fail clearly; the beam search's
argpartition top-n equals the stable full argsort it replaced."""
from __future__ import annotations

import numpy as np
import pytest

from invemb.errors import InvembError
from invemb.graph_stepper import GraphStepper
from invemb.manifest import cache_plan, check_vectors, generation_config


def test_gru_export_decodes_like_torch(tmp_path):
    import dataclasses

    import torch

    from invemb.export import exporter
    from invemb.config import preset
    from invemb.generation import generate
    from invemb.model import InvertibleEmbedder
    from invemb.ort import make_session
    torch.manual_seed(3)
    cfg = preset("toy").model
    cfg.decoder = dataclasses.replace(cfg.decoder, kind="gru")
    model = InvertibleEmbedder(cfg).eval()  # untrained: the token sequences are arbitrary but deterministic
    with exporter.quiet_exporter():
        manifest = exporter.export_model(model, tmp_path / "gru")
    plan = cache_plan(manifest)
    carried, first = plan.carried, plan.first
    assert carried == {"hidden": "present_hidden"} and first == {"hidden": "present_hidden", "context": "context"}
    sessions = {g: make_session(tmp_path / "gru" / manifest["graphs"][g]["file"], threads=1)
                for g in ("decoder_init", "decoder_step")}

    def run(graph, feeds, outputs):
        return dict(zip(outputs, sessions[graph].run(outputs, feeds)))

    vectors = np.random.default_rng(0).standard_normal((5, model.sentence_dim)).astype(np.float32)
    assert plan.top_k == 64  # the GRU pair ends in TopK too
    for beam in (1, 3):
        for candidates in (True, False):
            hyps = generate(GraphStepper(run, manifest, vectors, candidates), generation_config(manifest, beam))
            assert model.detokenize([h.tokens for h in hyps]) == model.decode(vectors, beam_size=beam, rerank="off")


def _manifest(graphs: dict) -> dict:
    return {"sentence_dim": 4, "max_length": 8, "special_ids": {"bos": 1, "eos": 2, "pad": 0},
            "decoder_kind": "x", "graphs": {name: {"inputs": [{"name": n} for n in ins],
                                                  "outputs": [{"name": n} for n in outs]}
                                           for name, (ins, outs) in graphs.items()}}


def test_manifests_without_usable_step_graphs_fail_clearly():
    onepass = _manifest({"encoder": (["input_ids"], ["sentence_embedding"]),
                         "decoder_onepass": (["sentence_embedding"], ["logits"])})
    with pytest.raises(InvembError, match="no 'decoder_init' graph.*decoder_init \\+ decoder_step"):
        cache_plan(onepass)
    unfed = _manifest({"decoder_init": (["sentence_embedding"], ["log_probs", "cross_key_0"]),
                       "decoder_step": (["input_ids", "cross_key_0", "past_key_0"], ["log_probs", "present_key_0"])})
    with pytest.raises(InvembError, match=r"unfed step inputs \['past_key_0'\]"):
        cache_plan(unfed)


def test_vector_and_generation_checks():
    m = _manifest({})
    assert check_vectors(m, [0.0, 1.0, 2.0, 3.0]).shape == (1, 4)
    with pytest.raises(InvembError, match=r"shape \[N, 4\].*\[2, 3\]"):
        check_vectors(m, np.zeros((2, 3)))
    with pytest.raises(InvembError, match=r"row\(s\) \[1\] contain NaN or Inf"):
        check_vectors(m, [[0, 0, 0, 0], [0, np.inf, 0, 0]])
    with pytest.raises(InvembError, match="not numeric"):
        check_vectors(m, [["a", "b", "c", "d"]])
    assert generation_config(m).max_length == 7 and generation_config(m).eos_id == 2
    with pytest.raises(InvembError, match=r"max_length must be in \[1, 7\]"):
        generation_config(m, 4, 8)
    with pytest.raises(InvembError, match=r"beam_size must be in \[1, 32\], got 0"):  # the core's check (limits)
        generation_config(m, 0)


def test_top_n_equals_stable_argsort():
    from invemb.generation import top_n
    rng = np.random.default_rng(0)
    for trial in range(200):
        rows, width, n = rng.integers(1, 6), rng.integers(1, 80), rng.integers(1, 12)
        x = rng.integers(-3, 3, size=(rows, width)).astype(float) if trial % 2 else rng.standard_normal((rows, width))
        if trial % 3 == 0:
            x[:, ::2] = -1e9  # dead beams, as at the first search step
        np.testing.assert_array_equal(top_n(x, n), np.argsort(-x, axis=1, kind="stable")[:, :n])


def test_reorder_keeps_per_item_entries_only_while_items_stay():
    """Beam reordering within items reuses the never-changing cross entries; dropping an item gathers them."""
    manifest = _manifest({"decoder_init": (["sentence_embedding"], ["log_probs", "cross_key_0", "present_key_0"]),
                          "decoder_step": (["input_ids", "cross_key_0", "past_key_0"],
                                           ["log_probs", "present_key_0"])})
    vectors = np.arange(2 * 4, dtype=np.float32).reshape(2, 4)

    def run(graph, feeds, outputs):
        assert "_item" not in feeds  # bookkeeping never reaches a graph
        n = len(feeds.get("sentence_embedding", feeds.get("input_ids")))
        item = feeds["sentence_embedding"][:, :1] if graph == "decoder_init" else feeds["cross_key_0"][:, :1]
        out = {"log_probs": np.zeros((n, 5), np.float32), "cross_key_0": np.repeat(item, 3, axis=1),
               "present_key_0": np.arange(n, dtype=np.float32)[:, None]}
        return {k: out[k] for k in outputs}
    st = GraphStepper(run, manifest, vectors, candidates=False)
    _, cache = st.start(3)  # rows 0-2: item 0, rows 3-5: item 1
    within = st.reorder(cache, np.array([2, 2, 0, 5, 3, 3]))
    assert within["cross_key_0"] is cache["cross_key_0"]  # same items per row: not copied
    np.testing.assert_array_equal(within["past_key_0"], cache["past_key_0"][[2, 2, 0, 5, 3, 3]])
    dropped = st.reorder(within, np.array([3, 4, 5]))  # item 0 finished
    np.testing.assert_array_equal(dropped["cross_key_0"][:, 0], [4.0, 4.0, 4.0])  # item 1's vector[0]
    assert dropped["_item"].tolist() == [1, 1, 1]
    _, stepped = st.step(np.array([1, 1, 1]), dropped)
    assert set(stepped) == {"cross_key_0", "past_key_0", "_item"}
