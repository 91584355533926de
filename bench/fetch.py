"""Benchmark of fetching: weightship beside s5cmd, boto3 and huggingface_hub, same bytes, same run.

A model directory of ``--size`` random bytes (default 1 GiB, in ``--files`` files) is served on
loopback two ways: by ``rclone serve s3`` (S3, stocked by ``weightship push --key``: rclone
speaks plain HTTP, where weightship trusts a manifest only when it is signed, so the fetch is
given the public key as ``fetch --trust-key`` would) and by ``weightship mirror`` (the Hub
protocol, in its own process). Each tool fetches it into a fresh directory ``--runs`` times (default 5, round-robin);
the table shows medians and each weightship figure as a ratio to its peer (>1 = faster):

- S3 fetch + sha256 (weightship) beside ``s5cmd cp`` and boto3's ``download_file`` (neither
  hashes);
- Hub fetch + sha256 (weightship) beside ``huggingface_hub``'s ``snapshot_download`` from the
  same mirror (which checks no sha256);
- the downloader with inline sha256 beside the same downloader with hashing off, both fetching
  the files two at a time as the engine does (target: the hash costs ≤ 10 %).

weightship fsyncs each file before promoting it (a promoted file survives a power cut); the
peers do not, and on 1 GiB their bytes are still only in the page cache when they return (and
when the bench deletes them): the "s5cmd cp, then fsync" row is s5cmd with the same durability.
``--many`` prints the "many files" tables of issue 22 instead. Each row (``--rows``, default
1 x 1 GiB, 16 x 64 MiB, 256 x 1 MiB and 2,000 x 2 KiB, the small ones in nested folders) at each
added latency (``--latency-ms``, default 0 and 20): weightship's Hub fetch beside
``snapshot_download`` from the same ``weightship mirror``, and its S3 fetch beside
``s5cmd cp 's3://…/*'`` from the same rclone. Every tool runs as its own process, as a user runs
it (``python -m weightship fetch``, ``python -c 'snapshot_download(…)'``, ``s5cmd``), so its
start-up counts and its peak RSS and CPU time are its own (``wait4``); interleaved, median of
``--runs``. Latency: this VM's kernel has no ``sch_netem`` (``tc qdisc … netem`` answers "qdisc
kind is unknown"), so a relay in the bench (asyncio, on loopback, in front of each server) holds
every byte a client sends for the delay before passing it on: each request is answered that
much later, on an open connection or a new one; answers flow back as sent. The relay costs CPU
on the same cores, alike for both tools of a row. Requests per file are counted on the wire
by the same relay (neither rclone nor the mirror keeps a count), in one untimed run of each
tool before the timed ones (listing, manifest and signature included). ``--tree DIR`` runs the
weightship package under DIR; ``--baseline DIR`` adds a column: the S3 fetch of the package
under DIR (e.g. ``git archive COMMIT weightship | tar -x -C DIR``), in the same rounds;
``--ws-args '--requests 32'`` passes arguments to every weightship fetch; ``--only s3|hub``.
``--tls`` serves both over TLS on loopback (issue 19): a throwaway CA made by ``trustme`` signs a
certificate for 127.0.0.1 that rclone (``--cert``/``--key``) and the mirror (``--tls-cert``/
``--tls-key``) present, and every client is pointed at the CA (``AWS_CA_BUNDLE``,
``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``: weightship, boto3, s5cmd's Go TLS and
huggingface_hub each read one of them); the relay passes the encrypted bytes, so it cannot count
requests ("-" in req/file). Each row also shows the CPU seconds per GiB fetched of each process.
Issue 19's rows: ``--many --rows 1x1048576KiB,1x262144KiB --latency-ms 0 [--tls] --tree DIR``
(DIR a ``git archive`` of the package, so that others' uncommitted edits are not measured).
Measured after a4b5732 (before it, s5cmd wrote into a leftover ./DEST and its figures were
wrong), quiet machine, median of 3, weightship's speed / s5cmd's: S3 1 GiB plain 0.60x, TLS
0.50x; 256 MiB plain 0.31x, TLS 0.34x. Hub 1 GiB (not affected): plain 2.08-2.72x, TLS
1.98-2.55x of snapshot_download (d799349, load 2-7). s5cmd makes no file durable (no fsync
call under strace); weightship flushes every file before promoting any.

Usage::

    python bench/fetch.py [--size-mib 1024] [--files 2] [--runs 3]
    python bench/fetch.py --many [--rows 256x1024KiB,2000x2KiB] [--latency-ms 0,20] [--runs 3] [--tls]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' loopback helpers

from tests.net import free_port, listening, make_pki, wait_until
from weightship.fetch import build_request, fetch
from weightship.fetch.download import download
from weightship.fetch.options import FetchOptions, TransferOptions
from weightship.fetch.s3 import ObjectSigner, S3Remote, make_s3_client, make_s3_pool, push_directory
from weightship.manifest import Manifest, create_for_directory
from weightship.signing import generate_key

S3_TOOLS = ("ws s3", "s5cmd", "s5cmd+sync", "ws s3 base")
MANY_ROWS = "1x1048576KiB,16x65536KiB,256x1024KiB,2000x2KiB"  # the rows of issue 22
KEYS = {"AWS_ACCESS_KEY_ID": "benchKEY", "AWS_SECRET_ACCESS_KEY": "benchSECRET",
        "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


def _bin(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise SystemExit(f"{name} is not installed (pip install {name}-bin / {name})")
    return found


@contextmanager
def _server(args: list[str], port: int, cwd: Path | None = None) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    try:
        wait_until(lambda: listening(port), 30, f"{Path(args[0]).name} to listen", proc)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def make_model(root: Path, size: int, files: int) -> Path:
    """``root/bench/model``: ``files`` random files of ``size`` bytes in all, with a manifest."""
    model = root / "bench" / "model"
    model.mkdir(parents=True)
    for i in range(files):
        with open(model / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            left = size // files
            while left:
                n = min(left, 64 << 20)
                f.write(os.urandom(n))
                left -= n
    create_for_directory(model, name="bench").write(model)
    return model


def _row(text: str) -> tuple[int, int]:
    count, _, size = text.lower().partition("x")
    return int(count), int(size.removesuffix("kib")) << 10


def make_many(root: Path, name: str, count: int, size: int) -> Path:
    """``root/bench/NAME``: ``count`` random files of ``size`` bytes, in nested folders when many."""
    model = root / "bench" / name
    for i in range(count):
        f = model / f"d{i % 16:02d}" / f"s{i % 5}" / f"part-{i:05d}.json" if count > 16 else \
            model / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "wb") as out:
            left = size
            while left:
                n = min(left, 64 << 20)
                out.write(os.urandom(n))
                left -= n
    create_for_directory(model, name=name).write(model)
    return model


_REQUEST = re.compile(rb"(GET|HEAD|POST|PUT|DELETE) /[^ \r\n]* HTTP/1\.[01]\r\n")


class Relay:
    """A TCP relay on loopback to a server that holds each byte the client sends for
    ``delay`` seconds before passing it on (so every request waits that much longer for its
    answer; the answers come back as they are sent, at most ``rate`` bytes a second on each
    connection when it is set: a flow held back by its round trips, as on a long link), and
    counts the request lines it passes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.delay, self.rate = upstream_port, 0.0, 0.0
        self.requests: collections.Counter[str] = collections.Counter()
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(lambda loop, context: None)  # a client that hung up
        self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port, backlog=1024))
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:  # client -> server, each byte held ``delay`` seconds
            tail = b""
            while data := await reader.read(1 << 16):
                buf = tail + data
                for m in _REQUEST.finditer(buf):
                    if m.end() > len(tail):
                        self.requests[m.group(1).decode()] += 1
                tail = buf[-8192:]
                queue.put_nowait((self.loop.time() + self.delay, data))
            queue.put_nowait((0.0, b""))

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    up_writer.write_eof()
                    return
                if (wait := due - self.loop.time()) > 0:
                    await asyncio.sleep(wait)
                up_writer.write(data)
                await up_writer.drain()

        async def back() -> None:  # server -> client, as it comes (paced to ``rate``)
            free = self.loop.time()
            while data := await up_reader.read(1 << 18 if not self.rate else 1 << 16):
                if self.rate:
                    free = max(free, self.loop.time()) + len(data) / self.rate
                    if (wait := free - self.loop.time()) > 0:
                        await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.write_eof()

        try:
            await asyncio.gather(forward(), send(), back())
        except (OSError, RuntimeError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()


@dataclass
class Run:
    """One tool's run: seconds, CPU seconds, peak RSS (bytes), requests sent."""

    seconds: float
    cpu: float
    rss: int
    requests: int = 0


def run_tool(args: list[str], env: dict[str, str], dest: Path, cwd: Path, relay: Relay | None) -> Run:
    """``args`` (DEST replaced by ``dest``) as a child process: its time, its own CPU and peak RSS
    (GNU time's, which forks it from a small process: the rusage of a child forked from this
    bench would count the bench's own RSS), the requests ``relay`` passed meanwhile; ``dest``
    is deleted afterwards."""
    before = sum(relay.requests.values()) if relay else 0
    with tempfile.NamedTemporaryFile() as usage, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", usage.name,
                               *(a.replace("DEST", str(dest), 1) if a in ("DEST", "DEST/") else a
                                 for a in args)], env=env, cwd=cwd,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(args[:4])} failed ({proc.returncode}):\n{err.read().decode()[-2000:]}")
        rss, user, system = Path(usage.name).read_text().split()[-3:]
    shutil.rmtree(dest, ignore_errors=True)
    return Run(seconds, float(user) + float(system), int(rss) << 10,
               sum(relay.requests.values()) - before if relay else 0)


