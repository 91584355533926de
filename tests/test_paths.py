"""The path sanitizer: hostile names are rejected, and nothing accepted escapes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightship.errors import UnsafePathError
from weightship.paths import resolve_under, safe_relpath

HOSTILE = [
    ("/etc/passwd", "absolute"),
    ("../outside", "'..'"),
    ("a/../../outside", "'..'"),
    ("a/b/..", "'..'"),
    ("C:/Windows/system32", "drive letter"),
    ("c:evil", "drive letter"),
    ("//server/share/file", "UNC"),
    ("\\\\server\\share\\file", "backslash"),
    ("a\\..\\..\\b", "backslash"),
    ("model\x00.safetensors", "NUL"),
    ("", "empty"),
    ("a//b", "''"),
    ("./a", "'.'"),
    (".weightship/manifest.json", "weightship's own state"),
    ("a/\x1b[31mred", "control character"),
    ("x" * 300, "too long"),
]


@pytest.mark.parametrize(("name", "reason"), HOSTILE, ids=[repr(n)[:30] for n, _ in HOSTILE])
def test_hostile_names_are_rejected_with_reason(name: str, reason: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError) as info:
        resolve_under(tmp_path, name)
    assert reason in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_plain_names_pass(tmp_path: Path) -> None:
    assert resolve_under(tmp_path, "model-00001-of-00002.safetensors") == tmp_path.resolve() / \
        "model-00001-of-00002.safetensors"
    assert resolve_under(tmp_path, "sub/dir/tokenizer.model").parent == tmp_path.resolve() / "sub" / "dir"
    assert str(safe_relpath("mistral-7B-v0.1/params.json")) == "mistral-7B-v0.1/params.json"


def test_symlinked_directory_is_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symlink"):
        resolve_under(dest, "sub/file.bin")


def test_symlinked_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.json").symlink_to("/etc/hostname")
    with pytest.raises(UnsafePathError, match="symlink"):
        resolve_under(tmp_path, "config.json")


_component = st.sampled_from(["a", "b", "..", ".", "", "c:", "\\", "/", "x\x00", "..\\", "model.bin", " "])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(_component, max_size=6).map("/".join)))
def test_no_accepted_path_resolves_outside(tmp_path_factory: pytest.TempPathFactory, name: str) -> None:
    dest = tmp_path_factory.getbasetemp() / "prop-dest"
    dest.mkdir(exist_ok=True)
    try:
        resolved = resolve_under(dest, name)
    except UnsafePathError:
        return
    root = dest.resolve()
    real = Path(os.path.realpath(resolved))
    assert root in real.parents, (name, real)
