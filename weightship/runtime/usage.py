"""Usage metering: one record per finished API request, per key id, in a JSON-lines log and in
Prometheus counters; and ``GET /v1/usage``, which hands the records to the operator.

A record (one line of the log)::

    {"id": "req_3f…", "time": "2026-05-01T10:00:00.123Z", "key_id": "key_5f2c…",
     "key_name": "ci", "model": "mistral-7b-v0.1", "route": "/v1/chat/completions",
     "status": 200, "prompt_tokens": 12, "completion_tokens": 200,
     "duration_s": 1.532}

``prompt_tokens`` and ``completion_tokens`` are the ``usage`` the client was sent. ``id`` is
unique (128 random bits; the response carries it as ``x-weightship-request-id``), so a reader
that sums records by id never counts one twice, whatever it reads again after a restart.

Durability: the record is written (one ``write(2)`` on an ``O_APPEND`` descriptor) before the
response's last bytes are sent — for a stream, before the chunk that ends its last choice — so
a process that is killed loses none: the bytes are in the kernel. A thread fsyncs the log once
a second, so a machine that crashes loses at most the last second. A line cut short by a crash
is skipped by readers, and the next record starts on a line of its own.

Keys hold scopes (:mod:`weightship.runtime.keys`): the API needs ``inference``, ``/v1/usage``
and ``/v1/keys`` need ``usage``, ``/metrics`` either. ``GET /v1/keys`` answers
``{"digest": "sha256:…", "keys": N}``: the SHA-256 of the key file the server has loaded, so that
``instance keys add/revoke`` can wait until every server has the new file. The key is read from the scope the
:class:`~weightship.runtime.middleware.Guard` authenticated.

Status: what the client was answered; 499 when the client hung up before the answer ended (a
whole answer is then not sent at all); 500 when the server failed, also after a stream's
headers went out (an exception, or a choice that ended with an engine error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter

from weightship.runtime.keys import KeyRing
from weightship.runtime.middleware import (
    KEY_SCOPE,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    reply,
)
from weightship.runtime.protocol import error_body

log = logging.getLogger(__name__)

METERED = frozenset({"/v1/completions", "/v1/chat/completions"})
USAGE_ROUTE = "/v1/usage"
KEYS_ROUTE = "/v1/keys"  # which key file this server has loaded (its digest), for the operator
RUN_SCOPE = "weightship.run"  # scope entry: the engine run whose usage the client is told
READ_BLOCK = 1 << 20
CLIENT_GONE = 499  # the status of a request whose client hung up before its answer ended


class MeteredRun(Protocol):
    """What the Meter reads of the run behind a request (:class:`~weightship.runtime.run.Run`)."""

    unfinished: int  # choices still generating
    disconnected: bool  # the client hung up: nothing more is sent
    failed: bool  # a choice ended with an engine error

    def usage(self) -> dict[str, int]: ...


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class UsageLog:
    """An append-only JSON-lines file, fsynced once a second (see the module docstring)."""

    def __init__(self, path: Path, *, fsync_every: float = 1.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if not _ends_a_line(path):
            os.write(self._fd, b"\n")  # a line cut short by a crash stays a line of its own
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one writer at a time: a record is one write(2)
        self._flusher = threading.Thread(target=self._flush_loop, args=(fsync_every,),
                                         name="weightship-usage-fsync", daemon=True)
        self._flusher.start()

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line (called on the event loop: it never waits for a disk
        flush, only for another append's write)."""
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            while data:
                data = data[os.write(self._fd, data):]
        self._dirty.set()

    def _flush_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self.sync()

    def sync(self) -> None:
        """fsync what was appended. Outside the lock: a slow disk (an fsync can take hundreds
        of milliseconds) must not hold up :meth:`append`, which runs on the event loop."""
        if self._dirty.is_set():
            self._dirty.clear()
            fd = self._fd
            if fd >= 0:
                os.fsync(fd)

    def close(self) -> None:
        """Stop the flusher (waiting for an fsync it is in), flush, close."""
        self._stop.set()
        self._flusher.join()
        self._dirty.set()
        self.sync()
        with self._lock:
            os.close(self._fd)
            self._fd = -1


