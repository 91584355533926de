"""Transports for one large object, side by side (issue 19, item 1: measure before choosing).

One object of ``--size-mib`` random bytes (default 1 GiB) is served from one directory by two
rclone servers on loopback, plain or, with ``--tls``, over TLS (a throwaway CA from ``trustme``):
``rclone serve s3`` for s5cmd, and ``rclone serve http`` (Go's file server) for the readers
measured, so that none of them pays for request signing and each gets a proper ``206``: rclone's
S3 server answers a ranged GET with ``200`` and a ``Content-Range`` (weightship's engine accepts
that; obstore refuses it, "Received non-partial response when range requested"). Each reader
copies it to a fresh file with ``--connections`` ranged GETs of ``--chunk-mib`` in flight
(default 8 of 16 MiB), writes each range at its offset, takes the sha256 of every range as it
lands (``--no-hash``: none; the same CPU as one digest of the whole file), and flushes the file
to disk before it stops (fsync; ``--sink null``: neither, to compare the transports alone, but
weightship's engine and s5cmd write as always):

- ``weightship engine``: weightship's own downloader (:func:`weightship.fetch.download.download`,
  its journal, stall detection, O_DIRECT writes and in-order sha256 of the whole file) over its
  urllib3 pool: what a fetch does, minus planning;
- ``urllib3``: the same pool library with nothing around it, ``readinto`` a buffer per range;
- ``pycurl``: libcurl's multi interface, ``--connections`` easy handles reused range after range
  (libcurl's transfer loop and TLS in C; Python sees each 1 MiB of body in a write callback);
- ``obstore``: the Rust ``object_store`` crate's ``get_range`` from ``--connections`` threads
  (the body is read into Rust-owned buffers with the GIL released);
- ``s5cmd cp`` then ``sync -f``: the peer tool, no hash.

Each reader runs as its own process (``--python``, default this interpreter), timed with its CPU
seconds (user + system, its own, by GNU time), interleaved for ``--runs`` rounds (default 3);
the table shows medians, CPU-seconds per GiB and each reader's speed as a ratio to s5cmd's.

pycurl and obstore are no dependency of weightship: install them into a separate environment
that also sees the project's packages, and pass its interpreter::

    python3 -m venv /var/tmp/tv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /var/tmp/tv/lib/python3.11/site-packages/ws.pth
    /var/tmp/tv/bin/pip install obstore pycurl
    .venv/bin/python bench/transport.py --python /var/tmp/tv/bin/python [--tls] [--runs 3]

A reader whose library the interpreter lacks is left out of the table (and said so).

**Many small objects** (issue 22, item 3), ``--objects N [--object-kib K]``: N objects of K KiB
(default 2) in nested folders instead of one large one, each read whole by one GET, hashed,
written to its own file, the tree flushed at the end (``syncfs``, as a fetch does for many
files); ``--connections`` GETs in flight. ``weightship engine`` is then the engine's small-file
path (:func:`weightship.fetch.many.fetch_small` from ``--connections`` threads: one GET, the
reply's checks, sha256 against the plan, one write), ``urllib3`` the bare pool from as many
threads, ``pycurl`` one multi handle driving ``--connections`` easy handles, ``obstore`` its
``get`` from threads, and the peer ``s5cmd cp 's3://…/*'`` then ``sync -f``. The table gives
milliseconds and CPU-milliseconds per object.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.net import free_port, listening, make_pki, wait_until

BUCKET, KEY, SMALL = "models", "big/model.safetensors", "small"
KEYS = ("benchKEY", "benchSECRET")  # s5cmd's, for rclone's S3 server
READERS = ("weightship engine", "urllib3", "pycurl", "obstore")
_MODULE = {"weightship engine": "urllib3", "urllib3": "urllib3", "pycurl": "pycurl", "obstore": "obstore"}


# --- the readers (each runs in a child process: ``transport.py --reader NAME ...``) ---

def _ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(size, s + chunk)) for s in range(0, size, chunk)]


def _copy(a: argparse.Namespace, read: Callable[[int, int], memoryview]) -> None:
    """``read(start, end)`` for every range on ``a.connections`` threads, each range written at
    its offset and hashed; the file flushed at the end."""
    fd = os.open(a.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, a.size)

        def one(r: tuple[int, int]) -> None:
            view = read(*r)
            assert len(view) == r[1] - r[0], (len(view), r)
            if a.sink == "disk":
                os.pwrite(fd, view, r[0])
            if a.hash:
                hashlib.sha256(view).digest()

        with ThreadPoolExecutor(a.connections) as pool:
            list(pool.map(one, _ranges(a.size, a.chunk)))
        if a.sink == "disk":
            os.fsync(fd)
    finally:
        os.close(fd)


def read_urllib3(a: argparse.Namespace) -> None:
    import urllib3

    http = urllib3.PoolManager(maxsize=a.connections, ca_certs=a.ca, retries=False)
    local = threading.local()

    def read(start: int, end: int) -> memoryview:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(a.chunk))
        r = http.request("GET", a.url, headers={"Range": f"bytes={start}-{end - 1}"}, preload_content=False)
        pos = 0
        while pos < end - start and (n := r.readinto(buf[pos:end - start])):
            pos += n
        r.release_conn()
        return buf[:pos]

    _copy(a, read)


def read_pycurl(a: argparse.Namespace) -> None:
    import pycurl

    fd = os.open(a.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, a.size)
    todo = _ranges(a.size, a.chunk)[::-1]
    multi = pycurl.CurlMulti()
    state: dict[pycurl.Curl, list] = {}

    def start(c: pycurl.Curl) -> None:
        s, e = todo.pop()
        buf = memoryview(bytearray(e - s))
        box = [s, buf, 0]
        state[c] = box

        def write(data: bytes, box: list = box) -> None:
            n = len(data)
            box[1][box[2]:box[2] + n] = data
            box[2] += n

        c.setopt(pycurl.RANGE, f"{s}-{e - 1}")
        c.setopt(pycurl.WRITEFUNCTION, write)
        multi.add_handle(c)

    for _ in range(min(a.connections, len(todo))):
        c = pycurl.Curl()
        c.setopt(pycurl.URL, a.url)
        c.setopt(pycurl.BUFFERSIZE, 1 << 20)
        if a.ca:
            c.setopt(pycurl.CAINFO, a.ca)
        start(c)
    def finished(c: pycurl.Curl) -> None:
        s, buf, got = state.pop(c)
        assert got == len(buf), (got, len(buf))
        if a.sink == "disk":
            os.pwrite(fd, buf, s)
        if a.hash:
            hashlib.sha256(buf).digest()
        if todo:
            start(c)

    _drive(multi, state, finished)
    if a.sink == "disk":
        os.fsync(fd)
    os.close(fd)


def _drive(multi: Any, busy: dict[Any, Any], finished: Callable[[Any], None]) -> None:
    """Run pycurl's ``multi`` until ``busy`` (its transfers in flight) is empty, handing each
    finished transfer's handle to ``finished`` (which may start the next on it)."""
    import pycurl

    while busy:
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            queued, done, failed = multi.info_read()
            if failed:
                raise SystemExit(f"pycurl: {failed[0][2]}")
            for c in done:
                multi.remove_handle(c)
                finished(c)
            if not queued:
                break
        if busy:
            multi.select(1.0)


