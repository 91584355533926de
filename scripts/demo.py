"""The demo behind ``make demo``: fetch and verify the tiny model, serve it, ask it one question.

Every step is the real CLI, as a user would run it: ``weightship fetch``, ``weightship verify``,
``weightship serve`` on a free loopback port, one chat request through the OpenAI-compatible API
(with the official ``openai`` client), then SIGTERM and a clean drain.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

WEIGHTSHIP = [sys.executable, "-m", "weightship"]


def step(title: str, *args: str) -> None:
    print(f"\n$ weightship {' '.join(args)}", flush=True)
    code = subprocess.call([*WEIGHTSHIP, *args])
    if code != 0:
        sys.exit(f"demo: {title} failed (exit {code})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("demo-model"))
    args = parser.parse_args()

    step("fetch", "fetch", "weightship-tiny", "--to", str(args.dir))
    step("verify", "verify", str(args.dir), "--deep")

    port = free_port()
    print(f"\n$ weightship serve {args.dir} --port {port}", flush=True)
    server = subprocess.Popen([*WEIGHTSHIP, "serve", str(args.dir), "--host", "127.0.0.1",
                               "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                sys.exit(f"demo: the server exited early (exit {server.returncode})")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit("demo: the server did not become ready in 180 s")
            time.sleep(0.5)

        from openai import OpenAI

        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        question = "What is the capital of France?"
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": question}],
            max_tokens=24, temperature=0)
        print(f"\nuser:      {question}")
        print(f"assistant: {reply.choices[0].message.content!r}")
        print("(weightship-tiny has random weights: fluent nonsense is the expected answer)")
        if reply.usage is not None:
            print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} "
                  "completion tokens")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            sys.exit("demo: the server did not drain within 60 s of SIGTERM")
    if code != 0:
        sys.exit(f"demo: the server exited with {code} after SIGTERM")
    print("\nserver drained and stopped cleanly")


if __name__ == "__main__":
    main()
