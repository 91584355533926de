"""A lab of on-prem "nodes" for the tests and benchmarks of ``weightship deploy nodes``.

Each node is a real Debian system booted by real systemd (``systemd-nspawn -b``) with real
OpenSSH: its own network namespace on a bridge with its own address, its own root file system (an
overlay over one shared read-only image, so no node sees another's files) and its own host keys.
The image is made once with ``mmdebstrap`` and cached. Needs root, systemd-container, mmdebstrap
and openssh (``.ci/run`` installs them).

The tests reach the nodes only over SSH, as the deployer does; :meth:`Node.sh` (``nsenter`` into
the node) is for a test's own checks and faults: reading a file, corrupting one, taking a link down.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUITE = "bookworm"
PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv",
            "iproute2", "procps", "util-linux"]
IMAGE_CACHE = Path(os.environ.get("WEIGHTSHIP_TEST_CACHE", "/var/cache/weightship-tests"))
BOOT_TIMEOUT = 60.0
_LABS = itertools.count()


def have_lab() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "mmdebstrap", "ssh-keygen", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def _run(*cmd: str | Path, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)


def image() -> Path:
    """The node image: a minimal Debian with systemd, sshd and Python, no host keys (made once)."""
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)} v1".encode()).hexdigest()[:12]
    root = IMAGE_CACHE / f"node-{SUITE}-{key}"
    if (root / ".complete").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _run("mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "--mode=root",
         "--quiet", SUITE, tmp)
    for key_file in (tmp / "etc/ssh").glob("ssh_host_*"):
        key_file.unlink()  # each node makes its own
    (tmp / "etc/ssh/sshd_config.d/lab.conf").write_text("UseDNS no\nPermitRootLogin prohibit-password\n")
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                 "dpkg-db-backup.timer", "console-getty.service"):
        (tmp / "etc/systemd/system" / unit).unlink(missing_ok=True)
        (tmp / "etc/systemd/system" / unit).symlink_to("/dev/null")  # masked: quieter boots
    (tmp / ".complete").touch()
    with contextlib.suppress(OSError):
        tmp.rename(root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


@dataclass
class Node:
    """One booted node: ``name`` is its inventory name, ``address`` its IPv4 address."""

    name: str
    address: str
    netns: str
    veth: str
    base: Path  # overlay: lower is the image, upper/work/root live here
    proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> Path:
        return self.base / "root"

    def leader(self) -> int:
        """PID (on the host) of the node's systemd."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert children, f"{self.name}: systemd-nspawn has no child yet"
        return int(children[0])

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> str:
        """Run ``script`` inside the node (all its namespaces), as root; returns stdout."""
        r = _run("nsenter", "-t", str(self.leader()), "-a", "sh", "-c", script, check=False,
                 timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{self.name}: {script!r} exited {r.returncode}: {r.stderr}")
        return r.stdout

    def host_key_fingerprint(self) -> str:
        """SHA256 fingerprint of the node's ed25519 host key, as ssh-keygen prints it."""
        out = _run("ssh-keygen", "-l", "-E", "sha256", "-f",
                   self.root / "etc/ssh/ssh_host_ed25519_key.pub").stdout
        return out.split()[1]

    def new_host_keys(self) -> None:
        """Replace the node's host keys (as a reinstalled or impersonated server would) and
        restart its sshd."""
        self.sh("rm -f /etc/ssh/ssh_host_* && ssh-keygen -A >/dev/null && systemctl restart ssh")

    def link(self, up: bool) -> None:
        """Cut (or restore) the node's only network link, as a pulled cable would."""
        _run("ip", "link", "set", self.veth, "up" if up else "down")

    def ssh_up(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((self.address, 22)) == 0


@dataclass
class Lab:
    """``count`` nodes on a bridge; the host is ``gateway`` on the same subnet."""

    count: int
    workdir: Path
    nodes: list[Node] = field(default_factory=list)
    tag: str = ""
    gateway: str = ""
    bridge: str = ""
    client_key: Path = Path()

    def __post_init__(self) -> None:
        n = (os.getpid() % 10_000) * 10 + next(_LABS) % 10  # unique among labs running at once
        self.tag = f"{n:05d}"
        self.subnet = f"10.{200 + n % 50}.{(n // 50) % 250}"
        self.gateway = f"{self.subnet}.1"
        self.bridge = f"wsb{self.tag}"

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> Lab:
        lower = image()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_key = self.workdir / "id_ed25519"
        if not self.client_key.exists():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "weightship-lab", "-f", self.client_key)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i in range(self.count):
            self.nodes.append(self._boot(i, lower))
        deadline = time.monotonic() + BOOT_TIMEOUT
        for node in self.nodes:
            while not node.ssh_up():
                assert node.proc is not None and node.proc.poll() is None, f"{node.name} exited while booting"
                assert time.monotonic() < deadline, f"{node.name}: sshd did not come up"
                time.sleep(0.2)
        return self

    def _boot(self, i: int, lower: Path) -> Node:
        name = f"node{i + 1}"
        node = Node(name=name, address=f"{self.subnet}.{11 + i}", netns=f"wsn{self.tag}{i}",
                    veth=f"wsv{self.tag}{i}", base=self.workdir / name)
        for d in ("upper", "work", "root"):
            (node.base / d).mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={node.base / 'upper'},workdir={node.base / 'work'}", node.root)
        _run("ssh-keygen", "-A", "-f", node.root)  # this node's own host keys
        ssh_dir = node.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        (node.root / "etc/hostname").write_text(name + "\n")
        _run("ip", "netns", "add", node.netns)
        _run("ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        _run("ip", "link", "set", node.veth, "master", self.bridge, "up")
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{node.address}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"], ["ip", "route", "add", "default", "via", self.gateway]):
            _run("ip", "netns", "exec", node.netns, *cmd)
        log = (node.base / "console.log").open("wb")
        node.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", str(node.root), "-b", "--register=no", "--keep-unit",
             "--console=read-only", f"--machine=ws{self.tag}{name}",
             f"--network-namespace-path=/run/netns/{node.netns}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)  # nspawn halts the container's systemd
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
            _run("umount", "-l", node.root, check=False)
            _run("ip", "link", "del", node.veth, check=False)
            _run("ip", "netns", "del", node.netns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        for node in self.nodes:
            shutil.rmtree(node.base, ignore_errors=True)

    def __enter__(self) -> Lab:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- what the deployer is given -----------------------------------------------------------

    def inventory(self, path: Path, *, runtime: dict[str, Any], trust: bool = True,
                  extra: dict[str, Any] | None = None) -> Path:
        """Write ``nodes.yaml`` for every node (group ``all-nodes``) and, when ``trust``, a
        ``known_hosts`` beside it that pins each node's real key."""
        hosts = {n.name: {"address": n.address, "user": "root", "identity": str(self.client_key), "gpus": 0}
                 for n in self.nodes}
        doc = {"known_hosts": "known_hosts", "runtime": runtime, "hosts": hosts,
               "groups": {"all-nodes": [n.name for n in self.nodes]}, **(extra or {})}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        known = path.parent / "known_hosts"
        if trust:
            lines = [f"{n.address} " + " ".join((n.root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])
                     for n in self.nodes]
            known.write_text("\n".join(lines) + "\n")
        else:
            known.unlink(missing_ok=True)
        return path


@contextlib.contextmanager
def lab(count: int, workdir: Path) -> Iterator[Lab]:
    """``count`` booted nodes, torn down afterwards."""
    with Lab(count, workdir) as running:
        yield running
