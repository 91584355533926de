"""A persistent compile cache: what torch.compile made at one start, reused by the next.

Inductor keeps everything it compiles (FX-graph and AOT-autograd cache entries, the generated
C++ or Triton code and its binaries, autotuning results) under ``TORCHINDUCTOR_CACHE_DIR``, and
Triton under ``TRITON_CACHE_DIR``. By default both live under ``$TMPDIR``, which a pod or a
unit's ``PrivateTmp`` loses at every start: the 7B decode step was compiled afresh each time
(143 s on an H200). A :class:`CompileCache` points both at ``ROOT/<key>/``, where ``key`` is a
digest of everything the compiled code depends on — the device model, dtype, shapes, the
compile options and the versions of Python, torch, Triton and weightship, and the model's
manifest — so a start that differs in any of them compiles into a fresh directory (a
mismatch recompiles, never loads foreign code). ``key.json`` beside the artifacts says what
the key was; the three most recently used keys under a root are kept.

A start whose cache turns out unusable (a corrupt or truncated artifact: inductor then fails
to load it and the compilation raises) empties its directory with a warning and compiles once
more (:func:`recover_from`); only a failure with an empty cache falls back to eager.

Measured on CPU (``serve --compile``, weightship-tiny, the decode step at batch 1 and 2):
warm-up 27 s cold, 7 s with this directory kept (what is left is Dynamo tracing the step);
torch's portable mega-cache (``torch.compiler.save_cache_artifacts``/``load_cache_artifacts``)
loaded into an empty directory gave 20.6 s (it holds no compiled C++, which is built again),
and on top of a kept directory nothing more: the directory is what is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import torch

from weightship import __version__
from weightship.catalog.architecture import Architecture
from weightship.errors import ManifestError
from weightship.paths import STATE_DIR

log = logging.getLogger(__name__)

FORMAT = 1  # of the key and the directory's layout
KEEP = 3  # key directories kept under one root: the one in use and the two used before it
KEY_FILE = "key.json"


def default_root(model_dir: Path) -> Path:
    """Where the cache goes unless ``--compile-cache`` says otherwise: in the model directory's
    state directory, beside its manifest."""
    return model_dir / STATE_DIR / "compile-cache"


def device_kind(device: torch.device) -> str:
    """The device model the compiled code was made for (compiled code is specific to it)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda {props.name} sm_{props.major}{props.minor} cuda {torch.version.cuda}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    # inductor's C++ is built for the host's vector ISA
    return f"cpu {platform.machine()} {model or platform.processor()} {torch.backends.cpu.get_cpu_capability()}"