def read_obstore(a: argparse.Namespace) -> None:
    import obstore
    from obstore.store import HTTPStore

    options: dict[str, object] = {"allow_http": True}
    if a.ca:
        options["root_certificate"] = Path(a.ca).read_text()
    store = HTTPStore.from_url(a.endpoint, client_options=options)
    _copy(a, lambda s, e: memoryview(obstore.get_range(store, f"{BUCKET}/{KEY}", start=s, end=e)))


def read_engine(a: argparse.Namespace) -> None:
    from weightship.fetch.download import download
    from weightship.fetch.options import TransferOptions
    from weightship.fetch.remote import RemoteStat
    from weightship.fetch.transport import HttpPool, HttpRemote

    class Known(HttpRemote):  # the size is known, as a fetch knows it from its plan: no HEAD
        def stat(self) -> RemoteStat:
            return RemoteStat(size=a.size, validator=None)

    opts = TransferOptions(connections=a.connections, parallel_files=1, chunk_size=a.chunk, verify=a.hash)
    pool = HttpPool(opts, ca_certs=a.ca, proxies=False)
    out = Path(a.out)
    download(Known(pool, a.url), out, expected_size=a.size, sha256=None, opts=opts, root=out.parent)


# --- many small objects (``--objects``): each reader gets the keys and digests in ``--keys`` ---

