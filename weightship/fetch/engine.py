"""The path every fetch takes: resolve → plan → fetch into staging → check → promote → manifest.

For each file the engine:
1. skips it if the directory's manifest already lists it with the planned digest and the file on
   disk has the planned size;
2. otherwise streams the source's bytes into ``DIR/.weightship/incoming/PATH.incomplete``,
   hashing them as they arrive (no second read). Sources that read byte ranges
   (``Source.reads_ranges``: hf, s3, https) share one budget of requests
   in flight (:mod:`weightship.fetch.many`): a small file whose size and digest the listing gave
   is one GET, checked in memory and written once; a large one goes through the parallel,
   resumable downloader in :mod:`weightship.fetch.download`, with a resume journal beside its
   partial file;
3. checks size and sha256 (or the Hub's git blob sha1) against the plan, which came from a
   trust anchor and was held to the catalog card's pins before a byte was written
   (:mod:`weightship.fetch.pins`) — a mismatch deletes the staging file and moves on to the next
   source;
4. once every file is checked, compares them with the card's pins once more, flushes the staged
   files to disk (one ``syncfs`` for many), renames each into place (atomic; each directory
   fsynced once) and writes the manifest last, atomically. A directory whose manifest lists
   every file is complete and verified.

The whole job holds the directory's lock. (About 420 lines: the steps above, each a named
function of under 45 lines; what a source does, the downloads and the promote's flushes live in
the modules named above.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from weightship.errors import (
    DiskFullError,
    DiskSpaceError,
    FetchError,
    GatedRepoError,
    IntegrityError,
    ManifestError,
)
from weightship.fetch import many, pins
from weightship.fetch.base import FetchPlan, FetchRequest, PlannedFile, Sink, Source
from weightship.fetch.convert import convert_on_fetch
from weightship.fetch.download import download, journal_path
from weightship.fetch.lock import dir_lock
from weightship.fetch.options import TransferOptions
from weightship.fetch.request import build_request as build_request  # re-exported
from weightship.fetch.request import default_dir_name as default_dir_name  # re-exported
from weightship.fetch.request import make_sources
from weightship.fetch.result import _COUNTERS, FetchResult
from weightship.fetch.select import select_files, wanted_by
from weightship.manifest import UNSIGNED_ANCHORS, FileEntry, Manifest, utcnow
from weightship.paths import STATE_DIR, PathsUnder, open_beneath, replace_all_beneath, unlink_beneath
from weightship.progress import NullProgress, Progress
from weightship.verify.digests import hash_files, sha256_and_git_blob

if TYPE_CHECKING:
    from weightship.swarm import SwarmNode

log = logging.getLogger(__name__)

INCOMING = "incoming"
_RESERVE = 64 << 20  # keep this much free beyond the download, for manifests and logs


def _existing_manifest(dest: Path) -> Manifest | None:
    try:
        return Manifest.load(dest)
    except ManifestError:
        return None


def _already_have(files: list[PlannedFile], candidates: dict[str, Path],
                  progress: Progress) -> dict[str, FileEntry]:
    """Entries for the planned files whose candidate path holds exactly the planned bytes.

    Files are hashed again rather than trusted from an old manifest: a re-run of ``fetch`` is
    how a damaged directory is repaired, and hashing is cheap next to downloading. Files the
    anchor knows only by git blob sha1 (the Hub's small files) are checked by that.
    """
    by_path = {f.path: f for f in files}
    sized = {rel: p for rel, p in candidates.items()
             if (by_path[rel].sha256 is not None or by_path[rel].git_sha1 is not None)
             and p.is_file() and p.stat().st_size == by_path[rel].size}
    have = {}
    by_sha = {rel: p for rel, p in sized.items() if by_path[rel].sha256 is not None}
    for rel, result in hash_files(by_sha.items(), progress=progress).items():
        f = by_path[rel]
        if not isinstance(result, OSError) and result == (f.size, f.sha256):
            have[rel] = FileEntry(path=rel, size=result[0], sha256=result[1], anchor=f.anchor)
    for rel, p in sized.items():
        f = by_path[rel]
        if f.sha256 is None and f.git_sha1 is not None:
            size, sha256, git = sha256_and_git_blob(p)
            if git == f.git_sha1:
                have[rel] = FileEntry(path=rel, size=size, sha256=sha256, anchor=f.anchor)
    return have


def _remove_empty_dirs(root: Path) -> None:
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def _check_space(dest: Path, files: list[PlannedFile], staging: dict[str, Path]) -> None:
    partial = sum(staging[f.path].stat().st_size for f in files if staging[f.path].is_file())
    needed = max(0, sum(f.size or 0 for f in files) - partial)
    free = shutil.disk_usage(dest).free
    if needed + _RESERVE > free:
        raise DiskSpaceError(dest, needed, free, _RESERVE)


def _fetch_one(source: Source, f: PlannedFile, staging: Path, progress: Progress,
               result: FetchResult | None = None, root: Path | None = None,
               swarm: SwarmNode | None = None, slots: threading.Semaphore | None = None) -> FileEntry:
    """Fetch ``f`` from ``source`` into ``staging`` and check it; the entry for the manifest.

    ``staging`` is opened without following a symlink below ``root`` (the destination; without
    one, below ``staging``'s directory). With a ``swarm``, a ranged source's chunks come from
    peers where they have them. ``slots`` is the fetch's request budget (:mod:`weightship.fetch.many`).
    """
    if root is None:
        staging.parent.mkdir(parents=True, exist_ok=True)
        root = staging.parent
    if source.reads_ranges:
        return _fetch_ranged(source, f, staging, root, progress, result, swarm, slots)
    return _fetch_streamed(source, f, staging, root, progress, result)


def _fetch_ranged(source: Source, f: PlannedFile, staging: Path, root: Path, progress: Progress,
                  result: FetchResult | None, swarm: SwarmNode | None,
                  slots: threading.Semaphore | None) -> FileEntry:
    """A small file the listing described in one GET; any other by the parallel downloader."""
    exchange = swarm.exchange_for(f, staging, root) if swarm is not None else None
    opts, reader = source.request.options.transfer, source.remote(f)
    done = None
    if exchange is None and many.is_small(f, opts):  # one GET, no HEAD: the listing said enough
        done = many.fetch_small(reader, f, staging, root, opts, progress, slots)
    if done is None:
        done = download(reader, staging, expected_size=f.size, sha256=f.sha256,
                        git_sha1=f.git_sha1, opts=opts, progress=progress,
                        path=f.path, root=root, exchange=exchange, slots=slots)
    assert done.sha256 is not None, f.path
    if result is not None:  # with an exchange, the swarm counts where the bytes came from
        result.add(f.path, done.fetched_bytes, done.resumed_bytes, from_origin=exchange is None)
    return FileEntry(path=f.path, size=done.size, sha256=done.sha256,
                     source=source.uri_for(f), anchor=f.anchor)


def _fetch_streamed(source: Source, f: PlannedFile, staging: Path, root: Path, progress: Progress,
                    result: FetchResult | None) -> FileEntry:
    """``f`` as one stream from the source (:meth:`Source.fetch_file`), hashed as it is written."""
    unlink_beneath(root, journal_path(staging))  # a partial from a ranged source is void now
    try:
        fd = open_beneath(root, staging.relative_to(root), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                          create_parents=True)
        with os.fdopen(fd, "wb") as out:
            sink = Sink(out, expected_size=f.size, git_sha1=f.git_sha1 is not None,
                        progress=progress, path=f.path)
            try:
                source.fetch_file(f, sink)
            except OSError as e:
                if isinstance(e, FetchError) or e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise
                raise DiskFullError(staging, e.strerror or str(e)) from None
            out.flush()
            os.fsync(out.fileno())
        f.check(sink.bytes_written, sink.sha256(), sink.git_sha1())
    except BaseException:
        unlink_beneath(root, staging)  # wrong or partial bytes are never kept as-is
        raise
    if result is not None and source.network:  # not bytes a generator or a local store made
        result.add(f.path, sink.bytes_written)
    return FileEntry(path=f.path, size=sink.bytes_written, sha256=sink.sha256(),
                     source=source.uri_for(f), anchor=f.anchor)


def fetch(request: FetchRequest, dest: Path, *, source: str = "auto",
          progress: Progress | None = None, lock_wait: float = 0.0) -> FetchResult:
    """Fetch ``request`` into ``dest``; see the module docstring for the steps."""
    progress = progress or NullProgress()
    sources = make_sources(request, source)
    dest.mkdir(parents=True, exist_ok=True)
    state = dest / STATE_DIR
    swarm: SwarmNode | None = None
    try:
        with dir_lock(state, wait=lock_wait):
            swarm = _open_swarm(request, sources, state)
            result = _fetch_locked(request, dest, sources, progress, swarm)
        if swarm is not None:  # the lock is free: serving reads only what was verified
            swarm.linger(progress)
            _swarm_report(result, swarm)
        return result
    finally:
        if swarm is not None:
            swarm.close()
        for s in sources:
            s.close()


def _open_swarm(request: FetchRequest, sources: list[Source], state: Path) -> SwarmNode | None:
    """The fleet swarm this fetch joins, when its options name peers or a listen address and
    its first source reads byte ranges (a torrent source is its own swarm: it takes the same
    options as BitTorrent peers and listen address)."""
    if not (sources[0].reads_ranges and request.options.peers.wanted):
        return None
    from weightship.swarm import SwarmNode  # only a fetch with peers loads the swarm

    return SwarmNode(request.options.peers, state, request.options.transfer)


def _swarm_report(result: FetchResult, swarm: SwarmNode) -> None:
    for path, t in swarm.traffic().items():
        result.count(path, origin=t.origin, peers=t.peers)
        for peer, n in t.from_peers.items():
            result.from_peers[peer] = result.from_peers.get(peer, 0) + n
    result.uploaded_bytes = swarm.uploaded()
    result.banned_peers = swarm.banned()


def _plan(sources: list[Source], request: FetchRequest) -> FetchPlan:
    """The first plan a source makes, narrowed to the files the user wants, that the card's pins
    allow (checked before any byte is written)."""
    errors: list[FetchError | IntegrityError] = []
    for s in sources:
        try:
            plan = s.plan()
            plan.files = select_files(plan.files, request, s.default_optional)
            pinned = pins.card_pins(request, plan.layout)
            plan.files = pins.bind(plan.files, pinned, f"the {s.kind} source")
            pins.check_complete(plan.files, pinned, wanted_by(request, s.default_optional),
                                f"the {s.kind} source")
            return plan
        except (FetchError, IntegrityError) as e:
            if len(sources) > 1:
                log.warning("source %s could not plan: %s", s.kind, e)
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]  # the source's own error, with its type and hint
    contradicted = [err for err in errors if isinstance(err, IntegrityError)]
    if contradicted:  # a source contradicted the card: that says more than the others' failures
        raise contradicted[0]
    raise FetchError("no source could list the model: " + "; ".join(
        f"{s.kind}: {e}" for s, e in zip(sources, errors, strict=True)),
        hint=next((e.hint for e in errors if e.hint), None))


def _fetch_with_failover(sources: list[Source], f: PlannedFile, staging: Path,
                         progress: Progress, result: FetchResult | None = None,
                         dead: dict[Source, Exception] | None = None,
                         root: Path | None = None, swarm: SwarmNode | None = None,
                         slots: threading.Semaphore | None = None) -> FileEntry:
    """Fetch ``f`` from the first source that delivers the right bytes.

    A source that failed for the whole repository (a gated Hub repo) goes into ``dead``, shared
    by the fetch's files: it is said once and not asked again for any other file.
    """
    dead = {} if dead is None else dead
    last_error: Exception | None = None
    for s in sources:
        if s in dead:
            last_error = dead[s]
            continue
        try:
            return _fetch_one(s, f, staging, progress, result, root, swarm, slots)
        except DiskFullError:
            raise  # another source cannot make room
        except GatedRepoError as e:
            with _COUNTERS:
                first = s not in dead
                last_error = dead.setdefault(s, e)
            if first and len(sources) > 1:
                log.warning("source %s: %s; trying the others", s.kind, e)
        except (FetchError, IntegrityError) as e:
            log.warning("%s from %s failed: %s", f.path, s.kind, e)
            progress.note(f"{f.path}: {s.kind} failed: {e}")
            last_error = e
    progress.file_end(f.path, "failed")
    assert last_error is not None
    raise last_error


def _fetch_locked(request: FetchRequest, dest: Path, sources: list[Source],
                  progress: Progress, swarm: SwarmNode | None = None) -> FetchResult:
    plan = _plan(sources, request)
    pinned = pins.card_pins(request, plan.layout)
    under = PathsUnder(dest)
    targets = {f.path: under.resolve(f.path) for f in plan.files}  # reject bad names first
    old = _existing_manifest(dest)
    result = FetchResult(directory=dest, manifest=Manifest(
        name=plan.name, files=[], layout=plan.layout, source=plan.source,
        created_at=old.created_at if old else utcnow()))
    incoming = dest / STATE_DIR / INCOMING
    staging = {f.path: incoming / (f.path + ".incomplete") for f in plan.files}
    present = _already_have(plan.files, targets, progress)
    # Files checked by an earlier run that stopped before promoting: promote, don't re-fetch.
    # A staging file with a journal is a partial download: the downloader resumes it.
    staged = _already_have([f for f in plan.files if f.path not in present],
                           {rel: staging[rel] for rel in targets if rel not in present
                            and not journal_path(staging[rel]).exists()}, progress)
    todo = [f for f in plan.files if f.path not in present and f.path not in staged]
    _check_space(dest, todo, staging)
    progress.begin("fetch", total_bytes=sum(f.size or 0 for f in todo), files=len(todo))
    if todo:
        staged |= _fetch_bulk(sources[0], todo, staging, dest, incoming, result, progress)
    _keep(plan.files, present, staged, old, result, sources[0], progress)
    if swarm is not None:  # what this node already has, verified, it serves from the start
        for f in plan.files:
            if f.path in present or f.path in staged:
                swarm.share_verified(f, targets[f.path] if f.path in present else staging[f.path], dest)
    rest = [f for f in plan.files if f.path not in present and f.path not in staged]
    opts = request.options.transfer if sources[0].reads_ranges else None
    entries = {e.path: e for e in result.manifest.files}
    entries.update((e.path, e) for e in _fetch_all(sources, rest, staging, progress, result, opts, dest, swarm))
    result.manifest.files = sorted(entries.values(), key=lambda e: e.path)  # once, not per file
    pins.check_entries(result.manifest.files, pinned)  # once more, before anything is promoted
    _promote(dest, [f.path for f in plan.files if f.path not in present], staging, result)
    convert_on_fetch(request, dest, result.manifest, progress)  # a card's GGUF, made ready to serve
    _remove_empty_dirs(incoming)
    result.manifest.verified_at = utcnow()
    result.manifest.write(dest)
    progress.end()
    return result


def _fetch_bulk(source: Source, todo: list[PlannedFile], staging: dict[str, Path], dest: Path,
                incoming: Path, result: FetchResult, progress: Progress) -> dict[str, FileEntry]:
    """The files a bulk source (a torrent) delivered together, checked; empty for the others."""
    if not source.fetch_many(todo, {f.path: staging[f.path] for f in todo}, root=dest,
                             incoming=incoming, progress=progress):
        return {}
    # A bulk source wrote the staging files itself: they count only if they hash right.
    checked = _already_have(todo, {f.path: staging[f.path] for f in todo}, progress)
    network, resumed = source.bulk_bytes()
    result.downloaded_bytes += network
    result.resumed_bytes += resumed
    for path, (origin, peers) in source.bulk_traffic().items():
        result.count(path, origin=origin, peers=peers)
    return checked


def _keep(files: list[PlannedFile], present: dict[str, FileEntry], staged: dict[str, FileEntry],
          old: Manifest | None, result: FetchResult, source: Source, progress: Progress) -> None:
    """Record the files already in place (``present``) or checked in staging (``staged``)."""
    earlier_of = {e.path: e for e in old.files} if old else {}
    kept: list[FileEntry] = []
    for f in files:
        if f.path in present:
            earlier = earlier_of.get(f.path)
            now = present[f.path]
            # The earlier record stays (its source, its anchor) unless the bytes changed or this
            # fetch vouches for them better: a trust anchor where there was only a server's word.
            weaker = earlier is not None and earlier.anchor in UNSIGNED_ANCHORS and now.anchor not in UNSIGNED_ANCHORS
            kept.append(earlier if earlier and earlier.sha256 == f.sha256 and not weaker else now)
            result.skipped.append(f.path)
            progress.file_end(f.path, "present")
        elif f.path in staged:
            kept.append(dataclasses.replace(staged[f.path], source=source.uri_for(f)))
            progress.file_end(f.path, "staged")
    result.manifest.upsert(*kept)  # once: a thousand files kept are not a thousand sorts


def _promote(dest: Path, paths: list[str], staging: dict[str, Path], result: FetchResult) -> None:
    """Move the checked staging files into place, durably, before the manifest names them."""
    many.make_durable(dest, [staging[p] for p in paths])  # one flush, not one per file
    # By descriptors, refusing a symlink met on the way: the names were checked at plan time,
    # but in a shared cache another writer may have swapped a directory since.
    replace_all_beneath(dest, [(staging[p].relative_to(dest), p) for p in paths])
    result.fetched.extend(paths)
    many.sync_dirs(dest, paths)  # the renames on disk before the manifest says they are done


def _fetch_all(sources: list[Source], files: list[PlannedFile], staging: dict[str, Path],
               progress: Progress, result: FetchResult, opts: TransferOptions | None, root: Path,
               swarm: SwarmNode | None = None) -> list[FileEntry]:
    """Fetch ``files``: one at a time from a source that does not read ranges (``opts`` None),
    else under one request budget (:func:`weightship.fetch.many.run_all`; with a swarm,
    ``parallel_files`` at a time). A failed file does not stop the others (what they fetched
    stays staged for the next run); the first failure is raised once all have ended."""

    dead: dict[Source, Exception] = {}
    slots = threading.Semaphore(many.budget(opts)) if opts is not None and swarm is None else None

    def one(f: PlannedFile) -> FileEntry:
        progress.file_begin(f.path, f.size)
        entry = _fetch_with_failover(sources, f, staging[f.path], progress, result, dead, root, swarm, slots)
        progress.file_end(f.path, "ok")
        return entry

    if opts is None or len(files) <= 1:
        return [one(f) for f in files]
    if slots is not None:
        entries, errors = many.run_all(files, one, opts)
    else:
        entries, errors = _in_parallel(files, one, opts.parallel_files)
    if errors:
        # an integrity failure says more than a transport error; a full disk most of all
        errors.sort(key=lambda e: (not isinstance(e, DiskFullError), not isinstance(e, IntegrityError)))
        raise errors[0]
    return entries


def _in_parallel(files: list[PlannedFile], one: Callable[[PlannedFile], FileEntry],
                 width: int) -> tuple[list[FileEntry], list[BaseException]]:
    entries: list[FileEntry] = []
    errors: list[BaseException] = []
    with ThreadPoolExecutor(min(width, len(files)), thread_name_prefix="ws-file") as pool:
        for fut in [pool.submit(one, f) for f in files]:
            try:
                entries.append(fut.result())
            except Exception as e:
                errors.append(e)
    return entries, errors
