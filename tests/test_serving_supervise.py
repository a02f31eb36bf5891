"""The launcher as a restart policy, on a real tritonserver with a hand-made ONNX model (no invemb model): a killed
model process, a stalled one (SIGSTOP under requests) and a killed server each end in a restart on the same ports
that the client rides through with its default settings; the old generation's processes and /dev/shm regions are
reaped; a crash loop ends supervision; no admin secret on the command line and no way to unload a model."""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO as ROOT
from invemb.serving import procs
from invemb.serving.client import TritonClient
from invemb.serving.launch import TritonServer
from invemb.serving.supervise import RestartPolicy
from test_serving_launch import ADD_CONFIG, write_add_model

X = np.arange(6, dtype=np.float32).reshape(2, 3)  # [2,3]


def add_repo(folder: Path) -> Path:
    write_add_model(folder / "add" / "1")
    (folder / "add" / "config.pbtxt").write_text(f'name: "add"\n{ADD_CONFIG}')
    return folder


def wait_for(condition, seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def regions_left(names) -> list[str]:
    return [n for n in names if os.path.exists(f"/dev/shm/{n}")]


class Load:
    """`n` client threads with DEFAULT settings sending `add` requests until stopped; every answer checked."""

    def __init__(self, url: str, n: int = 2):
        self.url, self.stop, self.ok, self.failed = url, threading.Event(), [], []
        self.threads = [threading.Thread(target=self.run) for _ in range(n)]
        for t in self.threads:
            t.start()

    def run(self) -> None:
        client = TritonClient(self.url)
        while not self.stop.is_set():
            try:
                y = client.infer("add", {"x": X}, ["y"])["y"]
                (self.ok if np.array_equal(y, X + 1) else self.failed).append("wrong" if not
                                                                               np.array_equal(y, X + 1) else 1)
            except Exception as e:  # noqa: BLE001 - counted, asserted below
                self.failed.append(str(e))

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)


def test_killed_stub_stalled_stub_and_killed_server_are_restarted_and_clients_ride_through(tmp_path):
    with TritonServer(add_repo(tmp_path / "repo"), log_file=tmp_path / "server.log") as server:
        ports = (server.http_port, server.grpc_port, server.metrics_port)
        argv = cmdline(server.proc.pid)
        assert "--model-control-mode=none" in argv and not any("restricted" in a for a in argv)
        outsider = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/add/unload", data=b"{}",
                                          method="POST")
        with pytest.raises(urllib.error.HTTPError):  # no repository API: nobody can unload a model
            urllib.request.urlopen(outsider, timeout=10)
        assert server.model_ready("add") and server.ready()
        load = Load(server.grpc_url)
        seen_regions: set[str] = set()
        faults = [("stub SIGKILL", lambda s: os.kill(s.pid, signal.SIGKILL)),
                  ("stub SIGSTOP", lambda s: os.kill(s.pid, signal.SIGSTOP)),
                  ("server SIGKILL", lambda s: os.kill(server.proc.pid, signal.SIGKILL))]
        for k, (name, fault) in enumerate(faults, 1):
            assert wait_for(lambda: len(load.ok) > 20 * k), name  # requests are flowing
            stub, = [s for s in procs.stubs(server.proc.pid, server.repo) if s.state != "Z"]
            seen_regions |= {stub.region}
            old_group = server.proc.pid
            fault(stub)
            assert wait_for(lambda: len(server.restarts) == k), (name, server.restarts)
            assert server.restarts[-1]["ok"], server.restarts[-1]
            assert wait_for(server.alive)
            assert not procs.group_alive(old_group), name  # the old generation is reaped ...
            assert not regions_left([stub.region]), name  # ... with its shm region
        load.finish()
        reasons = [r["reason"] for r in server.restarts]
        assert "died" in reasons[0] and "stopped making progress" in reasons[1] and "killed by signal 9" in \
            reasons[2], reasons
        assert (server.http_port, server.grpc_port, server.metrics_port) == ports
        assert load.failed == [] and len(load.ok) > 60
        assert "invemb-supervisor" in (tmp_path / "server.log").read_text()
        last_group, last_regions = server.proc.pid, set(server.regions)
    assert not procs.group_alive(last_group) and not regions_left(seen_regions | last_regions)


