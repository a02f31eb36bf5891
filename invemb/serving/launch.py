"""Start the REAL Triton Inference Server bundled in the `nvidia-pytriton` wheel (CPU), as a library.

    with TritonServer("model_repository") as server:             # library / test fixture
        server.grpc_url, server.http_url, server.metrics_url
    python serving/launch.py --repo model_repository            # the CLI: invemb.serving.launch_cli

The server folder comes from the wheel (invemb.serving.server_dir); the server runs on 127.0.0.1, free ports, in its
own process group, with model control mode NONE (every model of the repository loaded at start; no load/unload
API, so nothing can unload a model and no admin secret exists). A supervisor thread (invemb.serving.supervise)
restarts it on the same ports when it exits, when a model process dies or stalls; `restarts` records each one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable

from invemb.serving import procs
from invemb.serving.procs import python_stubs  # noqa: F401 (re-exported: scripts and tests)
from invemb.serving.server_dir import ORT_BACKEND, ServerError, build_server_dir, server_env  # noqa: F401
from invemb.serving.supervise import RestartPolicy, Supervisor
from invemb.util import free_port

HARMLESS = ("CUDA driver", "CudaDriverHelper", "unable to create stream")  # expected log errors without a GPU
STUB_TIMEOUT_S = 300  # python backend stub-timeout-seconds (see command())


class TritonServer:
    """A supervised tritonserver serving `repo`; a context manager. Ports default to free ones and stay the same
    across restarts. supervise=False: no restarts (the server's exit is final)."""

    def __init__(self, repo: str | os.PathLike, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_file: str | os.PathLike | None = None, echo: bool = False,
                 startup_timeout: float = 180.0, server_dir: str | os.PathLike | None = None,
                 log_verbose: int = 0, extra_args: tuple[str, ...] = (), supervise: bool = True,
                 policy: RestartPolicy | None = None):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ServerError(f"model repository {self.repo} does not exist")
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        if log_file is None:
            import tempfile
            fd, log_file = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
        self.log_file = Path(log_file)
        self.echo, self.startup_timeout, self.log_verbose = echo, startup_timeout, log_verbose
        self.server_dir_arg, self.extra_args = server_dir, tuple(extra_args)
        self.supervise, self.policy = supervise, policy or RestartPolicy()
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        self.restarts: list[dict] = []  # supervised restarts: reason, ok, down_s, ... (invemb.serving.supervise)
        self.failed: str | None = None  # why the supervisor gave up (crash loop), else None
        self.regions: set[str] = set()  # /dev/shm regions of the current generation's stubs
        self.reaped: list[str] = []  # regions removed by restarts and stop (all generations)
        self._pumps: list[threading.Thread] = []
        self._lock = threading.RLock()  # one restart / stop at a time
        self._stopping = False
        self._reaper: subprocess.Popen | None = None
        self._supervisor: Supervisor | None = None
        self._server_dir: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def recoveries(self) -> list[dict]:  # the name of the earlier stub watch's record
        return self.restarts

    def command(self, server_dir: Path) -> list[str]:
        return [str(server_dir / "bin" / "tritonserver"), f"--model-repository={self.repo}",
                f"--backend-directory={server_dir / 'backends'}", f"--cache-directory={server_dir / 'caches'}",
                "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false", "--exit-on-error=true",
                "--strict-readiness=true", f"--log-verbose={self.log_verbose}",
                "--model-control-mode=none",  # every model loaded at start; the load/unload API answers an error
                # how long the server waits on a stub (start, messages) before giving up on it (default 30 s): on a
                # starved box a stub's imports take longer and the server aborted (lock_exception) while loading
                *(f"--backend-config={b},stub-timeout-seconds={STUB_TIMEOUT_S}" for b in ("python", "onnxruntime")),
                *self.extra_args]

    # ------------------------------------------------------------------------------------------ generations
    def _spawn(self) -> None:
        """Start a generation (a new process group) and the thread copying its output into the log."""
        self.generation += 1
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command(self._server_dir), env=server_env(self._server_dir),
                                     cwd=str(self._server_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,  # own process group
                                     preexec_fn=procs.die_with_parent if sys.platform.startswith("linux") else None)
        pump = threading.Thread(target=self._copy_log, args=(self.proc, self.generation > 1), daemon=True)
        pump.start()
        self._pumps.append(pump)

    def _after_ready(self, shm_before: set[str]) -> None:
        """The generation is ready: its regions noted, a watchdog that reaps it if this process dies."""
        self.note_regions(procs.shm_regions() - shm_before)
        self.note_regions(r for _, r in procs.python_stubs(self.proc.pid, self.repo).values())
        if self._reaper is not None and self._reaper.poll() is None:
            self._reaper.kill()
            self._reaper.wait(5)
        self._reaper = subprocess.Popen([sys.executable, "-c", procs.REAPER, str(os.getpid()), str(self.proc.pid),
                                         ",".join(sorted(self.regions))], start_new_session=True,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def start(self) -> "TritonServer":
        """Start and wait until ready. A generation that dies of a signal while starting (tritonserver 2.51 aborts
        with boost::interprocess::lock_exception while loading the python models on a starved box: measured beside
        a training run) is started again under the restart policy; an exit with a code (a bad repository) is
        final: ServerError with the log's errors."""
        self._server_dir = build_server_dir(self.server_dir_arg)
        while True:
            shm_before, t0 = procs.shm_regions(), time.monotonic()
            with self._lock:
                self._spawn()
                try:
                    self.wait_ready()
                    self._after_ready(shm_before)
                    break
                except ServerError as e:
                    code = self.proc.poll()
                    if not (self.supervise and code is not None and code < 0 and not self._stopping
                            and len(self.restarts) < self.policy.max_restarts):
                        self.stop()
                        raise
                    reason = f"tritonserver killed by signal {-code} while starting"
                    self.log_note(f"restart {len(self.restarts) + 1}: {reason}; starting again")
                    self.reap_current()
                    self.restarts.append({"reason": reason, "ok": None, "detail": str(e).splitlines()[0][:300],
                                          "down_s": round(time.monotonic() - t0, 2), "time": time.time(),
                                          "monotonic": t0, "generation": self.generation})
                except BaseException:
                    self.stop()
                    raise
            time.sleep(self.policy.delay(len(self.restarts) - 1))
        for r in self.restarts:  # the starts that crashed led to this ready generation
            r["ok"] = True if r["ok"] is None else r["ok"]
        if self.supervise and sys.platform.startswith("linux"):
            # The restarted generations are started by this thread: their parent-death signal follows it, and it
            # lives until stop() (which reaps the generation first).
            self._supervisor = Supervisor(self, self.policy)
            self._supervisor.start()
        return self

    def note_regions(self, regions: Iterable[str]) -> None:
        self.regions |= {r for r in regions if r}

    def reap_current(self, grace: float = 0.0) -> None:
        """Kill every process of the current generation and remove its /dev/shm regions."""
        with self._lock:
            if self.proc is None:
                return
            self.reaped += procs.reap_generation(self.proc.pid, self.regions, grace)
            self.regions = set()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def respawn(self) -> tuple[bool, str]:
        """A new generation on the same ports (after reap_current); (ok, detail)."""
        with self._lock:
            if self._stopping:
                return False, "stopping"
            shm_before = procs.shm_regions()
            self._spawn()
            try:
                self.wait_ready()
            except ServerError as e:
                return False, str(e)
            self._after_ready(shm_before)
            return True, f"generation {self.generation} ready"

    def give_up(self, why: str) -> None:
        self.log_note(f"giving up: {why}")
        self.reap_current()
        self.failed = why  # set last: whoever sees it finds the generation reaped

    def log_note(self, message: str) -> None:
        """A line of the supervisor in the server log (and on stderr when the log is echoed)."""
        line = f"invemb-supervisor {time.strftime('%Y-%m-%d %H:%M:%S')}: {message}\n"
        with open(self.log_file, "a") as f:
            f.write(line)
        if self.echo:
            sys.stderr.write(line)

    def _copy_log(self, proc: subprocess.Popen, append: bool) -> None:
        with open(self.log_file, "ab" if append else "wb", buffering=0) as f:
            for line in iter(proc.stdout.readline, b""):
                f.write(line)
                if self.echo:
                    sys.stdout.write(line.decode("utf-8", "replace"))
                    sys.stdout.flush()

    # ------------------------------------------------------------------------------------------ readiness
    def _get(self, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read() or b""
        except OSError:
            return 0, b""

    def is_ready(self) -> bool:
        """tritonserver's own readiness (/v2/health/ready; --strict-readiness: every loaded model ready)."""
        return self._get("/v2/health/ready")[0] == 200

    def model_states(self) -> dict[str, str]:
        """Every model of the repository (ensembles included) -> its state (READY, UNAVAILABLE, ...); {} when the
        server does not answer."""
        status, body = self._get("/v2/repository/index", b"{}")
        if status != 200:
            return {}
        try:
            return {m["name"]: m.get("state", "") for m in json.loads(body)}
        except (ValueError, KeyError, TypeError):
            return {}

    def model_ready(self, model: str) -> bool:
        return self._get(f"/v2/models/{model}/ready")[0] == 200

    def ready(self) -> bool:
        """The server answers ready AND every model of the repository is READY (not restarting, not failed)."""
        states = self.model_states()
        return self.is_ready() and bool(states) and all(s == "READY" for s in states.values())

    def alive(self) -> bool:
        """The current generation runs and is ready (false while restarting and after a crash loop)."""
        return self.proc is not None and self.proc.poll() is None and self.ready()

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

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and not self._stopping:
            if self.proc.poll() is not None:
                self._pumps[-1].join(timeout=5)
                raise self._failure(f"tritonserver exited with code {self.proc.returncode} while starting")
            if self.is_ready():
                return
            # the stubs' regions, noted while they live: a generation that aborts while starting leaves them
            self.note_regions(s.region for s in procs.stubs(self.proc.pid, Path("/")) if s.region)
            time.sleep(0.25)
        raise self._failure("stopped while starting" if self._stopping else
                            f"tritonserver not ready after {self.startup_timeout:.0f} s")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the current generation's process group, SIGKILL after `timeout` s; its regions removed."""
        if self.proc is None:
            return
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.halt.set()
        self.reap_current(grace=timeout)
        if self._supervisor is not None:
            self._supervisor.join(timeout=30)
        for pump in self._pumps:
            pump.join(timeout=5)
        if self._reaper is not None and self._reaper.poll() is None:
            self._reaper.kill()
            self._reaper.wait(5)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
