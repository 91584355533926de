"""What a peer says is checked field by field: malformed events never get past the parser."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightship.swarm.protocol import BadEvent, Event, parse_event, parse_range

SHA = "ab" * 32
DIGEST = "cd" * 32


def test_a_peers_story_parses() -> None:
    sizes: dict[str, tuple[int, int]] = {}
    assert parse_event(["file", SHA, 10 << 20, 4 << 20], sizes) == Event("file", SHA, size=10 << 20, chunk=4 << 20)
    assert parse_event(["take", SHA, 2, "o"], sizes) == Event("take", SHA, 2, origin=True)
    assert parse_event(["have", SHA, 2, "node-1", DIGEST], sizes) == Event("have", SHA, 2, provenance="node-1",
                                                                          digest=DIGEST)
    assert parse_event(["drop", SHA, 2], sizes).kind == "drop"
    assert parse_event(["done", SHA], sizes).kind == "done"


@pytest.mark.parametrize("raw", [
    ["have", SHA, 3, "n", DIGEST],  # a chunk past the file's end (3 chunks: 0..2)
    ["have", SHA, -1, "n", DIGEST],
    ["have", SHA, 0, "../etc", DIGEST],  # provenance ids are plain names
    ["have", SHA, 0, "n", "zz" * 32],
    ["have", "AB" * 32, 0, "n", DIGEST],  # digests are lower-case hex, as the manifest's
    ["have", "../../etc/passwd", 0, "n", DIGEST],
    ["take", SHA, 0, "x"],
    ["take", SHA, True, "o"],  # a bool is not an index
    ["file", SHA, -5, 4096],
    ["file", SHA, 1 << 60, 4096],
    ["file", SHA, 100, 1],  # a chunk size below 4 KiB
    ["exec", SHA],
    ["done"],
    "have",
    [],
])
def test_malformed_events_are_refused(raw: Any) -> None:
    sizes = {SHA: (10 << 20, 4 << 20)}
    with pytest.raises(BadEvent):
        parse_event(raw, sizes)


def test_a_chunk_of_a_file_never_announced_is_refused() -> None:
    with pytest.raises(BadEvent, match="never announced"):
        parse_event(["have", SHA, 0, "n", DIGEST], {})


def st_kind(xs: list[Any]) -> str:
    """An event kind, so that the fields after it are fuzzed against every kind."""
    return ["file", "have", "take", "drop", "done", "gone"][len(xs) % 6]


_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=6)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@given(raw=st.one_of(_json, st.lists(_json, max_size=6).map(lambda xs: [st_kind(xs), *xs])))
def test_any_json_a_peer_sends_is_parsed_or_refused(raw: Any) -> None:
    sizes = {SHA: (10 << 20, 4 << 20)}
    json.dumps(raw)  # what a peer can send: JSON
    try:
        e = parse_event(raw, sizes)
    except BadEvent:
        return
    assert len(e.sha256) == 64 and e.index < 3


@pytest.mark.parametrize(("header", "want"), [
    ("bytes=0-99", (0, 100)),
    ("bytes=50-50", (50, 51)),
    ("bytes=0-1000", None),  # past the end
    ("bytes=5-4", None),
    ("bytes=0-9,20-29", None),  # one range only
    ("bytes=-10", None),
    ("bytes=10-", None),
    ("items=0-9", None),
    (None, None),
])
def test_ranges(header: str | None, want: tuple[int, int] | None) -> None:
    assert parse_range(header, 1000) == want
