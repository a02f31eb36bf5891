"""Optimised variants of an ONNX export, written next to the fp32 graphs (make_variants). The command
`python export/optimize.py` (invemb.export.optimize_report) writes them, measures them against fp32 and reports.

Variants (listed in manifest.json "variants", loadable with OnnxEmbedder(dir, variant=NAME)):
  opt   encoder.opt.onnx: ORT transformer fusions (onnxruntime.transformers.optimizer: BiasGelu, LayerNorm; not
        SkipLayerNorm or Attention, see optimize_encoder); decoders unchanged.
  int8  dynamic int8 (onnxruntime.quantization.quantize_dynamic, MatMul/Gemm weights, per-channel) of the
        optimised encoder and of the decoder graphs (constant Transposes of weights folded first, so the tied
        output projection is quantised too); the encoder's activation outliers are smoothed into its weights
        first (SmoothQuant, smooth_activations) and its activations get fixed calibrated ranges
        (static_activations: a vector does not depend on the other texts of its batch; --no-smooth turns both
        off), and its integer MatMuls are fused with their scales and biases (fuse_integer_matmuls). The
        decoders' activations stay per batch (dynamic): with them a text can depend on its batch. CPU.
  int8_encoder (made with int8) the int8 encoder with the fp32 decoder graphs: the encode path's int8, what a
        Triton repository serves by default (export/to_onnx.py --triton-repo; --triton-encoder fp32 opts out).
  fp16  fp16 weights/compute with fp32 inputs/outputs (keep_io_types), for a GPU; no speed-up on a CPU.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from invemb.errors import InvembError
from invemb.manifest import read_manifest, write_manifest

VARIANTS = ("opt", "int8", "fp16")
DEVICE = {"opt": "cpu", "int8": "cpu", "fp16": "gpu"}
SMOOTH_ALPHA = 0.85  # smooth_activations' migration strength (measured: 0.5 / 0.65 / 0.85 / 1.0 on the shipped encoder)
STATIC_MARGIN = 1.0  # calibrated activation ranges are widened by this factor (static_activations)


# ----------------------------------------------------------------------------------------------- graph passes
def fold_constant_transposes(model) -> int:
    """Replace Transpose(initializer) nodes by a transposed initializer (quantize_dynamic only quantises MatMul
    weights that are initializers; the dynamo export transposes the tied output projection at run time)."""
    from onnx import numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    folded = 0
    for node in list(g.node):
        if node.op_type == "Transpose" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)),
                                                         node.output[0]))
            g.node.remove(node)
            folded += 1
    return folded


def optimize_encoder(src: Path, dst: Path, num_heads: int = 0, hidden_size: int = 0,
                     fuse_skip_layer_norm: bool = False) -> dict:
    """ORT transformer fusions for a BERT-family encoder; returns the fused-operator counts (non-zero ones).
    Attention and EmbedLayerNormalization are not fused: on 2 CPU cores the fused Attention kernel was no faster
    than the unfused graph for headline-length inputs, and quantize_dynamic cannot type the fused graph.
    SkipLayerNormalization is not fused: ORT's CPU kernel is ~8x slower than Add + LayerNormalization
    (invemb.ort.CPU_DISABLED_OPTIMIZERS); measured on the shipped int8 encoder, 256 headlines, 1 thread, EPYC:
    783 sentences/s with the 12 fusions, 993 without, 1,047 with ORT's own load-time fusion skipped too.
    fuse_skip_layer_norm=True writes them anyway (the graph before; scripts/bench_export.py measures both)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    options = FusionOptions("bert")
    options.enable_attention = options.enable_embed_layer_norm = False
    options.enable_skip_layer_norm = fuse_skip_layer_norm
    m = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
                       optimization_options=options)
    m.save_model_to_file(str(dst))
    return {k: v for k, v in m.get_fused_operator_statistics().items() if v}


