#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh needs on a GPU machine that has torch but no internet and no
# open_clip / datasets (the versions this repository's tests pass with; pure Python, ~3.5 MB):
#     bash scripts/gpu_wheels.sh          # where pip can download; writes .whl/ (git-ignored)
# Then carry .whl/ to the GPU machine beside the checkout; gpu_check.sh installs them into
# /tmp/gpu_check_site when its python lacks open_clip or datasets. pyarrow (which datasets
# needs, >= 24) is assumed there; add `pyarrow==26.0.1` below if it is not.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 fsspec==2026.9.0
ls -la .whl
