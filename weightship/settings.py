"""weightship's own settings: every ``WEIGHTSHIP_*`` variable, read once, here.

The ecosystems' variables (``HF_TOKEN``, ``HF_ENDPOINT``, ``AWS_*``, ``KUBECONFIG``) are not read
here: the libraries that own them (huggingface_hub, boto3, kubernetes) honour them as they do.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from weightship.errors import UsageError


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}")
    return value


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """What the ``WEIGHTSHIP_*`` variables say, with defaults."""

    home: Path  # WEIGHTSHIP_HOME: default root for fetched models (models/NAME)
    debug: bool  # WEIGHTSHIP_DEBUG=1: tracebacks on errors
    hash_workers: int  # WEIGHTSHIP_HASH_WORKERS: files hashed at once (default: all cores)
    read_chunk: int  # WEIGHTSHIP_READ_CHUNK: bytes per read while hashing

    def model_dir(self, name: str) -> Path:
        """Where a catalog model goes when no ``--to`` is given."""
        return self.home / "models" / name


@functools.cache
def get_settings() -> Settings:
    """The settings of this process (read once; tests call ``get_settings.cache_clear()``)."""
    home = os.environ.get("WEIGHTSHIP_HOME") or str(Path.home() / ".cache" / "weightship")
    return Settings(
        home=Path(home).expanduser(),
        debug=_flag("WEIGHTSHIP_DEBUG"),
        hash_workers=_int("WEIGHTSHIP_HASH_WORKERS", os.cpu_count() or 1),
        read_chunk=_int("WEIGHTSHIP_READ_CHUNK", 4 << 20, minimum=4096),
    )
