"""The ranged downloader on its own: resume journal, validators, retries, inline hashing."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightship.errors import DigestMismatchError, FetchError, TransientFetchError
from weightship.fetch.download import download, journal_path
from weightship.fetch.options import TransferOptions
from weightship.fetch.remote import RangeReader, RemoteStat

DATA = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes
SHA = hashlib.sha256(DATA).hexdigest()
OPTS = TransferOptions(connections=3, chunk_size=64 << 10, backoff=0.001, backoff_max=0.002, retries=3)


class MemoryRemote(RangeReader):
    """Serves ``data`` from memory, counting bytes, failing on request."""

    def __init__(self, data: bytes = DATA, validator: str | None = '"v1"',
                 fail_at: set[int] | None = None, error: type[Exception] = TransientFetchError) -> None:
        self.data, self.validator = data, validator
        self.fail_at = set(fail_at or ())  # range starts whose first read fails (once each)
        self.error = error
        self.served = 0
        self.lock = threading.Lock()

    def stat(self) -> RemoteStat:
        return RemoteStat(size=len(self.data), validator=self.validator)

    def read_range(self, start: int, end: int, validator: str | None, into: memoryview) -> Iterator[memoryview]:
        assert len(into) == end - start
        with self.lock:
            fail = start in self.fail_at
            self.fail_at.discard(start)
        if fail:
            into[:100] = self.data[start:start + 100]  # a little progress, then the connection drops
            yield into[:100]
            with self.lock:
                self.served += 100
            raise self.error(f"boom at {start}")
        for i in range(start, end, 16 << 10):
            n = min(end, i + (16 << 10)) - i
            into[i - start:i - start + n] = self.data[i:i + n]
            with self.lock:
                self.served += n
            yield into[i - start:i - start + n]


def test_download_hashes_inline_and_removes_the_journal(tmp_path: Path) -> None:
    remote = MemoryRemote()
    staging = tmp_path / "f.incomplete"
    result = download(remote, staging, expected_size=len(DATA), sha256=SHA, opts=OPTS)
    assert result.sha256 == SHA and staging.read_bytes() == DATA
    assert remote.served == len(DATA) and not journal_path(staging).exists()


def test_resume_skips_chunks_the_journal_lists(tmp_path: Path) -> None:
    staging = tmp_path / "f.incomplete"
    with pytest.raises(FetchError):  # a permanent failure at chunk 5 stops the first run
        download(MemoryRemote(fail_at={5 * OPTS.chunk_size}, error=FetchError), staging,
                 expected_size=len(DATA), sha256=SHA, opts=OPTS)
    journal = json.loads(journal_path(staging).read_text())
    assert journal["done"] and 5 not in journal["done"]
    again = MemoryRemote()
    result = download(again, staging, expected_size=len(DATA), sha256=SHA, opts=OPTS)
    assert result.sha256 == SHA and staging.read_bytes() == DATA
    assert result.resumed_bytes == len(journal["done"]) * OPTS.chunk_size
    assert again.served == len(DATA) - result.resumed_bytes


def test_a_changed_validator_throws_the_partial_away(tmp_path: Path) -> None:
    staging = tmp_path / "f.incomplete"
    with pytest.raises(FetchError):
        download(MemoryRemote(fail_at={3 * OPTS.chunk_size}, error=FetchError), staging,
                 expected_size=len(DATA), sha256=SHA, opts=OPTS)
    changed = MemoryRemote(validator='"v2"')
    result = download(changed, staging, expected_size=len(DATA), sha256=SHA, opts=OPTS)
    assert result.resumed_bytes == 0 and changed.served == len(DATA) and result.sha256 == SHA


def test_a_changed_size_is_an_integrity_failure(tmp_path: Path) -> None:
    with pytest.raises(DigestMismatchError, match="size"):
        download(MemoryRemote(DATA + b"x"), tmp_path / "f", expected_size=len(DATA), sha256=SHA, opts=OPTS)


def test_a_garbled_journal_means_starting_over(tmp_path: Path) -> None:
    staging = tmp_path / "f.incomplete"
    staging.write_bytes(b"\0" * len(DATA))
    journal_path(staging).write_text("{not json")
    remote = MemoryRemote()
    assert download(remote, staging, expected_size=len(DATA), sha256=SHA, opts=OPTS).sha256 == SHA
    assert remote.served == len(DATA)


def test_a_lying_journal_is_caught_by_the_digest(tmp_path: Path) -> None:
    staging = tmp_path / "f.incomplete"
    staging.write_bytes(b"\0" * len(DATA))  # "done" chunks that hold zeros
    journal_path(staging).write_text(json.dumps({"size": len(DATA), "chunk_size": OPTS.chunk_size,
                                                 "validator": '"v1"', "digest": SHA, "done": [0, 1]}))
    with pytest.raises(DigestMismatchError):
        download(MemoryRemote(), staging, expected_size=len(DATA), sha256=SHA, opts=OPTS)
    assert not staging.exists() and not journal_path(staging).exists()
    assert download(MemoryRemote(), staging, expected_size=len(DATA), sha256=SHA, opts=OPTS).sha256 == SHA


def test_retryable_errors_are_retried_from_the_last_byte(tmp_path: Path) -> None:
    starts = {i * OPTS.chunk_size for i in range(0, 16, 3)}
    remote = MemoryRemote(fail_at=starts)
    result = download(remote, tmp_path / "f", expected_size=len(DATA), sha256=SHA, opts=OPTS)
    assert result.sha256 == SHA
    assert remote.served == len(DATA)  # each retry continues after the bytes it already had


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    remote = MemoryRemote(fail_at={0}, error=FetchError)
    with pytest.raises(FetchError, match="boom at 0"):
        download(remote, tmp_path / "f", expected_size=len(DATA), sha256=SHA,
                 opts=TransferOptions(connections=1, chunk_size=64 << 10))
    assert remote.served < 200


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 300_000), conns=st.integers(1, 5),
       chunk=st.one_of(st.integers(4096, 70_000), st.integers(1, 17).map(lambda k: k * 4096)),  # O_DIRECT
       fails=st.sets(st.integers(0, 80), max_size=6), git=st.booleans())
def test_any_chunking_gives_the_same_digests(tmp_path_factory: pytest.TempPathFactory, size: int,
                                             chunk: int, conns: int, fails: set[int], git: bool) -> None:
    data = hashlib.shake_256(str(size).encode()).digest(size)
    blob = hashlib.sha1(b"blob %d\0" % size + data).hexdigest()
    remote = MemoryRemote(data, fail_at={i * chunk for i in fails})
    staging = tmp_path_factory.mktemp("p") / "f.incomplete"
    opts = TransferOptions(connections=conns, chunk_size=chunk, backoff=0.0001, backoff_max=0.0001)
    result = download(remote, staging, expected_size=size, sha256=hashlib.sha256(data).hexdigest(),
                      git_sha1=blob if git else None, opts=opts)
    assert staging.read_bytes() == data
    assert result.git_sha1 == (blob if git else None)


def _cached_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (util-linux's fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def test_direct_io_bypasses_the_page_cache(tmp_path: Path) -> None:
    direct, buffered = tmp_path / "direct", tmp_path / "buffered"
    download(MemoryRemote(), direct, expected_size=len(DATA), sha256=SHA, opts=OPTS)
    download(MemoryRemote(), buffered, expected_size=len(DATA), sha256=SHA,
             opts=dataclasses.replace(OPTS, direct_io=False))
    assert _cached_bytes(direct) <= 4096  # only the 4-byte tail went through the cache
    assert _cached_bytes(buffered) >= len(DATA)
    assert direct.read_bytes() == DATA == buffered.read_bytes()


def test_refused_direct_writes_fall_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    refused = []

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:  # a device wanting a larger alignment
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    result = download(MemoryRemote(), tmp_path / "f", expected_size=len(DATA), sha256=SHA, opts=OPTS)
    assert result.sha256 == SHA and (tmp_path / "f").read_bytes() == DATA
    assert len(refused) == 1  # the first refusal turned O_DIRECT off for the rest of the file


class RangeLog(MemoryRemote):
    """A :class:`MemoryRemote` that records the range of every read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.ranges: list[tuple[int, int]] = []

    def read_range(self, start: int, end: int, validator: str | None, into: memoryview) -> Iterator[memoryview]:
        with self.lock:
            self.ranges.append((start, end))
        yield from super().read_range(start, end, validator, into)