def _keys(a: argparse.Namespace) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in Path(a.keys).read_text().splitlines()]  # type: ignore[misc]


def _store(a: argparse.Namespace, key: str, data: bytes | memoryview, sha256: str) -> None:
    """Check one object's bytes, then write them to their own file under ``--out``."""
    assert len(data) == a.object_kib << 10 and hashlib.sha256(data).hexdigest() == sha256, key
    path = Path(a.out) / key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _flush(a: argparse.Namespace) -> None:
    from weightship.fetch.many import make_durable

    make_durable(Path(a.out), [Path(a.out) / k for k, _ in _keys(a)])


def _each(a: argparse.Namespace, one: Callable[[str, str], None]) -> None:
    with ThreadPoolExecutor(a.connections) as pool:
        list(pool.map(lambda kd: one(*kd), _keys(a)))
    _flush(a)


def small_urllib3(a: argparse.Namespace) -> None:
    import urllib3

    http = urllib3.PoolManager(maxsize=a.connections, ca_certs=a.ca, retries=False)

    def one(key: str, sha256: str) -> None:
        r = http.request("GET", f"{a.url}/{key}")
        assert r.status == 200, (r.status, key)
        _store(a, key, r.data, sha256)

    _each(a, one)


def small_engine(a: argparse.Namespace) -> None:
    from weightship.fetch.base import PlannedFile
    from weightship.fetch.many import fetch_small
    from weightship.fetch.options import TransferOptions
    from weightship.fetch.transport import HttpPool, HttpRemote
    from weightship.progress import NullProgress

    opts = TransferOptions(connections=a.connections, parallel_files=1)
    pool, root, progress = HttpPool(opts, ca_certs=a.ca, proxies=False), Path(a.out), NullProgress()

    def one(key: str, sha256: str) -> None:
        f = PlannedFile(path=key, size=a.object_kib << 10, sha256=sha256)
        assert fetch_small(HttpRemote(pool, f"{a.url}/{key}"), f, root / key, root, opts, progress) is not None

    _each(a, one)


def small_pycurl(a: argparse.Namespace) -> None:
    import io

    import pycurl

    todo = _keys(a)[::-1]
    multi = pycurl.CurlMulti()
    state: dict[pycurl.Curl, tuple[str, str, io.BytesIO]] = {}

    def start(c: pycurl.Curl) -> None:
        key, sha256 = todo.pop()
        body = io.BytesIO()
        c.setopt(pycurl.URL, f"{a.url}/{key}")
        c.setopt(pycurl.WRITEDATA, body)
        state[c] = (key, sha256, body)
        multi.add_handle(c)

    for _ in range(min(a.connections, len(todo))):
        c = pycurl.Curl()
        if a.ca:
            c.setopt(pycurl.CAINFO, a.ca)
        start(c)
    def finished(c: pycurl.Curl) -> None:
        key, sha256, body = state.pop(c)
        assert c.getinfo(pycurl.RESPONSE_CODE) == 200, key
        _store(a, key, body.getbuffer(), sha256)
        if todo:
            start(c)

    _drive(multi, state, finished)
    _flush(a)


