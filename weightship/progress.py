"""The one progress interface: the library reports, the CLI renders (rich or JSON lines).

Library code takes a ``Progress`` and calls it; it never prints. :class:`NullProgress` keeps the
library silent; ``weightship.cli._common`` has the renderers.
"""

from __future__ import annotations


class Progress:
    """Receives progress events; this base class ignores them all (silent)."""

    def begin(self, task: str, *, total_bytes: int | None, files: int) -> None:
        """A job starts: ``task`` names it ("fetch", "verify"), sizes are totals."""

    def file_begin(self, path: str, size: int | None) -> None:
        """Work on one file starts."""

    def advance(self, path: str, nbytes: int) -> None:
        """``nbytes`` more bytes of ``path`` are done."""

    def file_end(self, path: str, status: str) -> None:
        """Work on one file ended with ``status`` ("ok", "skipped", "failed", …)."""

    def note(self, message: str) -> None:
        """A line a person may want to see (not an error)."""

    def end(self) -> None:
        """The job ended."""


NullProgress = Progress
