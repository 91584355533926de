"""Benchmark: ``weightship verify`` beside ``sha256sum`` run one file after another.

Both read the same files from the page cache (each file is read once before timing), in the
same run; the table shows medians of ``--runs`` runs and the ratio (higher = weightship faster).
Target (DESIGN.md): >= 1.8x on 2 cores. ``--size-mib`` and ``--files`` scale the data.

    python bench/verify.py [--files 4] [--size-mib 256] [--runs 3]
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
from pathlib import Path

import numpy as np


def _time(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files")
    args = parser.parse_args()
    if shutil.which("sha256sum") is None:
        sys.exit("sha256sum not found")

    root = Path(tempfile.mkdtemp(prefix="ws-bench-verify-", dir=args.dir))
    try:
        rng = np.random.default_rng(0)
        files = []
        for i in range(args.files):
            path = root / f"model-{i:05d}.safetensors"
            with open(path, "wb") as f:
                for _ in range(args.size_mib // 16):
                    f.write(rng.bytes(16 << 20))
            files.append(path)
        weightship = [sys.executable, "-m", "weightship"]
        subprocess.run([*weightship, "manifest", "create", str(root), "--name", "bench"], check=True,
                       stdout=subprocess.DEVNULL)  # also warms the page cache
        total = args.files * args.size_mib * (1 << 20)
        rows = {
            "sha256sum, one file after another": [*(["sha256sum", *map(str, files)])],
            "weightship verify": [*weightship, "verify", str(root)],
            "weightship verify (1 worker)": [*weightship, "verify", str(root)],
        }
        results: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.runs):
            for name, cmd in rows.items():
                env = {"WEIGHTSHIP_HASH_WORKERS": "1"} if "1 worker" in name else None
                results[name].append(_time(cmd, env))
        base = statistics.median(results["sha256sum, one file after another"])
        print(f"\nverify: {args.files} files x {args.size_mib} MiB, {os.cpu_count()} cores, "
              f"median of {args.runs} runs (page cache warm)\n")
        print(f"| {'tool':<36} | {'seconds':>8} | {'GB/s':>6} | {'vs sha256sum':>12} |")
        print(f"|{'-' * 38}|{'-' * 10}|{'-' * 8}|{'-' * 14}|")
        for name, times in results.items():
            t = statistics.median(times)
            print(f"| {name:<36} | {t:8.2f} | {total / t / 1e9:6.2f} | {base / t:11.2f}x |")
        print("\ntarget: weightship verify >= 1.8x sha256sum")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
