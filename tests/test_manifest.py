"""The manifest module on its own: schema checks with a named place, atomic writes that never
follow a planted link, a stale signature dropped, and a directory hashed without omissions."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from weightship.errors import ManifestError, WeightshipError
from weightship.manifest import (
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    atomic_write,
    create_for_directory,
    manifest_path,
)


def _model(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    (directory / "sub").mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "sub" / "weights.bin").write_bytes(b"\x00" * 1000)
    return directory


def test_a_directory_round_trips_through_its_manifest(tmp_path: Path) -> None:
    directory = _model(tmp_path)
    m = create_for_directory(directory)
    assert [(f.path, f.size) for f in m.files] == [("config.json", 2), ("sub/weights.bin", 1000)]
    assert m.entry("sub/weights.bin").sha256 == hashlib.sha256(b"\x00" * 1000).hexdigest()  # type: ignore[union-attr]
    assert m.layout == "hf" and m.total_bytes == 1002 and {f.anchor for f in m.files} == {"local"}
    m.write(directory)
    again = Manifest.load(directory)
    assert again.to_dict() == m.to_dict()
    assert json.loads(manifest_path(directory).read_text())["manifest_version"] == 1


def test_a_symlink_or_an_empty_directory_is_refused_not_skipped(tmp_path: Path) -> None:
    directory = _model(tmp_path)
    (directory / "link").symlink_to(directory / "config.json")
    with pytest.raises(ManifestError, match="link is a symlink"):
        create_for_directory(directory)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="holds no files"):
        create_for_directory(tmp_path / "empty")


@pytest.mark.parametrize(("document", "where"), [
    ({"manifest_version": 1, "name": "m", "files": [{"path": "a", "size": -1, "sha256": "0" * 64}]}, "files/0/size"),
    ({"manifest_version": 1, "name": "m", "files": [{"path": "a", "size": 1, "sha256": "xyz"}]}, "files/0/sha256"),
    ({"manifest_version": 1, "files": []}, "(top level)"),
])
def test_an_invalid_document_names_where(document: dict, where: str) -> None:
    with pytest.raises(ManifestError, match=f"invalid manifest at {where.replace('(', '.').replace(')', '.')}"):
        Manifest.from_dict(document, origin="test")


def test_the_schema_is_itself_valid() -> None:
    """Reading a manifest no longer checks the schema every time (its validator is made once),
    so the schema file is checked here against its own meta-schema."""
    import jsonschema

    from weightship.manifest import schema

    jsonschema.validators.validator_for(schema()).check_schema(schema())


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", ".weightship/manifest.json"])
def test_paths_outside_the_directory_are_refused(path: str) -> None:
    with pytest.raises(WeightshipError):
        Manifest(name="m", files=[FileEntry(path=path, size=1, sha256="0" * 64)])


def test_a_path_listed_twice_is_refused() -> None:
    entry = FileEntry(path="a", size=1, sha256="0" * 64)
    with pytest.raises(ManifestError, match="twice"):
        Manifest(name="m", files=[entry, FileEntry(**{**entry.__dict__})])


def test_garbage_and_huge_files_are_refused_with_the_file_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe not json")
    with pytest.raises(ManifestError, match=f"{bad}: not valid JSON"):
        Manifest.load(bad)
    with bad.open("wb") as f:
        f.truncate((64 << 20) + 1)
    with pytest.raises(ManifestError, match="over 64 MiB"):
        Manifest.load(bad)
    with pytest.raises(ManifestError, match="no manifest at"):
        Manifest.load(tmp_path / "missing.json")


def test_write_never_follows_a_planted_link(tmp_path: Path) -> None:
    """Another user of a shared cache links .weightship/ (or the manifest) elsewhere: the write
    refuses or replaces the link, and the file it pointed at is untouched."""
    directory = _model(tmp_path)
    m = create_for_directory(directory)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    state = directory / ".weightship"
    state.mkdir()
    (state / "manifest.json").symlink_to(victim)
    m.write(directory)
    assert victim.read_text() == "keep me" and not (state / "manifest.json").is_symlink()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = _model(tmp_path / "other")
    os.symlink(elsewhere, other / ".weightship")
    with pytest.raises(WeightshipError):
        create_for_directory(other).write(other)
    assert list(elsewhere.iterdir()) == []


def test_a_changed_manifest_drops_its_stale_signature_and_an_unchanged_one_keeps_it(tmp_path: Path) -> None:
    directory = _model(tmp_path)
    m = create_for_directory(directory)
    m.write(directory)
    signature = directory / ".weightship" / SIGNATURE_NAME
    signature.write_text("signed")
    m.write(directory)  # the same bytes
    assert signature.exists()
    m.upsert(FileEntry(path="config.json", size=2, sha256="1" * 64, anchor="local"))
    m.write(directory)
    assert not signature.exists()


def test_atomic_write_leaves_no_temporary_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