def _ends_a_line(path: Path) -> bool:
    """Whether ``path`` is empty or ends with a newline (only its last byte is read)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def log_files(directory: Path) -> list[Path]:
    """The usage logs of a directory (each replica of an instance writes its own)."""
    return sorted(p for p in directory.glob("*.jsonl") if p.is_file())


def complete_lines(path: Path) -> Iterator[bytes]:
    """The whole lines of ``path`` in blocks of about 1 MiB (a last line still being written,
    or cut short by a crash, is left out)."""
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(READ_BLOCK):
            block = rest + block
            end = block.rfind(b"\n") + 1
            rest = block[end:]
            if end:
                yield block[:end]


def parse_records(pieces: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    """The records in usage-log text that comes in pieces (a file's blocks, a response's
    chunks, or one whole text), as they complete: one JSON object per line. A last line without
    its newline (still being written, or cut short by a crash) and a line that does not parse
    are skipped. The one parser of usage logs: the server's ``/v1/usage``, and ``instance
    usage`` on every target, read records through it."""
    rest = b""
    for piece in pieces:
        data = rest + (piece.encode() if isinstance(piece, str) else piece)
        end = data.rfind(b"\n") + 1
        rest = data[end:]
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every record in the usage logs of ``directory`` (see :func:`parse_records`)."""
    for path in log_files(directory):
        yield from parse_records(complete_lines(path))


