"""A one-call beam search graph: ONNX Runtime's `com.microsoft.BeamSearch` contrib op over the exported
decoder_init / decoder_step graphs, so a whole beam search is ONE session.run (or one Triton request to the
native onnxruntime backend; CUDA has a kernel for it).

    python export/to_onnx.py --one-call ...            # writes <export>/beam_search_op.onnx beside the graphs
    sentence_embedding [B,S] float32, num_beams [1] int32, max_length [1] int32 (generated tokens + 1)
        -> sequences [B, 1, max_length] int32 (BOS first, EOS, then pad), sequences_scores [B, 1] float32
    OneCallDecoder(export).decode(vectors)              # texts: as written when the export has decoder_surface
The op runs exactly two subgraphs, so the text as written (a model with surface heads) is one more call after it:
decoder_surface over [CLS] + the op's pieces (OneCallDecoder.decode chains it; a Triton client of beam_search_op
sends them to the served decoder_surface model).

How our graphs fit the op's T5-style (model_type 1) subgraphs, whose tensor names and order it checks:
- encoder subgraph = decoder_init: inputs encoder_input_ids / encoder_attention_mask / decoder_input_ids (int32
  [B,1] dummies the op builds from the outer graph's input_ids), the vector read from the OUTER scope (the main
  graph's `sentence_embedding`; the op runs its encoder once per item, before expanding to beams); outputs
  logits = our log_probs as [B,1,V] (the op's log_softmax of log-probs is the identity), encoder_hidden_states
  (a [B,1,S] placeholder no subgraph reads), present_key/value_self_<i> (our present_*) and
  present_key/value_cross_<i> (our cross_*).
- decoder subgraph = decoder_step: input_ids int32 [B,1] (cast to our int64), encoder_attention_mask (unused),
  past_key/value_self_<i> (our past_*), past_key/value_cross_<i> (our cross_*) -> logits, present_key/value_self_<i>.
Differences to the core search (read in ORT's beam_search_scorer.cc; the same-text rate on the shipped model is
measured by scripts/bench_export.py, never assumed):
- An ended hypothesis scores sum log p / length with length = BOS + tokens before EOS: the core's generated
  length with EOS, the same number. Beams still alive at the length cap are scored over BOS + max_length tokens
  (the core: max_length), and the "can a live beam still win" test takes the best of all 2k candidates, EOS ones
  included (the core: the best live beam).
- With early_stopping=0 the op's stop test for item b reads next_scores[b*k : b*k + 2k] where item b's candidates
  are at [b*2k : b*2k + 2k]: every item but the first is stopped by other items' scores, so a text can depend on
  the batch it was decoded in. This graph therefore sets early_stopping=1 (by default): an item stops as soon as
  it holds k ended hypotheses, the same for every batch; `early_stopping=False` builds the HF-style variant.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from invemb.errors import InvembError
from invemb.manifest import read_manifest, write_manifest

ONE_CALL_FILE = "beam_search_op.onnx"


def _subgraph(model, inputs, outputs, pre_nodes, post_nodes, name: str):
    """A GraphProto: model's nodes and initializers between `pre_nodes` and `post_nodes`, with new I/O."""
    from onnx import helper
    g = model.graph
    return helper.make_graph(list(pre_nodes) + list(g.node) + list(post_nodes), name, inputs, outputs,
                             initializer=list(g.initializer), value_info=list(g.value_info))


def _rename_inputs(model, mapping: dict[str, str]) -> None:
    """In place: every node input named k reads mapping[k] instead (so a new tensor can feed it)."""
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for attr in node.attribute:  # nested subgraphs (If/Loop) read outer names too
            if attr.g is not None and attr.g.node:
                for sub in attr.g.node:
                    for i, name in enumerate(sub.input):
                        if name in mapping:
                            sub.input[i] = mapping[name]


