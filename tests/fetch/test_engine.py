"""The shared fetch path: staging, digest checks, atomic promote, failover, lock, disk space."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from tests.conftest import assert_clean_failure, run_cli
from weightship.catalog import parse_card
from weightship.errors import DigestMismatchError, DiskSpaceError, LockedError, UnsafePathError
from weightship.fetch import FetchPlan, FetchRequest, PlannedFile, Sink, Source, engine, fetch, registry
from weightship.fetch.lock import dir_lock
from weightship.manifest import Manifest, SourceInfo

GOOD = {"a.bin": b"alpha" * 1000, "sub/b.json": b'{"b": 2}'}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class FakeSource(Source):
    """Serves ``GOOD``, optionally corrupting one file; a test double for a remote source."""

    kind: ClassVar[str] = "fake"
    served: ClassVar[list[str]] = []
    names: ClassVar[list[str]] = list(GOOD)  # what the plan lists
    corrupt: ClassVar[str | None] = None  # the file served with a flipped bit

    def plan(self) -> FetchPlan:
        files = [PlannedFile(path=n, size=len(GOOD.get(n, b"")), sha256=_sha(GOOD.get(n, b"")))
                 for n in self.names]
        return FetchPlan(name="fake-model", layout=None, files=files,
                         source=SourceInfo(kind="fake", uri=self.request.ref))

    def fetch_file(self, file: PlannedFile, sink: Sink) -> None:
        data = GOOD[file.path]
        corrupt = self.spec.get("corrupt", self.corrupt)
        if corrupt == file.path:
            data = data[:-1] + bytes([data[-1] ^ 1])
        FakeSource.served.append(f"{self.spec.get('name', 'uri')}:{file.path}")
        sink.write(data)


@pytest.fixture(autouse=True)
def _fake_source(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(registry._SOURCES, "fake", (f"{__name__}:FakeSource", ("fake",)))
    FakeSource.served, FakeSource.names, FakeSource.corrupt = [], list(GOOD), None
    yield


def _request() -> FetchRequest:
    return FetchRequest(ref="fake://model")


def test_good_fetch_promotes_and_writes_manifest(tmp_path: Path) -> None:
    result = fetch(_request(), tmp_path)
    assert sorted(result.fetched) == sorted(GOOD)
    for name, data in GOOD.items():
        assert (tmp_path / name).read_bytes() == data
    m = Manifest.load(tmp_path)
    assert {f.path: f.sha256 for f in m.files} == {n: _sha(d) for n, d in GOOD.items()}
    assert not (tmp_path / ".weightship" / "incoming").exists()


def test_corrupt_file_is_never_promoted(tmp_path: Path) -> None:
    FakeSource.corrupt = "sub/b.json"
    with pytest.raises(DigestMismatchError):
        fetch(_request(), tmp_path)
    # all-or-nothing: the good file was not promoted either, and no manifest claims anything
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "sub" / "b.json").exists()
    assert not (tmp_path / ".weightship" / "manifest.json").exists()
    # the corrupt bytes are gone; the verified a.bin waits in staging and is not fetched again
    assert [p.name for p in (tmp_path / ".weightship").rglob("*.incomplete")] == ["a.bin.incomplete"]
    FakeSource.served, FakeSource.corrupt = [], None
    result = fetch(_request(), tmp_path)
    assert FakeSource.served == ["uri:sub/b.json"]
    assert sorted(result.fetched) == sorted(GOOD)
    assert (tmp_path / "a.bin").read_bytes() == GOOD["a.bin"]


def test_failover_to_the_next_source_on_a_bad_digest(tmp_path: Path) -> None:
    card = parse_card({
        "name": "fake-model", "license": "x", "layouts": {"hf": {"files": None}},
        "architecture": {"dim": 8, "n_layers": 1, "head_dim": 4, "hidden_dim": 8, "n_heads": 2,
                         "n_kv_heads": 1, "norm_eps": 1e-5, "vocab_size": 10},
        "sources": [{"kind": "fake", "name": "first", "corrupt": "a.bin"}, {"kind": "fake", "name": "second"}],
    }, "test")
    result = fetch(FetchRequest(ref="fake-model", card=card), tmp_path)
    assert (tmp_path / "a.bin").read_bytes() == GOOD["a.bin"]
    assert FakeSource.served == ["first:a.bin", "second:a.bin", "first:sub/b.json"]
    assert sorted(result.fetched) == sorted(GOOD)


@pytest.mark.parametrize("bad", ["../escape.bin", "/abs.bin", ".weightship/manifest.json", "a\\b"])
def test_unsafe_planned_path_is_refused_before_writing(tmp_path: Path, bad: str) -> None:
    GOOD[bad] = b"evil"
    try:
        FakeSource.names = [bad, "a.bin"]
        with pytest.raises(UnsafePathError):
            fetch(_request(), tmp_path / "dest")
    finally:
        del GOOD[bad]
    assert FakeSource.served == []
    assert not (tmp_path / "escape.bin").exists()


def test_disk_space_is_checked_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1024))
    with pytest.raises(DiskSpaceError, match="not enough space"):
        fetch(_request(), tmp_path)
    assert FakeSource.served == []


def test_refetch_repairs_a_damaged_file(tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    assert run_cli("fetch", "weightship-tiny", "--to", d).code == 0
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01\x02")
    assert run_cli("verify", d).code == 3
    r = run_cli("fetch", "weightship-tiny", "--to", d, "--json")
    assert r.code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fetched"] == ["model.safetensors"] and sorted(out["skipped"]) == ["config.json", "tokenizer.model"]
    assert run_cli("verify", d).code == 0


def test_git_blob_sha1_is_checked(tmp_path: Path) -> None:
    class GitOnly(FakeSource):
        def plan(self) -> FetchPlan:
            data = GOOD["sub/b.json"]
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            if self.spec.get("wrong"):
                blob = "0" * 40
            return FetchPlan(name="g", layout=None, source=SourceInfo(kind="fake"),
                             files=[PlannedFile(path="sub/b.json", size=len(data), sha256=None, git_sha1=blob)])

    req = _request()
    fetch_one = engine._fetch_one
    entry = fetch_one(GitOnly(req), GitOnly(req).plan().files[0], tmp_path / "s", engine.NullProgress())
    assert entry.sha256 == _sha(GOOD["sub/b.json"])
    bad = GitOnly(req, {"wrong": True})
    with pytest.raises(DigestMismatchError, match="git blob sha1"):
        fetch_one(bad, bad.plan().files[0], tmp_path / "t", engine.NullProgress())
    assert not (tmp_path / "t").exists()


def test_lock_held_by_another_live_process(tmp_path: Path) -> None:
    state = tmp_path / ".weightship"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path;"
         "from weightship.fetch.lock import dir_lock\n"
         f"with dir_lock(Path({str(state)!r})):\n print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            fetch(_request(), tmp_path)
        r = run_cli("fetch", "weightship-tiny", "--to", tmp_path)
        assert_clean_failure(r, 1)
        assert "another weightship process" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    # its holder is gone: the stale lock is taken over
    assert fetch(_request(), tmp_path).fetched


def test_lock_is_exclusive_within_a_process(tmp_path: Path) -> None:
    with dir_lock(tmp_path / ".weightship"), pytest.raises(LockedError):
        fetch(_request(), tmp_path)
    assert not (tmp_path / ".weightship" / "lock").exists()


@pytest.mark.parametrize(("ref", "name"), [
    ("weightship-tiny", "weightship-tiny"),
    ("magnet:?xt=urn:btih:208b101a0f51514ecf285885a8b0f6fb1a1e4d7d&dn=mistral-7B-v0.1", "mistral-7B-v0.1"),
    ("magnet:?xt=urn:btih:208b101a0f51514ecf285885a8b0f6fb1a1e4d7d", "208b101a0f51514ecf285885a8b0f6fb1a1e4d7d"),
    ("hf://mistralai/Mistral-7B-v0.1@main", "Mistral-7B-v0.1"),
    ("s3://bucket/models/acme-7b/", "acme-7b"),
    ("/srv/torrents/tiny.torrent", "tiny"),
])
def test_default_directory_names(ref: str, name: str) -> None:
    assert engine.default_dir_name(engine.build_request(ref)) == name


@pytest.mark.parametrize("dn", ["../../etc", "..", ".weightship", "a%2Fb"])
def test_hostile_magnet_names_never_become_paths(dn: str) -> None:
    ref = f"magnet:?xt=urn:btih:208b101a0f51514ecf285885a8b0f6fb1a1e4d7d&dn={dn}"
    assert engine.default_dir_name(engine.build_request(ref)).startswith("model-")


# ---- a shared cache: a link swapped in after the check (issue 17, item 12) --------------------


def test_a_directory_swapped_for_a_link_after_the_check_is_refused_at_promotion(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another pod with the same uid swaps ``dest/sub`` for a link to a place of its choosing
    right after the engine checked the name: the promotion must not follow it."""
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    outside.mkdir()
    real_check = engine.PathsUnder.resolve

    def check_then_swap(under: engine.PathsUnder, name: str) -> Path:
        checked = real_check(under, name)
        if name == "sub/b.json":
            (under.root / "sub").symlink_to(outside)  # the swap, at the worst moment
        return checked

    monkeypatch.setattr(engine.PathsUnder, "resolve", check_then_swap)
    with pytest.raises(UnsafePathError, match="symlink"):
        fetch(_request(), dest)
    assert list(outside.iterdir()) == []  # nothing was written through the link
    assert not (dest / ".weightship" / "manifest.json").exists()


