"""``instance keys add/revoke`` on Kubernetes wait until every server that takes traffic has
loaded the new key file (each server reports the digest of its file at ``GET /v1/keys``, asked
through the fake API server's pod proxy), and name the servers that have not."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakekube import FakeKube
from instance_helpers import TINY, SecretVolume, run_ok, seed_server_pod, the

from tests.net import wait_until
from weightship.runtime.keys import load_key_file
from weightship.runtime.runner import BackgroundServer
from weightship.runtime.server import ServerState


def test_keys_return_once_every_server_has_them_and_name_those_that_have_not(
        two_pools: FakeKube, cli: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_ok(cli, capsys, "create", "acme", *TINY)
    with contextlib.ExitStack() as stack:
        volumes, urls = [], []
        for i in range(2):  # two replicas, each a real server reading its Secret volume
            volume = SecretVolume(two_pools, "wsi-acme", "weightship-api-keys", "keys.json",
                                  tmp_path / f"keys-{i}.json")
            stack.callback(volume.close)
            ring = load_key_file(volume.path)
            ring.watch(interval=0.1)
            stack.callback(ring.stop)
            srv = stack.enter_context(BackgroundServer(ServerState("weightship-tiny", keyring=ring)))
            seed_server_pod(two_pools, "acme", f"weightship-{i}", srv.port)
            volumes.append(volume)
            urls.append(srv.url)

        def status(i: int, key: str) -> int:
            return httpx.get(urls[i] + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                             timeout=30).status_code

        volumes[1].synced.clear()  # weightship-1's kubelet has not synced the volume yet
        code, out, err = cli("instance", "keys", "add", "acme", "--key-name", "ci", "--json",
                             "--timeout", "8", capsys=capsys)  # the pod that syncs must, even on a loaded machine
        assert code == 1, err
        added = json.loads(out)  # stored, so shown all the same: this is the only time
        assert added["name"] == "ci" and added["key"].startswith("wsk_")
        first = err.splitlines()[0]
        assert "pod weightship-1" in first and "weightship-0" not in first, err
        assert "kubectl -n wsi-acme delete pod weightship-1" in err
        assert status(0, added["key"]) == 200 and status(1, added["key"]) == 401
        secret = the(two_pools, "v1", "Secret", "wsi-acme", "weightship-api-keys")
        for i in range(2):  # each pod was touched, which makes the kubelet sync it now
            pod = the(two_pools, "v1", "Pod", "wsi-acme", f"weightship-{i}")
            assert pod["metadata"]["annotations"]["weightship.io/keys-revision"] == \
                secret["metadata"]["resourceVersion"]

        volumes[1].synced.set()
        wait_until(lambda: status(1, added["key"]) == 200, 10, "weightship-1 to load the key")
        run_ok(cli, capsys, "keys", "revoke", "acme", "ci", "--json")
        # the command has returned: every server refuses the key now, none "within seconds"
        assert status(0, added["key"]) == 401 and status(1, added["key"]) == 401