def build_one_call_graph(export_dir: str | os.PathLike, early_stopping: bool = True, file: str = ONE_CALL_FILE,
                         record: bool = True) -> Path:
    """Write <export_dir>/<file> from the fp32 decoder_init/decoder_step graphs and (record) note it in the
    manifest (`one_call`). Needs the transformer decoder (the GRU pair has no self-attention cache)."""
    import onnx
    from onnx import TensorProto, helper

    export_dir = Path(export_dir)
    m = read_manifest(export_dir)
    if m["decoder_kind"] != "transformer":
        raise InvembError(f"the one-call beam search graph needs a transformer decoder (this export: "
                          f"{m['decoder_kind']})")
    layers, heads, dh, v, s = m["num_layers"], m["num_heads"], m["head_dim"], m["vocab_size"], m["sentence_dim"]
    ids = m["special_ids"]
    init = onnx.load(str(export_dir / m["graphs"]["decoder_init"]["file"]))
    step = onnx.load(str(export_dir / m["graphs"]["decoder_step"]["file"]))
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32

    def kv(name, length):  # [B, heads, length, head_dim]
        return helper.make_tensor_value_info(name, f32, ["B", heads, length, dh])

    # ---- encoder subgraph (decoder_init): sentence_embedding comes from the outer scope
    enc_in = [helper.make_tensor_value_info(n, i32, ["B", 1])
              for n in ("encoder_input_ids", "encoder_attention_mask", "decoder_input_ids")]
    enc_out = [helper.make_tensor_value_info("logits", f32, ["B", 1, v]),
               helper.make_tensor_value_info("encoder_hidden_states", f32, ["B", 1, s])]
    post = [helper.make_node("Constant", [], ["_axis1"], value=helper.make_tensor("_a1", TensorProto.INT64, [1], [1])),
            helper.make_node("Unsqueeze", ["log_probs", "_axis1"], ["logits"]),
            helper.make_node("Unsqueeze", ["sentence_embedding", "_axis1"], ["encoder_hidden_states"])]
    for kind, src in (("self", "present"), ("cross", "cross")):
        for i in range(layers):
            for part in ("key", "value"):
                name = f"present_{part}_{kind}_{i}"
                post.append(helper.make_node("Identity", [f"{src}_{part}_{i}"], [name]))
                enc_out.append(kv(name, 1 if kind == "self" else m["memory_slots"]))
    encoder = _subgraph(init, enc_in, enc_out, [], post, "invemb_decoder_init")

    # ---- decoder subgraph (decoder_step)
    _rename_inputs(step, {"input_ids": "_input_ids_i64"})
    dec_in = [helper.make_tensor_value_info("input_ids", i32, ["B", 1]),
              helper.make_tensor_value_info("encoder_attention_mask", i32, ["B", "E"])]
    pre = [helper.make_node("Cast", ["input_ids"], ["_input_ids_i64"], to=TensorProto.INT64)]
    for kind, ours in (("self", "past"), ("cross", "cross")):
        for i in range(layers):
            for part in ("key", "value"):
                name = f"past_{part}_{kind}_{i}"
                dec_in.append(kv(name, "P" if kind == "self" else m["memory_slots"]))
                pre.append(helper.make_node("Identity", [name], [f"{ours}_{part}_{i}"]))
    dec_out = [helper.make_tensor_value_info("logits", f32, ["B", 1, v])]
    post = [helper.make_node("Constant", [], ["_axis1"], value=helper.make_tensor("_a1", TensorProto.INT64, [1], [1])),
            helper.make_node("Unsqueeze", ["log_probs", "_axis1"], ["logits"])]
    for i in range(layers):
        for part in ("key", "value"):
            name = f"present_{part}_self_{i}"
            post.append(helper.make_node("Identity", [f"present_{part}_{i}"], [name]))
            dec_out.append(kv(name, "P1"))
    # Our step graph's own inputs become internal tensors now (fed by the Identity/Cast nodes above).
    decoder = _subgraph(step, dec_in, dec_out, pre, post, "invemb_decoder_step")

    # ---- main graph: sentence_embedding -> BeamSearch
    main_in = [helper.make_tensor_value_info("sentence_embedding", f32, ["batch", s]),
               helper.make_tensor_value_info("num_beams", i32, [1]),
               helper.make_tensor_value_info("max_length", i32, [1])]

    def const(name, dtype, value):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", dtype, [1], [value]))
    nodes = [helper.make_node("Shape", ["sentence_embedding"], ["_shape"], start=0, end=1),  # [1] = B
             const("_one", TensorProto.INT64, 1),
             helper.make_node("Concat", ["_shape", "_one"], ["_ids_shape"], axis=0),  # [B, 1]
             helper.make_node("ConstantOfShape", ["_ids_shape"], ["_dummy_ids"],
                              value=helper.make_tensor("_z", i32, [1], [int(ids["bos"])])),
             helper.make_node("ConstantOfShape", ["_ids_shape"], ["_mask"], value=helper.make_tensor("_o", i32, [1], [1])),
             const("min_length", i32, 0), const("num_return_sequences", i32, 1),
             const("length_penalty", TensorProto.FLOAT, 1.0), const("repetition_penalty", TensorProto.FLOAT, 1.0),
             helper.make_node(
                 "BeamSearch",
                 ["_dummy_ids", "max_length", "min_length", "num_beams", "num_return_sequences", "length_penalty",
                  "repetition_penalty", "", "", "_mask"],
                 ["sequences", "sequences_scores"], domain="com.microsoft", name="beam_search",
                 eos_token_id=int(ids["eos"]), pad_token_id=int(ids["pad"]), decoder_start_token_id=int(ids["bos"]),
                 model_type=1, vocab_size=v, early_stopping=int(early_stopping), no_repeat_ngram_size=0,
                 encoder=encoder, decoder=decoder)]
    outs = [helper.make_tensor_value_info("sequences", i32, ["batch", 1, "length"]),
            helper.make_tensor_value_info("sequences_scores", f32, ["batch", 1])]
    graph = helper.make_graph(nodes, "invemb_beam_search", main_in, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", m["opset"]),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="invemb")
    model.ir_version = init.ir_version
    path = export_dir / file
    onnx.save(model, str(path))
    if record:
        m["one_call"] = {"file": file, "op": "com.microsoft.BeamSearch (model_type 1)",
                         "early_stopping": bool(early_stopping),
                         "inputs": ["sentence_embedding", "num_beams", "max_length"],
                         "outputs": ["sequences", "sequences_scores"],
                         "notes": "max_length counts BOS; see invemb/export/beam_graph.py for how its texts can "
                                  "differ from the core search's"}
        write_manifest(export_dir, m)
    return path


def triton_config(manifest: dict) -> str:
    """config.pbtxt of the `beam_search_op` Triton model (written beside its model.onnx by the exporter)."""
    return f"""# Generated by export/to_onnx.py --one-call --triton-repo (invemb/export/beam_graph.py); not committed.
# sentence_embedding [batch, S] + num_beams [1] + max_length [1] (generated tokens + 1) -> sequences
# [batch, 1, max_length] int32 (BOS first; cut at EOS {manifest['special_ids']['eos']}; detokenize client-side),
# sequences_scores [batch, 1]. The whole search is ONE onnxruntime call (com.microsoft.BeamSearch; on an NGC GPU
# image the native onnxruntime backend runs its CUDA kernel). Unbatched: num_beams/max_length have no batch axis.
name: "beam_search_op"
backend: "onnxruntime"
max_batch_size: 0
input [
  {{ name: "sentence_embedding" data_type: TYPE_FP32 dims: [ -1, {manifest['sentence_dim']} ] }},
  {{ name: "num_beams" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "max_length" data_type: TYPE_INT32 dims: [ 1 ] }}
]
output [
  {{ name: "sequences" data_type: TYPE_INT32 dims: [ -1, 1, -1 ] }},
  {{ name: "sequences_scores" data_type: TYPE_FP32 dims: [ -1, 1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
parameters {{ key: "inter_op_thread_count" value: {{ string_value: "1" }} }}
"""


class OneCallDecoder:
    """Runs beam_search_op.onnx: vectors -> generated ids per row (BOS dropped, cut at EOS); `decode` -> texts, as
    written when the export has surface heads: the op's sequences then go through decoder_surface (one more call,
    chained here; the BeamSearch op cannot run a third subgraph), else (or normalized=True) normalised."""

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None, file: str | None = None):
        from invemb.ort import make_session
        self.dir = Path(export_dir)
        self.manifest = m = read_manifest(self.dir)
        if "one_call" not in m and file is None:
            raise InvembError(f"{self.dir} has no one-call beam search graph (export with --one-call)")
        self.session = make_session(self.dir / (file or m["one_call"]["file"]), threads)
        self.eos, self.pad = int(m["special_ids"]["eos"]), int(m["special_ids"]["pad"])
        self.threads, self._texts = threads, None

    def decode(self, vectors: np.ndarray, beam_size: int = 4, max_length: int | None = None,
               normalized: bool = False) -> list[str]:
        """Vectors [B,S] -> texts: the op's ids, then (surface heads) the tags of one decoder_surface run."""
        from invemb.manifest import check_vectors
        vectors = check_vectors(self.manifest, vectors)
        ids, _ = self.decode_ids(vectors, beam_size, max_length)
        if self._texts is None:  # the export's tokenizer, surface table and decoder_surface session, once
            from invemb.graph_stepper import GraphEmbedder
            from invemb.manifest import load_export_surface, load_export_tokenizer
            from invemb.ort import make_session
            table = load_export_surface(self.dir, self.manifest)
            sess = make_session(self.dir / self.manifest["graphs"]["decoder_surface"]["file"], self.threads) \
                if table is not None else None
            self._texts = GraphEmbedder(lambda graph, feeds, names: dict(zip(names, sess.run(names, feeds))),
                                        self.manifest, load_export_tokenizer(self.dir, self.manifest),
                                        surface_table=table)
        return self._texts.texts(vectors, ids, normalized)

    def decode_ids(self, vectors: np.ndarray, beam_size: int = 4, max_length: int | None = None
                   ) -> tuple[list[list[int]], np.ndarray]:
        """(ids per row, scores [B]) for vectors [B,S]; max_length = generated tokens (default: the model's)."""
        from invemb.manifest import check_vectors, generation_limit
        vectors = check_vectors(self.manifest, vectors)
        steps = max_length or generation_limit(self.manifest)
        seq, scores = self.session.run(["sequences", "sequences_scores"], {
            "sentence_embedding": vectors, "num_beams": np.array([beam_size], np.int32),
            "max_length": np.array([steps + 1], np.int32)})
        out = []
        for row in seq[:, 0, 1:].tolist():  # [B, L-1]: BOS dropped
            out.append(row[:row.index(self.eos)] if self.eos in row else row)
        return out, scores[:, 0]
