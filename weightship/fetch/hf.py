"""The ``hf`` source: a Hugging Face Hub repository (or a ``weightship mirror``) at one commit.

``hf://org/repo[@revision]``, or a card source ``{kind: hf, repo: org/repo, revision: …}``.
The Hub's listing (the request of ``HfApi.model_info(files_metadata=True)``) resolves the
revision to a commit and lists the files at that commit with their sizes and digests;
``HF_ENDPOINT`` and ``HF_TOKEN`` (or the login's token, read by huggingface_hub) apply. The
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
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import ClassVar
from urllib.parse import quote

from weightship import __version__
from weightship.errors import (
    AccessDeniedError,
    DigestMismatchError,
    FetchError,
    GatedRepoError,
    RemoteNotFoundError,
    UsageError,
)
from weightship.fetch import pins
from weightship.fetch.base import FetchPlan, PlannedFile
from weightship.fetch.ranged import RangedSource
from weightship.fetch.remote import RangeReader
from weightship.fetch.select import DEFAULT_OPTIONAL
from weightship.fetch.transport import Head, HttpPool, HttpRemote, raise_for_status, read_small
from weightship.manifest import SourceInfo

log = logging.getLogger(__name__)

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")  # git's SHA-1 or SHA-256 commit id
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

    def _listing(self, repo: str, revision: str) -> tuple[str, list[PlannedFile]]:
        """The commit that ``revision`` names and the files at it, each with its size and digest.

        One GET of ``/api/models/{repo}/revision/{revision}?blobs=true``, the request of
        ``HfApi.model_info(files_metadata=True)``, sent through this source's own pool: the same
        proxies, CA bundle, retries and reading of the Hub's error codes as its files, and not
        the 0.2 s import of huggingface_hub's API client for one request (paid by every node of
        a rollout)."""
        where = f"hf://{repo}@{revision}"
        url = f"{endpoint()}/api/models/{repo}/revision/{quote(revision, safe='')}?blobs=true"
        body = read_small(HubListing(self.pool, url, repo=repo, headers=self._hub_headers[0], where=where),
                          missing_ok=False)
        try:
            info = json.loads(body or b"")
            commit, siblings = info.get("sha"), info.get("siblings")
        except (ValueError, AttributeError):
            raise FetchError(f"{where}: the Hub's listing is not a JSON object") from None
        if not isinstance(commit, str) or not _COMMIT.match(commit) or not isinstance(siblings, list):
            raise FetchError(f"{where}: the Hub returned no commit id or file list")
        self._commit = commit
        return commit, [self._planned(repo, s, where) for s in siblings]

    def _planned(self, repo: str, sibling: object, where: str) -> PlannedFile:
        """One file of the listing: an LFS file by its sha256, a plain-git one by its blob id."""
        s = sibling if isinstance(sibling, dict) else {}
        name, lfs = s.get("rfilename"), s.get("lfs")
        if not isinstance(name, str) or not name:
            raise FetchError(f"{where}: the Hub's listing names a file without a path")
        if isinstance(lfs, dict) and _is_size(lfs.get("size")) and isinstance(lfs.get("sha256"), str):
            return PlannedFile(path=name, size=lfs["size"], sha256=lfs["sha256"], anchor="hf-lfs",
                               locator=self._url(repo, name))
        if lfs is None and isinstance(s.get("blobId"), str) and _is_size(s.get("size")):
            return PlannedFile(path=name, size=s["size"], sha256=None, git_sha1=s["blobId"], anchor="hf-git",
                               locator=self._url(repo, name))
        raise FetchError(f"hf://{repo}: the Hub gave no size and digest for {name}",
                         hint="the endpoint must answer /api/models/…/revision/…?blobs=true")

    def plan(self) -> FetchPlan:
        repo, revision = self._target()
        card = self.request.card
        if card is not None and not self.request.options.revision and card.hub_revision(self.spec) is None:
            log.warning("%s pins no Hub commit for %s: fetching main as it is now (the manifest "
                        "records the commit); pass --revision COMMIT to choose one", card.name, repo)
        commit, files = self._listing(repo, revision)
        if _COMMIT_PREFIX.match(revision) and not commit.startswith(revision):
            raise DigestMismatchError(f"hf://{repo}", expected=revision, actual=commit[:64], what="commit")
        name = self.request.card.name if self.request.card else repo.rsplit("/", 1)[-1]
        layout = self.request.layout or (self.request.card.default_layout if self.request.card else "hf")
        files = pins.hold_hub_listing(self.request, files, repo=repo, commit=commit,
                                      endpoint=endpoint(), public=endpoint() == _DEFAULT_ENDPOINT,
                                      layout=layout, default_optional=self.default_optional)
        return FetchPlan(name=name, layout=layout, files=files,
                         source=SourceInfo(kind="hf", uri=f"hf://{repo}", revision=commit))

    def _url(self, repo: str, path: str) -> str:
        assert self._commit is not None, "plan() resolves the commit first"
        return f"{endpoint()}/{repo}/resolve/{self._commit}/{quote(path)}"

    @functools.cached_property
    def _hub_headers(self) -> tuple[dict[str, str], dict[str, str]]:
        """(The token huggingface_hub would send, the user agent). The token is
        ``huggingface_hub.get_token()``'s (``HF_TOKEN``, the stored login, ...), none where
        ``HF_HUB_DISABLE_IMPLICIT_TOKEN`` says so. Not ``build_hf_headers``: from huggingface_hub
        2.4 on it also builds telemetry into the user agent (torch's version; an AI agent, detected
        with a registry it fetches from the endpoint once a day), which cost each fetch about
        0.06 CPU-s and, with a fresh ``HF_HOME`` (each init container), a request of its own."""
        import platform

        from huggingface_hub import __version__ as hf_version
        from huggingface_hub import constants, get_token

        token = None if constants.HF_HUB_DISABLE_IMPLICIT_TOKEN else get_token()
        agent = f"weightship/{__version__}; hf_hub/{hf_version}; python/{platform.python_version()}"
        return ({"authorization": f"Bearer {token}"} if token else {}), {"user-agent": agent}

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

    def check_reply(self, r: Head) -> None:
        """The Hub names the commit it answers from (``X-Repo-Commit``): it must be the pinned one."""
        said = r.headers.get("x-repo-commit")
        if self.commit is not None and said is not None and said != self.commit:
            raise DigestMismatchError(self.where, expected=self.commit, actual=said[:64], what="commit")

    def check_status(self, r: Head) -> None:
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


class HubListing(HubRemote):
    """The listing request: a repository or revision that does not exist is said as such."""

    def check_status(self, r: Head) -> None:
        code = r.headers.get("x-error-code")
        if code == "RevisionNotFound":
            raise RemoteNotFoundError(self.where, "no such revision",
                                      hint="give a branch, tag or commit that exists")
        # The public Hub answers 401 RepoNotFound for a private repository asked without a token
        if code == "RepoNotFound" or (r.status in (401, 404) and not code):
            raise RemoteNotFoundError(self.where, "no such repository (or it is private)",
                                      hint="check the name; for a private repository set HF_TOKEN")
        super().check_status(r)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
