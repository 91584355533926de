"""One retry rule for every whole request of a fetch (a HEAD, a listing, a small file, a
manifest): tried again, with exponential backoff and jitter, while it fails in a way a retry may
fix (:class:`~weightship.errors.TransientFetchError`: a reset, a timeout, a 5xx, a short body),
at most ``TransferOptions.retries`` more times. A chunk of a large file is retried by the
downloader itself, which continues from the last byte it got."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from weightship.errors import TransientFetchError
from weightship.fetch.options import TransferOptions

log = logging.getLogger(__name__)

T = TypeVar("T")


def with_retries(call: Callable[[], T], opts: TransferOptions, what: str) -> T:
    """``call()``, retried as the module docstring says; ``what`` names it in the log."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except TransientFetchError as e:
            if attempt > opts.retries:
                raise
            log.info("%s: %s; retry %d", what, e, attempt)
            sleep_backoff(attempt, opts)


def sleep_backoff(attempt: int, opts: TransferOptions) -> None:
    """Sleep before retry ``attempt`` (1-based) of a whole request (not a chunk)."""
    delay = min(opts.backoff_max, opts.backoff * 2 ** (attempt - 1))
    time.sleep(delay * (0.5 + random.random() / 2))
