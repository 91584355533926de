"""Fixtures of the swarm tests: a small two-file model, origins of every kind in a fleet's
namespace (tests/fleet.py), and swarm fetches run as real processes on the nodes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fleet import Fleet, Host, have_fleet
from tests.net import listening, wait_until
from weightship.manifest import Manifest, create_for_directory

CHUNK_MIB = 1
PORT = 6881
ORIGIN_PORT = 8080


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two files (5 MiB + 3 MiB + 12,345 bytes, random) and a manifest: 9 chunks of 1 MiB."""
    d = tmp_path_factory.mktemp("swarm-model") / "m"
    d.mkdir()
    rng = __import__("random").Random(15)
    for name, size in (("model-00001-of-00002.safetensors", 5 << 20),
                       ("model-00002-of-00002.safetensors", (3 << 20) + 12345)):
        (d / name).write_bytes(rng.randbytes(size))
    create_for_directory(d, name="swarm-model").write(d)
    return d


def model_bytes(model: Path) -> int:
    return Manifest.load(model).total_bytes


@dataclass
class Origin:
    """An origin server in the fleet's origin namespace: the reference nodes fetch, and their
    environment."""

    kind: str
    ref: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[str]


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.skip(f"{name} is not installed")
    return found


def start_origin(kind: str, fleet: Fleet, model: Path, store: Path) -> Origin:
    """``weightship mirror`` (hub), ``rclone serve s3`` (s3) or ``rclone serve http`` over TLS
    (https), holding ``model``, on the origin's address."""
    host = fleet.origin
    assert host is not None
    addr = f"{host.address}:{ORIGIN_PORT}"
    if kind == "hub":
        shutil.copytree(model, store / "swarm" / "m")
        proc = host.popen([sys.executable, "-m", "weightship", "mirror", store, "--host", "0.0.0.0",
                           "--port", str(ORIGIN_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        origin = Origin(kind, ["hf://swarm/m"], {"HF_ENDPOINT": f"http://{addr}"}, proc)
    elif kind == "s3":
        shutil.copytree(model, store / "models" / "m")
        proc = host.popen([_tool("rclone"), "serve", "s3", "--addr", addr, "--auth-key", "wsKEY,wsSECRET",
                           "--config", "/dev/null", store], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        origin = Origin(kind, ["s3://models/m", "--manifest", str(model / ".weightship/manifest.json")], {
            "AWS_ENDPOINT_URL": f"http://{addr}", "AWS_ACCESS_KEY_ID": "wsKEY",
            "AWS_SECRET_ACCESS_KEY": "wsSECRET", "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}, proc)
    else:
        import trustme

        ca = trustme.CA()
        issued = ca.issue_cert(host.address)
        ca.cert_pem.write_to_path(str(store.parent / "ca.pem"))
        issued.private_key_pem.write_to_path(str(store.parent / "key.pem"))
        for i, blob in enumerate(issued.cert_chain_pems):
            blob.write_to_path(str(store.parent / "cert.pem"), append=i > 0)
        shutil.copytree(model, store / "m")
        proc = host.popen([_tool("rclone"), "serve", "http", "--addr", addr, "--config", "/dev/null",
                           "--cert", store.parent / "cert.pem", "--key", store.parent / "key.pem", store],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        origin = Origin(kind, [f"https://{addr}/m/"], {"SSL_CERT_FILE": str(store.parent / "ca.pem")}, proc)
    wait_until(lambda: listening(ORIGIN_PORT, host.address), 30, f"the {kind} origin to listen", proc)  # type: ignore[arg-type]
    return origin


@dataclass
class Fetch:
    """One ``weightship fetch`` running on a node."""

    host: Host
    dest: Path
    proc: subprocess.Popen[str]
    stderr: list[str] = field(default_factory=list)

    def result(self, timeout: float = 120) -> dict[str, object]:
        """The fetch's --json result (it must succeed)."""
        out, _ = self.proc.communicate(timeout=timeout)
        tail = "".join(self.stderr)[-3000:]
        assert self.proc.returncode == 0, f"{self.host.name}: exit {self.proc.returncode}: {tail}"
        return dict(json.loads(out))


def start_fetch(host: Host, origin: Origin, dest: Path, peers: Sequence[Host], *, home: Path,
                listen: bool = True, extra: Sequence[str] = (), ref: Sequence[str] | None = None) -> Fetch:
    """``weightship --json fetch`` of ``origin``'s model on ``host``, with ``peers``."""
    args: list[str | Path] = [sys.executable, "-m", "weightship", "--json", "fetch", *(ref or origin.ref), "--to", dest,
            "--chunk-mib", str(CHUNK_MIB), *extra]
    if listen:
        args += ["--listen", f"{host.address}:{PORT}"]
    args += [a for p in peers if p is not host for a in ("--peer", f"{p.address}:{PORT}")]
    env = {**os.environ, "WEIGHTSHIP_HOME": str(home), **origin.env}
    env.pop("WEIGHTSHIP_DEBUG", None)
    proc = host.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    fetch = Fetch(host, dest, proc)

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            fetch.stderr.append(line)
            del fetch.stderr[:-200]

    threading.Thread(target=drain, daemon=True).start()
    return fetch


@pytest.fixture
def make_fleet() -> Iterator[object]:
    """A factory of fleets (``make_fleet(n, rate_mbit=None)``), torn down after the test."""
    why = have_fleet()
    if why:
        pytest.skip(why)
    made: list[Fleet] = []

    def make(count: int, rate_mbit: float | None = None) -> Fleet:
        fleet = Fleet(count, rate_mbit).start()
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.stop()
