"""Benchmark of on-prem rollouts: ``weightship deploy nodes`` beside the same steps by hand.

The nodes are the tests' lab (tests/deploy/nodes/nodelab.py: real systemd and sshd booted with
systemd-nspawn in network namespaces on a bridge). For 1, 2 and 4 nodes, each way runs on its own
freshly booted lab, in the same run:

- **weightship**: ``weightship deploy nodes`` with its defaults (preflight, every host prepared at
  once while the old release serves, then one host at a time switched and gated);
- **by hand**: what the usual guides do, one host at a time with OpenSSH's ``ssh`` and ``scp``:
  copy the wheelhouse, make a venv and pip install, ``weightship fetch`` on the node, copy a unit
  and the key file, ``systemctl daemon-reload && systemctl enable --now``, poll ``/ready`` (no
  gate, no rollback, no hardening).

Three steps are timed on each lab: the first rollout of ``weightship-tiny`` (runtime + model), an
update of the serving options (runtime and model in place), and a new 256 MiB model (a synthetic
Mistral-architecture model served by ``weightship mirror`` on the host; ``--synthetic-mib``). The
table shows seconds and by-hand ÷ weightship (> 1: weightship is faster). Needs root.

Usage::

    python bench/nodes.py [--nodes 1,2,4] [--synthetic-mib 256]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests/deploy/nodes"))

from nodelab import Lab, Node, have_lab  # noqa: E402

from tests.net import free_port, listening, wait_until  # noqa: E402
from weightship.catalog.architecture import Architecture  # noqa: E402
from weightship.catalog.tiny import tiny_files  # noqa: E402
from weightship.manifest import create_for_directory  # noqa: E402

KEY = "sk-bench-" + "5" * 40
NAME = "bench"
HAND_UNIT = """[Unit]
Description=weightship by hand
[Service]
ExecStart=/opt/hand/venv/bin/weightship serve {model} --host 0.0.0.0 --port 8000 --device cpu {args} \
--api-key-file /opt/hand/keys.txt
Restart=on-failure
[Install]
WantedBy=multi-user.target
"""


def wheelhouse(out: Path) -> Path:
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", out, ROOT], check=True)
    subprocess.run([*pip, "download", "--dest", out, "--only-binary=:all:", "--find-links", out, "-c",
                    ROOT / "constraints.txt", "torch==2.13.0", "weightship[serve]"], check=True)
    return out


def synthetic_model(hub: Path, mib: int) -> str:
    """A Mistral-architecture model of about ``mib`` MiB in the hub ``hub`` (repo bench/synth)."""
    per_layer = 2 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 3072)
    layers = max(1, (mib * 2**20 - 2 * 2 * 32000 * 1024) // per_layer)
    arch = Architecture(dim=1024, n_layers=layers, head_dim=64, hidden_dim=3072, n_heads=16, n_kv_heads=4,
                        norm_eps=1e-5, vocab_size=32000, max_seq_len=2048)
    repo = hub / "bench" / "synth"
    repo.mkdir(parents=True, exist_ok=True)
    for name, data in tiny_files(arch, seed=7, layout="hf").items():
        (repo / name).write_bytes(data)
    create_for_directory(repo, name="bench-synth").write(repo)
    return "hf://bench/synth"


@contextmanager
def mirror(hub: Path, host: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "weightship", "mirror", str(hub), "--host", host, "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(port, host), 60, "the mirror", proc)
        yield f"http://{host}:{port}"
    finally:
        proc.terminate()
        proc.wait()


def timed(work: Callable[[], None]) -> float:
    start = time.monotonic()
    work()
    return time.monotonic() - start


@dataclass
class Way:
    """One way of rolling out, on its own lab."""

    lab: Lab
    work: Path
    wheels: Path
    endpoint: str

    def inventory(self) -> Path:
        self.work.mkdir(exist_ok=True)
        return self.lab.inventory(self.work / "nodes.yaml", runtime={"wheelhouse": str(self.wheels)},
                                  extra={"fetch": {"env": {"HF_ENDPOINT": self.endpoint}}})

    def weightship(self, model: str, *args: str) -> None:
        keys = self.work / "keys.txt"
        keys.write_text(KEY + "\n")
        r = subprocess.run([sys.executable, "-m", "weightship", "--quiet", "deploy", "nodes", model, "-i",
                            str(self.inventory()), "--name", NAME, "--gpus", "0", "--api-key-file", str(keys), "--yes",
                            *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"weightship deploy nodes failed: {r.stderr}")

    def _ssh(self, node: Node) -> list[str]:
        return ["-i", str(self.lab.client_key), "-o", f"UserKnownHostsFile={self.work / 'known_hosts'}",
                "-o", "BatchMode=yes"]

    def ssh(self, node: Node, command: str) -> None:
        subprocess.run(["ssh", *self._ssh(node), f"root@{node.address}", command], check=True,
                       stdout=subprocess.DEVNULL)

    def scp(self, node: Node, local: list[Path], remote: str) -> None:
        subprocess.run(["scp", "-q", "-r", *self._ssh(node), *map(str, local), f"root@{node.address}:{remote}"],
                       check=True)

    def by_hand(self, model: str, *serve_args: str, fresh: bool) -> None:
        self.inventory()  # writes known_hosts
        directory = "/opt/hand/models/" + model.replace("/", "_").replace(":", "")
        unit = self.work / "weightship-hand.service"
        unit.write_text(HAND_UNIT.format(model=directory, args=" ".join(serve_args)))
        keys = self.work / "hand-keys.txt"
        keys.write_text(KEY + "\n")
        for node in self.lab.nodes:  # one host at a time, as a person with a terminal does
            if fresh:
                self.ssh(node, "mkdir -p /opt/hand")
                self.scp(node, [self.wheels], "/opt/hand/wheels")
                self.ssh(node, "python3 -m venv /opt/hand/venv && PIP_CONFIG_FILE=/dev/null /opt/hand/venv/bin/pip "
                               "install -q --no-index --find-links /opt/hand/wheels 'weightship[serve]'")
            self.ssh(node, f"test -d {directory}/.weightship || HF_ENDPOINT={shlex.quote(self.endpoint)} "
                           f"/opt/hand/venv/bin/weightship --quiet fetch {model} --to {directory}")
            self.scp(node, [unit], "/etc/systemd/system/weightship-hand.service")
            self.scp(node, [keys], "/opt/hand/keys.txt")
            self.ssh(node, "systemctl daemon-reload && systemctl enable --quiet weightship-hand && "
                           "systemctl restart weightship-hand")
            wait_until(lambda n=node: _ready(n), 600, f"{node.name} ready")


def _ready(node: Node) -> bool:
    try:
        with urllib.request.urlopen(f"http://{node.address}:8000/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def one_size(n: int, base: Path, wheels: Path, hub: Path, synth: str, mib: int) -> list[tuple[int, str, float, float]]:
    """Both ways on ``n`` nodes each: (nodes, step, weightship s, by hand s) per step."""
    rows = []
    with Lab(n, base / f"w{n}") as wl, Lab(n, base / f"h{n}") as hl, mirror(hub, wl.gateway) as w_end, \
            mirror(hub, hl.gateway) as h_end:
        ws, hand = Way(wl, base / f"w{n}", wheels, w_end), Way(hl, base / f"h{n}", wheels, h_end)
        steps: list[tuple[str, Callable[[], None], Callable[[], None]]] = [
            ("first rollout, tiny (runtime + model)",
             lambda: ws.weightship("weightship-tiny"), lambda: hand.by_hand("weightship-tiny", fresh=True)),
            ("update serving options",
             lambda: ws.weightship("weightship-tiny", "--serve-arg=--max-batch=4"),
             lambda: hand.by_hand("weightship-tiny", "--max-batch", "4", fresh=False)),
            (f"new model, {mib} MiB from the mirror",
             lambda: ws.weightship(synth), lambda: hand.by_hand(synth, fresh=False)),
        ]
        for what, with_weightship, by_hand in steps:
            w_s, h_s = timed(with_weightship), timed(by_hand)
            rows.append((n, what, w_s, h_s))
            print(f"{n} node(s), {what}: weightship {w_s:.1f} s, by hand {h_s:.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="1,2,4", help="lab sizes, comma-separated")
    parser.add_argument("--synthetic-mib", type=int, default=256)
    args = parser.parse_args()
    if reason := have_lab():
        raise SystemExit(f"bench/nodes.py needs the node lab: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as tmp:
        base = Path(tmp)
        wheels = wheelhouse(base / "wheels")
        hub = base / "hub"
        synth = synthetic_model(hub, args.synthetic_mib)
        rows = [row for n in (int(x) for x in args.nodes.split(","))
                for row in one_size(n, base, wheels, hub, synth, args.synthetic_mib)]
    print()
    print("| nodes | step | weightship (s) | by hand (s) | by hand ÷ weightship |")
    print("|---|---|---|---|---|")
    for n, what, w_s, h_s in rows:
        print(f"| {n} | {what} | {w_s:.1f} | {h_s:.1f} | {h_s / w_s:.2f}× |")


if __name__ == "__main__":
    main()
