#!/usr/bin/env bash
# The GPU benchmark: bench.py --device cuda --model ViT-B-16 at its own CUDA defaults (batch 128,
# bf16; peak memory at batch 64 in fp32 and bf16, with and without gradient checkpointing, each
# in a fresh process; extraction of 4096 generated JPEGs), run as the bench step of the GPU
# check alone, with its python and wheels (.whl/) and from any folder:
#     OUT=/some/dir bash scripts/bench_gpu.sh
# is `OUT=/some/dir bash scripts/gpu_check.sh --only bench --full-bench`. Writes $OUT/bench.json
# (every number), $OUT/gpu_check.md (the tables of docs/benchmarks.md), $OUT/gpu_check.json and
# $OUT/logs.tar.gz (logs/bench.log); at most 540 s.
exec bash "$(dirname "$0")/gpu_check.sh" --only bench --full-bench "$@"
