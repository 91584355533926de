"""The persistent compile cache: two real ``weightship serve --compile`` starts on CPU (the second
compiles nothing), a corrupt cache emptied and compiled afresh, keys that differ in anything
the compiled code depends on opening different directories."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from tests.net import free_port, wait_until
from weightship.catalog.architecture import Architecture
from weightship.runtime import compile_cache
from weightship.runtime.compile_cache import KEY_FILE, CompileCache, cache_key, digest_of, recover_from

READY = re.compile(r"ready in [\d.]+ s: .*; compile cache (\S+): (\d+) graphs reused, (\d+) compiled")


@dataclasses.dataclass
class Start:
    """One ``serve`` process's start: where its cache was, what it reused and compiled, its log."""

    directory: Path
    reused: int
    compiled: int
    log: str
    answer: list[str]


@contextmanager
def serve(model: Path, log: Path, *args: str | Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``weightship serve MODEL --compile`` at batch 1 on CPU until its start-up line is logged."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTSHIP_DEBUG"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "weightship", "serve", str(model), "--port", str(port),
             "--device", "cpu", "--compile", "--max-batch", "1", "--max-model-len", "256",
             *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: READY.search(log.read_text(errors="replace")) is not None, 300,
                   f"serve's start-up line in {log}", proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def start(model: Path, log: Path, *args: str | Path) -> Start:
    with serve(model, log, *args) as (url, _):
        body = {"prompt": "The compile cache", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        text = log.read_text(errors="replace")
    m = READY.search(text)
    assert m is not None, text
    return Start(Path(m[1]), int(m[2]), int(m[3]), text, [r.json()["choices"][0]["text"]])


def artifacts(directory: Path) -> dict[str, int]:
    """Every file the compiler left, with its modification time (ns); key.json aside."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns
            for p in directory.rglob("*") if p.is_file() and p.name != KEY_FILE}


@pytest.fixture(scope="module")
def cold(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Start, dict[str, int]]:
    """A writable copy of the tiny model, started once (a cold start), and what it left in the
    default cache directory."""
    model = tmp_path_factory.mktemp("cc") / "tiny"
    shutil.copytree(tiny_hf_dir, model)
    first = start(model, model.parent / "cold.log")
    return model, first, artifacts(first.directory)


def test_a_second_start_compiles_nothing(cold: tuple[Path, Start, dict[str, int]]) -> None:
    """What a restarted pod or unit notices: the decode step is not compiled again (the cache in
    the model's state directory by default), and it answers exactly as before."""
    model, first, before = cold
    assert first.directory.parent == model / ".weightship" / "compile-cache"
    assert first.reused == 0 and first.compiled >= 1, first.log
    assert any(name.endswith((".so", ".py")) for name in before), before
    second = start(model, model.parent / "warm.log")  # verifies the model again, cache and all
    assert second.directory == first.directory
    assert (second.reused, second.compiled) == (first.compiled, 0), second.log
    assert artifacts(second.directory) == before  # nothing written again, nothing added
    assert "eagerly" not in second.log
    assert second.answer == first.answer


def test_a_corrupt_cache_is_emptied_and_compiled_afresh(cold: tuple[Path, Start, dict[str, int]],
                                                        tmp_path: Path) -> None:
    model, first, _ = cold
    root = tmp_path / "cache"
    shutil.copytree(first.directory.parent, root)
    broken = 0
    for p in (root / first.directory.name).rglob("*.so"):  # the compiled kernels, cut short
        p.write_bytes(p.read_bytes()[:100])
        broken += 1
    assert broken
    again = start(model, tmp_path / "corrupt.log", "--compile-cache", root)
    assert again.directory == root / first.directory.name
    assert "could not be used" in again.log and "emptied, compiling afresh" in again.log, again.log
    assert again.compiled >= 1 and "eagerly" not in again.log, again.log  # compiled, not eager
    assert again.answer == first.answer


# ---- keys and directories, in-process ------------------------------------------------------------


ARCH = Architecture(dim=64, n_layers=1, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                    norm_eps=1e-5, vocab_size=100)


def key(model: Path, **change: object) -> dict[str, object]:
    k = cache_key(arch=ARCH, device=torch.device("cpu"), dtype=torch.float32, max_batch=4,
                  max_model_len=256, model_dir=model, options={"compile_step": True})
    return {**k, **change}


@pytest.fixture
def restore_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    yield
    CompileCache.current = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_the_key_covers_what_compiled_code_depends_on(tiny_copy: Path) -> None:
    base = key(tiny_copy)
    assert base["model"].startswith("manifest:")  # type: ignore[union-attr]
    variants = [
        cache_key(arch=dataclasses.replace(ARCH, dim=128), device=torch.device("cpu"), dtype=torch.float32,
                  max_batch=4, max_model_len=256, model_dir=tiny_copy, options={"compile_step": True}),
        key(tiny_copy, dtype="bfloat16"), key(tiny_copy, max_batch=8), key(tiny_copy, max_model_len=512),
        key(tiny_copy, torch="2.99.0"), key(tiny_copy, weightship="9.9"), key(tiny_copy, device="cuda H200"),
        key(tiny_copy, options={"compile_step": False}),
    ]
    digests = {digest_of(base), *(digest_of(v) for v in variants)}
    assert len(digests) == 1 + len(variants)
    # the model's identity is its manifest's file list: re-verifying it changes nothing ...
    manifest = tiny_copy / ".weightship" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(data, indent=1))
    assert key(tiny_copy) == base
    # ... other weights do
    data["files"][0]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    assert key(tiny_copy)["model"] != base["model"]


@pytest.mark.usefixtures("restore_env")
def test_a_different_key_starts_from_an_empty_directory(tiny_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    a = CompileCache(root, key(tiny_copy))
    assert a.open() and not a.had_entries
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(a.directory / "inductor")
    (a.directory / "inductor").mkdir()
    (a.directory / "inductor" / "graph").write_text("compiled for key a")
    again = CompileCache(root, key(tiny_copy))
    assert again.open() and again.had_entries  # the same key finds its artifacts
    b = CompileCache(root, key(tiny_copy, max_model_len=512))
    assert b.open() and not b.had_entries and b.directory != a.directory
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(b.directory / "inductor")
    assert not recover_from(RuntimeError("a compile error"))  # an empty cache is not to blame
    assert (a.directory / "inductor" / "graph").exists()  # the other key's artifacts are kept


@pytest.mark.usefixtures("restore_env")
def test_a_directory_holding_another_key_is_emptied(tiny_copy: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    a = CompileCache(root, key(tiny_copy))
    a.open()
    (a.directory / "stale").write_text("x")
    (a.directory / KEY_FILE).write_text(json.dumps(key(tiny_copy, torch="0.1")))
    with caplog.at_level(logging.WARNING):
        again = CompileCache(root, key(tiny_copy))
        assert again.open()
    assert "names another key" in caplog.text
    assert not again.had_entries and not (a.directory / "stale").exists()
    assert json.loads((a.directory / KEY_FILE).read_text()) == again.key
    (a.directory / KEY_FILE).write_text("{not json")  # cut short
    third = CompileCache(root, key(tiny_copy))
    assert third.open() and json.loads((a.directory / KEY_FILE).read_text()) == third.key


@pytest.mark.usefixtures("restore_env")
def test_recovering_from_a_failed_compile_empties_the_cache_once(tiny_copy: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    cache = CompileCache(root, key(tiny_copy))
    (cache.directory / "inductor").mkdir(parents=True)
    (cache.directory / "inductor" / "kernel.so").write_bytes(b"\x7fELF cut short")
    cache.open()
    assert cache.had_entries
    with caplog.at_level(logging.WARNING):
        assert recover_from(OSError("kernel.so: invalid ELF header"))
    assert "invalid ELF header" in caplog.text
    assert not (cache.directory / "inductor" / "kernel.so").exists()
    assert (cache.directory / KEY_FILE).exists()
    assert not recover_from(OSError("again"))  # a second failure is not the cache's: eager


@pytest.mark.usefixtures("restore_env")
def test_only_the_most_recently_used_keys_are_kept(tiny_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    dirs = []
    for i in range(compile_cache.KEEP + 2):
        c = CompileCache(root, key(tiny_copy, max_batch=i + 1))
        assert c.open()
        os.utime(c.directory / KEY_FILE, (1000 + i, 1000 + i))  # used in this order
        dirs.append(c.directory)
    kept = sorted(p for p in root.iterdir() if p.is_dir())
    assert kept == sorted(dirs[-compile_cache.KEEP:])


@pytest.mark.usefixtures("restore_env")
def test_an_unwritable_cache_is_skipped_with_a_warning(tiny_copy: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with caplog.at_level(logging.WARNING):
        assert not CompileCache(blocker / "cache", key(tiny_copy)).open()
    assert "cannot be used" in caplog.text and "--compile-cache" in caplog.text
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before and CompileCache.current is None


def test_the_chart_keeps_the_cache_on_the_model_volume() -> None:
    """serve.compileCache=true: serve is given the cache directory, the only part of the model
    volume it may write besides the usage log's, made by an init container as the chart's uid;
    the objects stay valid under restricted Pod Security."""
    from weightship.deploy.k8s import helm as engine
    from weightship.deploy.k8s.deployer import check_objects

    chart = Path(__file__).parents[2] / "helm" / "weightship"
    values = {"serve": {"compileCache": True}, "storage": {"mode": "perPodPVC"}}
    rendered = engine.render(chart, values, release="demo", namespace="ml")
    workload = next(o for o in rendered.objects if o["kind"] in ("Deployment", "StatefulSet"))
    spec = workload["spec"]["template"]["spec"]
    serve = spec["containers"][0]
    i = serve["args"].index("--compile-cache")
    assert serve["args"][i + 1] == "/var/lib/weightship/compile-cache"
    writable = [m for m in serve["volumeMounts"] if m["name"] == "models" and not m.get("readOnly")]
    assert writable == [{"name": "models", "mountPath": "/var/lib/weightship/compile-cache",
                         "subPath": ".compile-cache"}]
    (init,) = [c for c in spec["initContainers"] if c["name"] == "compile-cache-dir"]
    assert init["command"] == ["mkdir", "-p", "/models/.compile-cache"]
    problems, _, _ = check_objects(rendered.objects + rendered.hooks, engine.effective_values(chart, values))
    assert problems == []
    default = engine.render(chart, {}, release="demo", namespace="ml")
    workload = next(o for o in default.objects if o["kind"] in ("Deployment", "StatefulSet"))
    assert "--compile-cache" not in workload["spec"]["template"]["spec"]["containers"][0]["args"]
