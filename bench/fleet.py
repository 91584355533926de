"""Benchmark of fleet distribution: N nodes fetch one model, as a swarm and the naive way.

The network is the tests' fleet (tests/fleet.py): N nodes and an origin, each in its own network
namespace on a bridge, every link shaped with ``tc`` to ``--rate-mbit`` each way, and a byte
counter on the origin's link. The origin is ``weightship mirror`` (the Hub protocol; default) or
``rclone serve s3`` in its own namespace, holding a ``--size-mib`` model of two files. For each N:

- **swarm**: every node runs ``weightship fetch … --listen ADDR:6881 --peer …`` (every other
  node) at once, ``--seed-for`` long enough for the slowest;
- **naive**: every node runs a plain ``weightship fetch`` from the origin at once.

``--origin webseed`` measures the alternative instead: BitTorrent, a torrent of the model whose
web seed (BEP 19) is the origin (``rclone serve http``), every node ``fetch MODEL.torrent
--listen … --peer …`` (the other nodes).

Printed per N: the time until every node has a verified model (its manifest is written), the
bytes the origin's link carried (× the model's size), and the physical limit ``size / link
rate`` (the time one link needs to carry the model once). Goals at N = 8 (DESIGN.md): origin ≤
1.2 × the model, time ≤ 1.5 × one node alone. Needs root. The model and the nodes' directories
live under ``--workdir`` (default ``/var/tmp``, a disk: N copies of the model in a tmpfs would
hold N × the model's size of memory), written with ``O_DIRECT`` as a fetch does by default.

Usage::

    python bench/fleet.py [--nodes 1,2,4,8] [--size-mib 512] [--rate-mbit 400] [--origin hub|s3|webseed] [--timeline]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fleet import Fleet, Host, have_fleet  # noqa: E402
from weightship.manifest import create_for_directory  # noqa: E402

PORT = 6881
ORIGIN_PORT = 8080
REPO = "fleet/model"


@dataclass
class Run:
    """One way of fetching on N nodes."""

    seconds: float  # until the last node had a verified model
    transfer: float  # the same, from when the last node began fetching (after its start-up)
    origin_bytes: int  # what the origin's link carried
    reported_origin: int  # what the nodes' --json said they took from the origin
    failures: list[str]
    cpu: list[float]  # CPU seconds (user + system) each node's process used, start to exit
    sys_cpu: list[float]  # the system part of it


def make_model(directory: Path, size: int) -> int:
    """Two random safetensors-named files, 5/8 and 3/8 of ``size``, and a manifest."""
    import numpy as np

    directory.mkdir(parents=True)
    rng = np.random.default_rng(15)
    first = (size * 5 // 8) // 4096 * 4096
    for name, n in (("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", size - first)):
        with open(directory / name, "wb") as f:
            for start in range(0, n, 64 << 20):
                f.write(rng.integers(0, 256, size=min(64 << 20, n - start), dtype=np.uint8).tobytes())
    create_for_directory(directory, name="fleet-model").write(directory)
    return size


def start_origin(origin: Host, kind: str, store: Path,
                 log: Path) -> tuple[subprocess.Popen[str], dict[str, str], list[str]]:
    """The origin server; returns it, the nodes' environment and the fetch's reference + args."""
    out = log.open("w")
    if kind == "hub":
        proc = origin.popen([sys.executable, "-m", "weightship", "mirror", store / "hub", "--host", "0.0.0.0",
                             "--port", str(ORIGIN_PORT)], stdout=out, stderr=subprocess.STDOUT)
        return proc, {"HF_ENDPOINT": f"http://{origin.address}:{ORIGIN_PORT}", "HF_HUB_DISABLE_TELEMETRY": "1"}, \
            [f"hf://{REPO}"]
    rclone = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if kind == "webseed":  # BitTorrent with the origin as its web seed (BEP 19), for comparison
        proc = origin.popen([rclone, "serve", "http", "--addr", f"0.0.0.0:{ORIGIN_PORT}", "--config", "/dev/null",
                             str(store / "web")], stdout=out, stderr=subprocess.STDOUT)
        torrent = store / f"webseed-{origin.netns}.torrent"
        made = subprocess.run([sys.executable, "-m", "weightship", "torrent", "create",
                               str(store / "web" / "fleet-model"), "--webseed",
                               f"http://{origin.address}:{ORIGIN_PORT}/", "-o", str(torrent)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"weightship torrent create: {made.stderr.strip()}")
        return proc, {}, [str(torrent)]
    proc = origin.popen([rclone, "serve", "s3", "--addr", f"0.0.0.0:{ORIGIN_PORT}", "--auth-key", "wsKEY,wsSECRET",
                         "--config", "/dev/null", str(store / "s3")], stdout=out, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://{origin.address}:{ORIGIN_PORT}", "AWS_ACCESS_KEY_ID": "wsKEY",
           "AWS_SECRET_ACCESS_KEY": "wsSECRET", "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    return proc, env, ["s3://models/fleet-model", "--manifest", str(store / "manifest.json")]


def wait_listening(host: Host, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["ip", "netns", "exec", host.netns, "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"],
                           capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"the origin did not listen on {port}")


def run_nodes(fleet: Fleet, work: Path, env: dict[str, str], ref: list[str], *, swarm: bool,
              chunk_mib: int | None, extra: list[str], seed_torrent: float = 60,
              profile: Path | None = None, profiler: str = "py-spy", timeline: bool = False) -> Run:
    assert fleet.origin is not None
    for i in range(len(fleet.nodes)):
        shutil.rmtree(work / f"node{i}", ignore_errors=True)
    before = fleet.origin.sent()
    procs = []
    start = time.monotonic()
    for i, node in enumerate(fleet.nodes):
        # `ip netns exec` execs the command: the pid waited for below is the fetch's (or py-spy's)
        spy: list[str | Path] = []
        main: list[str | Path] = ["-m", "weightship"]
        if profile is not None and (i == 0 or profiler == "threads"):
            name = profile / f"{'swarm' if swarm else 'naive'}-n{len(fleet.nodes)}-node{i + 1}"
            if profiler == "threads":
                main = [ROOT / "bench" / "threadcpu.py", name.with_suffix(".json")]
            elif profiler == "perf":
                spy = ["perf", "record", "-F", "499", "-g", "-o", name.with_suffix(".perf.data"), "--"]
            else:
                spy = [Path(sys.executable).parent / "py-spy", "record", "--gil", "--format", "raw", "--rate", "100",
                       "--output", name.with_suffix(".txt"), "--"]
        args = [*spy, sys.executable, *main, "--json", "fetch", *ref, "--to", work / f"node{i}",
                *(["--chunk-mib", str(chunk_mib)] if chunk_mib else []), *extra]
        if swarm:
            # --seed-for only with peers: a fetch that knows no peer serves the whole time; a
            # torrent's seeds the whole --seed-for, so there it is only long enough for the others
            seed_for = "5m" if ref[0].startswith(("hf://", "s3://")) else f"{seed_torrent:.0f}s"
            args += ["--listen", f"{node.address}:{PORT}", *(["--seed-for", seed_for] if len(fleet.nodes) > 1 else [])]
            args += [a for other in fleet.nodes if other is not node for a in ("--peer", f"{other.address}:{PORT}")]
        procs.append(node.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "WEIGHTSHIP_HOME": str(work / f"home{i}"), **env}))
    began: dict[int, float] = {}
    errors: dict[int, list[str]] = {}

    def watch(i: int, stream: Any) -> None:  # progress events as they come: when the fetch began
        lines = errors.setdefault(i, [])
        for line in stream:
            if '"event": "begin"' in line and i not in began:
                began[i] = time.monotonic() - start
            lines.append(line)
            del lines[:-20]

    readers = [threading.Thread(target=watch, args=(i, p.stderr), daemon=True) for i, p in enumerate(procs)]
    for t in readers:
        t.start()
    verified: dict[int, float] = {}
    rates = Rates(fleet) if timeline else None
    while len(verified) < len(procs):
        for i, p in enumerate(procs):
            if i not in verified and ((work / f"node{i}/.weightship/manifest.json").exists() or p.poll() is not None):
                verified[i] = time.monotonic() - start
        if rates is not None:
            rates.sample(time.monotonic() - start, verified)
        time.sleep(0.02)
    if rates is not None:
        print(rates.table(), file=sys.stderr, flush=True)
    reported, failures, cpu, sys_cpu = 0, [], [], []
    for i, p in enumerate(procs):
        assert p.stdout is not None
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)  # Popen.wait() drops the child's resource usage
        p.returncode = os.waitstatus_to_exitcode(status)
        cpu.append(usage.ru_utime + usage.ru_stime)
        sys_cpu.append(usage.ru_stime)
        readers[i].join()
        if p.returncode != 0:
            failures.append(f"node{i + 1}: exit {p.returncode}: {''.join(errors.get(i, []))[-500:]}")
            continue
        reported += _summary(out)["origin_bytes"]
    last = max(verified.values())
    return Run(last, last - max(began.values(), default=0.0), fleet.origin.sent() - before, reported, failures,
               cpu, sys_cpu)


class Rates:
    """The links' rates second by second (``--timeline``): what the origin sent, what each node
    received and sent, in Mbit/s, and which nodes had a verified model (V) by then."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet, self.rows = fleet, [f"{'s':>5} {'origin':>6} | each node received | each node sent | verified"]
        self.last: tuple[float, int, list[int], list[int]] | None = None

    def sample(self, at: float, verified: dict[int, float]) -> None:
        if self.last is not None and at - self.last[0] < 1.0:
            return
        assert self.fleet.origin is not None
        now = (at, self.fleet.origin.sent(), [n.received() for n in self.fleet.nodes],
               [n.sent() for n in self.fleet.nodes])
        if self.last is not None:
            mbit = 8 / (at - self.last[0]) / 1e6

            def row(a: list[int], b: list[int]) -> str:
                return " ".join(f"{(x - y) * mbit:4.0f}" for x, y in zip(a, b, strict=True))

            self.rows.append(f"{at:5.1f} {(now[1] - self.last[1]) * mbit:6.0f} | {row(now[2], self.last[2])} | "
                             f"{row(now[3], self.last[3])} | "
                             + "".join("V" if i in verified else "." for i in range(len(self.fleet.nodes))))
        self.last = now

    def table(self) -> str:
        return "\n".join(self.rows)