HANG_MODEL = '''
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FLAG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hang")


class TritonPythonModel:
    def execute(self, requests):
        if os.path.exists(FLAG):  # hang once, without being stopped: a deadlock as the server sees it
            os.remove(FLAG)
            while True:
                time.sleep(1)
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", (x + 1).astype(np.float32))]))
        return out
'''
HANG_CONFIG = """name: "add"
backend: "python"
max_batch_size: 8
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""


def test_a_model_that_hangs_without_being_stopped_is_restarted(tmp_path):
    # a stub can stop making progress while its state stays "sleeping" (a deadlock): only the server's own counts
    # show it, requests waiting and none finished; a model merely busy keeps finishing requests
    repo = tmp_path / "repo"
    (repo / "add" / "1").mkdir(parents=True)
    (repo / "add" / "1" / "model.py").write_text(HANG_MODEL)
    (repo / "add" / "config.pbtxt").write_text(HANG_CONFIG)
    policy = RestartPolicy(hang_s=3.0, metrics_every=0.5)
    with TritonServer(repo, log_file=tmp_path / "server.log", policy=policy) as server:
        load = Load(server.grpc_url)
        try:
            assert wait_for(lambda: len(load.ok) > 20)
            time.sleep(8)  # busy, finishing requests, and idle probes answered: no restart
            assert server.restarts == []
            load.finish()
            time.sleep(8)  # idle: probes answered, no restart
            assert server.restarts == []
            load = Load(server.grpc_url)
            assert wait_for(lambda: len(load.ok) > 20)
            old_group = server.proc.pid
            (repo / "add" / "1" / "hang").write_text("")
            assert wait_for(lambda: len(server.restarts) == 1), server.restarts
            assert server.restarts[0]["ok"] and "hung" in server.restarts[0]["reason"], server.restarts
            done = len(load.ok)
            assert wait_for(lambda: len(load.ok) > done + 50)  # the clients' requests inside the hung batch too
        finally:
            load.finish()
        assert load.failed == [] and not procs.group_alive(old_group)


def test_a_crash_loop_ends_supervision_and_leaves_nothing(tmp_path):
    policy = RestartPolicy(max_restarts=1, window_s=600, backoff_s=0.1)
    server = TritonServer(add_repo(tmp_path / "repo"), log_file=tmp_path / "server.log", policy=policy).start()
    try:
        os.kill(server.proc.pid, signal.SIGKILL)
        assert wait_for(lambda: len(server.restarts) == 1 and server.alive())
        group = server.proc.pid
        stub_regions = {s.region for s in procs.stubs(group, server.repo) if s.region}
        os.kill(group, signal.SIGKILL)  # the second failure within the window: a crash loop
        assert wait_for(lambda: server.failed is not None)
        assert "crash loop" in server.failed and len(server.restarts) == 1
        assert not server.alive() and not procs.group_alive(group) and not regions_left(stub_regions)
    finally:
        server.stop()


def test_launcher_cli_exits_on_a_crash_loop_with_one_line(tmp_path):
    import subprocess
    import sys

    from invemb.util import free_port
    repo, port = add_repo(tmp_path / "repo"), free_port()
    cli = subprocess.Popen([sys.executable, str(ROOT / "serving" / "launch.py"), "--repo", str(repo), "--quiet",
                            "--http-port", str(port), "--max-restarts", "0", "--log-file", str(tmp_path / "s.log")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: cli.poll() is not None or _answers(f"http://127.0.0.1:{port}/v2/health/ready"))
        time.sleep(2)  # the launcher prints "Triton ready" and supervises
        server_pid, = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_server(int(p), repo)]
        os.kill(server_pid, signal.SIGKILL)
        out, err = cli.communicate(timeout=120)
    finally:
        cli.kill()
    assert cli.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("error: the server kept failing") and "crash loop" in err


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _is_server(pid: int, repo: Path) -> bool:
    try:
        argv = cmdline(pid)
    except OSError:
        return False
    return argv[0].endswith("bin/tritonserver") and f"--model-repository={repo.resolve()}" in argv


def test_probe_body_follows_the_models_config():
    import json

    from invemb.serving.probe import probe_body
    from invemb.serving.supervise import parse_metrics
    config = {"max_batch_size": 8, "input": [
        {"name": "text", "data_type": "TYPE_STRING", "dims": [-1]},
        {"name": "sentence_embedding", "data_type": "TYPE_FP32", "dims": [4]},
        {"name": "beam_size", "data_type": "TYPE_INT32", "dims": [1], "optional": True}]}
    body = json.loads(probe_body(config))["inputs"]
    assert [(i["name"], i["shape"], i["datatype"]) for i in body] == [("text", [1, 1], "BYTES"),
                                                                        ("sentence_embedding", [1, 4], "FP32")]
    assert body[1]["data"] == [0, 0, 0, 0]
    text = ('nv_inference_request_success{model="a",version="1"} 5\n'
            'nv_inference_request_failure{model="a",version="1"} 2\n'
            'nv_inference_pending_request_count{model="a",version="1"} 1\n'
            'nv_inference_request_success{model="b",version="2"} 3\nnv_gpu_utilization{gpu_uuid="x"} 0\n')
    assert parse_metrics(text) == {"a": (1.0, 7.0), "b": (0.0, 3.0)}
