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
``--many`` prints the "many files" table of issue 22 instead: for each row (``--rows``, default
256 x 1 MiB and 2,000 x 2 KiB, in nested folders), weightship's Hub fetch beside
``snapshot_download`` from the same ``weightship mirror``, and its S3 fetch beside
``s5cmd cp 's3://…/*'`` from the same rclone, interleaved, median of ``--runs``.

Usage::

    python bench/fetch.py [--size-mib 1024] [--files 2] [--runs 3]
    python bench/fetch.py --many [--rows 256x1024KiB,2000x2KiB] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' loopback helpers

from tests.net import free_port, listening, wait_until
from weightship.fetch import build_request, fetch
from weightship.fetch.download import TransferOptions, download
from weightship.fetch.s3 import S3Remote, make_s3_client, make_s3_pool, push_directory
from weightship.manifest import Manifest, create_for_directory
from weightship.signing import generate_key

KEYS = {"AWS_ACCESS_KEY_ID": "benchKEY", "AWS_SECRET_ACCESS_KEY": "benchSECRET",
        "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


def _bin(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise SystemExit(f"{name} is not installed (pip install {name}-bin / {name})")
    return found


@contextmanager
def _server(args: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    """``root/bench/NAME``: ``count`` random files of ``size`` bytes in nested folders."""
    model = root / "bench" / name
    for i in range(count):
        f = model / f"d{i % 16:02d}" / f"s{i % 5}" / f"part-{i:05d}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(os.urandom(size))
    create_for_directory(model, name=name).write(model)
    return model


def many_files(rows: list[tuple[int, int]], runs: int) -> int:
    """The many-files table: see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="ws-bench-many-") as tmp:
        base = Path(tmp)
        (base / "s3" / "models").mkdir(parents=True)
        key = base / "bench.pem"
        public = generate_key(key)
        s3_port, hub_port = free_port(), free_port()
        os.environ.update(KEYS, AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}",
                          HF_ENDPOINT=f"http://127.0.0.1:{hub_port}", HF_HUB_DISABLE_PROGRESS_BARS="1")
        from huggingface_hub import snapshot_download  # after HF_ENDPOINT and the bars' switch

        names = [f"r{count}x{size >> 10}k" for count, size in rows]
        models = [make_many(base / "hub", n, c, s) for n, (c, s) in zip(names, rows, strict=True)]
        rclone = [_bin("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{s3_port}", "--config", "/dev/null",
                  "--auth-key", f"{KEYS['AWS_ACCESS_KEY_ID']},{KEYS['AWS_SECRET_ACCESS_KEY']}", str(base / "s3")]
        mirror = [sys.executable, "-m", "weightship", "mirror", str(base / "hub"), "--port", str(hub_port)]
        s5cmd = _bin("s5cmd")
        trust = {"trust_keys": [str(public)]}
        table: list[tuple[str, dict[str, float]]] = []
        with _server(rclone, s3_port), _server(mirror, hub_port):
            for name, model in zip(names, models, strict=True):
                push_directory(model, f"s3://models/{name}", key=key)
            for name in names:
                plan: list[tuple[str, Callable[[Path], object]]] = [
                    ("weightship hf", lambda d, n=name: fetch(build_request(f"hf://bench/{n}"), d)),
                    ("snapshot_download", lambda d, n=name: snapshot_download(
                        f"bench/{n}", local_dir=d, endpoint=os.environ["HF_ENDPOINT"])),
                    ("weightship s3", lambda d, n=name: fetch(build_request(f"s3://models/{n}", options=trust), d)),
                    ("s5cmd cp", lambda d, n=name: subprocess.run(
                        [s5cmd, "--endpoint-url", f"http://127.0.0.1:{s3_port}", "cp", f"s3://models/{n}/*",
                         f"{d}/"], check=True, stdout=subprocess.DEVNULL)),
                ]
                for _, fn in plan:
                    timed(fn, base / "warmup")
                times: dict[str, list[float]] = {label: [] for label, _ in plan}
                for i in range(runs):  # interleaved: a slow spell falls on every tool alike
                    for label, fn in plan:
                        times[label].append(timed(fn, base / f"run{i}"))
                table.append((name, {label: statistics.median(t) for label, t in times.items()}))
                print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in table[-1][1].items()),
                      file=sys.stderr, flush=True)
    print(f"\nmany files over loopback, median of {runs} runs (interleaved), {os.cpu_count()} cores; "
          "seconds, and weightship's speed / the peer's (>1 = faster)")
    print(f"{'row':<14} {'ws hf':>7} {'snapshot':>9} {'ratio':>6} {'target':>7}   "
          f"{'ws s3':>7} {'s5cmd':>7} {'ratio':>6} {'target':>7}")
    for name, t in table:
        print(f"{name:<14} {t['weightship hf']:>7.2f} {t['snapshot_download']:>9.2f} "
              f"{t['snapshot_download'] / t['weightship hf']:>5.2f}x {'≥ 1.0x':>7}   "
              f"{t['weightship s3']:>7.2f} {t['s5cmd cp']:>7.2f} "
              f"{t['s5cmd cp'] / t['weightship s3']:>5.2f}x {'≥ 0.8x':>7}")
    return 0


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
    p.add_argument("--rows", default="256x1024KiB,2000x2KiB", help="with --many: COUNTxSIZEKiB,...")
    a = p.parse_args(argv)
    if a.many:
        return many_files([_row(r) for r in a.rows.split(",")], a.runs)
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
    client = make_s3_client()

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

        def run(dest: Path) -> None:
            dest.mkdir(parents=True)
            with ThreadPoolExecutor(opts.parallel_files) as files:  # as the engine runs them
                list(files.map(lambda f: download(S3Remote(client, pool, "models", f"bench/{f.path}"),
                                                  dest / f.path, expected_size=f.size, sha256=f.sha256,
                                                  opts=opts), m.files))
        return run

    plan: list[tuple[str, Callable[[Path], object]]] = [
        ("s5cmd cp (no hash)", s5),
        ("s5cmd cp, then fsync (no hash)", s5_durable),
        ("boto3 download_file (no hash)", boto),
        ("weightship s3 fetch + sha256", lambda d: fetch(build_request(
            "s3://models/bench", options={"trust_keys": [str(trust_key)]}), d)),
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
    peers = {
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
