"""Start the REAL Triton Inference Server bundled in the `nvidia-pytriton` wheel (CPU), as a CLI or a library.

    python serving/launch.py --repo model_repository            # runs until Ctrl-C (invemb.serving.launch.main)
    with TritonServer("model_repository") as server:             # library / test fixture
        server.grpc_url, server.http_url, server.metrics_url

The wheel holds tritonserver 2.51, the python backend (+ stubs per Python version), caches and the shared
libraries; it has NO onnxruntime backend. `build_server_dir` lays out a server folder:
    bin/tritonserver, caches/, lib -> nvidia_pytriton.libs (the binary's RPATH is $ORIGIN/../lib),
    backends/python/{libtriton_python.so, triton_python_backend_utils.py, triton_python_backend_stub (this Python)},
    backends/onnxruntime/model.py  (our Python-based ONNX Runtime backend, invemb/serving/onnxruntime_backend.py)
The stub must run THIS interpreter's libpython (LD_LIBRARY_PATH gets sysconfig LIBDIR) and find this venv's
packages (PATH starts with this venv's bin). The server runs on 127.0.0.1, free ports, in its own process group.

A crashed model process (a python-backend stub killed by the OOM killer, a segfault in a native library) is not
noticed by tritonserver 2.51: every later request of that model fails INTERNAL while /v2/health/ready stays 200.
`TritonServer` therefore watches the stubs (`StubWatch`) and reloads the model of a stub that died (explicit
model control; the repository API is restricted to a per-server secret header, so clients cannot load or unload
models). While the model reloads it is not ready, so readiness is false and clients get UNAVAILABLE (the invemb
client retries those); `recoveries` records each event.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from invemb.util import free_port  # noqa: F401 (re-exported: TritonServer's default ports)

ORT_BACKEND = Path(__file__).resolve().parent / "onnxruntime_backend.py"  # installed as backends/onnxruntime/model.py
HARMLESS = ("CUDA driver", "CudaDriverHelper", "unable to create stream")  # expected log errors without a GPU


class ServerError(RuntimeError):
    """The server could not be built, started or reached; the message carries the log tail."""


SHM_MARK = "_backend_shm_region_"  # python-based backends' /dev/shm regions: triton_<backend>_backend_shm_region_*

# A watchdog in its own session: when the owner process (the one that called start()) is gone -- SIGKILL, SIGTERM
# without handler, a crash -- it kills the server's whole process group (tritonserver + python-backend stubs) and
# removes the server's /dev/shm regions. argv: owner pid, server pgid, shm names (comma-separated).
_REAPER = r"""
import os, signal, sys, time
owner, pgid, shm = int(sys.argv[1]), int(sys.argv[2]), [s for s in sys.argv[3].split(",") if s]
while True:
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        break
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        sys.exit(0)  # the server stopped by itself / was stopped: nothing to do
    time.sleep(0.5)
for pid in filter(str.isdigit, os.listdir("/proc")):  # + the regions of stubs started since (reloaded models)
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        if os.getpgid(int(pid)) == pgid and len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
            shm.append(argv[2].decode())
    except (OSError, ValueError):
        pass
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        break
    time.sleep(3)
for name in shm:
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass
"""


def _die_with_parent() -> None:
    """preexec_fn of the server: SIGKILL it when the process that started it dies (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _shm_regions() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("triton_") and SHM_MARK in n}
    except OSError:
        return set()


ADMIN_HEADER = "invemb-admin"  # the header that opens the restricted model-repository API (value: per server)
STUB_BINARY = b"triton_python_backend_stub"


