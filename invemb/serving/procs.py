"""The processes and /dev/shm regions of one tritonserver generation: find them, read their state, reap them.

A generation is one tritonserver process started in its own session (process group id == its pid) with its
python-backend stubs (children in the same group). Each stub maps a /dev/shm region named in its argv:
    <stub> <model file> <shm region> <shm size> <shm growth> <parent pid> <backend dir>
`reap_generation` kills the whole group and removes every region the generation made, so a restart or a stop
leaves no process and no region behind. `REAPER` is a watchdog started in its own session that does the same when
the process owning the server disappears (SIGKILL, a crash).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

SHM_MARK = "_backend_shm_region_"  # python-based backends' /dev/shm regions: triton_<backend>_backend_shm_region_*
STUB_BINARY = b"triton_python_backend_stub"

# A watchdog in its own session: when the owner process (the one that called start()) is gone -- SIGKILL, SIGTERM
# without handler, a crash -- it kills the server's whole process group (tritonserver + python-backend stubs) and
# removes the server's /dev/shm regions. argv: owner pid, server pgid, shm names (comma-separated).
REAPER = r"""
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
for pid in filter(str.isdigit, os.listdir("/proc")):  # + the regions of stubs started since
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


@dataclass(frozen=True)
class Stub:
    """One python-backend stub process: its model (folder name in the repository), shm region, scheduler state
    ('R', 'S', 'T' stopped, 'Z' zombie, ...) and CPU time so far (clock ticks, user + system)."""
    pid: int
    model: str
    region: str
    state: str
    cpu_ticks: int


def die_with_parent() -> None:
    """preexec_fn of the server: SIGKILL it when the thread that started it dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Any process (a zombie too) left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def shm_regions() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("triton_") and SHM_MARK in n}
    except OSError:
        return set()


def unlink_shm(name: str) -> None:
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass


def _stat(pid: int) -> tuple[str, int]:
    """(state, utime + stime) from /proc/<pid>/stat (the command name may hold spaces: split after its ')')."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[11]) + int(fields[12])  # fields 3, 14, 15 of proc(5)


def stubs(pgid: int, repo: Path) -> list[Stub]:
    """The python-backend stubs in process group `pgid` whose model lies in `repo` (zombies included: their
    cmdline is empty, so they are listed with model '' and state 'Z')."""
    out: list[Stub] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if pid == pgid or os.getpgid(pid) != pgid:
                continue
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state, ticks = _stat(pid)
        except (OSError, ProcessLookupError, IndexError, ValueError):
            continue
        if state == "Z":
            out.append(Stub(pid, "", "", state, ticks))
            continue
        if len(argv) < 3 or not argv[0].endswith(STUB_BINARY):
            continue
        try:
            model = Path(os.fsdecode(argv[1])).resolve().relative_to(repo).parts[0]
        except (ValueError, IndexError):
            continue
        out.append(Stub(pid, model, argv[2].decode(errors="replace"), state, ticks))
    return out


def python_stubs(pgid: int, repo: Path) -> dict[int, tuple[str, str]]:
    """pid -> (model name, shm region) of the live stubs of the generation `pgid` (the older interface)."""
    return {s.pid: (s.model, s.region) for s in stubs(pgid, Path(repo).resolve()) if s.state != "Z"}


def reap_generation(pgid: int, regions: set[str] | list[str], grace: float = 10.0) -> list[str]:
    """SIGTERM, then SIGKILL after `grace` s, to every process of group `pgid`; then remove `regions` plus those of
    the stubs still running at the time of the call. Returns the regions removed. Zombies of the group go with
    their parent (tritonserver), which is the group leader and is killed too."""
    regions = set(regions) | {s.region for s in stubs(pgid, Path("/")) if s.region}  # "/": any model path
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10  # orphaned stubs are reaped by init; the leader by the caller (Popen.wait)
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            os.waitpid(pgid, os.WNOHANG)  # the leader is the caller's child: reap it so the group can vanish
        except ChildProcessError:
            pass
    for name in regions:
        unlink_shm(name)
    return sorted(regions)
