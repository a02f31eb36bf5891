"""Liveness probes of a model that has finished no request for a while (invemb.serving.supervise).

A python-backend stub can hang without being stopped (a deadlock, a blocked read): its state stays "sleeping",
readiness stays 200, and when every client's request is already inside the hung batch nothing waits in the queue
either (measured: 2 clients, both requests in flight, `nv_inference_pending_request_count` 0). What remains
visible is that the model finishes nothing. An idle model finishes nothing too, so the supervisor then sends it
ONE small request built from the model's own config (zeros; "probe" for strings; batch 1; every -1 axis 1) and
waits: ANY answer, an error included (our models refuse such inputs with INVALID_ARGUMENT), shows the model
processes requests; no answer within the hang limit means it does not.
"""
from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request

_TYPES = {"TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_INT8": "INT8", "TYPE_INT16": "INT16",
          "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32",
          "TYPE_FP64": "FP64", "TYPE_STRING": "BYTES", "TYPE_BF16": "BF16"}


def probe_body(config: dict) -> bytes:
    """A model's config (GET /v2/models/<m>/config, JSON) -> the KServe v2 JSON body of a one-row request with
    every required input."""
    inputs = []
    batched = int(config.get("max_batch_size", 0)) > 0
    for spec in config.get("input", []):
        if spec.get("optional"):
            continue
        dims = [1 if int(d) < 0 else int(d) for d in spec.get("dims", [])]
        shape = ([1] if batched else []) + dims
        n = math.prod(shape)
        kind = _TYPES.get(spec.get("data_type", "TYPE_FP32"), "FP32")
        data = ["probe"] * n if kind == "BYTES" else [False] * n if kind == "BOOL" else [0] * n
        inputs.append({"name": spec["name"], "shape": shape, "datatype": kind, "data": data})
    return json.dumps({"inputs": inputs}).encode()


class Prober:
    """One probe at a time per model, each in its own daemon thread; `answered_at(model)` / `pending_since(model)`
    tell the supervisor what came back."""

    def __init__(self, http_url: str):
        self.http_url = http_url
        self.lock = threading.Lock()
        self.sent: dict[str, float] = {}  # model -> when the probe still unanswered was sent
        self.answered: dict[str, float] = {}  # model -> when its last probe was answered

    def reset(self) -> None:
        with self.lock:
            self.sent, self.answered = {}, {}

    def send(self, model: str, timeout: float) -> None:
        with self.lock:
            if model in self.sent:
                return
            self.sent[model] = time.monotonic()
        threading.Thread(target=self._run, args=(model, timeout), daemon=True, name=f"invemb-probe-{model}").start()

    def pending_since(self, model: str) -> float | None:
        with self.lock:
            return self.sent.get(model)

    def answered_at(self, model: str) -> float | None:
        with self.lock:
            return self.answered.get(model)

    def _run(self, model: str, timeout: float) -> None:
        base = f"http://{self.http_url}/v2/models/{model}"
        try:
            with urllib.request.urlopen(base + "/config", timeout=10) as r:
                body = probe_body(json.loads(r.read()))
            req = urllib.request.Request(base + "/infer", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout):
                answered = True
        except urllib.error.HTTPError:  # an answer: the model (or the server for it) refused the probe's input
            answered = True
        except (OSError, ValueError):  # no answer in time, or no server: the process checks see a dead server
            answered = False
        # unanswered: it stays in `sent`, where the supervisor reads how long it has been out; a probe of a
        # generation reset meanwhile is no longer in `sent` and is forgotten either way
        with self.lock:
            if answered and self.sent.pop(model, None) is not None:
                self.answered[model] = time.monotonic()
