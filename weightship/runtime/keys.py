"""API keys: the hashed key file, checking a presented key against it, and reloading it.

The key file (``weightship serve --api-key-file``) comes in two forms:

- **hashed** (what ``weightship instance keys`` writes): one JSON document holding no secret::

    {"format": "weightship-api-keys/1", "instance": "acme",
     "keys": [{"id": "key_5f2c9a1b7d3e4f60", "name": "ci", "created": "2026-05-01T10:00:00Z",
               "hash": "sha256:9f86d081…", "scopes": ["inference"]}]}

  ``hash`` is the SHA-256 of the key's UTF-8 text (``printf %s KEY | sha256sum``). A key is
  ``wsk_`` and 43 URL-safe characters from :func:`secrets.token_urlsafe` (256 random bits). A
  slow password hash (scrypt, PBKDF2, argon2) protects secrets people choose, which can be
  guessed; a 256-bit random key cannot be guessed, so SHA-256 alone makes the file worthless
  to whoever reads it, and costs every request microseconds, not the tens of milliseconds a
  KDF tuned to resist guessing would. No salt is needed for the same reason: no two keys and
  no dictionary share an input. ``scopes``: ``inference`` (the API) and ``usage`` (the
  operator's ``GET /v1/usage``); a key has only the scopes it was given.
- **plain** (the older form, still read): one key per line, ``#`` comments. Each key gets the
  id ``plain-`` + the first 16 hex digits of its SHA-256, and every scope.

A key is checked by hashing what the client presents and comparing that digest with every
stored digest in constant time (:func:`hmac.compare_digest`, all of them, always), so neither
the answer's timing nor its content says which key came close. A key is refused by any other
instance because its hash is in one instance's file only.

:class:`KeyRing` re-reads the file when it changes (checked every second by :meth:`KeyRing.watch`),
so a revoked key is refused within seconds and nobody restarts anything; requests in flight
keep going. A file that cannot be read or parsed on reload leaves the last good keys in place
(and says so in the log): a half-written file must not lock every client out. So does a file
that changed form: a hashed file that comes back empty, or as anything but JSON, is a file
being rewritten in place (or cut short), never "no keys"; nor may a plain file lose its last
key on reload (it could not start that way).

:attr:`KeyRing.digest` is the SHA-256 of the file the keys were loaded from: a server reports it
(``GET /v1/keys``) so that ``instance keys`` can tell when every server has the new keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from weightship.errors import KeyFileError

log = logging.getLogger(__name__)

FORMAT = "weightship-api-keys/1"
KEY_PREFIX = "wsk_"
SCOPES = ("inference", "usage")


def new_key() -> str:
    """A fresh API key: ``wsk_`` and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    """A fresh public key id (what logs, metrics and usage records name a key by)."""
    return "key_" + secrets.token_hex(8)


def key_hash(key: str | bytes) -> str:
    """The stored form of ``key``: ``sha256:`` and the hex digest of its bytes."""
    raw = key.encode() if isinstance(key, str) else key
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class KeyEntry:
    """One key as stored: never the key itself."""

    id: str
    name: str
    created: str
    hash: str  # "sha256:<hex>"
    scopes: tuple[str, ...] = ("inference",)

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.hash.removeprefix("sha256:"))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created": self.created, "hash": self.hash,
                "scopes": list(self.scopes)}

    def public(self) -> dict[str, Any]:
        """What ``keys list`` shows: everything but the hash."""
        return {"id": self.id, "name": self.name, "created": self.created,
                "scopes": list(self.scopes)}


@dataclass
class KeyFile:
    """A hashed key file: the keys of one instance."""

    instance: str = ""
    keys: list[KeyEntry] = field(default_factory=list)

    def to_text(self) -> str:
        return json.dumps({"format": FORMAT, "instance": self.instance,
                           "keys": [k.to_json() for k in self.keys]}, indent=2) + "\n"

    def by_name(self, name: str) -> KeyEntry | None:
        return next((k for k in self.keys if k.name == name), None)

    def add(self, name: str, scopes: Iterable[str] = ("inference",)) -> tuple[KeyEntry, str]:
        """Add a new key called ``name``; returns its entry and the key (shown once)."""
        key = new_key()
        entry = KeyEntry(new_key_id(), name, utc_now(), key_hash(key), tuple(scopes))
        self.keys.append(entry)
        return entry, key

    def remove(self, name: str) -> KeyEntry | None:
        entry = self.by_name(name)
        if entry is not None:
            self.keys.remove(entry)
        return entry


def _entry(raw: Any, where: str) -> KeyEntry:
    if not isinstance(raw, dict):
        raise KeyFileError(where, "each key must be an object")
    missing = [f for f in ("id", "name", "hash") if not isinstance(raw.get(f), str)]
    if missing:
        raise KeyFileError(where, f"a key lacks {', '.join(missing)}")
    digest = raw["hash"].removeprefix("sha256:")
    if not raw["hash"].startswith("sha256:") or len(digest) != 64 or not all(
            c in "0123456789abcdef" for c in digest):
        raise KeyFileError(where, f"key {raw['id']!r}: hash must be sha256: and 64 lowercase hex digits")
    scopes = raw.get("scopes", ["inference"])
    if not isinstance(scopes, list) or not set(scopes) <= set(SCOPES):
        raise KeyFileError(where, f"key {raw['id']!r}: scopes must be a list of {', '.join(SCOPES)}")
    return KeyEntry(raw["id"], raw["name"], str(raw.get("created", "")), raw["hash"], tuple(scopes))