class Meter:
    """The ASGI layer inside the Guard: scope checks, usage records and per-key counters."""

    def __init__(self, app: ASGIApp, *, usage_log: UsageLog | None, registry: CollectorRegistry,
                 model_name: str, keyring: KeyRing | None = None) -> None:
        self.app, self.log, self.model_name = app, usage_log, model_name
        self.keyring = keyring
        self.requests = Counter("weightship_key_requests", "Metered API requests by key id and "
                                "status", ["key_id", "status"], registry=registry)
        self.prompt_tokens = Counter("weightship_key_prompt_tokens", "Prompt tokens of the "
                                     "requests answered 200, by key id", ["key_id"],
                                     registry=registry)
        self.completion_tokens = Counter("weightship_key_completion_tokens", "Completion tokens "
                                         "of the requests answered 200, by key id", ["key_id"],
                                         registry=registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, key = scope["path"], scope.get(KEY_SCOPE)
        if key is not None and not self._allowed(path, key.scopes):
            await reply(send, 403, error_body(f"this key may not use {path}",
                                              type_="permission_error", code="key_scope"))
            return
        if path == USAGE_ROUTE:
            await self._usage(scope, send)
            return
        if path == KEYS_ROUTE:
            await self._keys(scope, send)
            return
        if path not in METERED:
            await self.app(scope, receive, send)
            return
        await self._metered(scope, receive, send)

    @staticmethod
    def _allowed(path: str, scopes: tuple[str, ...]) -> bool:
        if path in (USAGE_ROUTE, KEYS_ROUTE):
            return "usage" in scopes
        if path == "/metrics":
            return True
        return "inference" in scopes

    async def _metered(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.monotonic()
        rid = "req_" + secrets.token_hex(16)
        status: list[int] = []
        recorded = [False]

        async def metered_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-weightship-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and not recorded[0]:
                run: MeteredRun | None = scope.get(RUN_SCOPE)
                if not message.get("more_body") or (run is not None and run.unfinished == 0):
                    recorded[0] = True  # before these bytes go out
                    self._record(scope, rid, status[0] if status else 500, start)
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, metered_send)
        except Exception:
            failed = True  # the app failed, maybe after the headers went out: a 500, never 499
            raise
        finally:
            if not recorded[0]:  # cut short: the app failed, or the client went away
                run: MeteredRun | None = scope.get(RUN_SCOPE)
                if failed:
                    code = 500
                elif run is not None and run.disconnected:
                    code = CLIENT_GONE  # nothing was sent (a whole answer, on a closed connection)
                elif status:
                    code = CLIENT_GONE if status[0] == 200 else status[0]  # a stream left early
                else:
                    code = 500
                self._record(scope, rid, code, start)

    def _record(self, scope: Scope, rid: str, status: int, start: float) -> None:
        key = scope.get(KEY_SCOPE)
        run: MeteredRun | None = scope.get(RUN_SCOPE)
        if status == 200 and run is not None and run.failed:
            status = 500  # a stream that ended with an error event went out as 200 all the same
        usage = run.usage() if run is not None else {}
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        key_id = key.id if key is not None else None
        label = key_id or "-"
        self.requests.labels(label, str(status)).inc()
        if status == 200:
            self.prompt_tokens.labels(label).inc(prompt)
            self.completion_tokens.labels(label).inc(completion)
        if self.log is None:
            return
        record = {"id": rid, "time": _now(), "key_id": key_id,
                  "key_name": key.name if key is not None else None, "model": self.model_name,
                  "route": scope["path"], "status": status, "prompt_tokens": prompt,
                  "completion_tokens": completion,
                  "duration_s": round(time.monotonic() - start, 3)}
        try:
            self.log.append(record)
        except OSError:  # a full disk must not fail the answer; say so loudly
            log.exception("cannot write the usage record %s", rid)

    async def _keys(self, scope: Scope, send: Send) -> None:
        """``GET /v1/keys``: the digest of the key file loaded (see the module docstring)."""
        if scope["method"] != "GET":
            await reply(send, 405, error_body("use GET"))
            return
        ring = self.keyring
        await reply(send, 200, {"digest": ring.digest if ring else "",
                                "keys": len(ring.entries) if ring else 0})

    async def _usage(self, scope: Scope, send: Send) -> None:
        """``GET /v1/usage[?since=ISO&until=ISO]``: the records of every usage log beside this
        server's that finished in [since, until), as JSON lines, streamed from disk (the
        lines are picked on a worker thread, a block at a time)."""
        if scope["method"] != "GET":
            await reply(send, 405, error_body("use GET"))
            return
        if self.log is None:
            await reply(send, 404, error_body("this server keeps no usage log (--usage-log)",
                                              code="no_usage_log"))
            return
        try:
            since, until = window_of(scope.get("query_string", b""))
        except ValueError as e:
            await reply(send, 400, error_body(str(e), param="since"))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        for path in await asyncio.to_thread(log_files, self.log.path.parent):
            blocks = (select_lines(block, since, until) for block in complete_lines(path))
            while (block := await asyncio.to_thread(next, blocks, None)) is not None:
                if block:
                    await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def record_time(record: dict[str, Any]) -> datetime | None:
    """When ``record`` finished (UTC), or ``None`` when its ``time`` does not parse."""
    try:
        parsed = datetime.fromisoformat(str(record["time"]))
    except (KeyError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def window_of(query_string: bytes) -> tuple[datetime | None, datetime | None]:
    """``since`` and ``until`` of a ``/v1/usage`` query (ISO 8601; UTC unless they say)."""
    out: list[datetime | None] = []
    params = parse_qs(query_string.decode("latin-1"))
    for name in ("since", "until"):
        text = (params.get(name) or [""])[-1]
        try:
            when = datetime.fromisoformat(text) if text else None
        except ValueError:
            raise ValueError(f"{name}={text!r} is not an ISO 8601 date-time") from None
        out.append(when.replace(tzinfo=timezone.utc) if when and not when.tzinfo else when)
    return out[0], out[1]


def select_lines(block: bytes, since: datetime | None, until: datetime | None) -> bytes:
    """The lines of ``block`` (whole lines of a usage log) whose records finished in
    [since, until); all of them when there is no window."""
    if since is None and until is None:
        return block
    kept = []
    for line in block.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        when = record_time(record) if isinstance(record, dict) else None
        if when is not None and (since is None or when >= since) and (until is None or when < until):
            kept.append(line)
    return b"".join(kept)
