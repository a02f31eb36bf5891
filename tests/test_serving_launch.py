"""The Triton launcher and the Python-based onnxruntime backend on hand-made ONNX graphs (no invemb model):
server folder layout, config auto-complete vs explicit config, dynamic batching split-back, per-request errors,
a failing start reported with the log tail, a clean stop of the whole process group, a crashed model process
reloaded while clients ride through, and a server that dies with its owner."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from invemb.serving.launch import ORT_BACKEND, ServerError, TritonServer, build_server_dir

ADD_CONFIG = """
backend: "onnxruntime"
max_batch_size: 8
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""
EXPLICIT_IO = """
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "total" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""


def write_add_model(folder: Path) -> None:
    """y = x + 1 and total = sum over the last axis (keepdims): x float32 [batch, n]."""
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])
    nodes = [helper.make_node("Add", ["x", "one"], ["y"]),
             helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1)]
    inits = [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    model = helper.make_model(helper.make_graph(nodes, "add", [x], [y, total], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))


@pytest.fixture(scope="module")
def add_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("add_repo")
    for name, extra in (("add_auto", ""), ("add_explicit", EXPLICIT_IO)):
        write_add_model(repo / name / "1")
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\n{ADD_CONFIG}{extra}')
    with TritonServer(repo, startup_timeout=120) as server:
        yield server


def test_server_dir_layout(tmp_path):
    d = build_server_dir(tmp_path / "srv")
    assert os.access(d / "bin" / "tritonserver", os.X_OK)
    assert (d / "lib").is_symlink() and any((d / "lib").glob("libtritonserver*.so"))
    for f in ("libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"):
        assert (d / "backends" / "python" / f).is_file()
    assert (d / "backends" / "onnxruntime" / "model.py").read_text() == \
        ORT_BACKEND.read_text()
    assert build_server_dir(tmp_path / "srv") == d  # idempotent


@pytest.mark.parametrize("model", ["add_auto", "add_explicit"])
def test_ort_backend_runs_model_onnx(add_server, model):
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(add_server.grpc_url)
    config = client.get_model_config(model).config
    assert [i.name for i in config.input] == ["x"] and [o.name for o in config.output] == ["y", "total"]
    assert list(config.input[0].dims) == [-1]  # auto-complete drops the batch axis, symbolic axes are -1
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    inp = grpcclient.InferInput("x", [2, 3], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp])
    np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
    np.testing.assert_array_equal(result.as_numpy("total"), x.sum(1, keepdims=True))


def test_dynamic_batch_is_split_back_per_request(add_server):
    """Concurrent requests (same and different shapes) are batched by the server; each gets its own rows."""
    import queue

    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(add_server.grpc_url)
    before = client.get_inference_statistics("add_auto").model_stats[0]  # the server is shared by the module
    done: queue.Queue = queue.Queue()
    inputs = [np.full((1 + i % 3, 2 + i % 2), i, dtype=np.float32) for i in range(12)]
    for i, x in enumerate(inputs):
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.async_infer("add_auto", [inp], lambda result=None, error=None, i=i: done.put((i, result, error)))
    for _ in inputs:
        i, result, error = done.get(timeout=60)
        assert error is None, error
        np.testing.assert_array_equal(result.as_numpy("y"), inputs[i] + 1)
    stats = client.get_inference_statistics("add_auto").model_stats[0]
    # inference_count counts rows of the batch axis (max_batch_size > 0), summed over the requests
    assert stats.inference_count - before.inference_count == sum(x.shape[0] for x in inputs)
    runs = stats.execution_count - before.execution_count  # execute() calls: one per (dynamic) batch
    assert 1 <= runs <= len(inputs)
    succeeded = stats.inference_stats.success.count - before.inference_stats.success.count
    assert succeeded == len(inputs)  # every request answered, none failed


def test_wrong_input_is_a_clear_error_and_server_keeps_serving(add_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    client = grpcclient.InferenceServerClient(add_server.grpc_url)
    bad = grpcclient.InferInput("x", [1, 2], "INT64")
    bad.set_data_from_numpy(np.ones((1, 2), np.int64))
    with pytest.raises(InferenceServerException, match="data-type"):
        client.infer("add_auto", [bad])
    good = grpcclient.InferInput("x", [1, 2], "FP32")
    good.set_data_from_numpy(np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(client.infer("add_auto", [good]).as_numpy("y"), [[2.0, 2.0]])


def test_failed_start_shows_the_log_tail(tmp_path):
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "onnxruntime"\nmax_batch_size: 4\n')
    with pytest.raises(ServerError, match=r"(?s)exited with code.*broken"):
        TritonServer(tmp_path, startup_timeout=120).start()


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(ServerError, match="does not exist"):
        TritonServer(tmp_path / "nope")


def test_stop_ends_the_process_group(tmp_path):
    write_add_model(tmp_path / "repo" / "add" / "1")
    (tmp_path / "repo" / "add" / "config.pbtxt").write_text(f'name: "add"\n{ADD_CONFIG}')
    server = TritonServer(tmp_path / "repo", log_file=tmp_path / "server.log").start()
    pgid = os.getpgid(server.proc.pid)
    assert pgid != os.getpgid(0) and server.is_ready()
    server.stop()
    assert server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):  # no stub or server process left in its group
        os.killpg(pgid, 0)
    assert "Started GRPCInferenceService" in (tmp_path / "server.log").read_text()


def test_client_retries_unavailable_with_backoff_then_fails_clearly(monkeypatch):
    from invemb.serving.client import ClientError, TritonClient, text_tensor
    from invemb.util import free_port
    sleeps: list[float] = []
    monkeypatch.setattr("invemb.serving.client.time.sleep", sleeps.append)
    client = TritonClient(f"127.0.0.1:{free_port()}", timeout=10, retries=2, backoff=0.1)  # nothing listens there
    feeds = {"text": text_tensor(["Oil prices fall"])}
    with pytest.raises(ClientError, match="encode: UNAVAILABLE"):
        client.infer("encode", feeds, ["sentence_embedding"])
    assert sleeps == [0.1, 0.2]  # exponential backoff, then the error
    with pytest.raises(ClientError, match="not ready after"):
        client.wait_ready(timeout=0.5)


def test_client_retries_over_a_time_budget_then_says_what_happened():
    """No retry count: transient answers are retried until the budget is spent, then ONE line names the status,
    the time spent and the server."""
    from invemb.serving.client import ClientError, TritonClient, text_tensor
    from invemb.util import free_port
    url = f"127.0.0.1:{free_port()}"
    client = TritonClient(url, timeout=10, retry_budget=1.5, backoff=0.05)
    feeds = {"text": text_tensor(["Oil prices fall"])}
    for call in (lambda: client.infer("encode", feeds, ["sentence_embedding"]),
                 lambda: client.infer_many("encode", [feeds] * 3, ["sentence_embedding"], max_in_flight=2)):
        with pytest.raises(ClientError) as err:
            call()
        message = str(err.value)
        assert message.startswith("encode: UNAVAILABLE") and "retry budget 1.5 s" in message and url in message
        assert len(message.splitlines()) == 1


def test_client_rejects_bad_arguments_before_sending():
    from invemb.serving.client import ClientError, TritonClient
    from invemb.util import free_port
    client = TritonClient(f"127.0.0.1:{free_port()}")
    with pytest.raises(ClientError, match=r"shape \[N, S\]"):
        client.decode(np.zeros(4, np.float32))
    with pytest.raises(ClientError, match="mode must be"):
        client.decode(np.zeros((1, 4), np.float32), mode="nope")
    with pytest.raises(ClientError, match="--export"):
        client.decode(np.zeros((1, 4), np.float32), mode="client")


OWNER = """
import time
from invemb.serving.launch import TritonServer
s = TritonServer({repo!r}, startup_timeout=120).start()
print(s.proc.pid, ",".join(sorted(s.regions)), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_server_dies_with_its_owner(tmp_path, sig):
    """The process that started the server is killed: no server/stub process and no shm region stays behind."""
    import signal
    import subprocess
    import time
    write_add_model(tmp_path / "repo" / "add" / "1")
    (tmp_path / "repo" / "add" / "config.pbtxt").write_text(f'name: "add"\n{ADD_CONFIG}')
    owner = subprocess.Popen([sys.executable, "-c", OWNER.format(repo=str(tmp_path / "repo"))],
                             stdout=subprocess.PIPE, text=True)
    try:
        parts = owner.stdout.readline().split()
        pgid, shm = int(parts[0]), (parts[1].split(",") if len(parts) > 1 else [])
        assert shm, "the python backend made no /dev/shm region (nothing to check)"
        os.killpg(pgid, 0)  # the server runs
        owner.send_signal(getattr(signal, sig))
        owner.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
        time.sleep(1)
        left = [n for n in os.listdir("/dev/shm") if "_backend_shm_region_" in n]
        assert not [n for n in left if n in shm], left
    finally:
        owner.kill()
