"""Usage reports: the usage records of every replica of an instance, summed by key or by day.

A record (written by ``weightship serve --usage-log``; see :mod:`weightship.runtime.usage`) is
one finished request: ``id`` (unique), ``time`` (UTC, when it finished), ``key_id``,
``key_name``, ``model``, ``status``, ``prompt_tokens``, ``completion_tokens``,
``duration_s``. Records are counted once by ``id``, however many replicas or reads return them,
and summed as they are read (:class:`Tally`): the records themselves are not kept. ``requests``
and the token sums count the requests answered 200; ``errors`` counts the others. The
operator's own requests (the health gate's, on nodes) are not the company's usage.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import datetime, time, timedelta, timezone
from typing import Any

from weightship.errors import UsageError, UsageRecordError
from weightship.instances.keys import OPERATOR_KEY
from weightship.runtime.usage import record_time

FIELDS = {"key": ("key_name", "key_id", "requests", "prompt_tokens", "completion_tokens", "errors"),
          "day": ("day", "requests", "prompt_tokens", "completion_tokens", "errors")}


def parse_when(text: str | None, *, end: bool = False) -> datetime | None:
    """``--since``/``--until``: an ISO date or date-time (UTC unless it says otherwise). A date
    alone means the start of that day for ``--since`` and its end for ``--until``."""
    if not text:
        return None
    try:
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").date()
            when = datetime.combine(day, time(), timezone.utc)
            return when + timedelta(days=1) if end else when
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a date",
                         hint="use YYYY-MM-DD or an ISO date-time like 2026-05-01T12:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class Tally:
    """Sums of usage records, made while they are read (nothing but the ids seen is kept):
    each ``id`` counted once, only records that finished in [since, until), never the
    operator's own requests (its key, :data:`~weightship.instances.keys.OPERATOR_KEY`, is not
    one of the company's, and ``keys list`` does not show it)."""

    def __init__(self, by: str, *, since: datetime | None = None, until: datetime | None = None,
                 key_names: dict[str, str] | None = None) -> None:
        if by not in FIELDS:
            raise UsageError(f"--by must be key or day, not {by!r}")
        self.by, self.since, self.until = by, since, until
        self.key_names = key_names or {}
        self.seen: set[str] = set()
        self._rows: dict[str, dict[str, Any]] = {}

    def add(self, record: dict[str, Any]) -> None:
        rid, when = record.get("id"), record_time(record)
        if not isinstance(rid, str) or when is None or rid in self.seen:
            return
        if (self.since is not None and when < self.since) or (
                self.until is not None and when >= self.until):
            return
        self.seen.add(rid)
        key_id = str(record.get("key_id") or "-")
        name = self.key_names.get(key_id) or str(record.get("key_name") or "-")
        if name == OPERATOR_KEY:
            return
        if self.by == "key":
            row = self._rows.setdefault(key_id, {"key_name": name, "key_id": key_id})
        else:
            day = when.astimezone(timezone.utc).date().isoformat()
            row = self._rows.setdefault(day, {"day": day})
        for f in ("requests", "prompt_tokens", "completion_tokens", "errors"):
            row.setdefault(f, 0)
        if _count(record, "status") == 200:
            row["requests"] += 1
            row["prompt_tokens"] += _count(record, "prompt_tokens")
            row["completion_tokens"] += _count(record, "completion_tokens")
        else:
            row["errors"] += 1

    def rows(self) -> list[dict[str, Any]]:
        key = (lambda row: (row["key_name"], row["key_id"])) if self.by == "key" else (
            lambda row: row["day"])
        return sorted(self._rows.values(), key=key)


def _count(record: dict[str, Any], field: str) -> int:
    """A whole number of a record (a missing token count is 0); a record whose value is
    anything else is a :class:`UsageRecordError`, never a crash or a guess."""
    value = record.get(field, 0 if field != "status" else None)
    if value is None and field != "status":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageRecordError(record.get("id"), field, value)
    return value


def summarize(records: Iterable[dict[str, Any]], by: str,
              key_names: dict[str, str] | None = None, *, since: datetime | None = None,
              until: datetime | None = None) -> list[dict[str, Any]]:
    """Rows of sums, one per key (``by="key"``) or per UTC day (``by="day"``), of the records
    that finished in [since, until), each once (see :class:`Tally`)."""
    tally = Tally(by, since=since, until=until, key_names=key_names)
    for record in records:
        tally.add(record)
    return tally.rows()


def to_csv(rows: list[dict[str, Any]], by: str) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(FIELDS[by]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