def python_stubs(pgid: int, repo: Path) -> dict[int, tuple[str, str]]:
    """pid -> (model name, shm region) of the live python-backend stubs in process group `pgid` whose model lies
    in `repo`. A stub's argv: <stub> <model file> <shm region> <shm size> <shm growth> <parent pid> <backend dir>
    (a zombie has an empty cmdline and counts as dead)."""
    out: dict[int, tuple[str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getpgid(pid) != pgid:
                continue
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if len(argv) < 3 or not argv[0].endswith(STUB_BINARY):
            continue
        try:
            model = Path(argv[1].decode()).resolve().relative_to(repo).parts[0]
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
        out[pid] = (model, argv[2].decode(errors="replace"))
    return out


class StubWatch(threading.Thread):
    """Every `period` s: a stub of the server gone -> its model is reloaded (a new stub) and the dead stub's shm
    region removed. Runs in the process that owns the TritonServer, until `stop` is set or the server exits."""

    def __init__(self, server: "TritonServer", period: float = 1.0):
        super().__init__(daemon=True, name="invemb-stub-watch")
        self.server, self.period, self.stop = server, period, threading.Event()

    def run(self) -> None:
        srv = self.server
        known = python_stubs(srv.proc.pid, srv.repo)
        while not self.stop.wait(self.period) and srv.proc.poll() is None:
            now = python_stubs(srv.proc.pid, srv.repo)
            dead = {pid: v for pid, v in known.items() if pid not in now}
            if not dead:
                known = now
                continue
            for model in sorted({m for m, _ in dead.values()}):
                ok, detail = srv.reload_model(model)
                srv.recoveries.append({"model": model, "ok": ok, "detail": detail, "time": time.time()})
            for _, region in dead.values():
                _unlink_shm(region)
            known = python_stubs(srv.proc.pid, srv.repo)
            srv.shm = sorted(set(srv.shm) | {r for _, r in known.values()})  # the new stubs' regions


def _unlink_shm(name: str) -> None:
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass


def _wheel_paths() -> tuple[Path, Path]:
    try:
        import pytriton
    except ImportError:
        raise ServerError("the Triton server comes from the pip package nvidia-pytriton==0.7.0 "
                          "(pip install 'invemb[serve]')") from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    if not (root / "bin" / "tritonserver").is_file() or not libs.is_dir():
        raise ServerError(f"no tritonserver binary under {root} (or no {libs}): reinstall nvidia-pytriton")
    return root, libs


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def default_server_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    venv = "".join(c if c.isalnum() else "_" for c in sys.prefix)[-60:]
    return cache / "invemb" / f"tritonserver-py{_python_tag()}-{venv}"


def build_server_dir(dest: str | os.PathLike | None = None) -> Path:
    """Create (once, atomically) the server folder from the wheel; always refresh the ORT backend's model.py."""
    root, libs = _wheel_paths()
    dest = Path(dest) if dest else default_server_dir()
    stub = root / "python_backend_stubs" / _python_tag() / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {_python_tag()} ({stub})")
    marker = dest / ".complete"
    if not marker.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            shutil.copytree(root / "bin", tmp / "bin")  # copied: $ORIGIN would resolve a symlink to the wheel
            shutil.copytree(root / "caches", tmp / "caches")
            py = tmp / "backends" / "python"
            py.mkdir(parents=True)
            for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
                shutil.copy2(root / "backends" / "python" / name, py / name)
            shutil.copy2(stub, py / "triton_python_backend_stub")
            (tmp / "lib").symlink_to(libs, target_is_directory=True)
            (tmp / ".complete").write_text(f"{root}\n")
            try:
                tmp.rename(dest)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    ort = dest / "backends" / "onnxruntime"
    ort.mkdir(parents=True, exist_ok=True)
    tmp_file = ort / f".model.py.{os.getpid()}"
    shutil.copy2(ORT_BACKEND, tmp_file)
    os.replace(tmp_file, ort / "model.py")
    return dest


def server_env(server_dir: Path, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(server_dir / "lib"), libdir,
                                                          env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


class TritonServer:
    """A tritonserver process serving `repo`; a context manager. Ports default to free ones."""

    def __init__(self, repo: str | os.PathLike, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_file: str | os.PathLike | None = None, echo: bool = False,
                 startup_timeout: float = 180.0, server_dir: str | os.PathLike | None = None,
                 log_verbose: int = 0, extra_args: tuple[str, ...] = (), watch_stubs: bool = True):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ServerError(f"model repository {self.repo} does not exist")
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        if log_file is None:
            fd, log_file = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
        self.log_file = Path(log_file)
        self.echo, self.startup_timeout, self.log_verbose = echo, startup_timeout, log_verbose
        self.server_dir_arg, self.extra_args = server_dir, tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self._pump: threading.Thread | None = None
        self.watch_stubs, self._watch = watch_stubs, None
        self._admin = secrets.token_hex(16)  # the restricted model-repository API's header value
        self.recoveries: list[dict] = []  # crashed model processes and their reloads (StubWatch)
        self.shm: list[str] = []

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, server_dir: Path) -> list[str]:
        return [str(server_dir / "bin" / "tritonserver"), f"--model-repository={self.repo}",
                f"--backend-directory={server_dir / 'backends'}", f"--cache-directory={server_dir / 'caches'}",
                "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false", "--exit-on-error=true",
                "--strict-readiness=true", f"--log-verbose={self.log_verbose}",
                # explicit model control (load every model at start), so that StubWatch can reload a crashed model;
                # the repository API (load/unload) answers only requests carrying this server's secret header
                "--model-control-mode=explicit", "--load-model=*",
                f"--http-restricted-api=model-repository:{ADMIN_HEADER}={self._admin}",
                f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}={self._admin}", *self.extra_args]

    def start(self) -> "TritonServer":
        server_dir = build_server_dir(self.server_dir_arg)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        shm_before = _shm_regions()
        self.proc = subprocess.Popen(self.command(server_dir), env=server_env(server_dir), cwd=str(server_dir),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True,  # own process group: stop() signals only it
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self._pump = threading.Thread(target=self._copy_log, daemon=True)
        self._pump.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.shm = sorted(_shm_regions() - shm_before)  # the regions this server's models made
        self._reaper = subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), str(self.proc.pid),
                                         ",".join(self.shm)], start_new_session=True, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.watch_stubs and sys.platform.startswith("linux"):
            self._watch = StubWatch(self)
            self._watch.start()
        return self

    def _repository_call(self, model: str, action: str, timeout: float) -> tuple[bool, str]:
        """POST /v2/repository/models/<model>/<action> with the secret header; (ok, detail)."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{model}/{action}", data=b"{}",
                                     method="POST", headers={ADMIN_HEADER: self._admin,
                                                             "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status == 200, f"{action} HTTP {r.status}"
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read() or b"{}").get("error", str(e))
            except ValueError:
                detail = str(e)
            return False, f"{action} failed: {detail}"
        except OSError as e:
            return False, f"{action} failed: {e}"

    def model_ready(self, model: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def reload_model(self, model: str, timeout: float = 120.0) -> tuple[bool, str]:
        """Unload + load `model` (new python-backend stubs): a plain load of a loaded model whose files did not
        change is a no-op in Triton, so the crashed instance would stay. (ok, detail)."""
        ok, detail = self._repository_call(model, "unload", timeout)
        if not ok:
            return ok, detail
        deadline = time.monotonic() + timeout
        while self.model_ready(model) and time.monotonic() < deadline:  # unloading is asynchronous
            time.sleep(0.2)
        ok, detail = self._repository_call(model, "load", timeout)
        return ok, ("reloaded" if ok else detail)

    def alive(self) -> bool:
        """The server process runs and answers ready (a crashed model makes readiness false: --strict-readiness)."""
        return self.proc is not None and self.proc.poll() is None and self.is_ready()

    def _copy_log(self) -> None:
        with open(self.log_file, "wb", buffering=0) as f:
            for line in iter(self.proc.stdout.readline, b""):
                f.write(line)
                if self.echo:
                    sys.stdout.write(line.decode("utf-8", "replace"))
                    sys.stdout.flush()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_errors(self, limit: int = 12) -> str:
        """Error lines and unavailable models from the log (the CPU-only CUDA complaints left out)."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [ln.split("\\n")[0][:400] for ln in lines if ln.startswith("E") and not any(
            s in ln for s in HARMLESS)]  # first line of each error (the log escapes tracebacks as \n)
        return "\n".join(keep[:limit])

    def _failure(self, what: str) -> ServerError:
        errors = self.log_errors()
        return ServerError(f"{what} (full log: {self.log_file})" + (f"\nerrors:\n{errors}" if errors else "")
                           + f"\nlog tail:\n{self.log_tail(8 if errors else 40)}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._pump.join(timeout=5)
                raise self._failure(f"tritonserver exited with code {self.proc.returncode} while starting")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise self._failure(f"tritonserver not ready after {self.startup_timeout:.0f} s")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout` seconds; its shm regions removed."""
        if self.proc is None:
            return
        if self._watch is not None:
            self._watch.stop.set()
            self._watch.join(timeout=5)
        pgid = self.proc.pid  # start_new_session: the server leads its own process group (pgid == pid)
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.proc.wait(10)
        _signal_group(pgid, signal.SIGKILL)  # python-backend stubs left in the group (also after a crash)
        if self._pump is not None:
            self._pump.join(timeout=5)
        for name in self.shm:  # a killed stub leaves its region behind
            _unlink_shm(name)
        reaper = getattr(self, "_reaper", None)
        if reaper is not None and reaper.poll() is None:
            reaper.kill()
            reaper.wait(5)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default="model_repository", help="Triton model repository")
    ap.add_argument("--http-port", type=int, default=None)
    ap.add_argument("--grpc-port", type=int, default=None)
    ap.add_argument("--metrics-port", type=int, default=None)
    ap.add_argument("--log-file", default=None, help="server log (default: a temp file)")
    ap.add_argument("--server-dir", default=None, help="where the server folder is built (default: a cache dir)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    ap.add_argument("--quiet", action="store_true", help="do not echo the server log to stdout")
    ap.add_argument("--log-verbose", type=int, default=0)
    ap.add_argument("--no-auto-export", action="store_true",
                    help="fail on a repository without model files instead of exporting the shipped model into it")
    args = ap.parse_args(argv)
    repo = Path(args.repo)
    if (repo / "tokenizer" / "config.pbtxt").is_file() and not (repo / "tokenizer" / "1" / "manifest.json").is_file():
        if args.no_auto_export:
            print(f"error: {repo} holds no exported model: run `python export/to_onnx.py [--checkpoint CKPT] "
                  f"--triton-repo {repo}` first", file=sys.stderr)
            return 2
        # the default: serve the shipped model (models/), exported into this repository first
        from invemb.paths import checkout_root
        print(f"{repo} holds no exported model: exporting the shipped model into it (export/to_onnx.py)", flush=True)
        rc = subprocess.run([sys.executable, "-m", "invemb.export.exporter",
                             "--out", str(checkout_root() / "onnx/shipped"), "--triton-repo", str(repo)]).returncode
        if rc != 0:
            return rc
    try:
        server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, log_file=args.log_file, echo=not args.quiet,
                              startup_timeout=args.timeout, server_dir=args.server_dir, log_verbose=args.log_verbose)
        server.start()
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nTriton ready: grpc {server.grpc_url}  http {server.http_url}  metrics {server.metrics_url}  "
          f"log {server.log_file}  (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and server.proc.poll() is None:
            stop.wait(1.0)
    finally:
        server.stop()
    return 0 if server.proc.returncode in (0, -signal.SIGTERM, None) or stop.is_set() else 1


if __name__ == "__main__":
    sys.exit(main())
