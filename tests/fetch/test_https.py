"""The https source and the shared ranged downloader, against a static server that can lie."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import assert_clean_failure, assert_same_files, run_cli
from tests.fetch.conftest import KeyPair
from tests.fetch.killing import RESUME_BOUND, kill_at_random_points
from tests.fetch.webserver import FileServer, serve
from weightship.errors import DigestMismatchError, FetchError, IntegrityError
from weightship.fetch import FetchOptions, TransferOptions, build_request, fetch
from weightship.manifest import Manifest, create_for_directory

FAST = FetchOptions(transfer=TransferOptions(retries=2, backoff=0.01, backoff_max=0.05, stall_timeout=1.0,
                                             chunk_size=256 << 10, connections=3))


@pytest.fixture
def fast(signing_key: KeyPair) -> FetchOptions:
    """:data:`FAST`, trusting the key the served manifests are signed with (these servers speak
    plain HTTP, where an unsigned manifest is no anchor)."""
    return dataclasses.replace(FAST, trust_keys=(signing_key.public,))


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair) -> Path:
    """A model directory of two random files (1.3 MiB and 700 KiB) and its signed manifest."""
    d = tmp_path_factory.mktemp("small") / "small-model"
    d.mkdir()
    rng = random.Random(3)
    (d / "a.safetensors").write_bytes(rng.randbytes((1 << 20) + 300_000))
    (d / "sub").mkdir()
    (d / "sub" / "b.json").write_bytes(rng.randbytes(700_000))
    create_for_directory(d).write(d)
    from weightship.signing import sign_directory

    sign_directory(d, signing_key.private)
    return d


@pytest.fixture
def server(small_dir: Path) -> Iterator[FileServer]:
    with serve(small_dir) as s:
        yield s


def test_fetch_tiny_over_https_then_verify(signed_tiny_dir: Path, signing_key: KeyPair, tmp_path: Path) -> None:
    with serve(signed_tiny_dir) as s:
        r = run_cli("fetch", s.url, "--to", tmp_path / "m", "--json", "--trust-key", signing_key.public)
    assert r.code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["manifest"]["source"] == {"kind": "https", "uri": s.url, "revision": None, "infohash": None}
    assert {f["anchor"] for f in out["manifest"]["files"]} == {"signed-manifest"}
    assert run_cli("verify", tmp_path / "m").code == 0
    assert_same_files(signed_tiny_dir, tmp_path / "m")


def test_big_model_in_parallel_ranges(signed_big_dir: Path, signing_key: KeyPair, tmp_path: Path) -> None:
    big_model_dir = signed_big_dir
    with serve(big_model_dir) as s:
        result = fetch(build_request(s.url, options=FetchOptions(
            transfer=TransferOptions(chunk_size=4 << 20), trust_keys=(signing_key.public,))), tmp_path / "m")
        served = s.bytes_served
    total = Manifest.load(big_model_dir).total_bytes
    assert result.downloaded_bytes == total
    assert served <= total + 64 << 10  # the manifest itself, and nothing fetched twice
    assert_same_files(big_model_dir, tmp_path / "m")
    assert not list((tmp_path / "m" / ".weightship").rglob("*.incomplete*"))


@pytest.mark.parametrize("fault", ["ignore_range", "wrong_range", "short", "bad_length",
                                   "status_503", "etag_change", "stall", "range_as_200"])
def test_a_server_that_lies_once_is_recovered_from(server: FileServer, small_dir: Path,
                                                   tmp_path: Path, fault: str, fast: dict[str, object]) -> None:
    server.lie(fault, times=1, paths={"a.safetensors"})
    fetch(build_request(server.url, options=fast), tmp_path / "m")
    assert_same_files(small_dir, tmp_path / "m")
    assert fault not in server.faults  # the lie was told


@pytest.mark.parametrize("fault", ["ignore_range", "wrong_range", "short", "bad_length",
                                   "status_416", "status_503", "etag_change", "flip", "range_as_200"])
def test_a_server_that_always_lies_never_gets_a_wrong_file_promoted(
        server: FileServer, small_dir: Path, tmp_path: Path, fault: str, fast: dict[str, object]) -> None:
    server.lie(fault, paths={"a.safetensors"})
    dest = tmp_path / "m"
    try:
        fetch(build_request(server.url, options=fast), dest)
    except (FetchError, IntegrityError) as e:
        assert not (dest / "a.safetensors").exists(), e
        assert not (dest / ".weightship" / "manifest.json").exists()
        if fault == "flip":
            assert isinstance(e, DigestMismatchError)
    else:  # recovered (a server that ignores ranges is read whole): the bytes must be right
        assert fault in {"ignore_range", "etag_change", "short", "range_as_200"}, fault
        assert_same_files(small_dir, dest)


def test_flipped_bit_exits_3_and_a_rerun_from_a_good_server_finishes(
        server: FileServer, small_dir: Path, tmp_path: Path, signing_key: KeyPair) -> None:
    server.lie("flip", times=1, paths={"a.safetensors"})
    dest = tmp_path / "m"
    r = run_cli("fetch", server.url, "--to", dest, "--chunk-mib", "1", "--trust-key", signing_key.public)
    assert_clean_failure(r, 3)
    assert not (dest / "a.safetensors").exists()
    assert run_cli("fetch", server.url, "--to", dest, "--trust-key", signing_key.public).code == 0
    assert_same_files(small_dir, dest)


def test_no_manifest_no_fetch(tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "x.safetensors").write_bytes(b"x" * 100)
    with serve(tmp_path / "srv") as s:
        r = run_cli("fetch", s.url, "--to", tmp_path / "m")
    assert_clean_failure(r, 1)
    assert "no manifest" in r.stderr and "--manifest" in r.stderr


def test_user_manifest_is_the_anchor(server: FileServer, small_dir: Path, tmp_path: Path) -> None:
    m = Manifest.load(small_dir)
    m.files[0].sha256 = hashlib.sha256(b"something else").hexdigest()
    (tmp_path / "wrong.json").write_text(json.dumps(m.to_dict()))
    r = run_cli("fetch", server.url, "--to", tmp_path / "m", "--manifest", tmp_path / "wrong.json")
    assert_clean_failure(r, 3)


def test_kill_9_at_random_points_then_resume(signed_big_dir: Path, signing_key: KeyPair, tmp_path: Path) -> None:
    big_model_dir = signed_big_dir
    total = Manifest.load(big_model_dir).total_bytes
    dest = tmp_path / "m"
    trust = ["--trust-key", str(signing_key.public)]
    with serve(big_model_dir) as s:
        s.delay = 0.0005  # ~100 MB/s, so that kills land all through the download
        landed = kill_at_random_points(s.url, dest, total, kills=10, seed=11, extra=trust)
        r = run_cli("fetch", s.url, "--to", dest, "--json", *trust)
        served = s.bytes_served
    assert r.code == 0, r.stderr
    assert run_cli("verify", dest).code == 0
    assert_same_files(big_model_dir, dest)
    # Bytes fetched twice are bounded by the chunks in flight at each kill, plus the manifests
    # and their signatures.
    print(f"https: {landed} kills mid-download, {served - total:,} bytes served twice "
          f"(bound {landed * RESUME_BOUND:,})")
    assert landed >= 5
    assert served - total <= landed * RESUME_BOUND + 11 * (64 << 10), (served - total, landed)


def test_disk_full_is_a_clean_error_and_the_partial_resumes(signed_big_dir: Path, signing_key: KeyPair,
                                                            tmp_path: Path) -> None:
    big_model_dir = signed_big_dir
    dest = tmp_path / "m"
    with serve(big_model_dir) as s:
        limit = 40 << 20  # RLIMIT_FSIZE: writes past 40 MiB in one file fail with EFBIG
        code = (f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}));"
                f"from weightship.cli.app import main; sys.argv=['weightship','fetch',{s.url!r},"
                f"'--to',{str(dest)!r},'--chunk-mib','4','--trust-key',{str(signing_key.public)!r}]; main()")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, p.stderr
        assert "Traceback" not in p.stderr and "no space left" in p.stderr, p.stderr
        partial = list((dest / ".weightship" / "incoming").rglob("*.journal"))
        assert partial, "the partial download and its journal are kept"
        assert not (dest / ".weightship" / "manifest.json").exists()
        r = run_cli("fetch", s.url, "--to", dest, "--json", "--trust-key", signing_key.public)
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["resumed_bytes"] > 0
    assert_same_files(big_model_dir, dest)




def test_a_manifest_whose_body_breaks_off_is_fetched_again(server: FileServer, small_dir: Path,
                                                           tmp_path: Path, fast: dict[str, object]) -> None:
    """Issue 17, item 7: a small GET that breaks mid-body (IncompleteRead) is retried."""
    server.lie("short_whole", times=1, paths={".weightship/manifest.json"})
    fetch(build_request(server.url, options=fast), tmp_path / "m")
    assert "short_whole" not in server.faults  # the body did break off once
    assert_same_files(small_dir, tmp_path / "m")


def test_a_manifest_over_the_size_cap_is_refused_once_not_retried(
        small_dir: Path, fast: FetchOptions, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A manifest larger than the cap (64 MiB; here lowered under the served one) is refused on
    the first answer: a retry would only be sent the same again."""
    from weightship.errors import TransientFetchError
    from weightship.fetch import transport

    size = (small_dir / ".weightship" / "manifest.json").stat().st_size
    monkeypatch.setattr(transport, "SMALL_LIMIT", size - 1)
    with serve(small_dir) as s:
        with pytest.raises(FetchError, match=f"larger than {size - 1} bytes") as refused:
            fetch(build_request(s.url, options=fast), tmp_path / "m")
        asked = s.requests
    assert not isinstance(refused.value, TransientFetchError)
    assert asked == 1, asked  # the manifest, once; no file
    assert not (tmp_path / "m" / "a.safetensors").exists()
