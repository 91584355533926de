"""The ``hf`` source: a Hugging Face Hub repository (or a ``weightship mirror``) at one commit.

``hf://org/repo[@revision]``, or a card source ``{kind: hf, repo: org/repo, revision: …}``.
``huggingface_hub`` resolves the revision to a commit and lists the files at that commit with
their sizes and digests, honouring ``HF_ENDPOINT`` and ``HF_TOKEN`` as it always does. The
public Hub's metadata is the trust anchor: the LFS sha256 for large files, the git blob sha1 for
small plain-git files (``config.json`` and friends) — the engine checks whichever the Hub gave,
and records a sha256 for every file. Another endpoint's listing is held to the catalog card and
trusted less (:func:`weightship.fetch.pins.hold_hub_listing`). The bytes come from
``/{repo}/resolve/{commit}/{path}`` by ranged GETs through the shared downloader (the Hub
redirects LFS files to its CDN).

A catalog card's source pins the commit (``revision:``); ``--revision`` overrides it, and a card
that pins none is fetched at ``main`` with a warning. When the revision asked for is a commit id
(or an abbreviation of one: 7 to 40 hex digits), the Hub must answer with a commit it begins.
The Hub's own error codes (``X-Error-Code`` and ``X-Error-Message``) are read on every reply: a
gated repository is one
:class:`~weightship.errors.GatedRepoError`, not a 403 per file.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import urllib3

from weightship.errors import (
    AccessDeniedError,
    DigestMismatchError,
    FetchError,
    GatedRepoError,
    RemoteNotFoundError,
    TransientFetchError,
    UsageError,
)
from weightship.fetch import pins
from weightship.fetch.base import FetchPlan, PlannedFile
from weightship.fetch.ranged import RangedSource
from weightship.fetch.remote import RangeReader
from weightship.fetch.retry import with_retries
from weightship.fetch.select import DEFAULT_OPTIONAL
from weightship.fetch.transport import HttpPool, HttpRemote, raise_for_status
from weightship.manifest import SourceInfo

log = logging.getLogger(__name__)

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_COMMIT_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")  # a commit id, or its abbreviation (as git's)
_DEFAULT_ENDPOINT = "https://huggingface.co"
_NOT_FOUND_CODES = ("RepoNotFound", "RevisionNotFound", "EntryNotFound")


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """``hf://org/repo[@revision]`` → (repo id, revision or None)."""
    rest = uri.removeprefix("hf://")
    repo, _, revision = rest.partition("@")
    repo = repo.strip("/")
    if not _REPO.match(repo) or ".." in repo:
        raise UsageError(f"not a Hub repository: {uri!r}", hint="use hf://org/name[@revision]")
    return repo, revision or None


def endpoint() -> str:
    """The Hub to talk to: ``HF_ENDPOINT`` (read now, so tests and long-lived processes see
    changes), else the public Hub."""
    return (os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT).rstrip("/")


class HfSource(RangedSource):
    """Fetches a Hub repository at a resolved commit."""

    kind: ClassVar[str] = "hf"
    default_optional: ClassVar[tuple[str, ...]] = DEFAULT_OPTIONAL
    _commit: str | None = None

    def _target(self) -> tuple[str, str]:
        if self.request.card is not None:
            repo = str(self.spec.get("repo") or "")
            revision = (self.request.options.revision
                        or self.request.card.hub_revision(self.spec) or "main")
            if not repo:
                raise UsageError(f"{self.request.card.name}: hf source without a repo")
            return repo, str(revision)
        repo, rev = parse_hf_uri(self.request.ref)
        return repo, str(self.request.options.revision or rev or "main")

    def _model_info(self, repo: str, revision: str) -> Any:
        """The Hub's description of ``repo`` at ``revision``, retried while the Hub is busy."""
        return with_retries(lambda: _hub_call(lambda: self._api().model_info(
            repo, revision=revision, files_metadata=True), repo, revision),
            self.transfer_options(), f"hf://{repo}@{revision}: the listing")

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=endpoint())

    def plan(self) -> FetchPlan:
        repo, revision = self._target()
        card = self.request.card
        if card is not None and not self.request.options.revision and card.hub_revision(self.spec) is None:
            log.warning("%s pins no Hub commit for %s: fetching main as it is now (the manifest "
                        "records the commit); pass --revision COMMIT to choose one", card.name, repo)
        info = self._model_info(repo, revision)
        if not info.sha or info.siblings is None:
            raise FetchError(f"hf://{repo}@{revision}: the Hub returned no commit or file list")
        if _COMMIT_PREFIX.match(revision) and not str(info.sha).startswith(revision):
            raise DigestMismatchError(f"hf://{repo}", expected=revision, actual=str(info.sha),
                                      what="commit")
        self._commit = info.sha
        files = []
        for s in info.siblings:
            if s.lfs is not None:
                files.append(PlannedFile(path=s.rfilename, size=s.lfs.size, sha256=s.lfs.sha256,
                                         anchor="hf-lfs", locator=self._url(repo, s.rfilename)))
            elif s.blob_id and s.size is not None:
                files.append(PlannedFile(path=s.rfilename, size=s.size, sha256=None,
                                         git_sha1=s.blob_id, anchor="hf-git",
                                         locator=self._url(repo, s.rfilename)))
            else:
                raise FetchError(f"hf://{repo}: the Hub gave no size and digest for {s.rfilename}",
                                 hint="the endpoint must answer /api/models/…/revision/…?blobs=true")
        name = self.request.card.name if self.request.card else repo.rsplit("/", 1)[-1]
        layout = self.request.layout or (self.request.card.default_layout if self.request.card else "hf")
        files = pins.hold_hub_listing(self.request, files, repo=repo, commit=info.sha,
                                      endpoint=endpoint(), public=endpoint() == _DEFAULT_ENDPOINT,
                                      layout=layout, default_optional=self.default_optional)
        return FetchPlan(name=name, layout=layout, files=files,
                         source=SourceInfo(kind="hf", uri=f"hf://{repo}", revision=info.sha))

    def _url(self, repo: str, path: str) -> str:
        assert self._commit is not None, "plan() resolves the commit first"
        return f"{endpoint()}/{repo}/resolve/{self._commit}/{quote(path)}"

    @functools.cached_property
    def _hub_headers(self) -> tuple[dict[str, str], dict[str, str]]:
        """huggingface_hub's headers, split: (the token from HF_TOKEN or the login, the rest)."""
        from huggingface_hub.utils import build_hf_headers

        headers = build_hf_headers(library_name="weightship")
        auth = {k: v for k, v in headers.items() if k.lower() == "authorization"}
        return auth, {k: v for k, v in headers.items() if k not in auth}

    def make_pool(self) -> HttpPool:
        return HttpPool(self.transfer_options(), headers=self._hub_headers[1])

    def remote(self, file: PlannedFile) -> RangeReader:
        if self._commit is None:
            self.plan()  # this source is a failover for another one's plan
        repo, _ = self._target()
        # The token goes with each file's requests, not the pool's defaults: the remote drops
        # it when the Hub redirects to another host (its CDN).
        return HubRemote(self.pool, self._url(repo, file.path), repo=repo, commit=self._commit,
                         headers=self._hub_headers[0], where=self.uri_for(file))

    def uri_for(self, file: PlannedFile) -> str:
        repo, _ = self._target()
        return f"hf://{repo}@{self._commit}/{file.path}"


