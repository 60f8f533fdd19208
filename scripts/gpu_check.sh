#!/usr/bin/env bash
# One command for the first GPU: every stage (train_sae, finetune with sae-preserve and l2,
# torchrun with two processes, evaluate with WiSE-FT, interpret report) on a random-weight
# ViT-B/16 and generated 224-px images, bf16 and gradient checkpointing, then a trimmed
# bench.py --device cuda; a 420 s budget (docs/reproduce.md: expected about 4-5 minutes on one
# H100, an estimate). From any folder; nothing is downloaded:
#     OUT=/some/dir bash scripts/gpu_check.sh
#     OUT=/some/dir bash scripts/gpu_check.sh --only ft_l2       # re-run a step (see --help)
#     DRY_RUN=1 OUT=/tmp/gpu_check bash scripts/gpu_check.sh     # the same steps on the CPU
# Every argument goes to scripts/gpu_check.py (--only, --full-bench, --budget, --workers, ...).
# Writes $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/bench.json and $OUT/logs.tar.gz (what
# each holds: scripts/gpu_check.py). Exit status 0 when every step passed.
#
# Python: $PY if set; else the first of .venv/bin/python and python3 that imports torch,
# open_clip, datasets, safetensors, tqdm and matplotlib (and, for the GPU check, sees a GPU).
# Where none does and .whl/ is there (built by `bash scripts/gpu_wheels.sh` where pip can
# download), the first one with torch gets what it lacks from .whl/ (pip resolves
# .whl/requirements.txt against what that python has, offline) installed into
# /tmp/gpu_check_site, nowhere else.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export OUT HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
DRY=""
[ "${DRY_RUN:-0}" = "1" ] && DRY=1
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
LOG="$OUT/python_check.log"

HAS_TORCH='import torch'
[ -z "$DRY" ] && HAS_TORCH="$HAS_TORCH; assert torch.cuda.is_available(), 'torch sees no GPU'"
NEED='import open_clip, datasets, safetensors, tqdm, matplotlib'
CANDIDATES="${PY:-} .venv/bin/python python3"
has() {   # has PYTHON CODE: the python exists and runs CODE
    command -v "$1" >/dev/null 2>&1 && "$1" -c "$2" >>"$LOG" 2>&1
}
install_wheels() {   # install_wheels PYTHON: what it lacks, from .whl/ into /tmp/gpu_check_site
    local report=/tmp/gpu_check_wheels.json files
    echo "installing what $1 lacks from .whl/ into /tmp/gpu_check_site" | tee -a "$LOG"
    "$1" -m pip install --quiet --dry-run --no-index --find-links .whl --report "$report" \
        -r .whl/requirements.txt >>"$LOG" 2>&1 || return 1
    files=$("$1" -c 'import json, sys, urllib.parse as u
print("\n".join(u.unquote(u.urlparse(i["download_info"]["url"]).path)
                for i in json.load(open(sys.argv[1]))["install"]))' "$report") || return 1
    [ -z "$files" ] && return 0
    # shellcheck disable=SC2086  # one wheel path a line, no spaces
    "$1" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site $files >>"$LOG" 2>&1
}

PYTHON=""
for cand in $CANDIDATES; do
    if has "$cand" "$HAS_TORCH; $NEED"; then PYTHON=$cand; break; fi
done
if [ -z "$PYTHON" ] && [ -f .whl/requirements.txt ]; then
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
    for cand in $CANDIDATES; do
        if has "$cand" "$HAS_TORCH"; then
            install_wheels "$cand" && has "$cand" "$HAS_TORCH; $NEED" && PYTHON=$cand
            break
        fi
    done
fi
if [ -z "$PYTHON" ]; then
    echo "error: no python here imports torch, open_clip, datasets, safetensors, tqdm and" \
         "matplotlib$([ -z "$DRY" ] && echo " with a GPU") (see $LOG, its end); set PY=...," \
         "or bring .whl/ (bash scripts/gpu_wheels.sh, where pip can download)" >&2
    tail -3 "$LOG" >&2
    exit 1
fi
rm -f "$LOG"
[ -z "$DRY" ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
exec "$PYTHON" scripts/gpu_check.py --out "$OUT" "$@"
