"""CoreSlots: the box's cores as lock files shared by the Triton `beam_search` instances (each its own process), so
that a search splits over both cores only when no other search holds them."""
from __future__ import annotations

import subprocess
import sys

from invemb.serving.triton_utils import CoreSlots


def test_slots_are_shared_between_instances_and_processes(tmp_path):
    folder = tmp_path / "cores"
    a, b = CoreSlots(folder, 2), CoreSlots(folder, 2)  # two instances of one model
    held = a.take(2)
    assert len(held) == 2 and b.take(2) == []  # the other instance is busy on both cores: no split
    a.release(held[1:])
    one = b.take(2)
    assert len(one) == 1  # one core came free
    a.release(held[:1])
    b.release(one)
    # another process (a stub) holds a slot until it is killed; the kernel drops a dead process's locks
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom invemb.serving.triton_utils import CoreSlots\n"
        f"s = CoreSlots({str(folder)!r}, 2)\nassert len(s.take(1)) == 1\nprint('held', flush=True)\ntime.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got = a.take(2)
        assert len(got) == 1
        a.release(got)
    finally:
        holder.kill()
        holder.wait()
    got = a.take(2)
    assert len(got) == 2
    a.release(got)
    b.close()
    a.close(remove=True)
    assert not folder.exists()
