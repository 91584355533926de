"""Faults the real Hub produces (issue 17, items 4-6), against the stand-in of
:mod:`tests.fetch.hubstub`: LFS files behind 302s to a CDN host, a one-off 503 on a file's first
request, a refused HEAD, a gated repository."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import assert_clean_failure, run_cli
from tests.fetch.hubstub import HubRepo, HubStub, hub
from weightship import __version__
from weightship.errors import AccessDeniedError
from weightship.fetch import FetchOptions, TransferOptions, build_request, fetch
from weightship.fetch.transport import HttpPool, HttpRemote

FAST = FetchOptions(transfer=TransferOptions(retries=3, backoff=0.01, backoff_max=0.02, chunk_size=64 << 10))
FILES = {"config.json": b'{"model_type": "mistral"}\n',
         "model.safetensors": random.Random(4).randbytes(300_000),
         "tokenizer.model": random.Random(5).randbytes(20_000)}
GATED_HINT = "gated: accept the conditions on the model's page and use a token that has access"


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStub]:
    with hub(tmp_path / "cdn") as h:
        h.add("acme/tiny", HubRepo(commit="a" * 40, files=dict(FILES)))
        h.add("acme/gated", HubRepo(commit="b" * 40, files=dict(FILES), gated=True))
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def test_a_503_on_the_first_request_for_a_file_is_retried(stub: HubStub, tmp_path: Path) -> None:
    stub.first_503 = {"model.safetensors": 1, "config.json": 2}
    result = fetch(build_request("hf://acme/tiny", options=FAST), tmp_path / "m")
    assert sorted(result.fetched) == sorted(FILES)
    for path, data in FILES.items():
        assert (tmp_path / "m" / path).read_bytes() == data
    assert stub.first_503 == {"model.safetensors": 0, "config.json": 0}  # the 503s were answered
    # the LFS file came from the CDN, which never saw the token
    assert stub.cdn.requests and set(stub.cdn.authorizations) == {None}


def test_a_refused_head_leaves_its_pooled_connection_usable(stub: HubStub) -> None:
    """The failed HEAD's error is kept alive (as the engine keeps the last error of a file);
    the next request on the same pooled connection must still work."""
    stub.head_403 = {"tokenizer.model"}
    pool = HttpPool(TransferOptions(connections=1, parallel_files=1))
    base = f"{stub.url}/acme/tiny/resolve/{'a' * 40}/"
    refused = HttpRemote(pool, base + "tokenizer.model")
    with pytest.raises(AccessDeniedError) as kept:
        refused.stat()
    st = HttpRemote(pool, base + "config.json").stat()
    assert st.size == len(FILES["config.json"]) and kept.value is not None
    pool.close()


def test_a_gated_repository_is_said_once_with_what_to_do(stub: HubStub, tmp_path: Path) -> None:
    r = run_cli("fetch", "hf://acme/gated", "--to", tmp_path / "m", env={"HF_ENDPOINT": stub.url})
    assert_clean_failure(r, 1)
    assert r.stderr.count(GATED_HINT) == 1, r.stderr
    said = [line for line in r.stderr.strip().splitlines() if "unsigned-hub-listing" not in line]
    assert len(said) == 2, r.stderr  # the error line and its hint (and the stand-in's trust warning)
    assert said[0].startswith("error: hf://acme/gated is gated"), r.stderr
    assert "resolve" not in r.stderr and "WARNING" not in "\n".join(said), r.stderr  # no internal URL
    resolves = [p for m, p in stub.requests if "/resolve/" in p]
    # one try per file in flight (the request budget has all three in flight at once), then
    # no more asking: no file is asked twice
    assert len(resolves) == len(set(resolves)) <= len(FILES), resolves
    assert not (tmp_path / "m" / "config.json").exists()


def _listing(commit: object = "a" * 40, **sibling: object) -> bytes:
    return json.dumps({"sha": commit, "siblings": [{"rfilename": "config.json", "size": 26,
                                                   "blobId": "0" * 40} | sibling]}).encode()


@pytest.mark.parametrize(("listing", "said"), [
    (b"<html>sign in</html>", "the Hub's listing is not a JSON object"),
    (b"[1, 2]", "the Hub's listing is not a JSON object"),
    (_listing(commit="../../api/whoami"), "the Hub returned no commit id or file list"),
    (_listing(commit="a" * 39), "the Hub returned no commit id or file list"),
    (json.dumps({"sha": "a" * 40, "siblings": {"x": 1}}).encode(), "no commit id or file list"),
    (_listing(size=-1), "the Hub gave no size and digest for config.json"),
    (_listing(size="26"), "the Hub gave no size and digest for config.json"),
    (_listing(lfs={"size": 26}), "the Hub gave no size and digest for config.json"),
    (_listing(rfilename=None), "the Hub's listing names a file without a path"),
], ids=["html", "array", "path-as-commit", "short-commit", "siblings-object", "negative-size",
        "size-as-text", "lfs-without-sha256", "no-path"])
def test_a_hostile_listing_is_refused_before_any_file(stub: HubStub, tmp_path: Path, listing: bytes,
                                                      said: str) -> None:
    stub.listing = listing
    r = run_cli("fetch", "hf://acme/tiny", "--to", tmp_path / "m", env={"HF_ENDPOINT": stub.url})
    assert_clean_failure(r, 1)
    assert said in r.stderr, r.stderr
    assert [p for _, p in stub.requests if "/resolve/" in p] == []  # not one file asked for
    assert not (tmp_path / "m" / "config.json").exists()


@pytest.mark.parametrize("login", ["env", "stored", "stored, implicit token off"])
def test_the_hub_hears_the_listing_and_the_files_with_the_token_and_nothing_else(
        stub: HubStub, tmp_path: Path, login: str) -> None:
    """With a fresh HF_HOME (an init container's): the token from HF_TOKEN or the stored login
    goes with the listing and the files (not where HF_HUB_DISABLE_IMPLICIT_TOKEN forbids it), the
    user agent is weightship's, and the Hub is asked nothing else (huggingface_hub 2.4's
    build_hf_headers asked it for its agent registry, /api/agent-harnesses)."""
    home = tmp_path / "hf-home"
    home.mkdir()
    env = {"HF_ENDPOINT": stub.url, "HF_HOME": str(home), "HF_TOKEN": ""}
    if login == "env":
        env["HF_TOKEN"] = "hf_from_env"
    else:
        (home / "token").write_text("hf_stored")
    if "off" in login:
        env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    r = run_cli("fetch", "hf://acme/tiny", "--to", tmp_path / "m", env=env)
    assert r.code == 0, r.stderr
    assert {p.split("/")[1] for _, p in stub.requests} == {"api", "acme"}, stub.requests
    assert [p for _, p in stub.requests if p.startswith("/api/")] == ["/api/models/acme/tiny/revision/main"]
    want = {"env": "Bearer hf_from_env", "stored": "Bearer hf_stored"}.get(login)
    assert set(stub.authorizations) == {want}, stub.authorizations
    assert all(a and a.startswith(f"weightship/{__version__}; ") for a in stub.agents), stub.agents


def test_the_listing_loads_no_hub_api_client(stub: HubStub, tmp_path: Path) -> None:
    """A Hub fetch reads the listing through its own pool: huggingface_hub's API client (about
    0.2 s to import) is not loaded; the token still goes with the listing."""
    code = ("import sys; from pathlib import Path; from weightship.fetch import build_request, fetch; "
            "fetch(build_request('hf://acme/tiny'), Path(sys.argv[1])); "
            "print(sorted(m for m in ('huggingface_hub.hf_api',) if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                         env={**os.environ, "HF_ENDPOINT": stub.url, "HF_TOKEN": "hf_secret"}, check=True)
    assert out.stdout.strip() == "[]", out.stderr
    for path, data in FILES.items():
        assert (tmp_path / "m" / path).read_bytes() == data
    said = dict(zip(stub.requests, stub.authorizations, strict=True))
    assert said[("GET", "/api/models/acme/tiny/revision/main")] == "Bearer hf_secret", said