def many_files(rows: list[tuple[int, int]], latencies: list[float], runs: int, tree: Path,
               baseline: Path | None, only: str | None = None, ws_args: tuple[str, ...] = (),
               tls: bool = False, flow_mbps: float = 0.0) -> int:
    """The many-files tables: see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="ws-bench-many-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        (base / "s3" / "models").mkdir(parents=True)
        key = base / "bench.pem"
        public = generate_key(key)
        s3_port, hub_port = free_port(), free_port()
        scheme = "https" if tls else "http"
        s3_tls: list[str] = []
        hub_tls: list[str] = []
        if tls:
            pki = make_pki(base / "pki")
            ca, cert, cert_key = pki.ca, pki.cert, pki.key
            s3_tls = ["--cert", str(cert), "--key", str(cert_key)]
            hub_tls = ["--tls-cert", str(cert), "--tls-key", str(cert_key)]
            os.environ.update(AWS_CA_BUNDLE=str(ca), SSL_CERT_FILE=str(ca), REQUESTS_CA_BUNDLE=str(ca))
        os.environ.update(KEYS, AWS_ENDPOINT_URL=f"{scheme}://127.0.0.1:{s3_port}")
        names = [f"{count}x{_size(size)}" for count, size in rows]
        models = [make_many(base / "hub", n, c, s) for n, (c, s) in zip(names, rows, strict=True)]
        rclone = [_bin("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{s3_port}", "--config", "/dev/null",
                  "--auth-key", f"{KEYS['AWS_ACCESS_KEY_ID']},{KEYS['AWS_SECRET_ACCESS_KEY']}", *s3_tls,
                  str(base / "s3")]
        mirror = [sys.executable, "-m", "weightship", "mirror", str(base / "hub"), "--port", str(hub_port), *hub_tls]
        s5cmd = _bin("s5cmd")
        here = tree
        table: list[tuple[str, float, dict[str, Run], dict[str, Run]]] = []
        with _server(rclone, s3_port), _server(mirror, hub_port, cwd=tree):
            for name, model in zip(names, models, strict=True):
                push_directory(model, f"s3://models/{name}", key=key)
            s3_relay, hub_relay = Relay(s3_port), Relay(hub_port)
            for name in names:
                def tools(s3: int, hub: int, n: str = name) -> list[tuple[str, list[str], dict[str, str], Path]]:
                    env = {**os.environ, "AWS_ENDPOINT_URL": f"{scheme}://127.0.0.1:{s3}",
                           "HF_ENDPOINT": f"{scheme}://127.0.0.1:{hub}", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
                    ws_s3 = [sys.executable, "-m", "weightship", "fetch", f"s3://models/{n}", "--to", "DEST",
                             "--trust-key", str(public), *ws_args]
                    plan = [
                        ("ws hf", [sys.executable, "-m", "weightship", "fetch", f"hf://bench/{n}", "--to", "DEST",
                                   *ws_args],
                         env, here),
                        ("snapshot", [sys.executable, "-c", "import sys; from huggingface_hub import "
                                      "snapshot_download as s; s(sys.argv[1], local_dir=sys.argv[2])",
                                      f"bench/{n}", "DEST"], env, here),
                        ("ws s3", ws_s3, env, here),
                        ("s5cmd", [s5cmd, "--endpoint-url", f"{scheme}://127.0.0.1:{s3}", "cp", f"s3://models/{n}/*",
                                   "DEST/"], env, here),
                        # s5cmd issues no fsync: this one waits until its files are on disk too,
                        # as weightship's are before it promotes them
                        ("s5cmd+sync", ["sh", "-c", '"$1" --endpoint-url "$2" cp "$3" "$0/" && sync -f "$0"',
                                        "DEST", s5cmd, f"{scheme}://127.0.0.1:{s3}", f"s3://models/{n}/*"], env, here),
                    ]
                    if baseline is not None:
                        plan.append(("ws s3 base", ws_s3, env, baseline))
                    return [t for t in plan if only is None or (only == "s3") == (t[0] in S3_TOOLS)]

                # Untimed, through the relays with no delay: warms the caches, counts the requests.
                counted = {label: run_tool(args, env, base / "warm", cwd, s3_relay if label in S3_TOOLS else hub_relay)
                           for label, args, env, cwd in tools(s3_relay.port, hub_relay.port)}
                for ms in latencies:
                    for relay in (s3_relay, hub_relay):
                        relay.delay, relay.rate = ms / 1000, flow_mbps * 1e6 / 8
                    relayed = ms or flow_mbps
                    plan = tools(s3_relay.port, hub_relay.port) if relayed else tools(s3_port, hub_port)
                    got: dict[str, list[Run]] = {label: [] for label, *_ in plan}
                    for i in range(runs):  # interleaved: a slow spell falls on every tool alike
                        for label, args, env, cwd in plan:
                            got[label].append(run_tool(args, env, base / f"run{i}", cwd, None))
                    medians = {label: Run(statistics.median(r.seconds for r in rs),
                                          statistics.median(r.cpu for r in rs), max(r.rss for r in rs))
                               for label, rs in got.items()}
                    table.append((name, ms, medians, counted))
                    print(f"  {name} +{ms:g} ms: " + ", ".join(f"{k} {v.seconds:.2f} s" for k, v in medians.items()),
                          file=sys.stderr, flush=True)
    print_many(table, runs, baseline, tls, flow_mbps)
    return 0


def _size(n: int) -> str:
    return f"{n >> 30}GiB" if n >= 1 << 30 and not n % (1 << 30) else \
        f"{n >> 20}MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n >> 10}KiB"


def print_many(table: list[tuple[str, float, dict[str, Run], dict[str, Run]]], runs: int,
               baseline: Path | None, tls: bool = False, flow_mbps: float = 0.0) -> None:
    flows = f", each connection's answers at most {flow_mbps:g} Mbit/s" if flow_mbps else ""
    print(f"\nmany files over loopback{' over TLS' if tls else ' (plain HTTP)'}{flows}, median of {runs} runs "
          f"(interleaved), {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "at the end; seconds (and CPU-s of the process), weightship's speed / the peer's (>1 = faster), "
          "CPU-s per GiB fetched (weightship/peer), requests per file (counted on the wire by the bench's "
          "relay, listing included; '-' over TLS), peak RSS of the process (MiB)")
    for what, ours, peer, target in (("Hub", "ws hf", "snapshot", "≥ 1.0x"), ("S3", "ws s3", "s5cmd", "≥ 0.8x")):
        if ours not in table[0][2]:
            continue
        extra = baseline is not None and what == "S3"
        print(f"\n{what}: weightship fetch beside {'snapshot_download' if what == 'Hub' else 's5cmd cp'}"
              + (f"; 'base' is weightship from {baseline}" if extra else ""))
        head = (f"{'row':<12} {'+ms':>4} {'ws s (cpu)':>12} {'peer s (cpu)':>13} {'ratio':>6} {'target':>7} "
                f"{'CPU-s/GiB':>11} {'req/file':>12} {'RSS MiB':>11}")
        durable = what == "S3" and "s5cmd+sync" in table[0][2]
        print(head + (f" {'base s (cpu)':>13} {'ratio':>6} {'base RSS':>8}" if extra else "")
              + (f" {'s5cmd+sync s':>13} {'ratio':>6}" if durable else ""))
        for name, ms, t, counted in table:
            files, size = _row_of(name)
            gib = files * size / (1 << 30)
            req = (f"{counted[ours].requests / files:>5.2f}/{counted[peer].requests / files:<5.2f}" if not tls
                   else f"{'-':>5}/{'-':<5}")
            goal = _goal_19(what, files, size) or target
            line = (f"{name:<12} {ms:>4g} {_cell(t[ours]):>12} {_cell(t[peer]):>13} "
                    f"{t[peer].seconds / t[ours].seconds:>5.2f}x {goal:>7} "
                    f"{t[ours].cpu / gib:>5.2f}/{t[peer].cpu / gib:<5.2f} "
                    f"{req} "
                    f"{t[ours].rss >> 20:>5}/{t[peer].rss >> 20:<5}")
            if extra:
                b = t["ws s3 base"]
                line += f" {_cell(b):>13} {t[peer].seconds / b.seconds:>5.2f}x {b.rss >> 20:>8}"
            if durable:
                d = t["s5cmd+sync"]
                line += f" {_cell(d):>13} {d.seconds / t[ours].seconds:>5.2f}x"
            print(line)


def _goal_19(what: str, files: int, size: int) -> str | None:
    """Issue 19's goal for a one-large-file row (it replaces issue 22's there): S3 1 GiB ≥ 1.0x
    s5cmd, S3 256 MiB ≥ 0.8x, Hub 1 GiB ≥ 1.5x snapshot_download."""
    if files != 1:
        return None
    return {("S3", 1 << 30): "≥ 1.0x", ("S3", 256 << 20): "≥ 0.8x", ("Hub", 1 << 30): "≥ 1.5x"}.get((what, size))


def _row_of(name: str) -> tuple[int, int]:
    """(count, bytes per file) of a row's name as :func:`_size` wrote it, e.g. ``1x256MiB``."""
    count, _, size = name.partition("x")
    unit = {"GiB": 30, "MiB": 20, "KiB": 10}[size[-3:]]
    return int(count), int(size[:-3]) << unit


