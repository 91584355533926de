"""Progress for a fetch of many files: one total (files and bytes) and a few file bars, not a
bar per file (issue 22, item 5)."""

from __future__ import annotations

import io

from rich.console import Console

from weightship.cli._common import RichProgress


def test_a_thousand_files_show_a_total_and_at_most_a_few_bars() -> None:
    out = io.StringIO()
    progress = RichProgress(Console(file=out, force_terminal=True, width=120))
    progress.begin("fetch", total_bytes=1000 * 100, files=1000)
    most = 0
    in_flight: list[str] = []
    for i in range(1000):
        path = f"d/f{i:04d}.json"
        progress.file_begin(path, 100)
        in_flight.append(path)
        progress.advance(path, 100)
        most = max(most, len(progress._bars.tasks))
        if len(in_flight) == 8:  # eight files in flight at a time, as a fetch's request budget
            for p in in_flight:
                progress.file_end(p, "ok")
            in_flight.clear()
    for p in in_flight:
        progress.file_end(p, "ok")
    total = progress._bars.tasks[0]
    assert most <= 1 + RichProgress.SHOWN
    assert total.description == "fetch (1000/1000 files)"
    assert total.completed == 1000 * 100
    assert len(progress._bars.tasks) == 1  # no file bar left behind
    progress.end()
