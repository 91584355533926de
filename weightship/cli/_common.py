"""What every command shares: global options, output (rich or JSON), progress, and errors.

Commands are thin: parse, call the library, render through :func:`emit`. Errors are raised as
:class:`~weightship.errors.WeightshipError` and rendered by :func:`main` as one line each.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichBars
from rich.text import Text

from weightship.errors import WeightshipError
from weightship.progress import NullProgress, Progress
from weightship.settings import get_settings

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


@dataclass
class CliState:
    """Global options, set by the app's callback."""

    json: bool = False
    quiet: bool = False
    emitted: bool = False  # a result was printed (an error then goes to stderr only)


_state = CliState()


def state() -> CliState:
    """The options of this invocation."""
    return _state


def configure(*, json_output: bool, quiet: bool, verbose: bool) -> None:
    """Apply the global options (called once by the app's callback)."""
    _state.json, _state.quiet = json_output, quiet
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if not quiet else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def emit(data: Any, human: Callable[[Console], None], *, json_flag: bool = False) -> None:
    """Print a command's result: JSON if asked for (globally or per command), else ``human``."""
    _state.emitted = True
    if _state.json or json_flag:
        stdout.out(json.dumps(data, indent=2, default=str), highlight=False)
    elif not _state.quiet:
        human(stdout)


def wants_json(json_flag: bool) -> bool:
    """Whether this command prints JSON."""
    return _state.json or json_flag


# ---- progress --------------------------------------------------------------------------------


class RichProgress(Progress):
    """Progress bars on stderr: a total (files and bytes), and a bar for each of the first few
    files in flight (a fetch of a thousand small files shows a few bars, not a thousand)."""

    SHOWN = 4  # file bars at most

    def __init__(self, console: Console | None = None) -> None:
        self._bars = RichBars(
            TextColumn("{task.description}", justify="left"), BarColumn(),
            DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=console or stderr, transient=True)
        self._tasks: dict[str, TaskID] = {}
        self._total: TaskID | None = None
        self._lock = threading.Lock()
        self._name, self._files, self._ended = "", 0, 0

    def begin(self, task: str, *, total_bytes: int | None, files: int) -> None:
        self._bars.start()
        self._name, self._files, self._ended = task, files, 0
        self._total = self._bars.add_task(self._describe(), total=total_bytes or None)

    def _describe(self) -> str:
        return f"{self._name} ({self._ended}/{self._files} files)"

    def file_begin(self, path: str, size: int | None) -> None:
        with self._lock:
            if len(self._tasks) < self.SHOWN:
                self._tasks[path] = self._bars.add_task(path, total=size)

    def advance(self, path: str, nbytes: int) -> None:
        task = self._tasks.get(path)
        if task is not None:
            self._bars.advance(task, nbytes)
        if self._total is not None:
            self._bars.advance(self._total, nbytes)

    def file_end(self, path: str, status: str) -> None:
        with self._lock:
            task = self._tasks.pop(path, None)
            if status in ("ok", "present", "staged"):
                self._ended += 1
            if self._total is not None:
                self._bars.update(self._total, description=self._describe())
        if task is not None:
            self._bars.remove_task(task)

    def note(self, message: str) -> None:
        self._bars.console.print(message, markup=False, highlight=False)

    def end(self) -> None:
        self._bars.stop()


class JsonLinesProgress(Progress):
    """One JSON event per line on stderr, for scripts (``--json``); byte counts are batched."""

    def __init__(self, every: int = 16 << 20) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._every = every

    def _event(self, **fields: Any) -> None:
        with self._lock:
            sys.stderr.write(json.dumps(fields) + "\n")
            sys.stderr.flush()

    def begin(self, task: str, *, total_bytes: int | None, files: int) -> None:
        self._event(event="begin", task=task, total_bytes=total_bytes, files=files)

    def file_begin(self, path: str, size: int | None) -> None:
        self._event(event="file_begin", path=path, size=size)

    def advance(self, path: str, nbytes: int) -> None:
        with self._lock:
            done = self._pending.get(path, 0) + nbytes
            self._pending[path] = done % self._every
        if done >= self._every:
            self._event(event="progress", path=path, bytes=done - done % self._every)

    def file_end(self, path: str, status: str) -> None:
        self._event(event="file_end", path=path, status=status)

    def note(self, message: str) -> None:
        self._event(event="note", message=message)

    def end(self) -> None:
        self._event(event="end")


@contextlib.contextmanager
def progress_for(json_flag: bool = False) -> Iterator[Progress]:
    """The progress renderer this invocation wants (JSON lines, bars on a terminal, or nothing),
    for the length of a ``with`` block; bars are taken down when it ends."""
    progress: Progress
    if wants_json(json_flag):
        progress = JsonLinesProgress()
    elif _state.quiet or not stderr.is_terminal:
        progress = NullProgress()
    else:
        progress = RichProgress()
    try:
        yield progress
    finally:
        if isinstance(progress, RichProgress):
            progress.end()


# ---- errors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorReport:
    """What the command line says of an error: one line, an optional hint, the exit code."""

    message: str
    code: int
    hint: str | None = None


def _weightship(e: BaseException) -> ErrorReport:
    assert isinstance(e, WeightshipError)
    return ErrorReport(str(e), e.exit_code, e.hint)


def _os_error(e: BaseException) -> ErrorReport:
    assert isinstance(e, OSError)
    where = f": {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return ErrorReport(f"no space left on device{where}", 1)
    return ErrorReport(f"{e.strerror or e}{where}", 1)


# Ordered: the first matching type renders the error.
ERROR_TABLE: list[tuple[type[BaseException], Callable[[BaseException], ErrorReport]]] = [
    (WeightshipError, _weightship),
    (OSError, _os_error),
    (MemoryError, lambda e: ErrorReport("out of memory", 1)),
]


def render_error(e: BaseException) -> int:
    """Print ``e`` as one line (plus a hint) on stderr; returns the exit code."""
    for kind, render in ERROR_TABLE:
        if isinstance(e, kind):
            report = render(e)
            break
    else:
        message = f"internal error: {type(e).__name__}: {e}"
        if not get_settings().debug:
            message += " (set WEIGHTSHIP_DEBUG=1 for a traceback)"
        report = ErrorReport(message, 1)
    if get_settings().debug:
        traceback.print_exception(e, file=sys.stderr)
    stderr.print(Text.assemble(("error: ", "bold red"), report.message), highlight=False, soft_wrap=True)
    if report.hint:
        stderr.print(f"hint: {report.hint}", highlight=False, markup=False)
    if _state.json and not _state.emitted:
        body: dict[str, object] = {"error": report.message, "hint": report.hint, "exit_code": report.code}
        details = getattr(e, "details", None)  # numbers an error names (a space refusal's)
        if isinstance(details, dict):
            body["details"] = details
        print(json.dumps(body))
    return report.code


def run(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 usage, 3 integrity)."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="weightship", standalone_mode=False)
        return 0
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # usage errors: bad options, missing arguments
        show = getattr(e, "show", None)
        if callable(show):
            show()
        else:
            stderr.print(f"error: {e.format_message()}", markup=False, highlight=False)
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        stderr.print("interrupted")
        return 130
    except Exception as e:
        return render_error(e)
