"""The crash and stall watch of a TritonServer: a restart policy for tritonserver and its model processes.

tritonserver 2.51 does not recover from a failed python-backend stub by itself (measured, issue 31):
- a stub killed (OOM killer, segfault): every later request of that model answers INTERNAL "Stub process ... is
  not healthy" forever while /v2/health/ready stays 200;
- a stub that stops making progress (SIGSTOP for 1.5, 5 or 25 s) while requests come in: when it resumes the
  server aborts (SIGABRT, boost::interprocess::lock_exception in libtriton_python.so), 4 runs of 4; the same abort
  is reported upstream under plain load (triton-inference-server/server#8882), where the remedy is a restart.
`Supervisor` (a thread of the process that owns the server, every `period` s) therefore restarts the whole server
on the same ports when tritonserver exits without being asked to, when a stub of the current generation dies, when
a stub has been stopped for `stall_s` (before the server aborts on it), or when a model hangs without being
stopped (a deadlock, a blocked read): it finished no request for `hang_s` (tritonserver's own metrics: success +
failure counts) while requests wait in its queue, or it then leaves a probe request unanswered for `hang_s`
(invemb.serving.probe). A model that is merely slow under load keeps finishing requests and is left alone. A
restart reaps every process and /dev/shm region of the old generation (invemb.serving.procs.reap_generation)
before the new one starts, so nothing is left behind and no healthy model of a live generation is ever reloaded on
its own. While it restarts the ports are closed: readiness is false and clients get UNAVAILABLE (the invemb client
retries over its time budget).

Why whole-server restarts and not per-model reloads (the earlier StubWatch): reloading one model needs the
repository API (explicit model control), and the only way tritonserver 2.51 restricts that API is a header value
given on its command line, readable by every local user (ps, /proc); with it anyone could unload a model. The
server now runs with model control mode NONE: no load/unload API at all, every model of the repository is loaded
at start and stays loaded, and no secret exists. A restart costs the whole repository's load time instead of one
model's (measured in results/load_serving.md).

Restart policy (RestartPolicy): the first restart after `backoff_s`, doubling for each restart within `window_s`
up to `max_backoff_s`; after `max_restarts` restarts within `window_s` the next failure is a crash loop: the
supervisor gives up, reaps the generation and sets `server.failed`. Every restart is logged into the server log and kept in
`server.restarts`.
"""
from __future__ import annotations

import re
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

from invemb.serving import procs
from invemb.serving.probe import Prober

if TYPE_CHECKING:
    from invemb.serving.launch import TritonServer


