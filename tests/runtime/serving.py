"""``weightship serve`` as a real process on loopback, for the tests that stop, kill and restart
it (keys, usage); and the time a kept-alive connection takes per request."""

from __future__ import annotations

import http.client
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.net import wait_until


def start(model_dir: Path, port: int, *args: str | Path) -> subprocess.Popen[str]:
    """Start ``weightship serve`` on ``port`` and wait until it is ready."""
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTSHIP_DEBUG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightship", "serve", str(model_dir), "--port", str(port),
         "--device", "cpu", "--max-model-len", "1024", "--max-batch", "8", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 120, "serve to turn ready", proc)  # type: ignore[arg-type]
    except AssertionError:
        proc.kill()
        raise AssertionError(f"serve did not start: {proc.communicate(timeout=30)[0]}") from None
    return proc


@contextmanager
def serving(model_dir: Path, port: int, *args: str | Path) -> Iterator[subprocess.Popen[str]]:
    """:func:`start`, killed on exit if still running."""
    proc = start(model_dir, port, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def keep_alive_quartile(port: int, requests: int = 20) -> float:
    """The lower quartile of the seconds the 2nd..``requests``-th of ``requests`` small requests
    (GETs and a refused POST, by turns) take on one kept-alive connection. A server that leaves
    Nagle's algorithm on sends the body of each answer only once the client has acknowledged its
    headers, which the client's delayed ACK holds back for 40 ms (the first answer escapes it: a
    connection starts in quick-ACK mode): then nearly every answer takes 40 ms or more. A loaded
    machine slows some answers, not three quarters of them."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    try:
        for i in range(requests):
            start = time.perf_counter()
            if i % 2:
                conn.request("POST", "/v1/completions", body=b'{"prompt": ""}',
                             headers={"Content-Type": "application/json"})
            else:
                conn.request("GET", "/v1/models")
            response = conn.getresponse()
            response.read()
            assert response.status == (400 if i % 2 else 200)
            times.append(time.perf_counter() - start)
    finally:
        conn.close()
    return statistics.quantiles(times[1:], n=4)[0]
