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

    python bench/fleet.py [--nodes 1,2,4,8] [--size-mib 512] [--rate-mbit 400] [--origin hub|s3|webseed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
              chunk_mib: int | None, extra: list[str], seed_torrent: float = 60) -> Run:
    assert fleet.origin is not None
    for i in range(len(fleet.nodes)):
        shutil.rmtree(work / f"node{i}", ignore_errors=True)
    before = fleet.origin.sent()
    procs = []
    start = time.monotonic()
    for i, node in enumerate(fleet.nodes):
        args = [sys.executable, "-m", "weightship", "--json", "fetch", *ref, "--to", work / f"node{i}",
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
    while len(verified) < len(procs):
        for i, p in enumerate(procs):
            if i not in verified and ((work / f"node{i}/.weightship/manifest.json").exists() or p.poll() is not None):
                verified[i] = time.monotonic() - start
        time.sleep(0.02)
    reported, failures = 0, []
    for i, p in enumerate(procs):
        assert p.stdout is not None
        out = p.stdout.read()
        p.wait(600)
        readers[i].join()
        if p.returncode != 0:
            failures.append(f"node{i + 1}: exit {p.returncode}: {''.join(errors.get(i, []))[-500:]}")
            continue
        reported += json.loads(out)["origin_bytes"]
    last = max(verified.values())
    return Run(last, last - max(began.values(), default=0.0), fleet.origin.sent() - before, reported, failures)


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
    a = parser.parse_args()
    why = have_fleet()
    if why:
        raise SystemExit(f"bench/fleet.py {why}")
    counts = [int(n) for n in a.nodes.split(",")]
    with tempfile.TemporaryDirectory(prefix="wsfleet-", dir=a.workdir) as tmp:
        store, work = Path(tmp) / "store", Path(tmp) / "work"
        model_dir = {"hub": store / "hub" / REPO, "s3": store / "s3" / "models" / "fleet-model",
                     "webseed": store / "web" / "fleet-model"}[a.origin]
        size = make_model(model_dir, a.size_mib << 20)
        shutil.copy(model_dir / ".weightship/manifest.json", store / "manifest.json")
        limit = size * 8 / (a.rate_mbit * 1e6)
        rows = []
        for n in counts:
            with Fleet(n, a.rate_mbit) as fleet:
                assert fleet.origin is not None
                proc, env, ref = start_origin(fleet.origin, a.origin, store, Path(tmp) / f"origin-{n}.log")
                try:
                    wait_listening(fleet.origin, ORIGIN_PORT)
                    extra = a.extra.split()
                    swarm = run_nodes(fleet, work, env, ref, swarm=True, chunk_mib=a.chunk_mib, extra=extra,
                                      seed_torrent=max(30.0, 4 * limit))
                    naive = None if a.no_naive else run_nodes(fleet, work, env, ref, swarm=False,
                                                               chunk_mib=a.chunk_mib, extra=extra)
                finally:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:  # a server still draining keep-alive connections
                        proc.kill()
                        proc.wait(10)
            rows.append((n, swarm, naive))
            for r in (swarm, naive):
                for failure in (r.failures if r else []):
                    print(f"  N={n}: {failure}", file=sys.stderr)
            print(f"  N={n}: swarm {swarm.seconds:.1f} s, origin {swarm.origin_bytes / size:.2f}x"
                  + (f"; naive {naive.seconds:.1f} s, origin {naive.origin_bytes / size:.2f}x" if naive else ""),
                  file=sys.stderr, flush=True)
    print(f"\nfleet fetch of a {size / 2**20:.0f} MiB model (2 files) from {a.origin} over {a.rate_mbit:.0f} Mbit/s "
          f"links, {os.cpu_count()} cores; limit = size / link rate = {limit:.1f} s")
    print("time: launch to the last verified model (in brackets: from the last node's start of fetching, "
          "i.e. without the start-up of N processes on this machine's cores)")
    print(f"{'N':>3} {'swarm s':>13} {'origin ×':>9} {'reported ×':>10} {'naive s':>13} {'origin ×':>9} "
          f"{'limit s':>7} {'swarm/N=1':>9}")
    alone = rows[0][1] if rows and rows[0][0] == 1 else None
    for n, swarm, naive in rows:
        print(f"{n:>3} {swarm.seconds:>6.1f} ({swarm.transfer:>4.1f}) {swarm.origin_bytes / size:>9.2f} "
              f"{swarm.reported_origin / size:>10.2f} "
              + (f"{naive.seconds:>6.1f} ({naive.transfer:>4.1f}) {naive.origin_bytes / size:>9.2f} " if naive
                 else f"{'-':>13} {'-':>9} ")
              + f"{limit:>7.1f} " + (f"{swarm.seconds / alone.seconds:>9.2f}" if alone else f"{'-':>9}"))
    last = rows[-1]
    if last[0] >= 8 and alone:
        print(f"\ngoals at N={last[0]}: origin {last[1].origin_bytes / size:.2f}x the model (≤ 1.2x); time "
              f"{last[1].seconds / alone.seconds:.2f}x one node alone, {last[1].transfer / alone.transfer:.2f}x "
              "from the start of fetching (≤ 1.5x)")


if __name__ == "__main__":
    main()
