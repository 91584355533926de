"""The inventory, the release identity and the systemd unit, checked without any node."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from weightship.deploy.nodes.inventory import load
from weightship.deploy.nodes.layout import Paths, Release, check_serve_args, render_unit
from weightship.deploy.nodes.rollout import parse_max_unavailable
from weightship.errors import InventoryError, UsageError

EXAMPLE = """\
known_hosts: known_hosts
runtime: {venv: /opt/weightship/venv}
defaults: {identity: ~/.ssh/id_ed25519}
hosts:
  gpu1: {address: 10.1.0.11, port: 22, user: root, gpus: 1, labels: {rack: a}}
  gpu2: {address: 10.1.0.12, gpus: 2, jump: bastion}
  bastion: {address: 203.0.113.7, port: 2222, user: ops, sudo: true,
            host_keys: ["SHA256:QTpuBJmKEbZ59paJkrPaFnxXZQic5q06ODL44fv4LCY"]}
groups:
  acme: [gpu1, gpu2]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nodes.yaml"
    path.write_text(text)
    return path


def test_the_example_inventory(tmp_path: Path) -> None:
    inv = load(write(tmp_path, EXAMPLE))
    assert [h.name for h in inv.select(group="acme")] == ["gpu1", "gpu2"]
    gpu2, bastion = inv.hosts["gpu2"], inv.hosts["bastion"]
    assert (gpu2.gpus, gpu2.jump, gpu2.user, gpu2.port) == (2, "bastion", "root", 22)
    assert bastion.target == "[203.0.113.7]:2222" and bastion.sudo
    assert gpu2.identity == Path("~/.ssh/id_ed25519").expanduser()
    assert inv.known_hosts == tmp_path / "known_hosts"
    assert inv.runtime.venv == "/opt/weightship/venv" and inv.prefix == "/opt/weightship"
    assert [h.name for h in inv.select(hosts=["bastion"])] == ["bastion"]


@pytest.mark.parametrize(("change", "line", "words"), [
    (("gpus: 2, jump", "gpus: two, jump"), 6, "not of type 'integer'"),
    (("port: 22, user", "port: 70000, user"), 5, "70000"),
    (("acme: [gpu1, gpu2]", "acme: [gpu1, gpu9]"), 10, "gpu9"),
    (("jump: bastion", "jump: nowhere"), 6, "nowhere"),
    (("user: ops, sudo: true,", "user: ops,"), 7, "sudo"),
    (("gpu1: {address", "GPU_1: {address"), 5, "GPU_1"),
    (("runtime: {venv: /opt/weightship/venv}", "runtime: {pip: yes}"), 2, "runtime"),
    (("  gpu2: {address", "\tgpu2: {address"), 6, "YAML"),
    (("  bastion: {address", "  gpu1: {address"), 7, "given twice"),
    (("port: 2222, user: ops,", "port: 2222, user: ops, jump: gpu2,"), 6, "circle"),
    (("known_hosts: known_hosts", "prefix: /opt/../etc\nknown_hosts: known_hosts"), 1, "'..'"),
    (("known_hosts: known_hosts", "prefix: /home/ops/weightship\nknown_hosts: known_hosts"), 1, "/home"),
])
def test_a_bad_inventory_names_its_line(tmp_path: Path, change: tuple[str, str], line: int, words: str) -> None:
    assert change[0] in EXAMPLE
    with pytest.raises(InventoryError) as e:
        load(write(tmp_path, EXAMPLE.replace(*change)))
    assert f"nodes.yaml:{line}:" in str(e.value), str(e.value)
    assert words in str(e.value)


def test_selecting_unknown_hosts_or_groups(tmp_path: Path) -> None:
    inv = load(write(tmp_path, EXAMPLE))
    for kwargs in ({"group": "nope"}, {"hosts": ["gpu1", "gpu7"]}, {"group": "acme", "hosts": ["gpu1"]}):
        with pytest.raises(UsageError):
            inv.select(**kwargs)  # type: ignore[arg-type]


RELEASE = Release(name="mistral", model_ref="mistral-7b-v0.1", model_key="mistral-7b-v0-1-default-0123456789",
                  layout=None, runtime="/opt/weightship/runtimes/abc", runtime_version="0.1.0", port=8000,
                  gpus=(0,), serve_args=("--max-batch", "16"), unit_sha256="1" * 64)


def test_a_release_is_named_by_everything_that_defines_it() -> None:
    assert RELEASE.rev == replace(RELEASE).rev and len(RELEASE.rev) == 12
    changed = [replace(RELEASE, port=8001), replace(RELEASE, gpus=(0, 1)), replace(RELEASE, key_mode="instance"),
               replace(RELEASE, serve_args=()), replace(RELEASE, runtime_version="0.1.1"),
               replace(RELEASE, model_key="other")]
    assert len({r.rev for r in changed} | {RELEASE.rev}) == len(changed) + 1
    assert "--device cpu" in replace(RELEASE, gpus=()).serve_env()
    assert "--device" not in RELEASE.serve_env() and "--max-batch 16" in RELEASE.serve_env()
    # A field at its default does not enter the digest: a release written before a field was
    # added keeps its name (this one was named before key_mode existed).
    before = {k: v for k, v in asdict(RELEASE).items() if k != "key_mode"}
    assert RELEASE.rev == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]


