"""Usage reports from usage records: each request once, the window, sums by key and by day."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightship.errors import UsageError
from weightship.instances import usage


def rec(rid: str, key: str, when: str, status: int = 200, prompt: int = 5,
        completion: int = 7) -> dict[str, Any]:
    return {"id": rid, "time": when, "key_id": key, "key_name": key.removeprefix("key_"),
            "status": status, "prompt_tokens": prompt, "completion_tokens": completion}


RECORDS = [rec("r1", "key_a", "2026-05-01T10:00:00.000Z"),
           rec("r2", "key_a", "2026-05-01T23:59:59.999Z", completion=3),
           rec("r3", "key_b", "2026-05-02T00:00:00.000Z", prompt=1, completion=1),
           rec("r4", "key_b", "2026-05-02T08:00:00.000Z", status=400, prompt=0, completion=0),
           rec("r5", "key_a", "2026-05-03T08:00:00.000Z", status=499, prompt=9, completion=2)]


def test_by_key_counts_answered_requests_and_their_tokens_and_the_rest_as_errors() -> None:
    rows = usage.summarize(RECORDS + RECORDS[:2], "key", {"key_a": "ci"})
    assert rows == [
        {"key_name": "b", "key_id": "key_b", "requests": 1, "prompt_tokens": 1,
         "completion_tokens": 1, "errors": 1},
        {"key_name": "ci", "key_id": "key_a", "requests": 2, "prompt_tokens": 10,
         "completion_tokens": 10, "errors": 1}]


def test_the_window_and_days_are_utc_and_an_until_date_includes_its_day() -> None:
    since, until = usage.parse_when("2026-05-01"), usage.parse_when("2026-05-01", end=True)
    assert since == datetime(2026, 5, 1, tzinfo=timezone.utc)
    (day,) = usage.summarize(RECORDS, "day", since=since, until=until)
    assert (day["day"], day["requests"], day["completion_tokens"]) == ("2026-05-01", 2, 10)
    later = usage.parse_when("2026-05-02T04:00:00+02:00")  # 02:00 UTC: r4 and r5
    assert [(d["day"], d["requests"], d["errors"]) for d in usage.summarize(
        RECORDS, "day", since=later)] == [("2026-05-02", 0, 1), ("2026-05-03", 0, 1)]
    days = usage.summarize(RECORDS, "day")
    assert [(d["day"], d["requests"], d["errors"]) for d in days] == [
        ("2026-05-01", 2, 0), ("2026-05-02", 1, 1), ("2026-05-03", 0, 1)]
    # a record's day is its UTC day, whatever offset its time was written with
    assert usage.summarize([rec("r9", "key_a", "2026-05-02T01:00:00+02:00")], "day")[0][
        "day"] == "2026-05-01"


def test_csv_has_the_columns_of_the_json() -> None:
    rows = usage.summarize(RECORDS, "key")
    parsed = list(csv.DictReader(io.StringIO(usage.to_csv(rows, "key"))))
    assert [{k: str(v) for k, v in r.items()} for r in rows] == parsed


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "2026/05/01"])
def test_a_date_that_does_not_parse_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        usage.parse_when(text)


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 50),
                          st.integers(0, 50), st.sampled_from([200, 200, 400, 499]),
                          st.integers(1, 3)), max_size=40))
def test_sums_are_the_sums_of_the_records_whatever_is_read_twice(
        made: list[tuple[str, int, int, int, int]]) -> None:
    records = [rec(f"r{i}", f"key_{k}", "2026-05-01T00:00:00Z", s, p, c)
               for i, (k, p, c, s, _) in enumerate(made)]
    read = [r for r, (*_, times) in zip(records, made, strict=True) for _ in range(times)]
    rows = usage.summarize(read, "key")
    assert sum(r["requests"] + r["errors"] for r in rows) == len(records)
    assert sum(r["completion_tokens"] for r in rows) == sum(
        r["completion_tokens"] for r in records if r["status"] == 200)


def test_the_operators_own_requests_are_not_the_companys_usage() -> None:
    """The operator key (health gates, usage reads) is hidden by `keys list`; its requests
    must not appear in the sums either, by name or by the id the key file gives it."""
    records = [*RECORDS, rec("g1", "key_op", "2026-05-01T11:00:00Z"),
               {**rec("g2", "key_gate", "2026-05-01T12:00:00Z"), "key_name": "weightship-operator"}]
    rows = usage.summarize(records, "key", {"key_op": "weightship-operator"})
    assert [r["key_id"] for r in rows] == ["key_a", "key_b"]
    assert sum(d["requests"] + d["errors"] for d in usage.summarize(records, "day",
                                                                      {"key_op": "weightship-operator"})) == 5


@pytest.mark.parametrize("field,value", [("prompt_tokens", "12"), ("completion_tokens", -1),
                                         ("status", "200"), ("completion_tokens", True),
                                         ("status", None)])
def test_a_record_holding_something_else_is_a_typed_error(field: str, value: Any) -> None:
    from weightship.errors import UsageRecordError

    with pytest.raises(UsageRecordError) as e:
        usage.summarize([{**rec("r1", "key_a", "2026-05-01T10:00:00Z"), field: value}], "key")
    assert f"'r1': {field} is not a whole number" in str(e.value) and e.value.exit_code == 1
