"""Loading torrent metadata safely: load limits, and every file name through the path sanitizer.

A ``.torrent`` file or the metadata a peer sends for a magnet link is input from strangers.
It is refused, with :class:`~weightship.errors.TorrentMetadataError`, when it is over
libtorrent's load limits (buffer size, bdecode depth and token count, piece count), and with
:class:`~weightship.errors.UnsafePathError` when any file name is unsafe. Names are checked in
the raw info dict, not in what libtorrent makes of it: libtorrent quietly rewrites names such as
``../x`` or ``C:x``, and a torrent whose names had to be repaired is rejected, not renamed
(``weightship.paths``). All of this happens before the torrent is added to a session, so an
unsafe torrent never writes a byte.

The info dict may carry ``x-weightship-sha256`` (``{path: hex sha256}``, written by
``weightship torrent create``). It is inside the info dict, so the infohash covers it: the
digests are exactly as trustworthy as the piece hashes, and give the engine a sha256 per file.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import libtorrent as lt

from weightship.errors import TorrentMetadataError, UnsafePathError
from weightship.paths import safe_relpath
from weightship.torrent.settings import MAX_METADATA_BYTES

SHA256_KEY = b"x-weightship-sha256"
MAX_PIECES = 1 << 18  # 262,144: a 14.5 GB model gets ~900 pieces from piece_size_for()
MAX_DECODE_DEPTH = 32  # v2 file trees nest one level per path component
MAX_DECODE_TOKENS = 1_000_000
LOAD_LIMITS = {"max_buffer_size": MAX_METADATA_BYTES, "max_pieces": MAX_PIECES,
               "max_decode_depth": MAX_DECODE_DEPTH, "max_decode_tokens": MAX_DECODE_TOKENS}
_SHA256_HEX = re.compile(rb"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TorrentFile:
    """One file of a torrent: libtorrent's index, and its checked path without the root name."""

    index: int
    path: str
    size: int


@dataclass
class TorrentMeta:
    """A checked torrent: its libtorrent object, infohashes, files and published digests."""

    info: lt.torrent_info
    name: str
    files: list[TorrentFile]
    sha256: dict[str, str] = field(default_factory=dict)
    pad_files: list[int] = field(default_factory=list)

    @property
    def infohash(self) -> str:
        """The v1 infohash in hex when there is one (what most clients show), else v2."""
        hashes = self.info.info_hashes()
        return str(hashes.v1) if hashes.has_v1() else str(hashes.v2)

    def by_path(self) -> dict[str, TorrentFile]:
        """The files keyed by their path."""
        return {f.path: f for f in self.files}

    def torrent_bytes(self) -> bytes:
        """A ``.torrent`` file for this metadata (for seeding after a magnet download)."""
        with warnings.catch_warnings():  # the binding has no other way to re-serialise a torrent
            warnings.simplefilter("ignore", DeprecationWarning)
            data: bytes = lt.bencode(lt.create_torrent(self.info).generate())
        return data


def load_torrent_bytes(data: bytes, origin: str) -> TorrentMeta:
    """Parse a ``.torrent`` file's bytes within :data:`LOAD_LIMITS` and check it."""
    if len(data) > MAX_METADATA_BYTES:
        raise TorrentMetadataError(origin, f"{len(data):,} bytes is over the "
                                   f"{MAX_METADATA_BYTES:,}-byte limit for torrent files")
    try:
        limits: Any = dict(LOAD_LIMITS)  # the binding takes a dict of load_torrent_limits fields
        info = lt.torrent_info(data, limits)
    except RuntimeError as e:  # libtorrent reports every parse and limit failure this way
        raise TorrentMetadataError(origin, f"refused by the torrent parser: {e}") from None
    return check_torrent(info, origin)


def check_torrent(info: lt.torrent_info, origin: str) -> TorrentMeta:
    """Check a parsed torrent (from a file or from peers) and list its files.

    Raises :class:`TorrentMetadataError` for limits and malformed fields, and
    :class:`UnsafePathError` for any unsafe, duplicate or symlinked file name.
    """
    raw = info.info_section()
    if len(raw) > MAX_METADATA_BYTES:
        raise TorrentMetadataError(origin, f"info dict of {len(raw):,} bytes is over the limit")
    if info.num_pieces() > MAX_PIECES:
        raise TorrentMetadataError(origin, f"{info.num_pieces():,} pieces is over the "
                                   f"{MAX_PIECES:,}-piece limit")
    d: Any = lt.bdecode(raw)
    if not isinstance(d, dict):
        raise TorrentMetadataError(origin, "the info dict is not a dictionary")
    name, raw_files = _raw_files(d, origin)
    fs = info.layout()
    real = [(rel, attr) for rel, attr in raw_files if "p" not in attr]
    indices = [i for i in range(fs.num_files()) if not fs.file_flags(i) & fs.flag_pad_file]
    if len(real) != len(indices):
        raise TorrentMetadataError(origin, f"the info dict lists {len(real)} files, the parser "
                                   f"{len(indices)}")
    files: list[TorrentFile] = []
    seen: set[str] = set()
    for index, (rel, attr) in zip(indices, real, strict=True):
        if "l" in attr or fs.file_flags(index) & fs.flag_symlink:
            raise UnsafePathError(rel, "the torrent marks it as a symlink")
        safe_relpath(rel)
        if rel in seen:
            raise UnsafePathError(rel, "listed twice in the torrent")
        seen.add(rel)
        files.append(TorrentFile(index=index, path=rel, size=fs.file_size(index)))
    pads = [i for i in range(fs.num_files()) if fs.file_flags(i) & fs.flag_pad_file]
    return TorrentMeta(info=info, name=name, files=files, sha256=_digests(d, seen, origin),
                       pad_files=pads)