def small_obstore(a: argparse.Namespace) -> None:
    import obstore
    from obstore.store import HTTPStore

    options: dict[str, object] = {"allow_http": True}
    if a.ca:
        options["root_certificate"] = Path(a.ca).read_text()
    store = HTTPStore.from_url(a.url, client_options=options)
    _each(a, lambda key, sha256: _store(a, key, memoryview(obstore.get(store, key).bytes()), sha256))


# --- the bench ---

def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    with tempfile.NamedTemporaryFile() as usage:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%U %S", "-o", usage.name, *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:6])} failed: {proc.stderr[-1500:]}")
        user, system = Path(usage.name).read_text().split()[-2:]
    return seconds, float(user) + float(system)


def has(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--chunk-mib", type=int, default=16)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--no-hash", dest="hash", action="store_false")
    p.add_argument("--sink", choices=("disk", "null"), default="disk",
                   help="null: the urllib3, pycurl and obstore readers write nothing (the transport alone)")
    p.add_argument("--objects", type=int, default=0, help="many small objects instead of one large one")
    p.add_argument("--object-kib", type=int, default=2)
    p.add_argument("--python", default=sys.executable, help="the interpreter the readers run in")
    p.add_argument("--reader", choices=READERS, help=argparse.SUPPRESS)
    for name in ("url", "endpoint", "out", "ca", "keys"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.chunk = a.chunk_mib << 20
    if a.reader:
        read = ({"weightship engine": small_engine, "urllib3": small_urllib3, "pycurl": small_pycurl,
                    "obstore": small_obstore} if a.keys else
                   {"weightship engine": read_engine, "urllib3": read_urllib3, "pycurl": read_pycurl,
                    "obstore": read_obstore})
        read[a.reader](a)
        return 0

    size = a.size_mib << 20 if not a.objects else a.objects * (a.object_kib << 10)
    readers = [r for r in READERS if has(a.python, _MODULE[r])]
    for r in set(READERS) - set(readers):
        print(f"{r}: not installed in {a.python}, left out", file=sys.stderr)
    s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
    rclone = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    with tempfile.TemporaryDirectory(prefix="ws-bench-transport-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        want = _make_small(base, a) if a.objects else _make_large(base, size)
        port, http_port, scheme, tls, ca = free_port(), free_port(), "http", [], None
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
               "AWS_ACCESS_KEY_ID": KEYS[0], "AWS_SECRET_ACCESS_KEY": KEYS[1], "AWS_REGION": "us-east-1"}
        if a.tls:
            pki = make_pki(base / "pki")
            scheme, tls, ca = "https", ["--cert", str(pki.cert), "--key", str(pki.key)], str(pki.ca)
            env["AWS_CA_BUNDLE"] = env["SSL_CERT_FILE"] = ca
        endpoint, web = f"{scheme}://127.0.0.1:{port}", f"{scheme}://127.0.0.1:{http_port}"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        servers = [subprocess.Popen([rclone, "serve", kind, "--addr", f"127.0.0.1:{at}", "--config", "/dev/null",
                                     *extra, *tls, str(base / "s3")], **quiet)  # type: ignore[call-overload]
                   for kind, at, extra in (("s3", port, ["--auth-key", ",".join(KEYS)]), ("http", http_port, []))]
        try:
            for server, at in zip(servers, (port, http_port), strict=True):
                wait_until(functools.partial(listening, at), 30, "rclone to listen", server)
            common = ["--endpoint", web, "--connections", str(a.connections), *(["--ca", ca] if ca else [])]
            if a.objects:
                out = base / "out"
                common += ["--url", f"{web}/{BUCKET}/{SMALL}", "--keys", str(base / "keys.txt"),
                           "--object-kib", str(a.object_kib)]
                peer = ["sh", "-c", '"$1" --endpoint-url "$2" cp "$3" "$0/" && sync -f "$0"', str(out),
                        s5cmd, endpoint, f"s3://{BUCKET}/{SMALL}/*"]
            else:
                out = base / "out" / "model.safetensors"
                common += ["--url", f"{web}/{BUCKET}/{KEY}", "--size", str(size), "--chunk-mib", str(a.chunk_mib),
                           "--sink", a.sink, *([] if a.hash else ["--no-hash"])]
                peer = ["sh", "-c", '"$1" --endpoint-url "$2" cp "$3" "$0" && sync -f "$0"', str(out),
                        s5cmd, endpoint, f"s3://{BUCKET}/{KEY}"]
            plans = {r: [a.python, __file__, "--reader", r, "--out", str(out), *common] for r in readers}
            plans["s5cmd cp + sync"] = peer
            times: dict[str, list[tuple[float, float]]] = {r: [] for r in plans}
            for i in range(a.runs + 1):  # the first round warms the caches and checks the bytes, untimed
                for name, cmd in plans.items():
                    shutil.rmtree(base / "out", ignore_errors=True)
                    (base / "out").mkdir()
                    got = run(cmd, env)
                    wrote = a.objects or a.sink == "disk" or name in ("weightship engine", "s5cmd cp + sync")
                    if i == 0 and wrote and _digest(out) != want:  # each reader's bytes, once
                        raise SystemExit(f"{name} wrote other bytes than the object's")
                    if i:
                        times[name].append(got)
        finally:
            for server in servers:
                server.terminate()
                server.wait(10)
    peer_s = statistics.median(s for s, _ in times["s5cmd cp + sync"])
    where = (f"rclone serve http (s5cmd: serve s3) over loopback ({'TLS' if a.tls else 'plain HTTP'}), "
             f"{a.connections} GETs in flight")
    if a.objects:
        print(f"\n{a.objects} objects of {a.object_kib} KiB from {where}, each read whole, sha256 checked "
              f"(s5cmd: none), written, the tree flushed; median of {a.runs}, {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f}")
        print(f"{'reader':<20} {'seconds':>8} {'ms/object':>10} {'CPU-ms/object':>14} {'vs s5cmd':>9}")
    else:
        print(f"\none {a.size_mib} MiB object from {where} of {a.chunk_mib} MiB ranges, sha256 "
              f"{'on' if a.hash else 'off'} (s5cmd: none), "
              f"{'written, flushed' if a.sink == 'disk' else 'not written (but by weightship, s5cmd)'}, "
              f"median of {a.runs}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        print(f"{'reader':<20} {'seconds':>8} {'CPU-s/GiB':>10} {'vs s5cmd':>9}")
    gib = size / (1 << 30)
    for name, runs in times.items():
        secs = statistics.median(x for x, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        if a.objects:
            print(f"{name:<20} {secs:8.2f} {1000 * secs / a.objects:10.3f} {1000 * cpu / a.objects:14.3f} "
                  f"{peer_s / secs:8.2f}x")
        else:
            print(f"{name:<20} {secs:8.2f} {cpu / gib:10.2f} {peer_s / secs:8.2f}x")
    return 0


def _make_large(base: Path, size: int) -> str:
    """The one large object; its sha256."""
    obj = base / "s3" / BUCKET / KEY
    obj.parent.mkdir(parents=True)
    digest = hashlib.sha256()
    with open(obj, "wb") as f:
        for _ in range(0, size, 64 << 20):
            block = os.urandom(min(64 << 20, size - f.tell()))
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def _make_small(base: Path, a: argparse.Namespace) -> str:
    """The small objects, nested as a repository's files are, and ``keys.txt`` (key, sha256 per
    line) for the readers; the digest of the tree (:func:`_digest`)."""
    lines = []
    for i in range(a.objects):
        key = f"d{i % 16:02d}/s{i % 5}/part-{i:05d}.json"
        data = os.urandom(a.object_kib << 10)
        obj = base / "s3" / BUCKET / SMALL / key
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(data)
        lines.append(f"{key} {hashlib.sha256(data).hexdigest()}")
    (base / "keys.txt").write_text("\n".join(lines) + "\n")
    return _digest(base / "s3" / BUCKET / SMALL)


def _digest(path: Path) -> str:
    """The sha256 of a file, or of a tree's files (names and bytes, in order)."""
    if path.is_file():
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\0".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()

if __name__ == "__main__":
    sys.exit(main())
