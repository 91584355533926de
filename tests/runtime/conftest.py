"""Fixtures of the runtime tests: the tiny model's directories, loaded models, an engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from weightship.catalog.architecture import Architecture
from weightship.catalog.tiny import original_tensors, safetensors_bytes, tiny_files

TINY_ARCH = Architecture(dim=128, n_layers=2, head_dim=32, hidden_dim=384, n_heads=4,
                         n_kv_heads=2, norm_eps=1e-5, vocab_size=32000, rope_theta=10000.0,
                         sliding_window=32, max_seq_len=2048)
TINY_SEED = 20231027


def _write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in the HF layout (no manifest: load with the loader, not ``serve``)."""
    return _write(tmp_path_factory.mktemp("tiny-hf"), tiny_files(TINY_ARCH, TINY_SEED, "hf"))


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in the original layout, with the safetensors ``convert`` would make."""
    files = tiny_files(TINY_ARCH, TINY_SEED, "original")
    del files["consolidated.00.pth"]
    files["consolidated.safetensors"] = safetensors_bytes(original_tensors(TINY_ARCH, TINY_SEED))
    return _write(tmp_path_factory.mktemp("tiny-original"), files)


@pytest.fixture(autouse=True)
def _inference_mode() -> Iterator[None]:
    with torch.inference_mode():
        yield
