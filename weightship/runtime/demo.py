"""The end of ``make demo``: serve a fetched model, ask it one chat question, shut it down.

Runs ``weightship serve DIR`` as a child process on a free loopback port, waits for ``/ready``,
sends one ``POST /v1/chat/completions`` (standard library only), prints the answer, then sends
SIGTERM and checks the server drained and exited cleanly. Usage::

    python -m weightship.runtime.demo DIR ["question"]
"""

from __future__ import annotations

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


def ask(url: str, question: str, max_tokens: int = 32) -> dict:
    """One chat completion through the API."""
    body = json.dumps({"messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        reply: dict = json.loads(r.read())
    return reply


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    directory, question = Path(args[0]), (args[1] if len(args) > 1 else QUESTION)
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
        print(f"({reply['usage']['completion_tokens']} tokens from {reply['model']} — random "
              f"weights make fluent nonsense)")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    print(f"server drained and exited with code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