@pytest.mark.parametrize("gpus", [(), (0, 1)])
def test_the_unit_is_hardened_and_passes_systemd_analyze_verify(tmp_path: Path, gpus: tuple[int, ...]) -> None:
    paths = Paths(str(tmp_path / "opt"), "mistral")
    unit = render_unit(paths, gpus=gpus)
    settings = [line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")]
    got = dict(settings)
    for key, want in [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                      ("NoNewPrivileges", "yes"), ("Restart", "on-failure"), ("KillSignal", "SIGTERM"),
                      ("User", "weightship-mistral"), ("DevicePolicy", "closed")]:
        assert got[key] == want, key
    assert int(got["TimeoutStopSec"]) >= 60
    assert got["LoadCredential"] == f"api-keys:{paths.app}/api-keys"  # not in a release: no rollback revives a key
    assert "--api-key-file ${CREDENTIALS_DIRECTORY}/api-keys" in got["ExecStart"]
    assert got["CacheDirectory"] == "weightship/mistral" and "TORCHINDUCTOR_CACHE_DIR=" in unit
    assert got["ExecStart"].endswith("--compile-cache /var/cache/weightship/mistral/compile")
    devices = [v for k, v in settings if k == "DeviceAllow"]
    nvidia = ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
              "/dev/nvidia-modeset"]
    assert devices == ([] if not gpus else [f"{d} rw" for d in nvidia])
    assert got["Environment"].startswith("CUDA_VISIBLE_DEVICES=")  # the last Environment= line
    assert f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))}" in unit

    runtime = Path(paths.current) / "runtime/bin"
    runtime.mkdir(parents=True)
    shutil.copy("/bin/true", runtime / "weightship")
    (tmp_path / paths.unit).write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / paths.unit)], capture_output=True, text=True)
    assert r.returncode == 0 and "weightship" not in r.stderr, r.stderr


@pytest.mark.parametrize(("value", "hosts", "want"), [("1", 4, 1), ("2", 4, 2), ("50%", 4, 2), ("10%", 4, 1),
                                                      ("100%", 3, 3)])
def test_max_unavailable(value: str, hosts: int, want: int) -> None:
    assert parse_max_unavailable(value, hosts) == want


@pytest.mark.parametrize("value", ["x", "-1", "0", "0%", "150%"])
def test_bad_max_unavailable(value: str) -> None:
    with pytest.raises(UsageError):
        parse_max_unavailable(value, 4)


@pytest.mark.parametrize("name", ["../models", "../../../etc", "a/b", "Tiny", "-x", "x-", "", "a" * 64, "a b", "a\nb"])
def test_a_deployment_name_is_a_dns_label(name: str) -> None:
    with pytest.raises(UsageError):
        Paths("/opt/weightship", name)


def test_long_names_never_share_a_service_user() -> None:
    a = Paths("/opt/weightship", "mistral-7b-instruct-v0-2-awq").user
    b = Paths("/opt/weightship", "mistral-7b-instruct-v0-2-gptq").user
    assert a != b and len(a) <= 32 and len(b) <= 32
    assert Paths("/opt/weightship", "tiny").user == "weightship-tiny"


@pytest.mark.parametrize("arg", ["--x=a b", "--x='a'", "--x=a\nLD_PRELOAD=/tmp/x.so", "--x=$HOME", "--x=*"])
def test_serve_args_that_systemd_would_split_or_expand_are_refused(arg: str) -> None:
    with pytest.raises(UsageError):
        check_serve_args(("--max-batch=4", arg))
    assert check_serve_args(("--max-batch=4", "--dtype", "bfloat16")) == ("--max-batch=4", "--dtype", "bfloat16")


def test_an_instance_unit_reads_its_hashed_keys_where_they_are(tmp_path: Path) -> None:
    paths = Paths(str(tmp_path / "opt"), "acme")
    unit = render_unit(paths, gpus=(), key_mode="instance")
    assert "LoadCredential" not in unit  # a copy made at start would never see a revoked key
    assert f"--api-key-file {paths.app}/keys.json --usage-log /var/lib/weightship/acme/usage.jsonl" in unit
    assert "ReadWritePaths=/var/lib/weightship/acme" in unit and "StateDirectory=weightship/acme" in unit
    runtime = Path(paths.current) / "runtime/bin"
    runtime.mkdir(parents=True)
    shutil.copy("/bin/true", runtime / "weightship")
    (tmp_path / paths.unit).write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / paths.unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