def parse_hashed(text: str, where: str = "key file") -> KeyFile:
    """A hashed key file's text as a :class:`KeyFile` (raises :class:`KeyFileError`)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise KeyFileError(where, f"not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KeyFileError(where, f"not a {FORMAT} document")
    if not isinstance(data.get("keys"), list):
        raise KeyFileError(where, "keys must be a list")
    entries = [_entry(k, where) for k in data["keys"]]
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise KeyFileError(where, "two keys share an id")
    return KeyFile(str(data.get("instance") or ""), entries)


HASHED, PLAIN = "hashed", "plain"


def form_of(text: str) -> str:
    """Which form of key file ``text`` is: :data:`HASHED` (JSON) or :data:`PLAIN`."""
    return HASHED if text.lstrip().startswith("{") else PLAIN


def parse(text: str, where: str = "key file") -> list[KeyEntry]:
    """The keys of either form of key file (see the module docstring)."""
    if form_of(text) == HASHED:
        return parse_hashed(text, where).keys
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if key and not key.startswith("#"):
            digest = key_hash(key)
            entries.append(KeyEntry("plain-" + digest[7:23], f"line-{number}", "", digest, SCOPES))
    return entries


class KeyRing:
    """The keys a server accepts: from its key file, re-read when the file changes, or a fixed
    set (:meth:`of_keys`)."""

    def __init__(self, path: Path | None, entries: Iterable[KeyEntry] = ()) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: tuple[KeyEntry, ...] = tuple(entries)
        self._form: str | None = None  # of the file loaded last (HASHED or PLAIN)
        self._digest = ""
        self._failed: str | None = None
        self._stop = threading.Event()
        if path is not None:
            try:
                self._load()
            except (OSError, UnicodeDecodeError) as e:
                raise KeyFileError(str(path), f"cannot read it: {getattr(e, 'strerror', None) or e}"
                                   ) from None

    @classmethod
    def of_keys(cls, keys: Iterable[str]) -> KeyRing:
        """A fixed ring of plain keys (never reloaded)."""
        return cls(None, parse("\n".join(keys)))

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        return self._entries

    @property
    def form(self) -> str | None:
        """:data:`HASHED` or :data:`PLAIN`: the form of the file loaded (``None``: no file)."""
        return self._form

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the key file the keys were loaded from ("" for a fixed ring)."""
        return self._digest

    def _signature(self) -> tuple[int, int, int]:
        assert self.path is not None
        st = os.stat(self.path)  # follows links: a Kubernetes Secret volume swaps ..data
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self) -> None:
        assert self.path is not None
        stamp = self._signature()
        raw = self.path.read_bytes()
        text, where = raw.decode("utf-8"), str(self.path)
        form = form_of(text)
        if self._form == HASHED and form != HASHED:
            raise KeyFileError(where, "was a hashed key file and now is not (empty, or being "
                                      "rewritten in place?)")
        entries = tuple(parse(text, where))
        if self._form == PLAIN and form == PLAIN and not entries:
            raise KeyFileError(where, "holds no keys (a plain key file needs one)")
        self._entries = entries  # one assignment: readers see the old keys or the new
        self._stamp, self._form = stamp, form
        self._digest = key_hash(raw)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; whether the keys were replaced."""
        if self.path is None:
            return False
        try:
            if self._signature() == self._stamp:
                return False
            self._load()
        except (OSError, UnicodeDecodeError, KeyFileError) as e:
            message = str(e) if isinstance(e, KeyFileError) else f"{self.path}: {e}"
            if message != self._failed:
                log.error("keeping the last good API keys: cannot reload %s", message)
                self._failed = message
            return False
        self._failed = None
        log.info("API keys reloaded from %s: %d key(s)", self.path, len(self._entries))
        return True

    def watch(self, interval: float = 1.0) -> threading.Thread:
        """Check the file every ``interval`` seconds on a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(interval):
                self.reload_if_changed()

        thread = threading.Thread(target=loop, name="weightship-keys", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def authenticate_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> KeyEntry | None:
        """The entry of the key a request presents: ``Authorization: Bearer KEY``, or
        ``X-Weightship-Key: KEY`` (for proxies that consume ``Authorization`` themselves, as
        the Kubernetes API server's pod proxy does)."""
        for k, v in headers:
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                return self.authenticate(v[7:].strip())
            if k == b"x-weightship-key":
                return self.authenticate(v.strip())
        return None

    def authenticate(self, presented: bytes) -> KeyEntry | None:
        """The entry whose hash matches ``presented``, compared with every entry in constant
        time; ``None`` when none does."""
        digest = hashlib.sha256(presented).digest()
        found: KeyEntry | None = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found


def load_key_file(path: Path) -> KeyRing:
    """The ring of ``serve --api-key-file``: a plain file must hold a key; a hashed file may
    hold none yet (an instance before its first ``keys add``: every request is refused)."""
    ring = KeyRing(path)
    if not ring.entries and ring.form == PLAIN:
        raise KeyFileError(str(path), "holds no keys")
    return ring