def _text(value: Any, origin: str, what: str) -> str:
    if not isinstance(value, bytes):
        raise TorrentMetadataError(origin, f"{what} is not a byte string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise TorrentMetadataError(origin, f"{what} is not UTF-8") from None


def _component(value: Any, origin: str) -> str:
    part = _text(value, origin, "a file name")
    if "/" in part or part in ("", ".", ".."):
        # A component with a slash would be joined into a different path than it claims.
        raise UnsafePathError(part, "a torrent path component must be a plain name")
    return part


def _raw_files(d: dict[bytes, Any], origin: str) -> tuple[str, list[tuple[str, str]]]:
    """The root name and each file's (path without the root, attributes), in libtorrent's order."""
    name_value = d.get(b"name.utf-8", d.get(b"name"))
    name = _component(name_value, origin)
    if b"name.utf-8" in d and b"name" in d:
        _component(d[b"name"], origin)  # both spellings must be safe
    if b"files" in d or b"length" in d:  # v1 or hybrid: the v1 list is libtorrent's order
        if b"length" in d:  # single-file torrent: the name is the file
            safe_relpath(name)
            return name, [(name, _attr(d))]
        entries = d[b"files"]
        if not isinstance(entries, list):
            raise TorrentMetadataError(origin, "files is not a list")
        out = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise TorrentMetadataError(origin, "a files entry is not a dictionary")
            for key in (b"path", b"path.utf-8"):
                if key in entry and (not isinstance(entry[key], list) or not entry[key]):
                    raise TorrentMetadataError(origin, "a file path is not a non-empty list")
            parts = entry.get(b"path.utf-8", entry.get(b"path"))
            if parts is None:
                raise TorrentMetadataError(origin, "a file has no path")
            if b"path.utf-8" in entry and b"path" in entry:
                for p in entry[b"path"]:
                    _component(p, origin)  # both spellings must be safe
            if b"symlink path" in entry:
                raise UnsafePathError("/".join(map(repr, parts)), "the torrent marks it as a symlink")
            out.append(("/".join(_component(p, origin) for p in parts), _attr(entry)))
        if b"file tree" in d:
            _walk_tree(d[b"file tree"], [], origin, [], 0)  # a hybrid's v2 names must be safe too
        return name, out
    if b"file tree" in d:  # v2 only
        leaves: list[tuple[str, str]] = []
        _walk_tree(d[b"file tree"], [], origin, leaves, 0)
        return name, leaves  # a v2 single-file torrent's tree holds just the name
    raise TorrentMetadataError(origin, "the info dict lists no files")


def _walk_tree(tree: Any, prefix: list[str], origin: str, out: list[tuple[str, str]], depth: int) -> None:
    if not isinstance(tree, dict) or depth > MAX_DECODE_DEPTH:
        raise TorrentMetadataError(origin, "malformed file tree")
    for key in sorted(tree):
        node = tree[key]
        if key == b"":
            if not isinstance(node, dict):
                raise TorrentMetadataError(origin, "malformed file tree leaf")
            if b"symlink path" in node or "l" in _attr(node):
                raise UnsafePathError("/".join(prefix), "the torrent marks it as a symlink")
            out.append(("/".join(prefix), _attr(node)))
        else:
            _walk_tree(node, [*prefix, _component(key, origin)], origin, out, depth + 1)


def _attr(entry: dict[bytes, Any]) -> str:
    value = entry.get(b"attr", b"")
    return value.decode("ascii", "replace") if isinstance(value, bytes) else ""


def _digests(d: dict[bytes, Any], names: set[str], origin: str) -> dict[str, str]:
    table = d.get(SHA256_KEY)
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise TorrentMetadataError(origin, f"{SHA256_KEY.decode()} is not a dictionary")
    out = {}
    for key, value in table.items():
        path = _text(key, origin, "a digest's path")
        if path not in names:
            raise TorrentMetadataError(origin, f"{SHA256_KEY.decode()} names {path!r}, which the "
                                       "torrent does not hold")
        if not isinstance(value, bytes) or not _SHA256_HEX.match(value):
            raise TorrentMetadataError(origin, f"the sha256 of {path!r} is not 64 hex digits")
        out[path] = value.decode()
    return out
