"""Web seeds (BEP 19) and a generated 256 MiB model fetched by magnet link from three seeders."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.torrent.conftest import Seeder
from weightship.fetch import FetchOptions, PeerOptions, build_request, fetch
from weightship.manifest import Manifest, create_for_directory
from weightship.torrent.create import create_torrent


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """The standard library's file server plus single byte ranges, which web seeds request."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        spec = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not spec.startswith("bytes=") or not path.is_file():
            super().do_GET()
            return
        size = path.stat().st_size
        first_text, _, last_text = spec[6:].partition("-")
        first = int(first_text)
        last = min(int(last_text) if last_text else size - 1, size - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(first)
            self.wfile.write(f.read(last - first + 1))


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A plain HTTP server on loopback serving a directory (a mirror, as a web seed)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_fetch_from_a_web_seed_alone(tiny_hf_dir: Path, http_root: tuple[Path, str], tmp_path: Path) -> None:
    """No peer at all: every byte comes from the HTTP mirror the torrent names."""
    root, url = http_root
    (root / "weightship-tiny").symlink_to(tiny_hf_dir)  # BEP 19: URL + torrent name + path
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(create_torrent(tiny_hf_dir, webseeds=[url]).data)
    dest = tmp_path / "got"
    fetch(build_request(str(torrent), options=FetchOptions(peers=PeerOptions(listen="127.0.0.1:0"))), dest)
    got, want = Manifest.load(dest), Manifest.load(tiny_hf_dir)
    assert [(f.path, f.size, f.sha256) for f in got.files] == [(f.path, f.size, f.sha256) for f in want.files]


@pytest.mark.slow
def test_256_mib_model_by_magnet_from_three_seeders(seeder: Seeder, tmp_path: Path) -> None:
    model = tmp_path / "big-model"
    model.mkdir()
    with open(model / "model.safetensors", "wb") as f:
        for _ in range(4):
            f.write(os.urandom(64 << 20))
    (model / "config.json").write_text("{}\n")
    create_for_directory(model, name="big-model").write(model)
    created = create_torrent(model)
    seeds = [seeder(model, torrent=created.data) for _ in range(3)]
    dest = tmp_path / "got"
    r = run_cli("fetch", created.magnet, "--to", dest, *[a for s in seeds for a in ("--peer", s.listen[0])],
                timeout=300)
    assert r.code == 0, r
    assert run_cli("verify", dest).code == 0
    assert [(f.path, f.sha256) for f in Manifest.load(dest).files] == [
        (f.path, f.sha256) for f in Manifest.load(model).files]
