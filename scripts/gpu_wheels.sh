#!/usr/bin/env bash
# The wheels the first GPU check needs on a GPU machine without internet, built by one command
# where pip can download (any Linux x86-64 machine, any Python 3):
#     bash scripts/gpu_wheels.sh          # writes .whl/ (git-ignored) and .whl/requirements.txt
# Bring .whl/ along with the checkout; scripts/gpu_check.sh installs from it exactly what its
# python lacks, into /tmp/gpu_check_site (nothing else on that machine changes).
#
# The target, by default: Python 3.12 with torch 2.11 and torchvision 0.26 installed, and no
# open_clip and no datasets (the image of the GPU machines this project is checked on). Which
# wheels: pip resolves the project's packages (PACKAGES, pinned to the versions its tests pass
# with) together with torch==$TORCH and torchvision==$TORCHVISION for CPython $PYTHON_VERSION on
# x86-64 Linux, reading only the packages' metadata (nothing of torch is downloaded); kept is
# what that adds to torch's own dependencies (and those of torch's that the added packages ask
# for too: fsspec, filelock, ...), less the compiled packages the image already has
# (ON_IMAGE: pyarrow alone is 54 MB, and a GPU machine may be sent 64 MiB at most). Where the
# image's version of one of them does not fit, gpu_check.sh stops and pip names it: add it to
# PACKAGES, or take it out of ON_IMAGE.
# Another target: e.g. PYTHON_VERSION=3.11 TORCH=2.14.1 TORCHVISION=0.29.1 ON_IMAGE= bash ...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
TORCH=${TORCH:-2.11.0}
TORCHVISION=${TORCHVISION:-0.26.0}
PACKAGES=${PACKAGES:-open_clip_torch==3.3.0 datasets==5.2.0 safetensors tqdm matplotlib}
ON_IMAGE=${ON_IMAGE-pyarrow pandas numpy pillow matplotlib contourpy kiwisolver fonttools regex \
pyyaml xxhash hf-xet safetensors}
PIP=${PIP:-python3 -m pip}

abi=cp${PYTHON_VERSION/./}
platform=(--only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION"
          --abi "$abi" --abi abi3 --abi none --platform any --platform manylinux2014_x86_64)
for n in $(seq 5 39); do platform+=(--platform "manylinux_2_${n}_x86_64"); done  # pip: exact N

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
resolve() {   # the full list pip would install for "$@" on the target, as a JSON report
    local report=$1; shift
    $PIP install --quiet --dry-run --ignore-installed --target "$tmp/none" "${platform[@]}" \
        --report "$report" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
echo "resolving for CPython $PYTHON_VERSION with torch $TORCH, torchvision $TORCHVISION" >&2
# shellcheck disable=SC2086  # PACKAGES is a list of requirements
resolve "$tmp/all.json" "torch==$TORCH" "torchvision==$TORCHVISION" $PACKAGES
resolve "$tmp/torch.json" "torch==$TORCH" "torchvision==$TORCHVISION"
python3 - "$tmp/all.json" "$tmp/torch.json" "$ON_IMAGE" >"$tmp/need.txt" <<'EOF'
import json
import re
import sys

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def report(path):
    return {canonical(i["metadata"]["name"]): i for i in json.load(open(path))["install"]}

wanted, torch = report(sys.argv[1]), report(sys.argv[2])
on_image = {canonical(n) for n in sys.argv[3].split()}
# Also kept: torch's own dependencies that the new packages ask for too (fsspec, filelock, ...):
# the image's version may be outside the range they ask for.
shared = {canonical(re.match(r"[A-Za-z0-9._-]+", r).group())
          for name in set(wanted) - set(torch)
          for r in wanted[name]["metadata"].get("requires_dist", []) if "extra ==" not in r}
for name in sorted((set(wanted) - set(torch) | shared & set(torch)) - on_image
                   - {"torch", "torchvision"}):
    print(f"{name}=={wanted[name]['metadata']['version']}")
EOF

rm -rf .whl
$PIP download --quiet --no-deps "${platform[@]}" -d .whl -r "$tmp/need.txt" \
    2> >(grep -v "^WARNING: Location" >&2)
# What gpu_check.sh asks pip for there (it resolves it against what that python has).
printf '%s\n' $PACKAGES >.whl/requirements.txt
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (for CPython" \
     "$PYTHON_VERSION, torch $TORCH): $(tr '\n' ' ' <"$tmp/need.txt")" >&2
