"""Running the mirror: in the foreground (``weightship mirror``) or in a thread (tests, benches)."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from weightship.errors import UsageError
from weightship.mirror.app import create_app
from weightship.threaded_server import ThreadedServer

log = logging.getLogger(__name__)


def read_tokens(token_file: Path | None) -> frozenset[str]:
    """The tokens in ``token_file`` (one a line; blank lines and ``#`` comments skipped)."""
    if token_file is None:
        return frozenset()
    try:
        lines = token_file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read --token-file {token_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--token-file {token_file} is not UTF-8 text") from None
    tokens = frozenset(t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#"))
    if not tokens:
        raise UsageError(f"--token-file {token_file} holds no token")
    return tokens


@dataclass(frozen=True)
class Tls:
    """The certificate chain and private key the mirror presents (PEM files), loaded once here
    so that a wrong file is a usage error and not a failed start."""

    cert: Path
    key: Path

    def __post_init__(self) -> None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"cannot use --tls-cert {self.cert} with --tls-key {self.key}: {e}") from None


def _config(root: Path, host: str, port: int, tokens: frozenset[str], tls: Tls | None) -> uvicorn.Config:
    if not root.is_dir():
        raise UsageError(f"mirror root {root} is not a directory")
    return uvicorn.Config(create_app(root, tokens=tokens), host=host, port=port, log_level="warning",
                          access_log=False, timeout_keep_alive=30, lifespan="off",
                          ssl_certfile=tls.cert if tls else None, ssl_keyfile=tls.key if tls else None)


def serve_forever(root: Path, *, host: str = "127.0.0.1", port: int = 8080,
                  tokens: frozenset[str] = frozenset(), tls: Tls | None = None) -> None:
    """Serve until interrupted."""
    uvicorn.Server(_config(root, host, port, tokens, tls)).run()


class MirrorServer:
    """The mirror on a free loopback port in a background thread; a context manager."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", tokens: frozenset[str] = frozenset(),
                 tls: Tls | None = None) -> None:
        config = _config(root, host, 0, tokens, tls)
        self.scheme = "https" if tls else "http"
        self._app: Starlette = config.app  # type: ignore[assignment]
        self._threaded = ThreadedServer(uvicorn.Server(config), host=host, name="mirror")
        self.host = host
        self.port = self._threaded.port

    @property
    def bytes_sent(self) -> int:
        """File bytes served so far."""
        sent: int = self._app.state.api.bytes_sent
        return sent

    @property
    def url(self) -> str:
        """Its base URL (what ``HF_ENDPOINT`` is set to)."""
        return self._threaded.base_url(self.scheme)

    def start(self) -> MirrorServer:
        """Start and wait until it accepts connections."""
        self._threaded.start()
        return self

    def stop(self) -> None:
        """Stop and wait for the thread."""
        self._threaded.stop(timeout=10)

    def __enter__(self) -> MirrorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