def _probe(model, names: list[str], feeds: list[dict]):
    """Yield {name: array} of the named tensors for each feed: the graph is run with them added as outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from invemb.ort import disabled_optimizers, session_options
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in have)
    providers = ["CPUExecutionProvider"]
    sess = ort.InferenceSession(probe.SerializeToString(), session_options(), providers=providers,
                                disabled_optimizers=disabled_optimizers(providers))
    for feed in feeds:
        yield dict(zip(names, sess.run(names, feed)))


def _activation_maxima(model, names: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """Per-channel max |x| (over all other axes and every feed) of the named tensors."""
    amax = {n: 0.0 for n in names}
    for out in _probe(model, names, feeds):
        for n, x in out.items():  # x [..., C]
            amax[n] = np.maximum(amax[n], np.abs(x).reshape(-1, x.shape[-1]).max(0))
    return amax


def _activation_ranges(model, names: list[str], feeds: list[dict]) -> dict[str, tuple[float, float]]:
    """(min, max) of the named tensors over every feed, widened to include 0 (what uint8 quantisation covers)."""
    lo, hi = {n: 0.0 for n in names}, {n: 0.0 for n in names}
    for out in _probe(model, names, feeds):
        for n, x in out.items():
            lo[n], hi[n] = min(lo[n], float(x.min())), max(hi[n], float(x.max()))
    return {n: (lo[n], hi[n]) for n in names}


def static_activations(model, ranges: dict[str, tuple[float, float]]) -> int:
    """Fixed int8 activation ranges: every DynamicQuantizeLinear(x) whose x has a calibrated (min, max) becomes
    QuantizeLinear(x, scale, zero_point) with ONNX's uint8 formula (scale = (max - min) / 255, zero_point =
    round(-min / scale)); its scale/zero-point outputs become constants of the same names, so the MatMulInteger
    nodes after it are unchanged. Why: DynamicQuantizeLinear takes one range per TENSOR, i.e. over the whole
    batch (and its padding), so with it a headline's vector depends on the other headlines of its batch (measured
    on the shipped encoder: alone vs in a batch of 96, 1 - cosine up to 0.0075, and 26 of 96 beam-4 texts
    changed); with fixed ranges it does not (alone == batched to float rounding). Values beyond the calibrated
    range saturate. Returns the number of nodes replaced."""
    from onnx import helper, numpy_helper
    g = model.graph
    replaced = 0
    for node in g.node:
        if node.op_type != "DynamicQuantizeLinear" or node.input[0] not in ranges:
            continue
        lo, hi = ranges[node.input[0]]
        scale = np.float32(max(hi - lo, 1e-8) / 255)
        zero_point = np.uint8(np.clip(np.round(-lo / scale), 0, 255))
        quantized, scale_name, zp_name = node.output
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                              numpy_helper.from_array(np.array(zero_point, np.uint8), zp_name)])
        node.CopyFrom(helper.make_node("QuantizeLinear", [node.input[0], scale_name, zp_name], [quantized],
                                       name=f"{node.name or node.input[0]}.static"))
        replaced += 1
    return replaced


def fuse_integer_matmuls(model) -> int:
    """MatMulInteger(a_q, b_q, a_zp, b_zp) -> Cast(float) -> Mul(a_scale * b_scale) [-> Add(bias)] becomes one
    com.microsoft MatMulIntegerToFloat(a_q, b_q, a_scale, b_scale, a_zp, b_zp[, bias]) when both scales are
    initializers (static_activations' graphs). Why: ORT fuses the dynamic pattern (DynamicQuantizeMatMul) but not
    this one, so the static graph wrote every int32 product to memory three times (MatMulInteger, Cast, Mul) and
    the biases of the query/key/value projections once more; the fused kernel applies scale and bias inside the
    GEMM. Same arithmetic (int32 sums times the product of the scales, plus the bias). Returns the fusions made."""
    from onnx import helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def only_consumer(name: str, op: str):
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and name not in outputs else None

    drop, fused = set(), 0
    for mm in [n for n in g.node if n.op_type == "MatMulInteger" and len(n.input) == 4]:
        cast = only_consumer(mm.output[0], "Cast")
        mul = cast and only_consumer(cast.output[0], "Mul")
        if mul is None or helper.get_attribute_value(cast.attribute[0]) != 1:  # Cast to FLOAT
            continue
        scales = producer.get(next((i for i in mul.input if i != cast.output[0]), ""))
        if scales is None or scales.op_type != "Mul" or not all(i in inits for i in scales.input):
            continue
        a_scale, b_scale = scales.input  # quantize_dynamic writes Mul(activation scale, weight scale)
        if inits[a_scale].dims or len(inits[b_scale].dims) > 1:
            continue
        inputs, out, gone = [mm.input[0], mm.input[1], a_scale, b_scale, mm.input[2], mm.input[3]], mul.output[0], []
        add = only_consumer(out, "Add")
        bias = add and next((i for i in add.input if i != out), None)
        if bias in inits and list(inits[bias].dims) == list(inits[mm.input[1]].dims[-1:]):  # [N] of weight [K,N]
            inputs.append(bias)
            out, gone = add.output[0], [add]
        mm.CopyFrom(helper.make_node("MatMulIntegerToFloat", inputs, [out], name=f"{mm.name}.to_float",
                                     domain="com.microsoft"))
        drop.update(id(n) for n in [cast, mul, *gone])
        if len(consumers.get(scales.output[0], [])) == 1:
            drop.add(id(scales))
        fused += 1
    if fused:
        kept = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(kept)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def smooth_activations(model, feeds: list[dict], alpha: float = SMOOTH_ALPHA) -> int:
    """SmoothQuant (Xiao et al., 2023) for dynamic int8: ORT quantises a MatMul's input per TENSOR, so a few
    outlier channels (a BERT has them) set the step size for all of them. For every MatMul x @ W with W an
    initializer [C,N]: x' = x * (1/s), W' = diag(s) W with s_c = max|x_c|^alpha / max|W_c|^(1-alpha) (maxima over
    the calibration feeds), which moves the outliers into the weights (quantised per channel). Exact in float
    (x' W' = x W); MatMuls that share an input (query/key/value) share one scale and one Mul node. Returns the
    number of Mul nodes added. Measured on the shipped encoder, 256 validation headlines, int8 1 - cosine vs fp32
    (mean / max): 0.0169 / 0.045 without smoothing; 0.0046 / 0.013 smoothed with the built-in calibration text,
    0.0038 / 0.010 with 512 training headlines (alpha 0.85; 0.5 and 1.0 were worse)."""
    from onnx import helper, numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    groups: dict[str, list] = {}  # input tensor -> the MatMuls reading it with a 2-D initializer weight
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            groups.setdefault(node.input[0], []).append(node)
    if not groups:
        return 0
    uses: dict[str, int] = {}
    for node in g.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    amax = _activation_maxima(model, list(groups), feeds)
    muls = {}
    for x, nodes in groups.items():
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]  # [C,N] each
        wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)  # [C]
        s = np.maximum(amax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        # never amplify a channel more than the group's median one: a neuron that the calibration text never
        # fires (max |x| 0.17 after GELU) would otherwise be multiplied up to 100x, and when real text fires it
        # (|x| 5-8) it sets the whole tensor's int8 range (measured: 1 - cosine 0.026, worse than no smoothing)
        s = np.clip(s, np.median(s), 1e2).astype(np.float32)  # [C]
        g.initializer.append(numpy_helper.from_array(1 / s, f"{x}.smooth_inv"))
        muls[x] = helper.make_node("Mul", [x, f"{x}.smooth_inv"], [f"{x}.smoothed"], name=f"{x}.smooth")
        for node, w in zip(nodes, ws):
            name = node.input[1]
            scaled = numpy_helper.from_array((w * s[:, None]).astype(np.float32),
                                             name if uses[name] == 1 else f"{name}.smoothed")
            if uses[name] == 1:
                inits[name].CopyFrom(scaled)  # this MatMul is the weight's only reader: rescale it in place
            else:
                g.initializer.append(scaled)
                node.input[1] = scaled.name
            node.input[0] = f"{x}.smoothed"
    # each Mul goes right after the producer of its input (graph inputs: first), keeping the order topological
    order = [muls[x] for x in muls if not any(x in n.output for n in g.node)]
    for node in g.node:
        order.append(node)
        order.extend(muls[o] for o in node.output if o in muls)
    del g.node[:]
    g.node.extend(order)
    return len(muls)


def calibration_feeds(export_dir: str | os.PathLike, texts=None, batch_size: int = 16) -> list[dict]:
    """Tokenized calibration batches for smooth_activations (default: invemb.export.calibration's sentences)."""
    from invemb.export.calibration import CALIBRATION_TEXTS
    from invemb.manifest import load_export_tokenizer
    from invemb.text import tokenize_texts
    manifest = read_manifest(export_dir)
    tok = load_export_tokenizer(export_dir, manifest)
    texts = list(texts or CALIBRATION_TEXTS)
    return [tokenize_texts(tok, texts[i:i + batch_size], int(manifest["max_length"]))
            for i in range(0, len(texts), batch_size)]


def quantize_int8(src: Path, dst: Path, calib_feeds: list[dict] | None = None, static: bool = True,
                  margin: float = STATIC_MARGIN) -> dict:
    """Dynamic int8 of src's MatMul/Gemm weights (per channel) -> dst; with calib_feeds, the activations are
    smoothed first (smooth_activations) and, with `static`, quantised with fixed ranges (static_activations: the
    calibrated (min, max) times `margin`) instead of per-batch ones, and their integer MatMuls fused
    (fuse_integer_matmuls). Returns {"smoothing_muls": n, "static_activations": m, "fused_matmuls": k}: the nodes
    each pass added, replaced or fused."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    model = onnx.load(str(src))
    fold_constant_transposes(model)
    done = {"smoothing_muls": smooth_activations(model, calib_feeds) if calib_feeds else 0, "static_activations": 0,
            "fused_matmuls": 0}
    tmp = dst.with_name(f".{dst.name}.pre.onnx")
    root = logging.getLogger()
    level = root.level
    try:
        onnx.save(model, str(tmp))
        root.setLevel(logging.ERROR)  # quantize_dynamic advises shape-inference pre-processing on every call
        # per-tensor: encoder cosine 0.944 (min) vs 0.989 per-channel. DefaultTensorType: ONNX shape inference
        # cannot type the outputs of ORT's fused ops (SkipLayerNormalization, BiasGelu); every tensor here is float
        quantize_dynamic(str(tmp), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)
    if calib_feeds and static:
        quantized = onnx.load(str(dst))
        names = [n.input[0] for n in quantized.graph.node if n.op_type == "DynamicQuantizeLinear"]
        # ranges of the float (smoothed) graph's tensors: quantize_dynamic keeps the names of the inputs it reads
        ranges = _activation_ranges(model, names, calib_feeds)
        ranges = {n: (lo * margin, hi * margin) for n, (lo, hi) in ranges.items()}
        done["static_activations"] = static_activations(quantized, ranges)
        done["fused_matmuls"] = fuse_integer_matmuls(quantized)
        onnx.save(quantized, str(dst))
    return done


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def make_variants(export_dir: str | os.PathLike, variants=("opt", "int8"), smooth: bool = True,
                  encoder_only: bool = False, static: bool = True, fuse_skip_layer_norm: bool = False) -> dict:
    """Write the variant graphs next to the fp32 ones and record them in manifest.json (atomically). smooth: the
    int8 encoder is smoothed first (smooth_activations, calibrated on invemb.export.calibration); static: and its
    activations get fixed calibrated ranges (static_activations: a vector no longer depends on its batch). encoder_only:
    int8 quantises only the encoder and records only `int8_encoder` (what Triton's CPU encode serves by default:
    export_checkpoint(triton_encoder="int8")). fuse_skip_layer_norm: see optimize_encoder (a benchmark's control)."""
    d = Path(export_dir)
    manifest = read_manifest(d)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise InvembError(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    graphs = {name: d / g["file"] for name, g in manifest["graphs"].items()}
    fused: dict = {}
    passes: dict = {}  # graph -> quantize_int8's pass counts
    opt_encoder = d / "encoder.opt.onnx"
    if {"opt", "int8"} & set(variants):
        fused = optimize_encoder(graphs["encoder"], opt_encoder, fuse_skip_layer_norm=fuse_skip_layer_norm)
    for v in variants:
        files = {}
        if v == "opt":
            files["encoder"] = opt_encoder.name
        elif v == "int8":
            for name, path in graphs.items():
                if encoder_only and name != "encoder":
                    continue
                dst = d / f"{name}.int8.onnx"
                # only the encoder is calibrated: the decoders' int8 error is small (results/fidelity.md) and their
                # inputs (vectors, KV caches) have no calibration text, so their activations stay per batch
                feeds = calibration_feeds(d) if smooth and name == "encoder" else None
                passes[name] = quantize_int8(opt_encoder if name == "encoder" else path, dst, feeds, static)
                files[name] = dst.name
        else:
            for name, path in graphs.items():
                dst = d / f"{name}.fp16.onnx"
                convert_fp16(path, dst)
                files[name] = dst.name
        meta = {"device": DEVICE[v], **({"fused_ops": fused} if v in ("opt", "int8") else {}),
                **({"smoothing": {"alpha": SMOOTH_ALPHA, **{
                    key: {g: n[key] for g, n in passes.items() if n[key]}
                    for key in ("smoothing_muls", "static_activations", "fused_matmuls")},
                    **({"static_margin": STATIC_MARGIN} if static else {})}}
                   if v == "int8" and smooth else {})}
        recorded = manifest.setdefault("variants", {})
        if v == "int8":  # the int8 encoder with the fp32 decoders: int8 text -> vector, unchanged decoding
            recorded["int8_encoder"] = {"files": {"encoder": files["encoder"]}, **meta}
        if not (v == "int8" and encoder_only):
            recorded[v] = {"files": files, **meta}
    if "opt" not in variants and opt_encoder.exists():
        opt_encoder.unlink()
    write_manifest(d, manifest)
    return manifest["variants"]