def _summary(out: str) -> dict[str, Any]:
    """The fetch's --json summary in its stdout (py-spy, when profiling, writes lines of its own)."""
    start = out.find("\n{") + 1 if not out.startswith("{") else 0
    return dict(json.JSONDecoder().raw_decode(out, start)[0])


def _stop_cleanly(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # A kill (or Ctrl-C, also where a background shell ignores it) unwinds through the `with`
    # blocks: the fleet's processes killed, its namespaces and bridge deleted, the work
    # directory (N copies of the model) removed.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_cleanly)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2,4,8")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rate-mbit", type=float, default=400)
    parser.add_argument("--origin", choices=("hub", "s3", "webseed"), default="hub",
                        help="webseed: the 'swarm' is BitTorrent (a torrent of the model whose web seed "
                        "is the origin, rclone serve http; the nodes each other's --peer), for comparison")
    parser.add_argument("--chunk-mib", type=int, default=None, help="[default: fetch's own]")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive runs")
    parser.add_argument("--extra", default="", help="more fetch arguments, space-separated")
    parser.add_argument("--workdir", default="/var/tmp", help="where the model and the nodes' copies go")
    parser.add_argument("--runs", type=int, default=1, help="runs per N (swarm and naive interleaved); the "
                        "table shows the run of median time, and the median CPU per node")
    parser.add_argument("--profile", type=Path, default=None,
                        help="profile into this folder: the first node's fetch (its CPU then includes the "
                        "profiler's), or with --profiler threads every node's")
    parser.add_argument("--profiler", choices=("py-spy", "perf", "threads"), default="threads",
                        help="py-spy: Python stacks of the thread holding the GIL (100 Hz); perf: native and kernel "
                        "stacks (499 Hz); threads: each thread's CPU, by name (bench/threadcpu.py)")
    parser.add_argument("--timeline", action="store_true",
                        help="print each swarm run's link rates second by second (origin, every node)")
    a = parser.parse_args()
    why = have_fleet()
    if why:
        raise SystemExit(f"bench/fleet.py {why}")
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in a.nodes.split(",")]
    # The nodes run weightship compiled, as pip installs it on a node: a source tree run with
    # PYTHONDONTWRITEBYTECODE set (as on this machine) compiles its modules anew in every node
    # process, about 0.14 CPU-s of each fetch's start-up (0.77 against 0.63 CPU-s, measured).
    compileall.compile_dir(ROOT / "weightship", quiet=1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="wsfleet-", dir=a.workdir) as tmp:
        store, work = Path(tmp) / "store", Path(tmp) / "work"
        model_dir = {"hub": store / "hub" / REPO, "s3": store / "s3" / "models" / "fleet-model",
                     "webseed": store / "web" / "fleet-model"}[a.origin]
        size = make_model(model_dir, a.size_mib << 20)
        shutil.copy(model_dir / ".weightship/manifest.json", store / "manifest.json")
        limit = size * 8 / (a.rate_mbit * 1e6)
        rows = []
        for n in counts:
            swarms: list[Run] = []
            naives: list[Run] = []
            with Fleet(n, a.rate_mbit) as fleet:
                assert fleet.origin is not None
                proc, env, ref = start_origin(fleet.origin, a.origin, store, Path(tmp) / f"origin-{n}.log")
                try:
                    wait_listening(fleet.origin, ORIGIN_PORT)
                    extra = a.extra.split()
                    for _ in range(a.runs):
                        swarm = run_nodes(fleet, work, env, ref, swarm=True, chunk_mib=a.chunk_mib, extra=extra,
                                          seed_torrent=max(30.0, 4 * limit), profile=a.profile,
                                          profiler=a.profiler, timeline=a.timeline)
                        swarms.append(swarm)
                        naive = None if a.no_naive else run_nodes(fleet, work, env, ref, swarm=False,
                                                                   chunk_mib=a.chunk_mib, extra=extra)
                        if naive is not None:
                            naives.append(naive)
                        for r in (swarm, naive):
                            for failure in (r.failures if r else []):
                                print(f"  N={n}: {failure}", file=sys.stderr)
                        print(f"  N={n}: swarm {swarm.seconds:.1f} s, origin {swarm.origin_bytes / size:.2f}x, "
                              f"CPU {statistics.mean(swarm.cpu):.1f} s/node ({statistics.mean(swarm.sys_cpu):.1f} "
                              "system)"
                              + (f"; naive {naive.seconds:.1f} s, origin {naive.origin_bytes / size:.2f}x, "
                                 f"CPU {statistics.mean(naive.cpu):.1f} s/node" if naive else ""),
                              file=sys.stderr, flush=True)
                finally:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:  # a server still draining keep-alive connections
                        proc.kill()
                        proc.wait(10)
            rows.append((n, _median(swarms), _median(naives) if naives else None))
    per = (512 << 20) / size  # CPU is shown per 512 MiB of model
    print(f"\nfleet fetch of a {size / 2**20:.0f} MiB model (2 files) from {a.origin} over {a.rate_mbit:.0f} Mbit/s "
          f"links, {os.cpu_count()} cores; limit = size / link rate = {limit:.1f} s; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; median of {a.runs} run(s)")
    print("time: launch to the last verified model (in brackets: from the last node's start of fetching, "
          "i.e. without the start-up of N processes on this machine's cores); CPU: user + system seconds "
          "per node process, start to exit, per 512 MiB of model (sys: the kernel's part)")
    print(f"{'N':>3} {'swarm s':>13} {'origin ×':>9} {'reported ×':>10} {'CPU s':>6} {'sys':>5} {'naive s':>13} "
          f"{'origin ×':>9} {'CPU s':>6} {'limit s':>7} {'swarm/N=1':>9}")
    alone = rows[0][1] if rows and rows[0][0] == 1 else None
    for n, swarm, naive in rows:
        print(f"{n:>3} {swarm.seconds:>6.1f} ({swarm.transfer:>4.1f}) {swarm.origin_bytes / size:>9.2f} "
              f"{swarm.reported_origin / size:>10.2f} {swarm.cpu[0] * per:>6.2f} {swarm.sys_cpu[0] * per:>5.2f} "
              + (f"{naive.seconds:>6.1f} ({naive.transfer:>4.1f}) {naive.origin_bytes / size:>9.2f} "
                 f"{naive.cpu[0] * per:>6.2f} " if naive
                 else f"{'-':>13} {'-':>9} {'-':>6} ")
              + f"{limit:>7.1f} " + (f"{swarm.seconds / alone.seconds:>9.2f}" if alone else f"{'-':>9}"))
    last = rows[-1]
    if last[0] >= 8 and alone:
        print(f"\ngoals at N={last[0]}: origin {last[1].origin_bytes / size:.2f}x the model (≤ 1.2x); time "
              f"{last[1].seconds / alone.seconds:.2f}x one node alone, {last[1].transfer / alone.transfer:.2f}x "
              "from the start of fetching (≤ 1.5x)")


def _median(runs: list[Run]) -> Run:
    """The run of median time (the lower middle one of an even count), with the median CPU per node
    of all the runs."""
    ranked = sorted(runs, key=lambda r: r.seconds)
    mid = ranked[(len(ranked) - 1) // 2]
    cpu = statistics.median(statistics.mean(r.cpu) for r in runs)
    sys_cpu = statistics.median(statistics.mean(r.sys_cpu) for r in runs)
    return Run(mid.seconds, mid.transfer, mid.origin_bytes, mid.reported_origin, mid.failures, [cpu], [sys_cpu])

if __name__ == "__main__":
    main()
