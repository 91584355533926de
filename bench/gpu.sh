#!/usr/bin/env bash
# Every GPU measurement of issue 16 in one run; bench/RESULTS.md says which are still missing.
#
# On the CPU machine first (the GPU image has torch, transformers and safetensors but not serve's
# web stack; the `ready` phase needs it):
#     bash bench/gpu-wheels.sh                 # wheels into .whl/ (ignored by git)
# Then one device call, which fits its 10-minute limit:
#     run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
# or, with more device time, one call per phase (each then gets 9 minutes):
#     run(command="bash bench/gpu.sh ready", ...)  and  run(command="bash bench/gpu.sh decode", ...)
#
# Phases, in this order by default, each under its own time limit (PHASE_S seconds, default 285)
# so that a slow one cannot cost the other its tables; every table row is printed as it is made:
#   ready   the Mistral-7B shape (random bf16) written to local disk with a manifest, loaded onto
#           the GPU by weightship's loader and by transformers, then `weightship serve` started
#           cold (empty compile cache: load, compile, CUDA graphs) and warm (the cache kept)
#   decode  1 stream and 32 streams for the default compiled step and the split-KV attention
#           path side by side, then batched 1/16/32/64/128 streams against the roofline
#   kernels the matmul-attention and max-autotune paths beside the default (not in the default run)
# Output: stdout, and $OUT/gpu.log when the device tool's $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
[ -x .venv/bin/python ] && .venv/bin/python -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null \
    && PY=.venv/bin/python
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
WORK=${WORK:-/tmp/weightship-bench}
PHASE_S=${PHASE_S:-285}
mkdir -p "$WORK"
# the bench's own compilations are kept here, so that a rerun on this machine starts warm
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton"
LOG=${OUT:+$OUT/gpu.log}
LOG=${LOG:-$WORK/gpu.log}
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(ready decode)

{
    echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
    "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
    git log --oneline -1 2>/dev/null
    for phase in "${phases[@]}"; do
        echo "== phase $phase (at most $PHASE_S s)"
        case $phase in
            ready)   timeout "$PHASE_S" "$PY" bench/runtime.py --cuda --ready --no-decode --runs 1 --work "$WORK" ;;
            decode)  timeout "$PHASE_S" "$PY" bench/runtime.py --cuda --batched --paths step,split --no-references --runs 3 --work "$WORK" ;;
            kernels) timeout "$PHASE_S" "$PY" bench/runtime.py --cuda --paths step,matmul,autotune --no-references --runs 3 --work "$WORK" ;;
            *) echo "unknown phase $phase (ready, decode, kernels)"; continue ;;
        esac
        rc=$?
        [ $rc -eq 124 ] && echo "== phase $phase stopped at its $PHASE_S s limit: the rows above are what it measured"
        [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "== phase $phase failed with exit code $rc"
    done
    echo "== done $(date -u +%FT%TZ)"
} 2>&1 | tee "$LOG"
