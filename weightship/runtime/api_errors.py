"""Errors as the OpenAI API answers them: one ordered table from exception type to HTTP status and
OpenAI error type, and the one handler that applies it to whatever a route raises.

The body is ``{"error": {"message", "type", "param", "code"}}``
(:func:`~weightship.runtime.protocol.error_body`); ``param`` and ``code`` come from the exception
when it carries them (:class:`~weightship.errors.InvalidRequestError`), else from the table, and a
retryable error says when to retry (``Retry-After``). Anything the table does not name is a bug:
logged with its traceback, answered 500 ``internal error`` (the
:class:`~weightship.runtime.middleware.Guard` keeps the connection).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from weightship.errors import (
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    ModelNotServedError,
)
from weightship.runtime.protocol import error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorKind:
    """How one kind of error is answered."""

    status: int
    type: str  # OpenAI's error type
    code: str | None = None  # unless the exception has its own
    param: str | None = None  # unless the exception has its own
    retry_after: int | None = None  # seconds (Retry-After), unless the exception says


# First match wins: a subclass goes before its base.
API_ERRORS: tuple[tuple[type[Exception], ErrorKind], ...] = (
    (InvalidRequestError, ErrorKind(400, "invalid_request_error")),
    (ModelNotServedError, ErrorKind(404, "invalid_request_error", code="model_not_found", param="model")),
    (EngineOverloadedError, ErrorKind(429, "server_busy", code="queue_full")),
    (EngineStoppedError, ErrorKind(503, "server_error", retry_after=1)),
)
INTERNAL = ErrorKind(500, "server_error")


class ErrorResponse(JSONResponse):
    """An error body in ASCII JSON: what it quotes from a request (a field name, a model id)
    may hold anything, a lone surrogate included, and must not fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def api_error(status: int, message: str, *, type_: str = "invalid_request_error",
              param: str | None = None, code: str | None = None,
              headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    return ErrorResponse(error_body(message, type_=type_, param=param, code=code), status_code=status,
                         headers=headers)


def kind_of(e: Exception) -> ErrorKind | None:
    """The table's entry for ``e`` (None: not an API error)."""
    return next((kind for cls, kind in API_ERRORS if isinstance(e, cls)), None)


def error_response(e: Exception) -> JSONResponse:
    """The answer to ``e``, raised by a route (see the module docstring)."""
    if isinstance(e, RequestValidationError):
        e = invalid_request(e.errors())
    if isinstance(e, HTTPException):  # Starlette's own: an unknown route (404), a wrong method
        return api_error(e.status_code, str(e.detail), type_="not_found_error" if e.status_code == 404
                         else "invalid_request_error", headers=dict(e.headers or {}))
    kind = kind_of(e)
    if kind is None:
        log.error("request failed", exc_info=e)
        return api_error(INTERNAL.status, "internal error", type_=INTERNAL.type)
    retry_after = getattr(e, "retry_after", kind.retry_after)
    return api_error(kind.status, str(e), type_=kind.type, param=getattr(e, "param", None) or kind.param,
                     code=getattr(e, "code", None) or kind.code,
                     headers={"Retry-After": str(retry_after)} if retry_after is not None else None)


async def handle(_: Request, e: Exception) -> JSONResponse:
    """The FastAPI exception handler of every error (registered for each type the table names,
    for Starlette's HTTP errors, for FastAPI's validation errors and for ``Exception``)."""
    return error_response(e)


# Parts of a validation error's location that name no field: the body, the union members tried.
_NOT_FIELDS = frozenset({"body", "str", "int", "float", "bool", "list", "dict"})


def invalid_request(errors: Any) -> InvalidRequestError:
    """The 400 for pydantic's validation ``errors`` (their first): the field's path and why."""
    first = errors[0] if errors else {}
    # the fields and indexes, not the union members tried ("str", "function-after[…]")
    loc = [str(p) for p in first.get("loc", ())
           if isinstance(p, int) or (p.isidentifier() and p not in _NOT_FIELDS)]
    why = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return InvalidRequestError(f"{'.'.join(loc) or 'body'}: {why}", param=loc[0] if loc else None)