def test_a_state_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / ".weightship").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symlink"):
        fetch(_request(), dest)
    assert list(outside.iterdir()) == []  # no lock, no staging file, no manifest went there


def test_finding_a_uris_source_imports_no_source_module() -> None:
    """The registry knows each kind's URI schemes: choosing the source for a URI (and refusing an
    unknown scheme) loads neither the source modules nor boto3, libtorrent or huggingface_hub."""
    code = """
import sys
from weightship.errors import UnknownSourceError
from weightship.fetch.registry import kind_for_uri
kinds = [kind_for_uri(u) for u in ("s3://b/m", "magnet:?xt=urn:btih:" + "0" * 40, "hf://a/b",
                                   "https://h/m/", "http://h/m/", "m.torrent")]
try:
    kind_for_uri("ftp://h/m")
except UnknownSourceError as e:
    assert "s3://" in str(e.hint), e.hint
loaded = [m for m in ("weightship.fetch.s3", "weightship.fetch.torrent", "weightship.fetch.hf",
                      "weightship.fetch.https", "boto3", "libtorrent", "huggingface_hub") if m in sys.modules]
print(kinds, loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['s3', 'torrent', 'hf', 'https', 'https', 'torrent'] []"


def test_cleaning_up_a_bad_file_never_deletes_through_a_swapped_directory(tmp_path: Path) -> None:
    """A wrong file's staging copy is removed; if its directory was swapped for a symlink while
    the bytes arrived (a shared cache, another writer), nothing is removed through the link."""
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "b.json.incomplete").write_bytes(b"someone else's file")

    class Swapping(FakeSource):
        def fetch_file(self, file: PlannedFile, sink: Sink) -> None:
            if file.path == "sub/b.json":
                incoming = dest / ".weightship" / "incoming"
                (incoming / "sub").rename(incoming / "moved")
                (incoming / "sub").symlink_to(outside)
            sink.write(b"not the planned bytes")

    with pytest.raises((DigestMismatchError, UnsafePathError)):
        engine._fetch_one(Swapping(_request()), Swapping(_request()).plan().files[1],
                          dest / ".weightship" / "incoming" / "sub" / "b.json.incomplete",
                          engine.NullProgress(), root=dest)
    assert (outside / "b.json.incomplete").read_bytes() == b"someone else's file"
