"""Fixtures for the BitTorrent tests: libtorrent seeders on loopback, started and always stopped."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from weightship.torrent.create import create_torrent
from weightship.torrent.seed import Seeding, seed_directory

Seeder = Callable[..., Seeding]


@pytest.fixture(scope="session")
def tiny_torrent(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A v1+v2 hybrid .torrent of the HF-layout tiny model."""
    out = tmp_path_factory.mktemp("torrents") / "tiny.torrent"
    out.write_bytes(create_torrent(tiny_hf_dir).data)
    return out


@pytest.fixture
def seeder() -> Iterator[Seeder]:
    """Start libtorrent seeders of a directory on loopback: ``seeder(dir, torrent=bytes|None)``."""
    stops: list[threading.Event] = []
    threads: list[threading.Thread] = []

    def start(directory: Path, *, torrent: bytes | None = None, host: str = "127.0.0.1",
              **kwargs: object) -> Seeding:
        stop, ready = threading.Event(), threading.Event()
        info: list[Seeding] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                seed_directory(directory, torrent=torrent, listen=f"{host}:0", stop=stop.is_set,
                               on_ready=lambda s: (info.append(s), ready.set()), **kwargs)  # type: ignore[arg-type]
            except BaseException as e:
                errors.append(e)
                ready.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        stops.append(stop)
        threads.append(t)
        assert ready.wait(60), "the seeder did not start"
        if errors:
            raise errors[0]
        return info[0]

    yield start
    for s in stops:
        s.set()
    for t in threads:
        t.join(30)
