"""The chart's fleet distribution (issue 15): with p2p.enabled, the seeders' fetch init containers
fetch a Hub, S3 or HTTPS model as one swarm (each serves the chunks it has while it fetches) and
the serving pods' fetches take from the seeders, so the origin sends about one copy. The chart is
rendered by Helm's own engine; the last test runs what it renders as real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k8s_helpers import CHART

from tests.conftest import assert_same_files
from tests.fleet import Fleet, Host, have_fleet
from tests.net import listening, wait_until
from weightship.deploy.k8s import helm as engine
from weightship.deploy.k8s.deployer import check_objects
from weightship.manifest import Manifest, create_for_directory

Obj = dict[str, Any]
PEERS = "demo-weightship-peers.ml.svc"

MODELS = {"hf": "hf://acme/m7b", "s3": "s3://models/m7b", "https": "https://models.example.com/m7b/",
          "catalog": "mistral-7b-v0.1"}


def render(values: Obj, chart: Path = CHART) -> engine.Rendered:
    return engine.render(chart, values, release="demo", namespace="ml")


def owner(r: engine.Rendered, *kinds: str) -> Obj:
    (found,) = [o for o in r.objects if o["kind"] in kinds]
    return found


def container(pod_owner: Obj, name: str) -> Obj:
    spec = pod_owner["spec"]["template"]["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def option(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, (flag, args)
    return args[args.index(flag) + 1]


@pytest.mark.parametrize(("kind", "storage"), [("hf", "emptyDir"), ("s3", "perPodPVC"), ("https", "emptyDir"),
                                               ("catalog", "perPodPVC")])
def test_seeders_fetch_as_one_swarm_and_servers_take_from_them(kind: str, storage: str) -> None:
    """The seeders' fetch listens on the P2P port while it fetches, finds the other seeders by
    the headless Service (which lists seeders still in their init container) and serves them
    after it is done; the serving pods' fetch finds the seeders the same way, waits for them, and
    serves nobody. The seeder's own container then serves the model by the protocol its source
    speaks (seed --protocol auto)."""
    values = {"model": {"name": MODELS[kind]}, "p2p": {"enabled": True}, "storage": {"mode": storage}}
    r = render(values)
    assert check_objects(r.objects + r.hooks, engine.effective_values(CHART, values)) == ([], [], [])
    seeders = owner(r, "DaemonSet")
    seeder_fetch = container(seeders, "fetch")["args"]
    assert seeder_fetch[:2] == ["fetch", MODELS[kind]]
    assert option(seeder_fetch, "--listen") == "0.0.0.0:6881"
    assert option(seeder_fetch, "--peers-from-dns") == f"{PEERS}:6881"
    assert option(seeder_fetch, "--seed-for") == "600s"
    assert option(seeder_fetch, "--peer-wait") == "60"
    server_fetch = container(owner(r, "Deployment", "StatefulSet"), "fetch")["args"]
    assert option(server_fetch, "--peers-from-dns") == f"{PEERS}:6881"
    assert option(server_fetch, "--peer-wait") == "60"
    assert "--listen" not in server_fetch and "--seed-for" not in server_fetch
    seed = container(seeders, "seed")
    assert seed["args"][:2] == ["seed", option(seeder_fetch, "--to")]
    assert option(seed["args"], "--listen") == "0.0.0.0:6881"
    assert "--protocol" not in seed["args"] or option(seed["args"], "--protocol") == "auto"
    assert seed["ports"] == [{"name": "bittorrent", "containerPort": 6881, "protocol": "TCP"}]
    (peers,) = [o for o in r.objects if o["kind"] == "Service" and o["metadata"]["name"] == "demo-weightship-peers"]
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True


def test_values_move_the_port_and_the_waits_and_p2p_off_adds_nothing() -> None:
    r = render({"model": {"name": MODELS["hf"]},
                "p2p": {"enabled": True, "port": 7000, "peerWaitSeconds": 5, "handoverSeconds": 90}})
    seeder_fetch = container(owner(r, "DaemonSet"), "fetch")["args"]
    assert option(seeder_fetch, "--listen") == "0.0.0.0:7000"
    assert option(seeder_fetch, "--peers-from-dns") == f"{PEERS}:7000"
    assert (option(seeder_fetch, "--peer-wait"), option(seeder_fetch, "--seed-for")) == ("5", "90s")
    off = container(owner(render({"model": {"name": MODELS["hf"]}}), "Deployment"), "fetch")["args"]
    assert not {"--listen", "--peers-from-dns", "--peer-wait", "--seed-for"} & set(off)
    assert all(o["kind"] != "DaemonSet" for o in render({}).objects)


@pytest.mark.parametrize("values", [{"name": "magnet:?xt=urn:btih:" + "a" * 40},
                                    {"name": "https://models.example.com/m7b.torrent"},
                                    {"name": "mistral-7b-v0.1", "source": "torrent"}])
def test_a_torrent_seeder_hands_over_to_its_seed_container_at_once(values: Obj) -> None:
    """A torrent's fetch would seed the whole --seed-for (BitTorrent has no "every peer is
    done"), holding the seed container, and the DaemonSet's rolling update, back for
    p2p.handoverSeconds: the seeder's fetch listens (it serves while it fetches) but passes no
    --seed-for, and `weightship seed` serves it by BitTorrent on the same port."""
    r = render({"model": values, "p2p": {"enabled": True}})
    seeder_fetch = container(owner(r, "DaemonSet"), "fetch")["args"]
    assert option(seeder_fetch, "--listen") == "0.0.0.0:6881"
    assert "--seed-for" not in seeder_fetch
    assert option(seeder_fetch, "--peers-from-dns") == f"{PEERS}:6881"


# ---- the rendered containers, run ----------------------------------------------------------


def _model(root: Path) -> Path:
    """Two random files (6 MiB and 3 MiB + 12,345 bytes): three 4 MiB chunks, the fetch's size."""
    d = root / "acme" / "m7b"
    d.mkdir(parents=True)
    rng = __import__("random").Random(15)
    for name, size in (("model-00001-of-00002.safetensors", 6 << 20),
                       ("model-00002-of-00002.safetensors", (3 << 20) + 12345)):
        (d / name).write_bytes(rng.randbytes(size))
    create_for_directory(d, name="m7b").write(d)
    return d


