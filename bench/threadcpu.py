"""Run ``python -m weightship ARGS…`` and write the CPU each of its threads used, by thread name.

Used by ``bench/fleet.py --profiler threads``: a fetch's threads are named for their job
(``ws-chunk``, ``ws-write``, ``ws-ahead``, ``ws-peer-HOST``, the peer server's reply threads, …),
so their user and system seconds (the kernel's ``/proc/self/task/TID/stat``, read every 50 ms and
once more at the end) say where a node's CPU goes, the kernel's share included, which a sampling
profiler of Python stacks cannot tell.

Usage::

    python bench/threadcpu.py OUT.json ARGS…
"""

from __future__ import annotations

import json
import os
import re
import runpy
import sys
import threading
from collections import Counter
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _group(name: str) -> str:
    """A thread's name without what tells threads of one job apart (host, counter)."""
    if name.startswith("ws-peer-") and name != "ws-peer-server":
        return "ws-peer-* (events of a peer)"
    if "process_request_thread" in name:
        return "peer server replies"
    return re.sub(r"[_-]\d+$", "", re.sub(r"^Thread-\d+ ", "Thread ", name))


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    seen: dict[int, tuple[str, float, float]] = {}  # tid -> (group, user s, system s)
    stop = threading.Event()

    def sample() -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid_text in os.listdir("/proc/self/task"):
            tid = int(tid_text)
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            user, system = int(fields[11]) / TICK, int(fields[12]) / TICK
            name = names.get(tid) or (seen[tid][0] if tid in seen else "(not a Python thread)")
            seen[tid] = (_group(name), user, system)

    def loop() -> None:
        while not stop.wait(0.05):
            sample()

    sampler = threading.Thread(target=loop, name="threadcpu", daemon=True)
    sampler.start()
    sys.argv = ["weightship", *args]
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # this checkout's weightship, as `-m` would
    try:
        runpy.run_module("weightship", run_name="__main__", alter_sys=True)
    finally:
        stop.set()
        sample()
        totals: Counter[str] = Counter()
        system: Counter[str] = Counter()
        for group, user, sys_s in seen.values():
            totals[group] += user + sys_s
            system[group] += sys_s
        usage = os.times()
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        process = {"user": usage.user, "system": usage.system, "disk_read": int(io["read_bytes"]),
                   "disk_written": int(io["write_bytes"])}
        out.write_text(json.dumps({"process": process,
                                   "threads": {g: {"cpu": round(totals[g], 2), "system": round(system[g], 2)}
                                               for g, _ in totals.most_common()}}, indent=1))


if __name__ == "__main__":
    main()
