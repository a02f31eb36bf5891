"""ONNX export of the shipped model's design (multi-query pooling, chunk memory, compact output vocabulary) on a
toy backbone: graph parity at untraced shapes, and ORT beam search == torch texts on memorised headlines."""
from __future__ import annotations

from invemb.export import exporter
from invemb.export import validate


def test_compact_multiquery_export_matches_torch(every_lever_toy, headlines32, tmp_path):
    out = tmp_path / "onnx"
    with exporter.quiet_exporter():
        manifest = exporter.export_model(every_lever_toy, out)
    assert manifest["vocab_size"] == len(every_lever_toy.tokenizer)  # the graphs speak tokenizer ids
    rows = validate.graph_parity(every_lever_toy, out, threads=1)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    rows, details = validate.beam_parity(every_lever_toy, out, headlines32[:16], beam_size=4)
    assert all(r.ok for r in rows), rows
    assert details["torch_exact_match"] == 1.0  # memorised: the texts compared are the real headlines


def test_compact_graph_scores_equal_full_vocab_rows(every_lever_toy, headlines32, tmp_path):
    """The graphs log-softmax and rank the compact vocabulary's Vc columns only; what leaves them must still be the
    reference search's rows: log_softmax over all V tokenizer ids of decoder.step's full logits (pieces outside
    the compact vocabulary at ~NEG_LOGIT), and top_ids = the best ids of those rows, ties by lower id."""
    import numpy as np
    import torch

    from invemb.generation import log_softmax
    from invemb.ort import make_session

    model = every_lever_toy
    dec = model.decoder
    assert dec.compact and dec.vocab_ids.numel() < model.tokenizer.vocab_size  # the case under test
    out = tmp_path / "onnx"
    with exporter.quiet_exporter():
        exporter.export_model(model, out)
    vecs = model.encode(headlines32[:5])  # [5,S]
    sess = make_session(out / "decoder_init.onnx", threads=1)
    lp, top_v, top_i = sess.run(["log_probs", "top_log_probs", "top_ids"], {"sentence_embedding": vecs})
    with torch.no_grad():
        cache = dec.init_cache(torch.as_tensor(vecs))
        bos = torch.full((5, 1), model.bos_id, dtype=torch.long)
        ref = log_softmax(dec.step(bos, cache)[0][:, -1].float().numpy())  # [5,V]: what TorchStepper returns
    known = np.zeros(ref.shape[1], bool)
    known[dec.vocab_ids.numpy()] = True
    np.testing.assert_allclose(lp[:, known], ref[:, known], atol=1e-4)
    assert (lp[:, ~known] < -1e8).all() and (ref[:, ~known] < -1e8).all()
    k = top_i.shape[1]
    order = np.lexsort((np.arange(ref.shape[1])[None].repeat(5, 0), -ref), axis=1)[:, :k]  # best first, lower id
    np.testing.assert_array_equal(top_i, order)
    np.testing.assert_allclose(top_v, np.take_along_axis(ref, order, 1), atol=1e-4)
    assert validate.consistent_top(lp, top_v, top_i)
