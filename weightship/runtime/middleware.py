"""The server's outermost ASGI layer: size limits, API keys, draining, request counting.

It runs before FastAPI parses anything, so a hostile request is answered from its headers
alone: too many or too large headers → 431, a declared body over the limit → 413 without
reading it, a chunked body is read only up to the limit. Every route but ``/health`` and
``/ready`` needs a valid key when keys are configured (hashed, compared in constant time;
see :mod:`weightship.runtime.keys`); the key's entry is left in the scope for the layers inside.

No error answer costs the client its connection: Starlette re-raises an exception after its
handler has sent the 500, and uvicorn closes a connection whose app raised; here an exception
after a whole response is dropped (its handler logged it), one before any response gets a 500.
Only an answer cut short, or one that leaves a request body unread (413), closes the connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from weightship.runtime.keys import KeyRing
from weightship.runtime.metrics import Metrics
from weightship.runtime.protocol import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)

OPEN_ROUTES = frozenset({"/health", "/ready"})
KEY_SCOPE = "weightship.key"  # scope entry: the KeyEntry of the key the request presented


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 << 20
    max_headers: int = 100
    max_header_bytes: int = 64 << 10


async def reply(send: Send, status: int, body: dict[str, Any],
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a whole JSON response."""
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": raw})


class Guard:
    """Wraps the API app; see the module docstring."""

    def __init__(self, app: ASGIApp, *, limits: Limits, api_keys: KeyRing | None, metrics: Metrics,
                 draining: Callable[[], bool]) -> None:
        self.app, self.limits, self.metrics, self.draining = app, limits, metrics, draining
        self.api_keys = api_keys  # None: no key needed; an empty ring refuses everyone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []  # once the response has started
        sent = [False]  # the whole response

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                sent[0] = True
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send)
        except Exception:
            if sent[0]:  # answered (a handler's 500, logged there): keep the connection
                return
            if status:  # cut short: only closing the connection tells the client
                raise
            log.exception("request failed before any answer")
            await reply(counting_send, 500, error_body("internal error", type_="server_error"))
        finally:
            self.metrics.count_request(scope["path"], status[0] if status else 500)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if (len(headers) > self.limits.max_headers
                or sum(len(k) + len(v) for k, v in headers) > self.limits.max_header_bytes):
            await reply(send, 431, error_body(
                f"too many or too large headers (at most {self.limits.max_headers} headers, "
                f"{self.limits.max_header_bytes} bytes)", code="headers_too_large"))
            return
        if scope["path"] not in OPEN_ROUTES:
            if self.api_keys is not None and not self._authorized(scope, headers):
                await reply(send, 401, error_body("a valid API key is required (Authorization: "
                                                  "Bearer KEY)", code="invalid_api_key"),
                            [(b"www-authenticate", b"Bearer")])
                return
            if self.draining():
                await reply(send, 503, error_body("the server is shutting down",
                                                  type_="server_error", code="draining"),
                            [(b"retry-after", b"1"), (b"connection", b"close")])
                return
        declared = [v for k, v in headers if k == b"content-length"]
        if declared:
            try:
                length = int(declared[0])
            except ValueError:
                await reply(send, 400, error_body("invalid Content-Length"))
                return
            if length > self.limits.max_body_bytes:
                await self._too_large(send)
                return
        elif any(k == b"transfer-encoding" for k, _ in headers):
            body = await self._read_limited(receive)
            if body is None:
                await self._too_large(send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> bool:
        assert self.api_keys is not None
        # hashed and compared with every key's hash, so the time taken says nothing
        scope[KEY_SCOPE] = entry = self.api_keys.authenticate_headers(headers)
        return entry is not None

    async def _too_large(self, send: Send) -> None:
        await reply(send, 413, error_body(
            f"the request body is larger than {self.limits.max_body_bytes} bytes",
            code="body_too_large"), [(b"connection", b"close")])

    async def _read_limited(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limits.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then whatever the connection says next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