def _cell(r: Run) -> str:
    return f"{r.seconds:.2f} ({r.cpu:.2f})"


def timed(fn: Callable[[Path], object], dest: Path) -> float:
    """Seconds of ``fn(dest)``; ``dest`` is deleted afterwards (its page cache with it)."""
    t0 = time.perf_counter()
    fn(dest)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dest, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--many", action="store_true", help="the many-files table (issue 22)")
    p.add_argument("--rows", default=MANY_ROWS, help="with --many: COUNTxSIZEKiB,... [%(default)s]")
    p.add_argument("--latency-ms", default="0,20", help="with --many: added per request, ms,... [%(default)s]")
    p.add_argument("--flow-mbps", type=float, default=0.0, help="with --many: each connection's answers "
                   "at most this many Mbit/s (through the relay; 0: as fast as they come)")
    p.add_argument("--ws-args", default="", help="with --many: more arguments for weightship fetch, "
                   "e.g. '--requests 32'")
    p.add_argument("--tls", action="store_true", help="with --many: serve S3 and the Hub over TLS "
                   "(a throwaway CA, trusted by every client through the environment)")
    p.add_argument("--only", choices=["hub", "s3"], help="with --many: the Hub table or the S3 table only")
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="with --many: run the weightship package under this directory [this checkout]")
    p.add_argument("--baseline", type=Path, help="with --many: also time the S3 fetch of the weightship "
                   "package under this directory (e.g. a git archive of an older commit)")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the servers, removes the files
    if a.many:
        return many_files([_row(r) for r in a.rows.split(",")], [float(x) for x in a.latency_ms.split(",")],
                          a.runs, a.tree.resolve(), a.baseline.resolve() if a.baseline else None, a.only,
                          tuple(a.ws_args.split()), a.tls, a.flow_mbps)
    size = (a.size_mib << 20) // a.files * a.files
    with tempfile.TemporaryDirectory(prefix="ws-bench-fetch-") as tmp:
        base = Path(tmp)
        model = make_model(base / "hub", size, a.files)
        s3_root = base / "s3"
        (s3_root / "models").mkdir(parents=True)  # the bucket
        key = base / "bench.pem"
        public = generate_key(key)
        scratch = base / "out"
        scratch.mkdir()
        s3_port, hub_port = free_port(), free_port()
        os.environ.update(KEYS, AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}",
                          HF_ENDPOINT=f"http://127.0.0.1:{hub_port}", HF_HUB_DISABLE_PROGRESS_BARS="1")
        rclone = [_bin("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{s3_port}", "--config", "/dev/null",
                  "--auth-key", f"{KEYS['AWS_ACCESS_KEY_ID']},{KEYS['AWS_SECRET_ACCESS_KEY']}", str(s3_root)]
        mirror = [sys.executable, "-m", "weightship", "mirror", str(base / "hub"), "--port", str(hub_port)]
        with _server(rclone, s3_port), _server(mirror, hub_port):
            push_directory(model, "s3://models/bench", key=key)  # what `weightship push --key` runs
            rows = run_all(model, scratch, a.runs, s3_port, public)
    print_table(rows, size, a.runs)
    return 0


def run_all(model: Path, scratch: Path, runs: int, s3_port: int, trust_key: Path) -> dict[str, float]:
    from huggingface_hub import snapshot_download

    m = Manifest.load(model)
    s5cmd = _bin("s5cmd")
    import boto3

    client = boto3.client("s3")

    def s5(dest: Path) -> None:
        subprocess.run([s5cmd, "--endpoint-url", f"http://127.0.0.1:{s3_port}", "cp",
                        "s3://models/bench/*", f"{dest}/"], check=True, stdout=subprocess.DEVNULL)

    def s5_durable(dest: Path) -> None:
        s5(dest)
        for f in dest.iterdir():  # what weightship does before it promotes a file
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def boto(dest: Path) -> None:
        dest.mkdir(parents=True)
        for f in m.files:
            client.download_file("models", f"bench/{f.path}", str(dest / f.path))

    def hf_hub(dest: Path) -> None:
        snapshot_download("bench/model", local_dir=dest, endpoint=os.environ["HF_ENDPOINT"])

    def inline(verify: bool) -> Callable[[Path], object]:
        opts = TransferOptions(verify=verify)
        pool = make_s3_pool(opts)
        ours = make_s3_client(opts)  # as the engine signs: in headers, SigV4
        signer = ObjectSigner.for_bucket(ours, "models")

        def run(dest: Path) -> None:
            dest.mkdir(parents=True)
            with ThreadPoolExecutor(opts.parallel_files) as files:  # as the engine runs them
                list(files.map(lambda f: download(S3Remote(ours, pool, "models", f"bench/{f.path}", signer),
                                                  dest / f.path, expected_size=f.size, sha256=f.sha256,
                                                  opts=opts), m.files))
        return run

    plan: list[tuple[str, Callable[[Path], object]]] = [
        ("s5cmd cp (no hash)", s5),
        ("s5cmd cp, then fsync (no hash)", s5_durable),
        ("boto3 download_file (no hash)", boto),
        ("weightship s3 fetch + sha256", lambda d: fetch(build_request(
            "s3://models/bench", options=FetchOptions(trust_keys=(trust_key,))), d)),
        ("huggingface_hub snapshot_download (no sha256)", hf_hub),
        ("weightship hf fetch + sha256", lambda d: fetch(build_request("hf://bench/model"), d)),
        ("downloader, s3, hashing off", inline(False)),
        ("downloader, s3, inline sha256", inline(True)),
    ]
    for _, fn in plan:
        timed(fn, scratch / "warmup")  # imports, the servers' caches
    # Round-robin: each round runs every tool once, so a slow spell of a shared machine
    # (other tenants, the hypervisor backing fresh pages) falls on all of them alike.
    times: dict[str, list[float]] = {label: [] for label, _ in plan}
    for i in range(runs):
        for label, fn in plan:
            times[label].append(timed(fn, scratch / f"run{i}"))
        print(f"  round {i + 1}: " + ", ".join(f"{t[-1]:.2f}" for t in times.values()), file=sys.stderr, flush=True)
    return {label: statistics.median(t) for label, t in times.items()}


def print_table(rows: dict[str, float], size: int, runs: int) -> None:
    peers: dict[str, list[tuple[str, float | None]]] = {
        "weightship s3 fetch + sha256": [("s5cmd cp (no hash)", 1.0), ("s5cmd cp, then fsync (no hash)", None),
                                         ("boto3 download_file (no hash)", None)],
        "weightship hf fetch + sha256": [("huggingface_hub snapshot_download (no sha256)", 1.0)],
    }
    print(f"\nfetch {size / 2**30:.2f} GiB over loopback, median of {runs} runs, {os.cpu_count()} cores")
    print(f"{'what':<48} {'seconds':>8} {'MB/s':>8}")
    for label, secs in rows.items():
        print(f"{label:<48} {secs:>8.2f} {size / secs / 1e6:>8.0f}")
    print(f"\n{'ratio (weightship speed / peer speed)':<60} {'ratio':>7} {'target':>8}")
    for ours, theirs in peers.items():
        for peer, target in theirs:
            ratio = rows[peer] / rows[ours]
            goal = f"≥ {target:.1f}x" if target else "-"
            print(f"{ours + ' vs ' + peer.split(' (')[0]:<60} {ratio:>6.2f}x {goal:>8}")
    cost = rows["downloader, s3, inline sha256"] / rows["downloader, s3, hashing off"]
    print(f"{'inline sha256 time / hashing-off time':<60} {cost:>6.2f}x {'≤ 1.10x':>8}")


if __name__ == "__main__":
    sys.exit(main())
