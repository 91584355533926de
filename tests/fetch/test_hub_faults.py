"""Faults the real Hub produces (issue 17, items 4-6), against the stand-in of
:mod:`tests.fetch.hubstub`: LFS files behind 302s to a CDN host, a one-off 503 on a file's first
request, a refused HEAD, a gated repository."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import assert_clean_failure, run_cli
from tests.fetch.hubstub import HubRepo, HubStub, hub
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
