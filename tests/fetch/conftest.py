"""Fixtures of the fetch tests: a signing key pair, and model directories signed with it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class KeyPair:
    """A P-256 key pair made for this test run (``weightship manifest keygen``)."""

    private: Path
    public: Path


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    from weightship.signing import generate_key

    private = tmp_path_factory.mktemp("keys") / "publisher.pem"
    return KeyPair(private=private, public=generate_key(private))


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    from weightship.signing import generate_key

    private = tmp_path_factory.mktemp("other-keys") / "stranger.pem"
    return KeyPair(private=private, public=generate_key(private))


@pytest.fixture(scope="session")
def signed_tiny_dir(tiny_hf_dir: Path, signing_key: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the HF-layout tiny model whose manifest is signed with :func:`signing_key`
    (read only)."""
    from weightship.signing import sign_directory

    d = tmp_path_factory.mktemp("signed") / "tiny"
    shutil.copytree(tiny_hf_dir, d)
    sign_directory(d, signing_key.private)
    return d


@pytest.fixture(scope="session")
def signed_big_dir(big_model_dir: Path, signing_key: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hard-linked copy of :func:`big_model_dir`, its manifest signed (read only)."""
    import os

    from weightship.signing import sign_directory

    d = tmp_path_factory.mktemp("signed-big") / "big-model"
    shutil.copytree(big_model_dir, d, copy_function=os.link, ignore=shutil.ignore_patterns(".weightship"))
    shutil.copytree(big_model_dir / ".weightship", d / ".weightship")
    sign_directory(d, signing_key.private)
    return d