def _pod_process(host: Host, c: Obj, root: Path) -> subprocess.Popen[str]:
    """Start container ``c`` on ``host`` (its network namespace) as the kubelet would: each volume
    it mounts is a directory under ``root``, and each mount path in its args and env points
    there. ``weightship`` is this checkout's."""
    where = {m["mountPath"]: root / m["name"] for m in c.get("volumeMounts", [])}
    for d in where.values():
        d.mkdir(parents=True, exist_ok=True)

    def here(text: str) -> str:
        for mount, d in where.items():
            if text == mount or text.startswith(mount + "/"):
                return str(d) + text[len(mount):]
        return text

    assert c["command"] == ["weightship"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTSHIP_")}
    env.update({e["name"]: here(e["value"]) for e in c.get("env", []) if "value" in e})
    return host.popen([sys.executable, "-m", "weightship", *[here(a) for a in c["args"]]],
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


@pytest.fixture
def fleet_with_dns() -> Iterator[Fleet]:
    """A fleet of three nodes and an origin (tests/fleet.py) whose nodes resolve the peers
    Service's name to the first two: ``ip netns exec`` mounts /etc/netns/NS/hosts over
    /etc/hosts, as cluster DNS would answer for the headless Service."""
    why = have_fleet()
    if why:
        pytest.skip(why)
    fleet = Fleet(3).start()
    made: list[Path] = []
    try:
        for node in fleet.nodes:
            d = Path("/etc/netns") / node.netns
            try:
                d.mkdir(parents=True)
            except OSError as e:  # a read-only /etc
                pytest.skip(f"cannot give the nodes a hosts file: {e}")
            made.append(d)
            (d / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
                f"{seeder.address} {PEERS}\n" for seeder in fleet.nodes[:2]))
        yield fleet
    finally:
        fleet.stop()
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


def run_release(fleet: Fleet, chart: Path, tmp: Path) -> tuple[int, int]:
    """Run a release's pods on ``fleet``: two seeder pods (the fetch init container, then the
    seed container) and one serving pod's fetch, all started at once against a Hub mirror on
    the origin. Returns the bytes the origin sent and the model's size; asserts every pod ended
    with the model, verified."""
    origin = fleet.origin
    assert origin is not None
    model = _model(tmp / "hub")
    mirror = origin.popen([sys.executable, "-m", "weightship", "mirror", tmp / "hub", "--host", "0.0.0.0",
                           "--port", "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: listening(8080, origin.address), 30, "the Hub mirror to listen",
               mirror)  # type: ignore[arg-type]
    r = render({"model": {"name": "hf://acme/m7b"}, "p2p": {"enabled": True},
                "fetch": {"hfEndpoint": f"http://{origin.address}:8080"}}, chart)
    seeders, server = owner(r, "DaemonSet"), owner(r, "Deployment")
    to = option(container(server, "fetch")["args"], "--to").removeprefix("/models/")
    before = origin.sent()
    pods = [(node, tmp / f"pod{i}") for i, node in enumerate(fleet.nodes)]
    inits = [_pod_process(node, container(seeders, "fetch"), root) for node, root in pods[:2]]
    serving = _pod_process(pods[2][0], container(server, "fetch"), pods[2][1])
    seeds = []
    for (node, root), init in zip(pods[:2], inits, strict=True):
        _, err = init.communicate(timeout=120)
        assert init.returncode == 0, err[-3000:]
        seeds.append(_pod_process(node, container(seeders, "seed"), root))  # the main container
    _, err = serving.communicate(timeout=120)
    assert serving.returncode == 0, err[-3000:]
    for _, root in pods:
        got = root / "models" / to
        assert_same_files(model, got)
        assert {f.path for f in Manifest.load(got).files} == {f.path for f in Manifest.load(model).files}
    assert all(s.poll() is None for s in seeds), "the seed containers must keep serving"
    return origin.sent() - before, Manifest.load(model).total_bytes


def test_the_rendered_pods_pull_one_copy_from_the_origin(fleet_with_dns: Fleet, tmp_path: Path) -> None:
    """Two seeder pods and one serving pod, run from the rendered containers (the Hub model, the
    P2P port, the peers Service's name as rendered; the name resolved by the nodes' /etc/hosts),
    all starting at once: every pod verifies the model and the origin sends about one copy,
    where three pods fetching alone would pull three (before: the seeders' fetch did not serve
    while fetching, so each seeder pulled the whole model, ~2x, and the serving pod more)."""
    sent, size = run_release(fleet_with_dns, CHART, tmp_path)
    assert sent < 1.5 * size, f"the origin sent {sent / size:.2f}x the model"
