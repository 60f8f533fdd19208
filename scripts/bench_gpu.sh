#!/usr/bin/env bash
# GPU benchmark: bench.py on open_clip's ViT-B-16 with random weights (no download),
# batch 128 bf16, memory comparison at batch 64. Run from the repository root on a GPU machine
# with no internet:
#     OUT=/some/dir bash scripts/bench_gpu.sh
# Writes $OUT/bench_cuda.json (every number), $OUT/bench_cuda.md (the table of
# docs/benchmarks.md) and $OUT/bench_cuda.log (progress, errors, nvidia-smi). Expected wall
# time: ~3-4 minutes.
# scripts/gpu_check.sh runs the same bench.py command after every stage, in one command.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# No PyPI here: use the carried venv if it works, else the system python; both need torch
# with CUDA, open_clip, datasets, safetensors, tqdm.
CHECK='import torch, open_clip, datasets, safetensors, tqdm; assert torch.cuda.is_available()'
PY=""
for cand in .venv/bin/python python3; do
    if command -v "$cand" >/dev/null && "$cand" -c "$CHECK" 2>>"$OUT/bench_cuda.log"; then
        PY=$cand; break
    fi
done
if [ -z "$PY" ]; then
    echo "no python with torch+CUDA, open_clip, datasets, safetensors, tqdm (see $OUT/bench_cuda.log)" \
        | tee -a "$OUT/bench_cuda.log"
    exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -V; } \
    >>"$OUT/bench_cuda.log" 2>&1

# 540 s: under the 600 s a device command may run, so partial logs still come back.
timeout 540 "$PY" bench.py --device cuda --model ViT-B-16 --out "$OUT/bench_cuda.json" \
    >"$OUT/bench_cuda.md" 2>>"$OUT/bench_cuda.log"
rc=$?
cat "$OUT/bench_cuda.md"
tail -5 "$OUT/bench_cuda.log"
exit $rc
