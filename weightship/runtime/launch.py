"""``weightship serve`` as a library call: check a model directory, then serve it until SIGTERM.

:func:`serve_directory` verifies the directory against its manifest (unless told not to), checks
that the runtime can read it, loads the API keys (watched for changes) and the usage log, and
runs the server (:func:`~weightship.runtime.runner.serve_until_stopped`) while
:func:`load_engine` loads the weights on a thread, opens the compile cache, warms the engine and
logs how long each step took.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from weightship.errors import UsageError
from weightship.runtime.compile_cache import CompileCache
from weightship.runtime.state import ServerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """What ``weightship serve`` is asked for (its options; see its ``--help``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    name: str | None = None  # the model id in the API; default: the manifest's, or the directory's
    verify: bool = True  # refuse a directory that does not verify against its manifest
    device: str | None = None  # default: cuda if available
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 on CPU
    max_batch: int = 8
    max_model_len: int | None = None  # default: the model's
    max_queue: int = 64
    max_logprobs: int = 1 << 17
    api_key_file: Path | None = None
    usage_log: Path | None = None
    compile_step: bool | None = None  # default: on CUDA
    compile_cache: Path | None = None  # default: the model directory's, when writable

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 0 or self.max_logprobs < 0:
            raise UsageError("--max-batch must be at least 1, --max-queue and --max-logprobs at least 0")


def serve_directory(directory: Path, options: ServeOptions) -> None:
    """Serve the model in ``directory`` until SIGTERM (see the module docstring). A directory
    that does not verify is refused before anything listens (exit 3); a failure to load the
    model stops the server and is raised here."""
    from weightship.runtime.keys import load_key_file
    from weightship.runtime.loader import find_files
    from weightship.runtime.runner import serve_until_stopped
    from weightship.runtime.usage import UsageLog

    manifest_name: str | None = None
    if options.verify:
        from weightship.verify import verify_dir

        report = verify_dir(directory)
        report.raise_for_problems()
        manifest_name = report.name
    find_files(directory)  # a directory the runtime cannot read fails here, before listening
    keyring = load_key_file(options.api_key_file) if options.api_key_file else None
    state = ServerState(options.name or manifest_name or directory.resolve().name, keyring=keyring,
                        usage_log=UsageLog(options.usage_log) if options.usage_log else None,
                        max_logprobs=options.max_logprobs)
    if keyring is not None:
        keyring.watch()  # a revoked key is refused within seconds, with no restart
    serve_until_stopped(state, lambda: load_engine(state, directory, options), host=options.host,
                        port=options.port)


def load_engine(state: ServerState, directory: Path, options: ServeOptions) -> None:
    """Load the model of ``directory``, attach a warm engine to ``state`` (it turns ready), and
    log how long it took and what the compile cache held."""
    from weightship.runtime.engine import Engine, EngineConfig
    from weightship.runtime.loader import load_model
    from weightship.runtime.tokenizer import load_tokenizer

    started = time.monotonic()
    cache = open_compile_cache(directory, options)
    loaded, files = load_model(directory, device=options.device, dtype=options.dtype,
                               max_batch=options.max_batch, max_model_len=options.max_model_len)
    tokenizer = load_tokenizer(files.tokenizer)
    config = EngineConfig(max_queue=options.max_queue, compile_step=options.compile_step)
    engine = Engine(loaded, tokenizer, config)
    loaded_at = time.monotonic()
    state.attach(engine, tokenizer)
    ready_at = time.monotonic()
    stats = cache.stats() if cache is not None else None
    log.info("ready in %.1f s: weights loaded in %.1f s, warm-up (compile, CUDA graphs, "
             "one request) %.1f s; %s", ready_at - started, loaded_at - started,
             ready_at - loaded_at,
             f"compile cache {cache.directory}: {stats.reused} graphs reused, "
             f"{stats.compiled} compiled" if cache is not None and stats is not None
             else "no compile cache")


def open_compile_cache(directory: Path, options: ServeOptions) -> CompileCache | None:
    """The compile cache of this process, when anything will be compiled (CUDA, or --compile)."""
    from weightship.runtime.compile_cache import open_for_serving
    from weightship.runtime.loader import find_files, pick_device, pick_dtype

    dev = pick_device(options.device)
    if dev.type != "cuda" and not options.compile_step:
        return None
    arch = find_files(directory).arch
    max_model_len = options.max_model_len
    length = min(max_model_len or arch.max_seq_len, arch.max_seq_len)  # as load_model sizes it
    return open_for_serving(options.compile_cache, directory, arch=arch, device=dev,
                            dtype=pick_dtype(options.dtype, dev), max_batch=options.max_batch,
                            max_model_len=length,
                            options={"compile_step": dev.type == "cuda" if options.compile_step is None
                                     else options.compile_step})
