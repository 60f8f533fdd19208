#!/usr/bin/env bash
# The ID–OOD frontier sweep (`make frontier`): for each seed, the SAE, standard fine-tuning, and
# every curve's regulariser over its λ grid; each seed's runs evaluated together (WiSE-FT α
# sweep of its standard-FT run included); then `report.py frontier` over all seeds.
#
# Resumable: a finished run (its model.safetensors) and a finished seed evaluation (its
# results.jsonl, written only when complete) are skipped, so a stopped sweep loses one run.
# Every setting is an environment variable (the Makefile passes its own):
#   WORLD   toy world folder (toy_world.py --out)        OUT   sweep folder
#   SEEDS   "0 1 2"                                      PY    python to use
#   CURVES  one curve per line: NAME|FINETUNE FLAGS|λ GRID, e.g.
#           "l2|--reg l2|100 300 1000" (NAME names the run folders; the curve's label in the
#           table comes from each run's own settings). A curve with --reg pca gets the seed's
#           PCA basis of matched FVU (fitted once into OUT/seedS/pca: train_sae.py --basis pca
#           --match-fvu OUT/seedS/sae) as --basis; --reg ldifs needs --no-cache-zero-shot
#           after FT_FLAGS' --cache-zero-shot, e.g. "ldifs|--reg ldifs --no-cache-zero-shot|…"
#   SAE_FLAGS FT_FLAGS EVAL_FLAGS   flags of train_sae.py / finetune.py / evaluate.py
#   SETS, ID_SET                    evaluate.py --sets / --id-set (default: the toy world's)
#   TAG     names this curve set's results (OUT/seedS/results_TAG.jsonl, OUT/frontier_TAG.*);
#           runs are shared between curve sets, so a second set only trains its new curves
set -euo pipefail
WORLD=${WORLD:-toy_world}
OUT=${OUT:-runs/frontier}
SEEDS=${SEEDS:-0 1 2}
PY=${PY:-.venv/bin/python}
CURVES=${CURVES:-"l2|--reg l2|100 300 1000 3000
sae-preserve|--reg sae-preserve|100 300 1000 3000 10000"}
SAE_FLAGS=${SAE_FLAGS:---expansion 4 --k 8 --epochs 40 --batch-size 256 --warmup-steps 20}
FT_FLAGS=${FT_FLAGS:---epochs 5 --batch-size 128 --accum-steps 1 --lr 1e-3 --warmup-steps 10 \
--no-augment --cache-zero-shot --log-every 50 --probe-every 0 --workers 0}
EVAL_FLAGS=${EVAL_FLAGS:---wise-alphas sweep --workers 0}
SETS=${SETS:-test=$WORLD/data:test nocue=$WORLD/data:ood_nocue sketch=$WORLD/data:ood_sketch \
pattern=$WORLD/data:ood_pattern}
ID_SET=${ID_SET:-test}
TAG=${TAG:-main}
CLIP=local-dir:$WORLD/clip
common="--model $CLIP --train-data $WORLD/data --device cpu"

finetune() {  # finetune DIR FLAGS...: one run, skipped when already finished
  local dir=$1; shift
  if [ -f "$dir/model.safetensors" ]; then echo "  done: $dir"; return; fi
  echo "  run:  $dir"
  $PY finetune.py $common --seed "$seed" $FT_FLAGS "$@" --out "$dir" --overwrite > "$dir.log" 2>&1 \
    || { echo "failed: $dir (log: $dir.log)"; tail -3 "$dir.log"; exit 1; }
}

basis() {  # the seed's PCA basis matched to its SAE's held-out FVU (--reg pca), fitted once
  [ -f "$S/pca/pca_config.json" ] || $PY train_sae.py $common --workers 0 --seed "$seed" \
      $SAE_FLAGS --basis pca --match-fvu "$S/sae" --out "$S/pca" --overwrite > "$S/pca.log" 2>&1 \
      || { echo "failed: PCA basis (log: $S/pca.log)"; exit 1; }
}

t0=$(date +%s)
for seed in $SEEDS; do
  S=$OUT/seed$seed
  mkdir -p "$S"
  echo "seed $seed ($(( $(date +%s) - t0 )) s)"
  [ -f "$S/sae/sae.safetensors" ] || $PY train_sae.py $common --workers 0 --seed "$seed" \
      $SAE_FLAGS --out "$S/sae" > "$S/sae.log" 2>&1 \
      || { echo "failed: SAE (log: $S/sae.log)"; exit 1; }
  finetune "$S/none" --reg none
  run_dirs="$S/none"
  while IFS='|' read -r name flags grid; do
    [ -n "$name" ] || continue
    extra=""
    case " $flags " in *" --reg pca "*) basis; extra="--basis $S/pca" ;; esac
    for lam in $grid; do
      finetune "$S/${name}_lam$lam" $flags --lam "$lam" --sae "$S/sae" $extra
      run_dirs="$run_dirs $S/${name}_lam$lam"
    done
  done <<< "$CURVES"
  R=$S/results_$TAG.jsonl
  if [ ! -f "$R" ]; then
    rm -f "$R.part"
    $PY evaluate.py --runs $run_dirs --wise-runs "$S/none" --sae "$S/sae" --sets $SETS \
        --id-set "$ID_SET" --device cpu $EVAL_FLAGS --results "$R.part" \
        > "$S/evaluate_$TAG.log" 2>&1 || { echo "failed: evaluate (log: $S/evaluate_$TAG.log)"; exit 1; }
    mv "$R.part" "$R"
  fi
done
results=""
for seed in $SEEDS; do results="$results $OUT/seed$seed/results_$TAG.jsonl"; done
$PY report.py frontier $results --out "$OUT/frontier_$TAG.png" --markdown "$OUT/frontier_$TAG.md"
echo "frontier sweep: $(( $(date +%s) - t0 )) s; $OUT/frontier_$TAG.md, $OUT/frontier_$TAG.png"
