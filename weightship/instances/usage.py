"""Usage reports: the usage records of every replica of an instance, summed by key or by day.

A record (written by ``weightship serve --usage-log``; see :mod:`weightship.runtime.usage`) is
one finished request: ``id`` (unique), ``time`` (UTC, when it finished), ``key_id``,
``key_name``, ``model``, ``status``, ``prompt_tokens``, ``completion_tokens``,
``duration_s``. Records are counted once by ``id``, however many replicas or reads return them.
``requests`` and the token sums count the requests answered 200; ``errors`` counts the others.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import datetime, time, timedelta, timezone
from typing import Any

from weightship.errors import UsageError

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


def _time(record: dict[str, Any]) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def select(records: Iterable[dict[str, Any]], since: datetime | None = None,
           until: datetime | None = None) -> list[dict[str, Any]]:
    """Records finished in [since, until), each once (by ``id``), oldest first."""
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        rid, when = record.get("id"), _time(record)
        if not isinstance(rid, str) or when is None or rid in seen:
            continue
        if (since is None or when >= since) and (until is None or when < until):
            seen[rid] = record
    return sorted(seen.values(), key=lambda r: str(r["time"]))


def summarize(records: Iterable[dict[str, Any]], by: str,
              key_names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of sums, one per key (``by="key"``) or per UTC day (``by="day"``)."""
    if by not in FIELDS:
        raise UsageError(f"--by must be key or day, not {by!r}")
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        if by == "key":
            group = str(r.get("key_id") or "-")
            name = (key_names or {}).get(group) or r.get("key_name") or "-"
            row = rows.setdefault(group, {"key_name": name, "key_id": group})
        else:
            group = str(r["time"])[:10]
            row = rows.setdefault(group, {"day": group})
        for f in ("requests", "prompt_tokens", "completion_tokens", "errors"):
            row.setdefault(f, 0)
        if r.get("status") == 200:
            row["requests"] += 1
            row["prompt_tokens"] += int(r.get("prompt_tokens") or 0)
            row["completion_tokens"] += int(r.get("completion_tokens") or 0)
        else:
            row["errors"] += 1
    order = (lambda row: (row["key_name"], row["key_id"])) if by == "key" else (lambda row: row["day"])
    return sorted(rows.values(), key=order)


def to_csv(rows: list[dict[str, Any]], by: str) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(FIELDS[by]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
