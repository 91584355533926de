"""Throwaway: GPU kernel-time breakdown of one batch-1 decode step, compiled step vs elementwise-only."""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "bench")
from runtime import MISTRAL_7B, prompts, random_model  # noqa: E402

from weightship.runtime.engine import Engine, EngineConfig  # noqa: E402
from weightship.runtime.sampling import SamplingParams  # noqa: E402

torch.set_grad_enabled(False)
t0 = time.perf_counter()
model = random_model(MISTRAL_7B, torch.device("cuda"), torch.bfloat16, max_batch=1, max_model_len=1024)
p = prompts(1, 128, 32000)[0]
for compile_step in (True, False):
    eng = Engine(model, None, EngineConfig(use_graphs=True, compile_step=compile_step))
    eng.generate(p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    r = eng.runner
    tok = torch.ones(1, dtype=torch.long, device="cuda")
    pos = torch.full((1,), 300, dtype=torch.long, device="cuda")
    for _ in range(3):
        r._run_step(tok, pos, 512)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            r._run_step(tok, pos, 512)
        torch.cuda.synchronize()
    print(f"\n=== compile_step={compile_step} (t={time.perf_counter() - t0:.0f}s), 5 un-graphed steps, kv 512")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70))
    del eng