def test_a_file_of_few_chunks_gives_every_connection_a_share(tmp_path: Path) -> None:
    """A 20 MiB file read by 4 connections with 16 MiB chunks would leave two of them idle (16 + 4
    MiB): it is cut into 4 ranges of whole MiB instead. A chunk size the user chose is kept, and so
    is a resumed download's, whatever it was."""
    data = hashlib.shake_256(b"twenty").digest((20 << 20) + 3)
    sha = hashlib.sha256(data).hexdigest()
    opts = TransferOptions(connections=4, chunk_size=16 << 20)
    remote = RangeLog(data)
    assert download(remote, tmp_path / "a", expected_size=len(data), sha256=sha, opts=opts).sha256 == sha
    assert sorted(remote.ranges) == [(0, 6 << 20), (6 << 20, 12 << 20), (12 << 20, 18 << 20), (18 << 20, len(data))]
    assert (tmp_path / "a").read_bytes() == data

    kept = RangeLog(data)
    download(kept, tmp_path / "b", expected_size=len(data), sha256=sha, opts=dataclasses.replace(opts, split=False))
    assert sorted(kept.ranges) == [(0, 16 << 20), (16 << 20, len(data))]

    # a partial cut in 16 MiB chunks, its first chunk done, is resumed in 16 MiB chunks
    staging = tmp_path / "c"
    staging.write_bytes(data[:16 << 20])
    journal_path(staging).write_text(json.dumps({"version": 1, "size": len(data), "chunk_size": 16 << 20,
                                                 "validator": '"v1"', "digest": sha, "done": [0]}))
    resumed = RangeLog(data)
    result = download(resumed, staging, expected_size=len(data), sha256=sha, opts=opts)
    assert resumed.ranges == [(16 << 20, len(data))] and result.resumed_bytes == 16 << 20


