"""Benchmark: a torrent fetch from one local seeder, weightship beside aria2c and libtorrent defaults.

One ``weightship seed`` (the tuned settings) serves a model of one random file plus a manifest,
over loopback, announced to Debian's opentracker. Each leecher finds it through the tracker and
downloads the same ``--v1-only`` torrent (aria2 1.36 reads v1 only):

- **weightship**: ``weightship fetch X.torrent`` — download, then sha256 of every file against the
  manifest's digests, atomic promote, manifest written (all inside the timing);
- **aria2c**: download with its own SHA-1 piece checks (no sha256 of the files);
- **libtorrent defaults**: a bare ``lt.session()`` with default settings (DHT/LSD off), given
  the seeder directly (with one connection per IP, the default, the tracker's list of earlier
  leechers on 127.0.0.1 would hide the seeder) — the baseline the tuned settings are measured
  against, on ``--defaults-size`` bytes because it is much slower;
- **swarm**: one seeder, three leechers at once (weightship x3, then aria2c x3): time until all
  three finish.

Every figure is the median of ``--repeats`` runs; ratios are aria2c's time over weightship's
(> 1.0 means weightship is faster). transmission-cli 3.00 is not in the table: it refuses peers
on 127.0.0.0/8, so it cannot join a loopback swarm. Usage::

    python bench/fetch_torrent.py                  # 1 GiB, 3 repeats
    python bench/fetch_torrent.py --size 256M --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

WEIGHTSHIP = [sys.executable, "-m", "weightship"]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test helpers start opentracker and aria2c

from tests.torrent.tools import aria2, free_port, opentracker, stop  # noqa: E402

_DEFAULTS_LEECHER = """
import sys, time, libtorrent as lt
s = lt.session({"listen_interfaces": "127.0.0.1:0", "enable_dht": False, "enable_lsd": False,
                "enable_upnp": False, "enable_natpmp": False})
atp = lt.add_torrent_params()
atp.ti = lt.torrent_info(sys.argv[1])
atp.save_path = sys.argv[2]
h = s.add_torrent(atp)
host, port = sys.argv[3].rsplit(":", 1)
h.connect_peer((host, int(port)))
while not h.status().is_seeding:
    time.sleep(0.1)
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def make_model(directory: Path, size: int) -> None:
    """A model directory: one random weights file, a config, and a manifest."""
    from weightship.manifest import create_for_directory

    directory.mkdir(parents=True)
    with open(directory / "model.safetensors", "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n
    (directory / "config.json").write_text('{"model_type": "mistral"}\n')
    create_for_directory(directory, name="bench-model").write(directory)


def run(cmd: list[str], **kwargs: object) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="payload size (e.g. 256M, 1G, 14.5G)")
    ap.add_argument("--defaults-size", default="256M", help="payload for the libtorrent-defaults run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-swarm", action="store_true", help="skip the 1-to-3 swarm rows")
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="weightship-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "bench-model"
        make_model(model, size)
        from weightship.torrent.create import create_torrent

        infohash = create_torrent(model, v1_only=True).meta.infohash
        small = tmp / "small-model"
        make_model(small, min(size, parse_size(args.defaults_size)))
        small_hash = create_torrent(small, v1_only=True).meta.infohash
        with opentracker(tmp / "tracker", [infohash, small_hash]) as url:
            torrent, small_torrent = tmp / "bench.torrent", tmp / "small.torrent"
            run([*WEIGHTSHIP, "torrent", "create", str(model), "--v1-only", "--tracker", url, "--out", str(torrent)])
            run([*WEIGHTSHIP, "torrent", "create", str(small), "--v1-only", "--tracker", url, "--out",
                 str(small_torrent)])
            seeds = [subprocess.Popen([*WEIGHTSHIP, "seed", str(d), "--torrent", str(t), "--listen",
                                       "127.0.0.1:0", "--json"], stdout=subprocess.PIPE, text=True)
                     for d, t in ((model, torrent), (small, small_torrent))]
            try:
                ready = []
                for s in seeds:
                    assert s.stdout is not None
                    ready.append(json.loads(s.stdout.readline()))
                bare = tmp / "small-no-tracker.torrent"
                run([*WEIGHTSHIP, "torrent", "create", str(small), "--v1-only", "--out", str(bare)])
                rows = measure(tmp, torrent, small_torrent, size, parse_size(args.defaults_size),
                               args.repeats, not args.no_swarm, (bare, ready[1]["listen"][0]))
            finally:
                for s in seeds:
                    stop(s)  # type: ignore[arg-type]
    print_table(rows, size, args.repeats)


def measure(tmp: Path, torrent: Path, small_torrent: Path, size: int, small_size: int, repeats: int,
            swarm: bool, bare: tuple[Path, str]) -> dict[str, tuple[float, int]]:
    """Median seconds and bytes for each row."""
    out = tmp / "out"

    def ws(t: Path = torrent, n: int = 1) -> None:
        procs = [subprocess.Popen([*WEIGHTSHIP, "fetch", str(t), "--to", str(fresh(out / f"ws{i}"))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]
        for p in procs:
            assert p.wait(600) == 0, "weightship fetch failed"

    def ar(t: Path = torrent, n: int = 1) -> None:
        procs = [aria2(t, fresh(out / f"ar{i}"), seed=False, port=free_port()) for i in range(n)]
        for p in procs:
            assert p.wait(600) == 0, "aria2c failed"

    def lt_defaults() -> None:
        run([sys.executable, "-c", _DEFAULTS_LEECHER, str(bare[0]), str(fresh(out / "lt")), bare[1]],
            timeout=600)

    cases: dict[str, tuple[Callable[[], None], int]] = {
        "weightship (tuned, + sha256)": (ws, size),
        "aria2c 1.36": (ar, size),
        "weightship, defaults payload": (lambda: ws(small_torrent), small_size),
        "libtorrent defaults": (lt_defaults, small_size),
    }
    if swarm:
        cases["swarm 1->3: weightship x3"] = (lambda: ws(n=3), 3 * size)
        cases["swarm 1->3: aria2c x3"] = (lambda: ar(n=3), 3 * size)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, (fn, _n) in cases.items():  # interleaved, so drift hits every row alike
            times[name].append(timed(fn))
            shutil.rmtree(out, ignore_errors=True)
    return {name: (statistics.median(times[name]), n) for name, (_fn, n) in cases.items()}


def print_table(rows: dict[str, tuple[float, int]], size: int, repeats: int) -> None:
    print(f"torrent fetch over loopback, one seeder (weightship seed), {size / (1 << 20):.0f} MiB, "
          f"median of {repeats}")
    print(f"{'leecher':32} {'seconds':>9} {'MB/s':>9}   ratio")
    pairs = {"aria2c 1.36": "weightship (tuned, + sha256)",
             "libtorrent defaults": "weightship, defaults payload",
             "swarm 1->3: aria2c x3": "swarm 1->3: weightship x3"}
    for name, (seconds, n) in rows.items():
        ratio = ""
        if name in pairs and pairs[name] in rows:
            ours = rows[pairs[name]][0]
            ratio = f"weightship {seconds / ours:.2f}x faster" if seconds >= ours else \
                f"weightship {ours / seconds:.2f}x slower"
        print(f"{name:32} {seconds:9.2f} {n / seconds / 1e6:9.1f}   {ratio}")


if __name__ == "__main__":
    main()
