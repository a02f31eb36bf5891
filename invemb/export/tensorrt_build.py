"""Build TensorRT engines from an ONNX export (GPU machines with NVIDIA's TensorRT Python package).

    python export/to_tensorrt.py --onnx onnx/small --out trt/small [--fp16] [--max-batch 64] [--opt-batch 16]
                                 [--triton-repo model_repository]

One engine per graph (<out>/<graph>.plan) with one optimisation profile: batch 1..max-batch, sequence
1..max_length, past 1..max_length-1 (decoder_init produces past=1), new 1..4; axes from manifest.json.
`--triton-repo R` places them as R/<graph>_trt/1/model.plan (the serving side writes config.pbtxt).
Without TensorRT or without a GPU this exits with code 2 and one line saying so. TensorRT cannot be installed on
the CPU development machine (PyPI's `tensorrt*` packages there are placeholders), so this path is not exercised
by the CPU test suite beyond that message.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from invemb.errors import InvembError
from invemb.manifest import read_manifest


def gpu_count() -> int:
    """CUDA devices visible through the driver API (0 when there is no driver / GPU)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(name)
        except OSError:
            continue
        n = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
            return 0
        return n.value
    return 0


def require_tensorrt():
    """The tensorrt module, or InvembError with one line saying what is missing."""
    try:
        import tensorrt as trt
        trt.Builder  # noqa: B018 (placeholder packages import but lack the API)
    except (ImportError, AttributeError):
        raise InvembError("TensorRT is not installed (the PyPI 'tensorrt' packages are placeholders on this "
                          "machine): install NVIDIA's TensorRT Python wheel on a GPU machine or use an NGC "
                          "container") from None
    if gpu_count() == 0:
        raise InvembError("no CUDA GPU is visible: TensorRT engines must be built on the GPU that runs them")
    return trt


def profile_shapes(tensor: dict, max_length: int, max_batch: int, opt_batch: int) -> tuple[list, list, list]:
    """(min, opt, max) shapes of one input from its manifest shape."""
    ranges = {"batch": (1, opt_batch, max_batch), "sequence": (1, max(1, max_length // 2), max_length),
              "past": (1, max(1, max_length // 2), max_length - 1), "new": (1, 1, 4)}
    lo, opt, hi = [], [], []
    for d in tensor["shape"]:
        a, b, c = ranges[d] if isinstance(d, str) else (d, d, d)
        lo.append(a)
        opt.append(b)
        hi.append(c)
    return lo, opt, hi


def build_engine(trt, onnx_path: Path, graph: dict, manifest: dict, max_batch: int, opt_batch: int,
                 fp16: bool, workspace_gb: float) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if int(trt.__version__.split(".")[0]) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InvembError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for t in graph["inputs"]:
        profile.set_shape(t["name"], *profile_shapes(t, manifest["max_length"], max_batch, opt_batch))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise InvembError(f"TensorRT failed to build an engine for {onnx_path.name} (see the log above)")
    return bytes(engine)


def build_all(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, fp16: bool = False, max_batch: int = 64,
              opt_batch: int = 16, workspace_gb: float = 4.0, triton_repo: str | None = None) -> dict:
    trt = require_tensorrt()
    src, out = Path(onnx_dir), Path(out_dir)
    manifest = read_manifest(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        info = {"tensorrt": trt.__version__, "fp16": fp16, "engines": {}}
        for name, g in manifest["graphs"].items():
            (tmp / f"{name}.plan").write_bytes(build_engine(trt, src / g["file"], g, manifest, max_batch,
                                                            opt_batch, fp16, workspace_gb))
            info["engines"][name] = {"file": f"{name}.plan", "profile": {
                t["name"]: profile_shapes(t, manifest["max_length"], max_batch, opt_batch) for t in g["inputs"]}}
        (tmp / "tensorrt.json").write_text(json.dumps(info, indent=2))
        shutil.copy(src / "manifest.json", tmp / "manifest.json")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if triton_repo:
        for name in info["engines"]:
            dst = Path(triton_repo) / f"{name}_trt" / "1" / "model.plan"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / f"{name}.plan", dst)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", required=True, help="folder written by export/to_onnx.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--max-batch", type=int, default=64, help="largest batch (items x beams for the decoder)")
    ap.add_argument("--opt-batch", type=int, default=16)
    ap.add_argument("--workspace-gb", type=float, default=4.0)
    ap.add_argument("--triton-repo", default=None)
    args = ap.parse_args(argv)
    try:
        read_manifest(args.onnx)
        info = build_all(args.onnx, args.out, args.fp16, args.max_batch, args.opt_batch, args.workspace_gb,
                         args.triton_repo)
    except InvembError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built {', '.join(info['engines'])} with TensorRT {info['tensorrt']} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