def test_the_command_lines_chunk_size_is_never_cut() -> None:
    from weightship.fetch.options import build_options

    assert build_options().transfer.chunk_for(20 << 20) == 5 << 20
    assert build_options(chunk_size=16 << 20).transfer.chunk_for(20 << 20) == 16 << 20
    assert build_options(peers=["127.0.0.1:1"]).transfer.chunk_for(9 << 20) == 4 << 20  # the swarm's
    assert build_options().transfer.chunk_for(1 << 30) == 16 << 20 and build_options().transfer.chunk_for(1) == 4 << 20
    # and the connections grow only where the user did not say how many
    assert build_options().transfer.max_connections == 16
    assert build_options(connections=4).transfer.max_connections == 0
    assert build_options(peers=["127.0.0.1:1"]).transfer.max_connections == 0


class CappedRemote(MemoryRemote):
    """Serves ``data`` at most ``flow`` bytes a second on each read (a connection held back by
    its round trips), or ``link`` bytes a second over all reads together (a full link), and
    records the most reads it had in flight at once. A link that fell behind its rate (the
    machine busy elsewhere for a moment) catches up on up to :attr:`CATCH_UP` seconds, as a real
    link's queue would drain: a stall on a loaded machine does not look like a slower link."""

    CATCH_UP = 0.5

    def __init__(self, data: bytes, *, flow: float = 0.0, link: float = 0.0) -> None:
        super().__init__(data)
        self.flow, self.link, self.free = flow, link, 0.0
        self.inflight = self.most = 0

    def _pace(self, n: int, started: float, sent: int) -> None:
        now = time.monotonic()
        if self.flow:
            time.sleep(max(0.0, started + (sent + n) / self.flow - now))
        if self.link:
            with self.lock:
                self.free = max(self.free or now, now - self.CATCH_UP) + n / self.link
                wait = self.free - now
            time.sleep(max(0.0, wait))

    def read_range(self, start: int, end: int, validator: str | None, into: memoryview) -> Iterator[memoryview]:
        with self.lock:
            self.inflight += 1
            self.most = max(self.most, self.inflight)
        try:
            started = time.monotonic()
            for i in range(start, end, 64 << 10):
                n = min(end, i + (64 << 10)) - i
                self._pace(n, started, i - start)
                into[i - start:i - start + n] = self.data[i:i + n]
                yield into[i - start:i - start + n]
        finally:
            with self.lock:
                self.inflight -= 1


