"""Fetch at scale in the number of files (issue 22): a small file is one GET (no HEAD) under one
request budget for the whole fetch; what was verified before a failure or a kill -9 is not
requested again."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import S3Server, assert_clean_failure, run_cli
from tests.fetch.hubstub import HubRepo, HubStub, hub
from tests.net import wait_until
from weightship.errors import DigestMismatchError
from weightship.fetch import FetchOptions, TransferOptions, build_request, fetch
from weightship.manifest import create_for_directory
from weightship.verify import verify_dir

COMMIT = "c" * 40
FAST = FetchOptions(transfer=TransferOptions(retries=2, backoff=0.01, backoff_max=0.02, chunk_size=64 << 10))


def _small_files(n: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"d{i % 7}/s{i % 3}/f{i:04d}.json":
            json.dumps({"i": i, "pad": "x" * rng.randrange(10, 400)}).encode() for i in range(n)}


def _resolve(path: str, repo: str = "acme/many") -> str:
    return f"/{repo}/resolve/{COMMIT}/{path}"


@pytest.fixture
def stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStub]:
    with hub(tmp_path / "cdn") as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def test_500_small_files_are_one_get_each_and_no_head(stub: HubStub, tmp_path: Path) -> None:
    small = _small_files(500)
    big = random.Random(2).randbytes(300_000)  # LFS, five chunks of 64 KiB: read by ranges
    stub.add("acme/many", HubRepo(commit=COMMIT, files={**small, "model.safetensors": big}))
    dest = tmp_path / "m"
    result = fetch(build_request("hf://acme/many", options=FAST), dest)
    assert len(result.fetched) == 501 and len(result.manifest.files) == 501
    for path, data in small.items():
        assert (dest / path).read_bytes() == data, path
    assert (dest / "model.safetensors").read_bytes() == big
    verify_dir(dest).raise_for_problems()
    asked = collections.Counter(stub.requests)
    for path in small:
        assert asked[("GET", _resolve(path))] == 1, path
        assert asked[("HEAD", _resolve(path))] == 0, path
    # the listing once; the small files one GET each; the large file's redirect (HEAD) once
    assert sum(n for (_, p), n in asked.items() if "/resolve/" in p and p.endswith(".json")) == 500
    assert [p for _, p in stub.requests if p.startswith("/api/models/")] == ["/api/models/acme/many/revision/main"]


@pytest.mark.parametrize(("args", "budget"), [((), 8), (("--requests", "3"), 3)])
def test_one_budget_of_requests_in_flight_for_the_whole_fetch(
        stub: HubStub, tmp_path: Path, args: tuple[str, ...], budget: int) -> None:
    files = _small_files(120, seed=9)
    stub.add("acme/many", HubRepo(commit=COMMIT, files=files))
    # each answer waits until `budget` requests are in flight (5 s at most): a client with fewer
    # slots never fills it, one with more shows more than `budget`, however loaded the machine is
    stub.gather = budget
    r = run_cli("fetch", "hf://acme/many", "--to", tmp_path / "m", *args, env={"HF_ENDPOINT": stub.url})
    assert r.code == 0, r.stderr
    # the default is connections x parallel files (4 x 2): the budget is filled, never exceeded
    assert stub.most_in_flight == budget, stub.most_in_flight


@pytest.mark.parametrize("fault", ["corrupt", "gone"])
def test_one_small_file_served_wrong_fails_alone_and_the_rest_stay_verified(
        stub: HubStub, tmp_path: Path, fault: str) -> None:
    files = _small_files(60, seed=3)
    stub.add("acme/many", HubRepo(commit=COMMIT, files=files))
    bad = sorted(files)[17]
    getattr(stub, fault).add(bad)
    dest = tmp_path / "m"
    r = run_cli("fetch", "hf://acme/many", "--to", dest, env={"HF_ENDPOINT": stub.url})
    assert_clean_failure(r, 3 if fault == "corrupt" else 1)
    error = next(line for line in r.stderr.splitlines() if line.startswith("error:"))
    assert bad in error, r.stderr
    assert not any((dest / p).exists() for p in files), "nothing is promoted while a file failed"
    # the others were verified and staged: the same fetch, the server fixed, asks only for `bad`
    getattr(stub, fault).clear()
    stub.requests.clear()
    result = fetch(build_request("hf://acme/many"), dest)
    assert sorted(result.fetched) == sorted(files)
    assert [p for _, p in stub.requests if "/resolve/" in p] == [_resolve(bad)]
    for path, data in files.items():
        assert (dest / path).read_bytes() == data


def test_the_commit_the_hub_reports_must_be_the_pinned_one(stub: HubStub, tmp_path: Path) -> None:
    files = _small_files(5)
    stub.add("acme/many", HubRepo(commit=COMMIT, files=files))
    stub.say_commit = "d" * 40  # listed at COMMIT, each file answered from another commit
    with pytest.raises(DigestMismatchError, match="commit mismatch"):
        fetch(build_request(f"hf://acme/many@{COMMIT}", options=FAST), tmp_path / "m")
    assert not any((tmp_path / "m" / p).exists() for p in files)


def test_kill_9_mid_fetch_then_rerun_asks_nothing_already_verified(stub: HubStub, tmp_path: Path) -> None:
    files = _small_files(400, seed=5)
    stub.add("acme/many", HubRepo(commit=COMMIT, files=files))
    stub.delay = 0.01
    dest = tmp_path / "m"
    incoming = dest / ".weightship" / "incoming"
    proc = subprocess.Popen([sys.executable, "-m", "weightship", "fetch", "hf://acme/many", "--to", str(dest)],
                            env={**os.environ, "HF_ENDPOINT": stub.url},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: incoming.exists() and sum(1 for _ in incoming.rglob("*.incomplete")) >= 120,
                   60, "a third of the files staged", proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    staged = {p for p, data in files.items()
              if (incoming / (p + ".incomplete")).is_file()
              and (incoming / (p + ".incomplete")).read_bytes() == data}
    assert 100 <= len(staged) < len(files), len(staged)
    assert not (dest / ".weightship" / "manifest.json").exists()
    stub.delay = 0.0
    stub.requests.clear()
    result = fetch(build_request("hf://acme/many"), dest)
    asked = {p for _, p in stub.requests if "/resolve/" in p}
    assert not asked & {_resolve(p) for p in staged}, "a file verified before the kill was asked again"
    assert asked == {_resolve(p) for p in files if p not in staged}
    assert sorted(result.fetched) == sorted(files)
    verify_dir(dest).raise_for_problems()


def test_an_s3_prefix_of_500_small_objects_is_one_get_each(
        s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted in the client (rclone's server keeps no request count): every HTTP request the
    source sends, and every HeadObject through boto3."""
    from weightship.fetch import s3
    from weightship.fetch.transport import HttpPool

    files = _small_files(500, seed=7)
    prefix = s3_env.root / "models" / "many500"
    for path, data in files.items():
        (prefix / path).parent.mkdir(parents=True, exist_ok=True)
        (prefix / path).write_bytes(data)
    create_for_directory(prefix, name="many500").write(tmp_path)
    manifest = tmp_path / ".weightship" / "manifest.json"
    sent: list[tuple[str, str]] = []
    heads: list[str] = []
    request, get_whole = HttpPool.request, HttpPool.get_whole

    def counting(self: HttpPool, method: str, url: str, headers: object = None) -> object:
        sent.append((method, url.split("?")[0]))
        return request(self, method, url, headers)  # type: ignore[arg-type]

    def counting_whole(self: HttpPool, url: str, headers: dict[str, str], limit: int, where: str) -> object:
        sent.append(("GET", url.split("?")[0]))  # a small file's GET, read whole by libcurl
        return get_whole(self, url, headers, limit, where)

    def no_head(self: s3.S3Remote) -> object:
        heads.append(self.key)
        raise AssertionError("HeadObject for a file the manifest sized")

    monkeypatch.setattr(HttpPool, "request", counting)
    monkeypatch.setattr(HttpPool, "get_whole", counting_whole)
    monkeypatch.setattr(s3.S3Remote, "stat", no_head)
    dest = tmp_path / "m"
    result = fetch(build_request("s3://models/many500", options=FetchOptions(manifest=manifest)), dest)
    assert len(result.fetched) == 500
    for path, data in files.items():
        assert (dest / path).read_bytes() == data
    assert heads == []
    per_key = collections.Counter(url.split("/models/many500/", 1)[1] for _, url in sent)
    assert {m for m, _ in sent} == {"GET"} and set(per_key) == set(files) and set(per_key.values()) == {1}



def test_many_small_files_are_flushed_once_before_any_is_promoted(
        stub: HubStub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from weightship import paths
    from weightship.fetch import many

    files = _small_files(200, seed=11)
    stub.add("acme/many", HubRepo(commit=COMMIT, files=files))
    events: list[str] = []
    fsyncs = []
    real_fsync, real_syncfs, real_replace = os.fsync, many._syncfs, paths._replace_at

    def syncfs(fd: int) -> bool:
        events.append("syncfs")
        return real_syncfs(fd)

    def replace(*args: object, **kw: object) -> None:
        events.append("rename")
        real_replace(*args, **kw)  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(many, "_syncfs", syncfs)
    monkeypatch.setattr(paths, "_replace_at", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    fetch(build_request("hf://acme/many"), tmp_path / "m")
    assert events[0] == "syncfs" and events.count("syncfs") == 1 and events.count("rename") == 200
    # the directories the renames touched (7 x 3 + 7 + the top), and the manifest: not one per file
    assert len(fsyncs) < 40, len(fsyncs)
    verify_dir(tmp_path / "m").raise_for_problems()