class HubRemote(HttpRemote):
    """A file of a Hub repository; the Hub's error codes name what went wrong."""

    def __init__(self, pool: HttpPool, url: str, *, repo: str, headers: Mapping[str, str],
                 where: str, commit: str | None = None) -> None:
        super().__init__(pool, url, headers=headers, where=where)
        self.repo, self.commit = repo, commit

    def check_reply(self, r: urllib3.BaseHTTPResponse) -> None:
        """The Hub names the commit it answers from (``X-Repo-Commit``): it must be the pinned one."""
        said = r.headers.get("x-repo-commit")
        if self.commit is not None and said is not None and said != self.commit:
            raise DigestMismatchError(self.where, expected=self.commit, actual=said[:64], what="commit")

    def check_status(self, r: urllib3.BaseHTTPResponse) -> None:
        if r.status < 400:
            return
        code = r.headers.get("x-error-code")
        message = (r.headers.get("x-error-message") or "").strip() or None
        if code == "GatedRepo":
            raise GatedRepoError(self.repo, message)
        if code in _NOT_FOUND_CODES:
            raise RemoteNotFoundError(self.where, message or code or "not found")
        if code and r.status in (401, 403):
            raise AccessDeniedError(self.where, code + (f": {message}" if message else ""),
                                    hint="set HF_TOKEN to a token with access to this repository")
        raise_for_status(r.status, self.where)


def _hub_call(call: Any, repo: str, revision: str) -> Any:
    """Run a huggingface_hub call, turning its errors into weightship's (with a hint)."""
    from huggingface_hub.errors import GatedRepoError as HubGatedRepoError
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hf://{repo}@{revision}"
    try:
        return call()
    except HubGatedRepoError as e:
        raise GatedRepoError(repo, _first_line(e)) from None
    except RevisionNotFoundError:
        raise RemoteNotFoundError(where, "no such revision",
                                  hint="give a branch, tag or commit that exists") from None
    except RepositoryNotFoundError:
        raise RemoteNotFoundError(where, "no such repository (or it is private)",
                                  hint="check the name; for a private repository set HF_TOKEN") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is not None and (status >= 500 or status == 429):
            raise TransientFetchError(f"{where}: the Hub answered {status}") from None
        raise FetchError(f"{where}: {_first_line(e)}") from None
    except _transport_errors() as e:
        if _caused_by(e, ssl.SSLError):  # a certificate no retry will change
            raise FetchError(f"{where}: TLS failed at {endpoint()}: {e}",
                             hint="set SSL_CERT_FILE to the CA bundle that signs HF_ENDPOINT's certificate") from None
        raise TransientFetchError(f"{where}: cannot reach {endpoint()}: {type(e).__name__}: {e}",
                                  hint="check HF_ENDPOINT and the network") from None


def _caused_by(e: BaseException | None, kind: type[BaseException]) -> bool:
    """Whether ``e`` or an exception it was raised from or during is a ``kind``."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The connection-level errors of whichever HTTP library huggingface_hub uses."""
    import httpx

    kinds: list[type[BaseException]] = [httpx.HTTPError, OSError]
    try:
        import httpx2  # huggingface_hub >= 1.x ships its own fork of httpx

        kinds.append(httpx2.HTTPError)
    except ImportError:
        pass
    return tuple(kinds)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
