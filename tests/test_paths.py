"""The path sanitizer: hostile names are rejected, and nothing accepted escapes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightship.errors import UnsafePathError
from weightship.paths import PathsUnder, resolve_under, safe_relpath

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


# ---- opening and renaming beneath a directory, refusing links met on the way (issue 17, item 12)


def test_open_beneath_refuses_a_symlink_anywhere_below_the_root(tmp_path: Path) -> None:
    from weightship.paths import open_beneath

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "sub").symlink_to(outside)
    (root / "file").symlink_to(outside / "secret")
    for rel in ("sub/x.bin", "file"):
        with pytest.raises(UnsafePathError, match="symlink"):
            open_beneath(root, rel, os.O_WRONLY | os.O_CREAT, create_parents=True)
    assert list(outside.iterdir()) == []
    fd = open_beneath(root, "new/dir/x.bin", os.O_WRONLY | os.O_CREAT, create_parents=True)
    os.close(fd)
    assert (root / "new" / "dir" / "x.bin").is_file()


def test_paths_under_checks_each_directory_once_and_refuses_what_resolve_under_refuses(tmp_path: Path) -> None:
    """Many names under one destination (a fetch's plan, a verify): the same answers as
    resolve_under one by one, a link met under a directory refused for every name below it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "ok" / "deep").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "ok" / "file-link").symlink_to(outside / "x")
    under = PathsUnder(root)
    for name in ("ok/a.bin", "ok/deep/b.bin", "ok/deep/c.bin", "new/d.bin", "top.json"):
        assert under.resolve(name) == resolve_under(root, name)
    for name in ("link/a.bin", "link/b.bin", "ok/file-link", "link"):
        with pytest.raises(UnsafePathError, match="symlink"):
            under.resolve(name)
    for name in ("../x", "ok/../../x", ".weightship/manifest.json"):
        with pytest.raises(UnsafePathError):
            under.resolve(name)


def test_replace_beneath_refuses_a_directory_swapped_for_a_link(tmp_path: Path) -> None:
    from weightship.paths import replace_beneath

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "incoming").mkdir(parents=True)
    outside.mkdir()
    (root / "incoming" / "a.part").write_bytes(b"data")
    resolve_under(root, "sub/a.bin")  # the check: nothing there yet, fine
    (root / "sub").symlink_to(outside)  # ... and a link swapped in after it
    with pytest.raises(UnsafePathError, match="symlink"):
        replace_beneath(root, "incoming/a.part", "sub/a.bin")
    assert list(outside.iterdir()) == []
    assert (root / "incoming" / "a.part").read_bytes() == b"data"


def test_replace_beneath_never_moves_a_link_planted_for_the_source(tmp_path: Path) -> None:
    from weightship.paths import replace_beneath

    root = tmp_path / "root"
    (root / "incoming").mkdir(parents=True)
    (tmp_path / "secret").write_text("not yours")
    (root / "incoming" / "a.part").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        replace_beneath(root, "incoming/a.part", "a.bin")
    assert not (root / "a.bin").exists() and not (root / "a.bin").is_symlink()


def test_replace_all_beneath_moves_a_batch_and_refuses_a_link_in_any_directory(tmp_path: Path) -> None:
    """The batch rename of a fetch's small files (each directory pair reached once) keeps every
    check of replace_beneath: files in several directories arrive, a directory swapped for a link
    is refused, and nothing reaches the link's target."""
    from weightship.paths import replace_all_beneath

    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    names = ["a/1.bin", "a/2.bin", "b/c/3.bin", "top.bin"]
    for i, name in enumerate(names):
        part = root / "incoming" / f"{name}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(bytes([i]) * 10)
    replace_all_beneath(root, [(f"incoming/{n}.part", n) for n in names])
    assert [(root / n).read_bytes() for n in names] == [bytes([i]) * 10 for i in range(4)]
    assert not any(p.is_file() for p in (root / "incoming").rglob("*"))

    (root / "incoming" / "x.part").write_bytes(b"data")
    (root / "d").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symlink"):
        replace_all_beneath(root, [("incoming/x.part", "d/x.bin")])
    assert list(outside.iterdir()) == [] and (root / "incoming" / "x.part").read_bytes() == b"data"
