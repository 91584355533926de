"""Throwaway: 32-stream A/B interleaved (elementwise / compiled step + lookahead / compiled, no lookahead),
and one batch-32 decode step's logits from the same cache state against an all-eager reference."""
import sys
import time

import torch

sys.path.insert(0, "bench")
from runtime import MISTRAL_7B, SMALL, prompts, random_model, run_engine

from weightship.runtime.engine import Engine, EngineConfig

dry = "--dry-run" in sys.argv
torch.set_grad_enabled(False)
dev = torch.device("cpu" if dry else "cuda")
arch = SMALL if dry else MISTRAL_7B
dtype = torch.float32 if dry else torch.bfloat16
S = 32
t0 = time.perf_counter()
model = random_model(arch, dev, dtype, max_batch=S, max_model_len=1024)
sync = torch.cuda.synchronize if not dry else (lambda: None)
batch = prompts(S, 128, arch.vocab_size)
g = not dry
cfgs = {"E": EngineConfig(prefill_chunk=4096, use_graphs=g, compile_step=False, lookahead=False),
        "S": EngineConfig(prefill_chunk=4096, use_graphs=g, compile_step=True, lookahead=True),
        "N": EngineConfig(prefill_chunk=4096, use_graphs=g, compile_step=True, lookahead=False)}
engines = {}
for k, c in cfgs.items():
    engines[k] = e = Engine(model, None, c)
    t = time.perf_counter()
    run_engine(e, batch, 256, together=True, sync=sync)
    print(f"{k} warm-up {time.perf_counter() - t:.1f}s (t={time.perf_counter() - t0:.0f}s)", flush=True)


def step32(e: Engine) -> torch.Tensor:
    for i, p in enumerate(batch):
        model.prefill(torch.tensor(p[:-1], device=dev), 0, i, e.cache)
    logits, _ = e.runner([p[-1] for p in batch], [len(p) - 1 for p in batch])
    out = logits.float().clone()
    for i in range(S):
        e.cache.reset_slot(i)
    return out


logits = {k: step32(e) for k, e in engines.items()}
saved = dict(vars(model.pointwise))
model.pointwise.eager()
ref = Engine(model, None, EngineConfig(use_graphs=False, compile_step=False, lookahead=False))
logits["R"] = step32(ref)
del ref
vars(model.pointwise).update(saved)  # the same compiled wrappers: no recompilation
for a, b in (("E", "R"), ("S", "R"), ("N", "R"), ("S", "E")):
    d = (logits[a] - logits[b]).abs()
    agree = (logits[a].argmax(-1) == logits[b].argmax(-1)).float().mean().item()
    print(f"batch-32 step logits {a} vs {b}: max |diff| {d.max().item():.3g}, mean {d.mean().item():.3g}, "
          f"argmax agrees on {agree:.0%} of rows (|logit| max {logits[b].abs().max().item():.3g})", flush=True)
res: dict[str, list[float]] = {k: [] for k in engines}
for _ in range(3):
    for k, e in engines.items():
        tm = run_engine(e, batch, 256, together=True, sync=sync)
        res[k].append(tm.tps)
        print(f"{k} 32 streams {tm.tps:.1f} tokens/s (ttft {tm.ttft * 1e3:.0f} ms) t={time.perf_counter() - t0:.0f}s",
              flush=True)
for k, v in res.items():
    print(f"{k}: 32 streams median {sorted(v)[1]:.1f} tokens/s  {[round(x) for x in v]}", flush=True)