def model_digest(model_dir: Path) -> str:
    """The model's identity: the sha256 of its manifest's file list (paths, sizes, digests), or
    without a manifest of its files' names, sizes and modification times."""
    from weightship.manifest import Manifest, manifest_path

    h = hashlib.sha256()
    try:
        manifest = Manifest.load(manifest_path(model_dir))
    except (OSError, ManifestError):  # no manifest (serve --no-verify), or one that does not load
        for p in sorted(model_dir.iterdir()):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "files:" + h.hexdigest()
    for f in sorted(manifest.files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return "manifest:" + h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cache_key(*, arch: Architecture, device: torch.device, dtype: torch.dtype, max_batch: int,
              max_model_len: int, model_dir: Path, options: Mapping[str, object]) -> dict[str, object]:
    """Everything the compiled decode step and elementwise kernels depend on."""
    return {
        "format": FORMAT,
        "weightship": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "device": device_kind(device),
        "dtype": str(dtype).removeprefix("torch."),
        "architecture": dataclasses.asdict(arch),
        "max_batch": max_batch,
        "max_model_len": max_model_len,
        "options": dict(options),
        "model": model_digest(model_dir),
    }


def digest_of(key: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CacheStats:
    """Graphs of this process found in the cache, and compiled (inductor's FX-graph cache)."""

    reused: int
    compiled: int


def _inductor_counts() -> tuple[int, int]:
    if "torch._dynamo" not in sys.modules:
        return 0, 0
    from torch._dynamo.utils import counters as all_counters

    counters = all_counters["inductor"]
    return int(counters["fxgraph_cache_hit"]), int(counters["fxgraph_cache_miss"])


class CompileCache:
    """torch.compile's and Triton's caches under ``root/<digest of key>/``."""

    current: ClassVar[CompileCache | None] = None  # the cache this process compiles into

    def __init__(self, root: Path, key: Mapping[str, object]) -> None:
        self.root = root
        self.key = dict(key)
        self.directory = root / digest_of(self.key)
        self.had_entries = False  # artifacts of an earlier start were there when opened
        self.discarded = False
        self._counts = (0, 0)

    def open(self) -> bool:
        """Make and check the directory, then point torch at it (for this whole process).

        Returns False, with a warning, when the directory cannot be made or written: the
        process then compiles as if there were no cache.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            key_file = self.directory / KEY_FILE
            if key_file.exists() and self._stored_key(key_file) != self.key:
                log.warning("compile cache %s: %s is unreadable or names another key; emptied",
                            self.directory, KEY_FILE)
                self._empty()
            self.had_entries = any(p.name != KEY_FILE for p in self.directory.iterdir())
            self._write_key()
            self._prune()
        except OSError as e:
            log.warning("compile cache %s cannot be used (%s): compiling without a persistent "
                        "cache; give `serve --compile-cache DIR` a directory this user can write",
                        self.directory, e.strerror or e)
            return False
        self._point_torch_here()
        self._counts = _inductor_counts()
        CompileCache.current = self
        log.info("compile cache %s (%s)", self.directory,
                 "artifacts of an earlier start" if self.had_entries else "empty")
        return True

    def stats(self) -> CacheStats:
        """Graphs found and compiled since :meth:`open`."""
        hits, misses = _inductor_counts()
        return CacheStats(hits - self._counts[0], misses - self._counts[1])

    def discard(self, error: BaseException) -> None:
        """Empty the directory after ``error`` (logged) and forget what was compiled from it."""
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("compile cache %s could not be used (%s): emptied, compiling afresh",
                    self.directory, first[:300])
        try:
            self._empty()
            self._write_key()
        except OSError as e:
            log.warning("compile cache %s: could not empty it: %s", self.directory, e)
        self.had_entries = False
        self.discarded = True
        self._point_torch_here()
        import torch._dynamo

        torch._dynamo.reset()  # the frames compiled from the bad artifacts, and their guards

    # ---- inside -------------------------------------------------------------------------------

    @staticmethod
    def _stored_key(path: Path) -> object:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _write_key(self) -> None:
        tmp = self.directory / f".{KEY_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(self.key, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.directory / KEY_FILE)  # also marks the key as the most recently used

    def _empty(self) -> None:
        """Remove the directory's content (renamed first: a concurrent reader sees all or none)."""
        graveyard = self.root / f".{self.directory.name}.discarded.{os.getpid()}"
        self.directory.rename(graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _prune(self) -> None:
        """Keep the ``KEEP`` most recently used key directories under the root."""
        dirs = []
        for d in self.root.iterdir():
            key_file = d / KEY_FILE
            if d.is_dir() and not d.name.startswith(".") and d != self.directory and key_file.exists():
                dirs.append((key_file.stat().st_mtime, d))
        for _, d in sorted(dirs, reverse=True)[KEEP - 1 :]:
            log.info("compile cache: removing %s (least recently used)", d)
            shutil.rmtree(d, ignore_errors=True)

    def _point_torch_here(self) -> None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.directory / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(self.directory / "triton")
        if "torch._inductor.utils" in sys.modules:  # drop what was read from another directory
            from torch._inductor.utils import clear_caches

            clear_caches()


def recover_from(error: BaseException) -> bool:
    """Whether a failed compilation may be retried: True (the cache emptied) when the cache in
    use held artifacts of an earlier start, which may be what failed; at most once."""
    cache = CompileCache.current
    if cache is None or cache.discarded or not cache.had_entries:
        return False
    cache.discard(error)
    return True


def open_for_serving(root: Path | None, model_dir: Path, *, arch: Architecture, device: torch.device,
                     dtype: torch.dtype, max_batch: int, max_model_len: int,
                     options: Mapping[str, object]) -> CompileCache | None:
    """The cache of a ``serve`` process: under ``root``, by default in the model directory
    (skipped, with a note, when that cannot be written: an on-prem model directory is read-only
    to the service, which passes ``--compile-cache`` instead)."""
    explicit = root is not None
    where = root if root is not None else default_root(model_dir)
    if not explicit and not _writable(where):
        log.info("no compile cache: %s cannot be written; pass --compile-cache DIR to keep "
                 "compiled code across starts", where)
        return None
    key = cache_key(arch=arch, device=device, dtype=dtype, max_batch=max_batch,
                    max_model_len=max_model_len, model_dir=model_dir, options=options)
    cache = CompileCache(where, key)
    return cache if cache.open() else None


def _writable(path: Path) -> bool:
    """Whether ``path`` exists as a writable directory or could be made as one."""
    p = path
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)
