"""Seeding a directory other writers share (issue 17, item 12): libtorrent opens files by name
whenever a peer asks, so a file swapped for a link while seeding must stop the seeding rather
than have libtorrent serve whatever the link points to."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from weightship.errors import TorrentError, UnsafePathError
from weightship.torrent.seed import seed_directory


def test_a_file_swapped_for_a_link_while_seeding_stops_the_seeding(tiny_hf_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "shared" / "tiny"
    shutil.copytree(tiny_hf_dir, d)
    (tmp_path / "secret").write_text("a file of the pod that seeds, not of the model")
    ready = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            seed_directory(d, listen="127.0.0.1:0", duration=60, on_ready=lambda s: ready.set())
        except BaseException as e:
            errors.append(e)
        finally:
            ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(60) and not errors, errors
    link = d / "config.json.new"
    link.symlink_to(tmp_path / "secret")
    os.replace(link, d / "config.json")  # another pod with the same uid swaps the file
    t.join(30)
    assert not t.is_alive(), "seeding went on with a swapped file"
    assert len(errors) == 1 and isinstance(errors[0], TorrentError), errors
    assert "config.json was replaced" in str(errors[0])


def test_a_link_in_place_of_a_file_is_refused_before_seeding(tiny_hf_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    shutil.copytree(tiny_hf_dir, d)
    (tmp_path / "secret").write_bytes((d / "tokenizer.model").read_bytes())  # same size, elsewhere
    (d / "tokenizer.model").unlink()
    (d / "tokenizer.model").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError, match="symlink"):
        seed_directory(d, listen="127.0.0.1:0", duration=1)