DATA96 = hashlib.shake_256(b"ninety-six").digest(96 << 20)
GROWING = TransferOptions(connections=2, chunk_size=1 << 20, max_connections=8)


def test_connections_grow_while_each_one_is_held_back() -> None:
    """Each connection capped at 8 MB/s: 2 connections bring 16 MB/s, so doubling them pays
    and the download grows past its 2 (96 MiB in about 3.6 s instead of 6.3 s)."""
    remote = CappedRemote(DATA96, flow=8e6)
    with tempfile.TemporaryDirectory() as tmp:
        got = download(remote, Path(tmp) / "f", expected_size=len(DATA96),
                       sha256=hashlib.sha256(DATA96).hexdigest(), opts=GROWING)
    assert got.sha256 == hashlib.sha256(DATA96).hexdigest()
    assert 4 <= remote.most <= 8


def test_connections_stay_where_more_bring_nothing() -> None:
    """The link full at 24 MB/s whatever the connection count: the first doubling brings no
    more, so the download stops growing there (and never opens 8; 96 MiB take about 4.2 s)."""
    remote = CappedRemote(DATA96, link=24e6)
    with tempfile.TemporaryDirectory() as tmp:
        download(remote, Path(tmp) / "f", expected_size=len(DATA96),
                 sha256=hashlib.sha256(DATA96).hexdigest(), opts=GROWING)
    assert remote.most == 4


def test_chunks_an_exchange_stored_itself_are_not_written_again(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A swarm node writes the chunks it fetches ahead from the origin straight to the partial
    file; the download reads them back (to hash the file) and does not write them a second time."""
    from weightship.fetch import chunkfile
    from weightship.fetch.exchange import ChunkExchange, OriginRead

    chunk = OPTS.chunk_size
    ahead = {1, 5, 9}

    class Ahead(ChunkExchange):
        fd = -1

        def begin(self, fd: int, size: int, chunk_: int, done: set[int], stop: threading.Event,
                  origin: OriginRead) -> set[int]:
            self.fd = os.dup(fd)
            for i in ahead:
                os.pwrite(self.fd, DATA[i * chunk:(i + 1) * chunk], i * chunk)
            return set()

        def fetch(self, index: int, into: memoryview, origin: OriginRead, advance: Callable[[int], None]) -> memoryview:
            if index in ahead:
                os.preadv(self.fd, [into], index * chunk)
                return into
            return origin(index, into)

        def stored(self, index: int) -> bool:
            return index in ahead

        def written(self, index: int) -> None:
            pass

        def suspects(self, origin: OriginRead) -> set[int] | None:
            return None

        def end(self, verified: bool) -> None:
            os.close(self.fd)

    offsets: list[int] = []
    real = chunkfile.ChunkFile.write
    monkeypatch.setattr(chunkfile.ChunkFile, "write",
                        lambda self, data, offset: (offsets.append(offset), real(self, data, offset))[1])
    remote = MemoryRemote()
    download(remote, tmp_path / "f", expected_size=len(DATA), sha256=SHA, opts=OPTS, exchange=Ahead())
    assert (tmp_path / "f").read_bytes() == DATA
    chunks = -(-len(DATA) // chunk)
    assert sorted(offsets) == [i * chunk for i in range(chunks) if i not in ahead]
    assert remote.served == len(DATA) - len(ahead) * chunk
