#!/usr/bin/env bash
# One command for the first GPU: every stage (train_sae, finetune with sae-preserve and l2,
# torchrun, evaluate with WiSE-FT, interpret report) on a random-weight ViT-B/16 and generated
# 224-px images, bf16 and gradient checkpointing, then bench.py --device cuda; under 8 minutes.
# Run from the repository root; nothing is downloaded:
#     OUT=/some/dir bash scripts/gpu_check.sh
#     DRY_RUN=1 OUT=/tmp/gpu_check bash scripts/gpu_check.sh     # the same steps on the CPU
# Writes $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/bench.json and $OUT/logs.tar.gz (what
# each holds: scripts/gpu_check.py). Exit status 0 when every step passed.
#
# Python: $PY if set; else the first of .venv/bin/python and python3 that imports torch,
# open_clip and datasets (and, for the GPU check, sees a GPU). A machine without open_clip or
# datasets and without internet: put their wheels in .whl/ first (where pip can download:
# `bash scripts/gpu_wheels.sh`); they are installed into /tmp/gpu_check_site, nowhere else.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export OUT HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
DRY=""
[ "${DRY_RUN:-0}" = "1" ] && DRY="--dry-run"
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY="--dry-run"; done

NEED='import torch, open_clip, datasets, safetensors'
[ -z "$DRY" ] && NEED="$NEED; assert torch.cuda.is_available(), 'torch sees no GPU'"
find_python() {
    for cand in ${PY:-} .venv/bin/python python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "$NEED" >>"$OUT/python_check.log" 2>&1
        then echo "$cand"; return 0; fi
    done
    return 1
}
PYTHON=$(find_python)
if [ -z "$PYTHON" ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "installing the wheels in .whl/ into /tmp/gpu_check_site" | tee -a "$OUT/python_check.log"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl >>"$OUT/python_check.log" 2>&1
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
    PYTHON=$(find_python)
fi
if [ -z "$PYTHON" ]; then
    echo "error: no python here imports torch, open_clip and datasets${DRY:-" with a GPU"}" \
         "(see $OUT/python_check.log); set PY=..., or put their wheels in .whl/" \
         "(bash scripts/gpu_wheels.sh, where pip can download)" >&2
    exit 1
fi
rm -f "$OUT/python_check.log"
[ -z "$DRY" ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
exec "$PYTHON" scripts/gpu_check.py --out "$OUT" $DRY
