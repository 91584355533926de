"""Time to ready for bench/runtime.py: loading weights beside transformers, and serve's cold and
warm starts.

- **Load** (``--load``): weightship's loader against transformers' ``from_pretrained`` on the
  same safetensors files, each in a fresh process (a server loads once per process, and its
  first load pays what later ones do not: lazy imports, fresh memory), then once more in that
  process; and the first forward pass after the load, which pays for whatever the load left
  lazy (pages of a mapped file not yet faulted in). CPU: the tiny model and a ~1 GiB synthetic
  Mistral-architecture model (random bf16 weights), float32 (serve's CPU default) and bfloat16;
  CUDA: the 7B shape in bfloat16 onto the GPU.
- **Ready** (``--ready``): ``weightship serve --compile`` started twice with one compile cache,
  cold (an empty cache) then warm: seconds from the process's start to ``/ready``, split by
  serve's start-up line into verify + imports, load and warm-up (compile, CUDA graphs, one
  request), and the graphs it reused and compiled.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from weightship.catalog.architecture import Architecture, original_to_hf_name

READY = re.compile(r"ready in ([\d.]+) s: weights loaded in ([\d.]+) s, warm-up .*? ([\d.]+) s; "
                   r"(?:compile cache \S+: (\d+) graphs reused, (\d+) compiled|no compile cache)")
# ~1 GiB of bf16 weights: 537 M parameters of the Mistral architecture
GIB_MODEL = Architecture(dim=2048, n_layers=9, head_dim=128, hidden_dim=5632, n_heads=16, n_kv_heads=4,
                         norm_eps=1e-5, vocab_size=32000, sliding_window=4096, max_seq_len=4096)
SHARD_BYTES = 5 << 30  # like the Hub's 7B: a few shards of at most ~5 GB


# ---- synthetic models ---------------------------------------------------------------------------


def write_random_model(arch: Architecture, directory: Path, device: torch.device, *, seed: int = 0,
                       manifest: bool = True) -> Path:
    """An HF-layout model directory of ``arch`` with random bf16 weights (made on ``device``),
    sharded like the Hub's, with the Mistral tokenizer and, with ``manifest``, a manifest (so
    that ``serve`` verifies it as it would a fetched model)."""
    from weightship.catalog.tiny import tokenizer_bytes

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
    (directory / "tokenizer.model").write_bytes(tokenizer_bytes())
    shapes = {original_to_hf_name(k): v for k, v in sorted(arch.tensor_shapes("original").items())}
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 2 * _numel(shape)
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    g = torch.Generator(device=device).manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            n = 2 * _numel(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                shape = shapes[name]
                if name.endswith("norm.weight"):
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    t = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=g)
                f.write(t.cpu().view(torch.uint8).numpy().tobytes())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if manifest:
        from weightship.manifest import create_for_directory

        create_for_directory(directory, name=directory.name).write(directory)
    return directory


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- loading beside transformers ----------------------------------------------------------------


def load_child(directory: str, dtype: str, system: str, device: str) -> dict[str, float]:
    """In a fresh process: the first load, the forward pass after it, a second load (seconds)."""
    import transformers

    from weightship.runtime.loader import load_model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def load() -> torch.nn.Module:
        if system == "weightship":
            return load_model(Path(directory), device=device, dtype=dtype, max_batch=1, max_model_len=256)[0]
        return transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=getattr(torch, dtype), device_map=device if dev.type == "cuda" else None)

    tokens = torch.arange(1, 17, device=dev).unsqueeze(0)  # [1, 16]
    t0 = time.perf_counter()
    model = load()
    sync()
    t1 = time.perf_counter()
    model(tokens)
    sync()
    t2 = time.perf_counter()
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    t3 = time.perf_counter()
    load()
    sync()
    return {"first": t1 - t0, "forward": t2 - t1, "second": time.perf_counter() - t3}


def measure_load(directory: Path, dtype: str, system: str, device: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--load-child", str(directory), dtype, system, device],
                         capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_table(models: dict[str, Path], dtypes: list[str], device: str, runs: int) -> None:
    """Print weightship's loads beside transformers' (medians of ``runs`` fresh processes each)."""
    for dtype in dtypes:
        print(f"\nLoading weights onto {device} as {dtype}: weightship's loader and transformers' "
              f"from_pretrained on the same files, median of {runs} fresh processes each "
              f"(torch {torch.__version__})", flush=True)
        print(f"{'model':<26} {'system':<13} {'first load s':>13} {'1st forward ms':>15} "
              f"{'second load s':>14} {'x transformers (first, second)':>31}")
        for label, directory in models.items():
            rows: dict[str, list[dict[str, float]]] = {"weightship": [], "transformers": []}
            for _ in range(runs):  # interleaved, so that a busy moment hits both
                for system in rows:
                    rows[system].append(measure_load(directory, dtype, system, device))
            med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in rows.items()}
            size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
            for system, m in med.items():
                ratio = "" if system == "transformers" else (
                    f"{med['transformers']['first'] / m['first']:.2f}x, "
                    f"{med['transformers']['second'] / m['second']:.2f}x")
                name = f"{label} ({size / 2**20:,.0f} MiB)" if system == "weightship" else ""
                print(f"{name:<26} {system:<13} {m['first']:>13.3f} {m['forward'] * 1e3:>15.1f} "
                      f"{m['second']:>14.3f} {ratio:>31}", flush=True)


# ---- serve: cold and warm -----------------------------------------------------------------------


def serve_start(model: Path, cache: Path, args: list[str], timeout: float = 900) -> dict[str, float]:
    """Start ``weightship serve MODEL --compile-cache CACHE ARGS``, wait for /ready, stop it."""
    import httpx

    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log = cache.parent / f"serve-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTSHIP_DEBUG"}
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "weightship", "serve", str(model), "--port", str(port),
                                 "--compile-cache", str(cache), *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"serve not ready after {timeout:.0f} s")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        total = time.perf_counter() - t0
        while (m := READY.search(log.read_text(errors="replace"))) is None:
            time.sleep(0.05)  # the line follows /ready by a moment
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    ready, loaded, warm = float(m[1]), float(m[2]), float(m[3])
    return {"total": total, "before": total - ready, "load": loaded, "warm": warm,
            "reused": float(m[4] or 0), "compiled": float(m[5] or 0)}


def ready_table(models: dict[str, Path], args: list[str], work: Path, device: str) -> None:
    print(f"\nTime to ready, `weightship serve {' '.join(args)}` on {device}: a cold start (empty "
          "compile cache) then a warm one (same cache, weights in the page cache)", flush=True)
    print(f"{'model':<22} {'start':<6} {'to /ready s':>12} {'verify+imports s':>17} {'load s':>8} "
          f"{'warm-up s':>10} {'graphs reused':>14} {'compiled':>9}")
    for label, model in models.items():
        cache = work / f"compile-cache-{label}"
        for start in ("cold", "warm"):
            try:
                r = serve_start(model, cache, args)
            except RuntimeError as e:
                print(f"{label:<22} {start:<6} failed: {e}", flush=True)
                break
            print(f"{label:<22} {start:<6} {r['total']:>12.1f} {r['before']:>17.1f} {r['load']:>8.1f} "
                  f"{r['warm']:>10.1f} {r['reused']:>14.0f} {r['compiled']:>9.0f}", flush=True)


if __name__ == "__main__":  # the child of measure_load
    assert sys.argv[1] == "--load-child", sys.argv
    print(json.dumps(load_child(*sys.argv[2:6])))