@dataclass
class RestartPolicy:
    backoff_s: float = 0.5  # delay before the first restart of a window; doubles per restart within it
    max_backoff_s: float = 30.0
    max_restarts: int = 5  # restarts allowed within window_s; one more failure is a crash loop: give up
    window_s: float = 300.0
    stall_s: float = 1.0  # a stub stopped (state T) this long is stalled: under requests the server would abort
    period: float = 0.5  # seconds between two looks at the processes
    hang_s: float = 60.0  # a model that finishes no request for this long while requests wait, or then leaves a
    # probe unanswered this long, hangs (0: no such check); our slowest request (beam_search, 32 rows x beam 16,
    # 2 busy cores) takes about 20 s
    metrics_every: float = 2.0  # seconds between two reads of the server's metrics (the hang check)

    def delay(self, recent: int) -> float:
        """Seconds to wait before a restart when `recent` restarts happened within the window."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** recent)


class Supervisor(threading.Thread):
    """Watches the current generation of `server` and restarts it (see the module doc). Stops with `halt`."""

    def __init__(self, server: "TritonServer", policy: RestartPolicy):
        super().__init__(daemon=True, name="invemb-triton-supervisor")
        self.server, self.policy, self.halt = server, policy, threading.Event()
        self.known: dict[int, str] = {}  # pid -> model of the current generation's live stubs
        self.stopped_since: dict[int, float] = {}  # pid -> when it was first seen stopped
        self.progress: dict[str, tuple[float, float]] = {}  # model -> (requests finished, when that count moved)
        self.metrics_at = 0.0
        self.prober = Prober(server.http_url)

    def look(self) -> str | None:
        """One look at the current generation: the reason to restart it, or None when it is healthy."""
        srv = self.server
        code = srv.proc.poll()
        if code is not None:
            how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
            return f"tritonserver {how}"
        now = time.monotonic()
        live = {s.pid: s for s in procs.stubs(srv.proc.pid, srv.repo) if s.state != "Z" and s.model}
        srv.note_regions(s.region for s in live.values())
        dead = sorted((m, pid) for pid, m in self.known.items() if pid not in live)
        if dead:
            return "the process of model " + ", ".join(f"{m} (pid {pid})" for m, pid in dead) + " died"
        self.known = {pid: s.model for pid, s in live.items()}
        stopped = {pid: s for pid, s in live.items() if s.state in "Tt"}
        self.stopped_since = {pid: self.stopped_since.get(pid, now) for pid in stopped}
        stalled = sorted((s.model, pid) for pid, s in stopped.items()
                         if now - self.stopped_since[pid] >= self.policy.stall_s)
        if stalled:
            return ("the process of model " + ", ".join(f"{m} (pid {pid})" for m, pid in stalled)
                    + f" stopped making progress (stopped for >= {self.policy.stall_s:g} s)")
        return self.look_for_hangs(now)

    def look_for_hangs(self, now: float) -> str | None:
        """Every `metrics_every` s: the reason to restart when a model of a live stub hangs, else None. A model
        hangs when requests wait in its queue and it finished none for `hang_s` s, or when it finished none for
        `hang_s` s and then did not answer a probe within `hang_s` s (invemb.serving.probe: its clients' requests
        can all be inside the hung batch, with nothing queued). Unreadable metrics: None (a dead server is seen
        by the process checks)."""
        p = self.policy
        if p.hang_s <= 0 or now - self.metrics_at < p.metrics_every:
            return None
        self.metrics_at = now
        try:
            with urllib.request.urlopen(self.server.metrics_url, timeout=2) as r:
                counts = parse_metrics(r.read().decode(errors="replace"))
        except OSError:
            return None
        hung = []
        for model in sorted(set(self.known.values()) & set(counts)):
            pending, done = counts[model]
            seen_done, since = self.progress.get(model, (done, now))
            answered = self.prober.answered_at(model)
            if done != seen_done or (answered is not None and answered > since):
                since = now
            self.progress[model] = (done, since)
            if now - since < p.hang_s:
                continue
            if pending > 0:
                hung.append(f"{model} ({pending:g} request(s) waiting, none finished for >= {p.hang_s:g} s)")
                continue
            sent = self.prober.pending_since(model)
            if sent is None:
                self.prober.send(model, p.hang_s)
            elif now - sent >= p.hang_s:
                hung.append(f"{model} (finished no request for >= {p.hang_s:g} s, then left a probe unanswered "
                            f"for {now - sent:.0f} s)")
        if hung:
            return f"model {', '.join(hung)}: hung"
        return None

    def reset(self) -> None:
        """Take the stubs of a new generation as the known ones."""
        srv = self.server
        live = [s for s in procs.stubs(srv.proc.pid, srv.repo) if s.state != "Z" and s.model]
        self.known, self.stopped_since, self.progress = {s.pid: s.model for s in live}, {}, {}
        self.prober.reset()
        srv.note_regions(s.region for s in live)

    def run(self) -> None:
        self.reset()
        while not self.halt.wait(self.policy.period):
            try:
                reason = self.look()
            except OSError:  # /proc raced with an exiting process: look again
                continue
            if reason is None:
                continue
            if not self.restart(reason):
                return
            self.reset()

    def restart(self, reason: str) -> bool:
        """Restart after `reason`, retrying failed starts within the policy; False when it gave up (crash loop)
        or the server is being stopped."""
        srv, p = self.server, self.policy
        while not self.halt.is_set():
            t0 = time.monotonic()
            recent = [r for r in srv.restarts if r["monotonic"] > t0 - p.window_s]
            if len(recent) >= p.max_restarts:
                srv.give_up(f"{len(recent)} restarts within {p.window_s:g} s and it failed again (crash loop); "
                            f"last: {reason}")
                return False
            srv.log_note(f"restart {len(srv.restarts) + 1}: {reason}; restarting in {p.delay(len(recent)):g} s")
            srv.reap_current()
            if self.halt.wait(p.delay(len(recent))):
                return False
            ok, detail = srv.respawn()
            down = time.monotonic() - t0
            srv.restarts.append({"reason": reason, "ok": ok, "detail": detail, "down_s": round(down, 2),
                                 "time": time.time(), "monotonic": t0, "generation": srv.generation})
            srv.log_note(f"restart {len(srv.restarts)}: {'ready again' if ok else 'failed: ' + detail} "
                         f"after {down:.1f} s")
            if ok:
                return True
            reason = f"the restarted server did not get ready ({detail.splitlines()[0][:200]})"
        return False


_METRIC = re.compile(r'^(nv_inference_pending_request_count|nv_inference_request_success|nv_inference_request_failure)'
                     r'\{([^}]*)\}\s+([0-9.eE+-]+)\s*$')


def parse_metrics(text: str) -> dict[str, tuple[float, float]]:
    """tritonserver's Prometheus text -> model -> (requests waiting, requests finished: success + failure),
    summed over versions."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if "model" not in labels:
            continue
        row = out.setdefault(labels["model"], [0.0, 0.0])
        row[0 if m.group(1).endswith("count") else 1] += float(m.group(3))
    return {k: (v[0], v[1]) for k, v in out.items()}
