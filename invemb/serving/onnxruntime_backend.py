"""A Python-based Triton backend named `onnxruntime`: runs `<model>/<version>/model.onnx` with pip's onnxruntime.

The tritonserver in the nvidia-pytriton wheel has no native onnxruntime backend. Triton loads a Python-based
backend from `<backend-directory>/<name>/model.py`, so with this file at `backends/onnxruntime/model.py` a model
whose config says `backend: "onnxruntime"` loads here unchanged; on an NGC Triton image the native C++ backend
of the same name serves the same repository (same config keys: inputs/outputs, max_batch_size,
`default_model_filename`, parameters `intra_op_thread_count` / `inter_op_thread_count`).

Input and output names/dtypes come from the model config; a config that lists none is auto-completed from the
graph (as the native backend does), so one config.pbtxt serves exports with any number of decoder layers. Requests that the dynamic batcher hands over together
are grouped by their non-batch shapes, concatenated on axis 0, run once, and split back per request. A failing
group is retried request by request, so only the bad request fails; inputs are checked against the limits the
exporter wrote into the graph (token ids within the vocabulary, lengths within max_length, finite floats) and a
violation is that request's INVALID_ARGUMENT. The model keeps serving.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from invemb.limits import MAX_VECTOR_ABS
from invemb.manifest import PAST_PREFIX
from invemb.ort import disabled_optimizers
from invemb.serving.triton_utils import invalid_arg, model_param


ORT_TO_TRITON = {"float": "TYPE_FP32", "float16": "TYPE_FP16", "double": "TYPE_FP64", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


def _stub_model_dir() -> Path | None:
    """The version folder of the model this stub serves: the python backend passes `<model>/<version>/model.py`
    as the stub's first argument (auto_complete_config gets no args dict)."""
    try:
        argv = Path("/proc/self/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return Path(os.fsdecode(argv[1])).parent if len(argv) > 1 and argv[1] else None


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """Fill inputs/outputs from model.onnx when the config lists none (names, dtypes, dims; -1 = dynamic)."""
        config = auto_complete_model_config.as_dict()
        if config.get("input") and config.get("output"):
            return auto_complete_model_config
        import onnxruntime as ort
        folder = _stub_model_dir()
        path = folder / (config.get("default_model_filename") or "model.onnx") if folder else None
        if path is None or not path.is_file():
            raise pb_utils.TritonModelException(
                f"{config.get('name')}: cannot auto-complete inputs/outputs: no ONNX model at {path}; "
                "list them in config.pbtxt")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        batched = int(config.get("max_batch_size", 0)) > 0

        def spec(arg) -> dict:
            kind = arg.type[len("tensor("):-1]
            if kind not in ORT_TO_TRITON:
                raise pb_utils.TritonModelException(f"{path}: tensor {arg.name} has unsupported type {arg.type}")
            dims = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
            if batched:
                if not dims or dims[0] != -1:
                    raise pb_utils.TritonModelException(
                        f"{path}: {arg.name} has no dynamic batch axis but max_batch_size > 0")
                dims = dims[1:]
            return {"name": arg.name, "data_type": ORT_TO_TRITON[kind], "dims": dims}

        if not config.get("input"):
            for arg in session.get_inputs():
                auto_complete_model_config.add_input(spec(arg))
        if not config.get("output"):
            for arg in session.get_outputs():
                auto_complete_model_config.add_output(spec(arg))
        return auto_complete_model_config

    def initialize(self, args):
        import onnxruntime as ort
        self.config = json.loads(args["model_config"])
        name = self.config.get("default_model_filename") or "model.onnx"
        path = Path(args["model_repository"]) / args["model_version"] / name
        if not path.is_file():
            raise pb_utils.TritonModelException(f"{self.config['name']}: no ONNX model at {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(model_param(self.config, "intra_op_thread_count",
                                               os.environ.get("OMP_NUM_THREADS", "1")))
        opts.inter_op_num_threads = int(model_param(self.config, "inter_op_thread_count", "1"))
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}))
        self.session = ort.InferenceSession(str(path), opts, providers=providers,  # CPU: no SkipLayerNorm fusion
                                            disabled_optimizers=disabled_optimizers(providers))
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"]), i.get("optional", False))
                       for i in self.config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in self.config["output"]]
        meta = self.session.get_modelmeta().custom_metadata_map  # limits written by export/to_onnx.py
        self.vocab_size = int(meta["invemb_vocab_size"]) if "invemb_vocab_size" in meta else None
        self.max_length = int(meta["invemb_max_length"]) if "invemb_max_length" in meta else None
        graph_in = {i.name for i in self.session.get_inputs()}
        graph_out = {o.name for o in self.session.get_outputs()}
        missing = [n for n, _, _ in self.inputs if n not in graph_in] + [n for n, _ in self.outputs
                                                                           if n not in graph_out]
        if missing:
            raise pb_utils.TritonModelException(
                f"{self.config['name']}: config names {missing} are not in {path.name} "
                f"(graph inputs {sorted(graph_in)}, outputs {sorted(graph_out)})")

    def _feeds(self, request) -> dict[str, np.ndarray]:
        feeds = {}
        for name, dtype, optional in self.inputs:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                if optional:
                    continue
                raise ValueError(f"missing input {name!r}")
            feeds[name] = t.as_numpy().astype(dtype, copy=False)
        self._check(feeds)
        return feeds

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        """Reject what would fail inside the graph (or poison a dynamic batch) as this request's bad input."""
        ids = feeds.get("input_ids")
        if ids is not None and self.vocab_size is not None and ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"input_ids must be in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        mask = feeds.get("attention_mask")
        if ids is not None and mask is not None and ids.shape != mask.shape:
            raise ValueError(f"input_ids and attention_mask must have the same shape, got {list(ids.shape)} and "
                             f"{list(mask.shape)}")
        for name in ("input_ids", "attention_mask"):
            a = feeds.get(name)
            if a is not None and (a.ndim < 2 or a.shape[-1] == 0):
                raise ValueError(f"{name} must hold at least one token per row, got shape {list(a.shape)}")
        if mask is not None and mask.size and not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        if mask is not None and mask.size and not mask.any(axis=-1).all():  # [B,T]: a row that attends to nothing
            rows = np.flatnonzero(~mask.any(axis=-1))
            raise ValueError(f"attention_mask row(s) {rows[:10].tolist()} hold no 1 (a row must attend to a token)")
        if self.max_length is not None:
            for name, a in feeds.items():
                axis = 1 if name in ("input_ids", "attention_mask") else 2 if name.startswith(PAST_PREFIX) else None
                if axis is not None and a.ndim > axis and a.shape[axis] > self.max_length:
                    raise ValueError(f"{name} has length {a.shape[axis]} on axis {axis}, above the model's "
                                     f"max_length {self.max_length}")
            past = next((a.shape[2] for n, a in feeds.items() if n.startswith(PAST_PREFIX) and a.ndim == 4), None)
            if past is not None and ids is not None and past + ids.shape[-1] > self.max_length:
                raise ValueError(f"past length {past} + {ids.shape[-1]} new token(s) exceeds the model's "
                                 f"max_length {self.max_length}")
        for name, a in feeds.items():
            if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
                raise ValueError(f"{name} holds NaN or Inf")
        vectors = feeds.get("sentence_embedding")  # [B,S] into decoder_init: the same bound as beam_search
        if vectors is not None and vectors.size and np.abs(vectors).max() > MAX_VECTOR_ABS:
            rows = np.flatnonzero(np.abs(vectors.reshape(len(vectors), -1)).max(1) > MAX_VECTOR_ABS)
            raise ValueError(f"sentence_embedding row(s) {rows[:10].tolist()} have components beyond "
                             f"+-{MAX_VECTOR_ABS:g} (sentence vectors are O(1))")

    def _requested(self, request) -> tuple[str, ...]:
        """The outputs this request asked for (all of the config's when it named none), in config order: as the
        native backend does, only those are computed into the response (a search asking for top_ids/top_log_probs
        does not get the [N, V] log_probs)."""
        try:
            asked = set(request.requested_output_names())
        except AttributeError:  # older python backends: every output
            asked = set()
        names = tuple(n for n, _ in self.outputs if not asked or n in asked)
        unknown = asked - {n for n, _ in self.outputs}
        if unknown:
            raise ValueError(f"unknown output(s) {sorted(unknown)} requested")
        return names

    def _run(self, feeds: dict[str, np.ndarray], names: tuple[str, ...]) -> list[np.ndarray]:
        out = self.session.run(list(names), feeds)
        dtypes = dict(self.outputs)
        return [np.ascontiguousarray(a, dtype=dtypes[n]) for a, n in zip(out, names)]

    def execute(self, requests):
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict]]] = {}
        for r, request in enumerate(requests):
            try:
                feeds, names = self._feeds(request), self._requested(request)
            except Exception as e:  # noqa: BLE001 - becomes this request's error status
                responses[r] = pb_utils.InferenceResponse(error=invalid_arg(f"{self.config['name']}: {e}"))
                continue
            key = tuple(sorted((n, a.shape[1:] if self.batched else a.shape) for n, a in feeds.items())) + names
            groups.setdefault(key if self.batched else (r,), []).append((r, feeds, names))
        for members in groups.values():
            names = members[0][2]
            if len(members) > 1:  # dynamic batch: one run over the concatenated requests, split back
                try:
                    feeds = {n: np.concatenate([f[n] for _, f, _ in members]) for n in members[0][1]}
                    outs = self._run(feeds, names)
                    sizes = np.cumsum([next(iter(f.values())).shape[0] for _, f, _ in members])[:-1]
                    for (r, _, _), arrays in zip(members, zip(*[np.split(o, sizes) for o in outs])):
                        responses[r] = self._response(names, arrays)
                    continue
                except Exception:  # noqa: BLE001 - one bad request must not fail the others: run each alone
                    pass
            for r, feeds, names in members:
                try:
                    responses[r] = self._response(names, self._run(feeds, names))
                except Exception as e:  # noqa: BLE001
                    msg = f"{self.config['name']}: onnxruntime failed: {str(e).splitlines()[0][:500]}"
                    responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))
        return responses

    def _response(self, names, arrays):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(a))
                                                          for n, a in zip(names, arrays)])

    def finalize(self):
        self.session = None
