"""Start-up time of the command line: ``weightship --version`` and ``--help``, and one command's
``--help`` (it imports that command's module only), beside ``hf --version`` (huggingface_hub)
and ``s5cmd version``, in interleaved rounds on the same machine.

Every row is the median of ``--runs`` rounds of wall-clock seconds from ``exec`` to exit, and
the CPU seconds (user + system) of the child. Usage::

    python bench/startup.py [--runs 21]
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _which(name: str) -> str | None:
    return shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)


def commands() -> dict[str, list[str]]:
    weightship = _which("weightship")
    rows: dict[str, list[str]] = {}
    if weightship:
        rows |= {"weightship --version": [weightship, "--version"],
                 "weightship --help": [weightship, "--help"],
                 "weightship fetch --help": [weightship, "fetch", "--help"]}
    if hf := _which("hf"):
        rows["hf --version"] = [hf, "--version"]
    if s5cmd := _which("s5cmd"):
        rows["s5cmd version"] = [s5cmd, "version"]
    rows["python -c pass (the interpreter alone)"] = [sys.executable, "-c", "pass"]
    return rows


def once(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``argv``."""
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    rows = commands()
    # weightship's modules compiled, as pip compiles an installed wheel's: a source tree run with
    # PYTHONDONTWRITEBYTECODE set (as on this machine) compiles them anew in every process
    spec = importlib.util.find_spec("weightship")
    assert spec is not None and spec.submodule_search_locations
    compileall.compile_dir(spec.submodule_search_locations[0], quiet=1)
    for argv in rows.values():  # a first run fills the page cache
        once(argv)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(args.runs):
        for name, argv in rows.items():
            results[name].append(once(argv))
    print(f"start-up, median of {args.runs} interleaved rounds, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'command':<42} {'wall s':>8} {'CPU s':>8}")
    for name, runs in results.items():
        print(f"{name:<42} {statistics.median(w for w, _ in runs):>8.3f} {statistics.median(c for _, c in runs):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
