"""The commit a mirror answers for a directory fetched from the Hub is the Hub commit it was
fetched at, so clients pinned to that commit (a catalog card's pin, ``hf://org/name@COMMIT``,
huggingface_hub at a revision) are served by a mirror of it; a directory that records none keeps
the mirror's own derived id.

The directory is fetched for real (``weightship fetch`` of the Mistral card's tokenizer from the
Hub stand-in of :mod:`tests.fetch.hubstub`, which answers for the card's pinned commit), then
served by ``weightship mirror`` run as the command a user runs, and read back by
``weightship fetch`` and by the real huggingface_hub client."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import RevisionNotFoundError

from tests.conftest import run_cli
from tests.fetch.hubstub import HubRepo, hub
from tests.net import free_port, listening, wait_until
from weightship.manifest import Manifest, SourceInfo
from weightship.mirror.repos import describe

MISTRAL = "mistralai/Mistral-7B-v0.1"
PINNED = "27d67f1b5f57dc0953326b2601d68371d40ea8da"  # the card's pin for the Hub repo
TOKENIZER = (importlib.resources.files("weightship.catalog") / "data" / "tokenizer.model.v1").read_bytes()


@pytest.fixture(scope="module")
def root(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mistralai/Mistral-7B-v0.1`` fetched from a Hub at the card's commit (the tokenizer
    only), and ``weightship/tiny``, a directory that records no Hub commit."""
    root = tmp_path_factory.mktemp("mirror-commit")
    with hub(tmp_path_factory.mktemp("cdn")) as h:
        h.add(MISTRAL, HubRepo(commit=PINNED, files={"tokenizer.model": TOKENIZER}))
        r = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--include", "tokenizer.model",
                    "--to", root / MISTRAL, env={"HF_ENDPOINT": h.url})
    assert r.code == 0, r.stderr
    assert Manifest.load(root / MISTRAL).source == SourceInfo(kind="hf", uri=f"hf://{MISTRAL}",
                                                              revision=PINNED)
    shutil.copytree(tiny_hf_dir, root / "weightship" / "tiny", copy_function=os.link)
    return root


@pytest.fixture(scope="module")
def mirror(root: Path) -> Iterator[str]:
    """``weightship mirror ROOT`` as a user runs it; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "weightship", "mirror", str(root),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: listening(port), 60, "the mirror to listen", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_card_fetches_its_pinned_commit_from_a_mirror(mirror: str, tmp_path: Path) -> None:
    r = run_cli("fetch", "mistral-7b-v0.1", "--source", "hf", "--include", "tokenizer.model",
                "--to", tmp_path / "m", "--json", env={"HF_ENDPOINT": mirror})
    assert r.code == 0, r.stderr  # was: exit 1, "no such revision" (the mirror's own id only)
    m = json.loads(r.stdout)["manifest"]
    assert m["source"]["revision"] == PINNED
    assert [(f["path"], f["anchor"]) for f in m["files"]] == [("tokenizer.model", "catalog")]
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == TOKENIZER


def test_an_hf_uri_at_the_upstream_commit_is_served(mirror: str, tmp_path: Path) -> None:
    r = run_cli("fetch", f"hf://{MISTRAL}@{PINNED}", "--to", tmp_path / "m", "--json",
                env={"HF_ENDPOINT": mirror})
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["manifest"]["source"]["revision"] == PINNED
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == TOKENIZER


def test_huggingface_hub_reads_the_upstream_commit_and_main(mirror: str, tmp_path: Path) -> None:
    api = HfApi(endpoint=mirror)
    assert api.model_info(MISTRAL).sha == PINNED  # main is that commit
    assert api.model_info(MISTRAL, revision=PINNED).sha == PINNED
    got = hf_hub_download(MISTRAL, "tokenizer.model", revision=PINNED, endpoint=mirror,
                          cache_dir=tmp_path / "hf")
    assert Path(got).read_bytes() == TOKENIZER
    assert Path(got).parent.name == PINNED  # the client filed it under the commit it was told
    snap = snapshot_download(MISTRAL, revision=PINNED, endpoint=mirror, cache_dir=tmp_path / "s")
    assert (Path(snap) / "tokenizer.model").read_bytes() == TOKENIZER


def test_a_directory_without_a_hub_commit_keeps_the_mirrors_own_id(mirror: str, root: Path,
                                                                   tmp_path: Path) -> None:
    api = HfApi(endpoint=mirror)
    own = api.model_info("weightship/tiny").sha
    assert own is not None and own != PINNED
    assert api.model_info("weightship/tiny", revision=own).sha == own
    with pytest.raises(RevisionNotFoundError):
        api.model_info("weightship/tiny", revision=PINNED)
    r = run_cli("fetch", f"hf://weightship/tiny@{own}", "--to", tmp_path / "t", env={"HF_ENDPOINT": mirror})
    assert r.code == 0, r.stderr


@pytest.mark.parametrize(("kind", "revision", "upstream"), [
    ("hf", PINNED, True), ("hf", "main", False), ("hf", PINNED.upper(), False),
    ("hf", PINNED[:12], False), ("s3", PINNED, False), ("builtin", "1234", False)])
def test_only_a_recorded_hub_commit_is_answered(root: Path, tmp_path: Path, kind: str,
                                                revision: str, upstream: bool) -> None:
    d = tmp_path / "d"
    shutil.copytree(root / MISTRAL, d, copy_function=os.link)
    m = Manifest.load(d)
    dataclasses.replace(m, source=SourceInfo(kind=kind, uri="x://y", revision=revision)).write(d)
    repo = describe("a/b", d)
    assert (repo.commit == revision) is upstream
    assert len(repo.commit) == 40 and repo.has_revision("main") and repo.has_revision(repo.commit)
