#!/usr/bin/env bash
# What the J-RAS training changes of this version do (ACDC, U-Net, 96 px, 1000 steps):
# train + evaluate each variant on acdc/val, then the slice-by-slice annotator simulation.
# Usage (from the repository root):  bash benchmarks/accuracy/method_variants.sh [OUT [VARIANT...]]
# (no VARIANT: all of them). SEED=N (default 0) sets the seed; LOOP=0 skips the simulation.
# DATA (default ../shared/data/acdc, with train/ and val/), STEPS (1000), SIZE (96), WORK
# (benchmarks/_work/method_variants), JRAS (the CLI, default napari-jras) and PYTHON (python)
# are for smoke tests on tiny data.
# Writes OUT/<variant>_val.json (napari-jras evaluate reports) and OUT/<variant>_loop_slice.json.
# A run folder is resumed only if it was started with the same settings (train checks them and
# stops otherwise): delete WORK/<variant>_seed<N> to train a variant afresh.
set -euo pipefail
out=${1:-benchmarks/results/method_variants}
only=("${@:2}")
seed=${SEED:-0}
data=${DATA:-../shared/data/acdc}
steps=${STEPS:-1000}
size=${SIZE:-96}
work=${WORK:-benchmarks/_work/method_variants}
jras=${JRAS:-napari-jras}
python=${PYTHON:-python}
mkdir -p "$out" "$work"
plain='{"width":8,"input_size":64,"center":false}'
centred='{"width":8,"input_size":64,"center":true}'
variants=(
  "baseline|--no-retrieval"
  "jras_before|--guide-dropout 0 --retriever-options $plain"
  "jras_dropout_only|--guide-dropout 0.5 --retriever-options $plain"
  "jras_default|--guide-dropout 0.5 --retriever-options $centred"
  "jras_neighbours|--guide-dropout 0.3 --neighbour-guides 0.3 --retriever-options $centred"
  "jras_aligned|--guide-dropout 0.5 --align-shift 0.25 --retriever-options $centred"
)
for spec in "${variants[@]}"; do
  name=${spec%%|*}; flags=${spec#*|}
  if [ ${#only[@]} -gt 0 ] && [[ ! " ${only[*]} " =~ " $name " ]]; then continue; fi
  run=$work/${name}_seed$seed
  # shellcheck disable=SC2086  # the flags are meant to split
  $jras train --data "$data/train" --out "$run" --backbone unet \
    --backbone-options '{"base_channels":8}' --size "$size" --steps "$steps" --batch-size 8 \
    --seed "$seed" --class-names background,RV,myocardium,LV --embed-dim 64 --quiet $flags
  $jras evaluate --model "$run" --data "$data/val" --report "$out/${name}_val.json" --quiet
  if [ "$name" != baseline ] && [ "${LOOP:-1}" != 0 ]; then
    $python benchmarks/loop/simulate_annotator.py --jras "$run" --data "$data/val" \
      --out "$work/${name}_loop" --unit slice --settings jras-bank
    cp "$work/${name}_loop/loop.json" "$out/${name}_loop_slice.json"
  fi
done
