#!/usr/bin/env bash
# CSI (rotation) vs blurgaussian_rotation vs DIA (diffusion_rotation) on a 2-core CPU, three
# seeds each, with the main job's budget (reproduce.py --preset quick: 250 optimiser steps of a
# ResNet-18 at width 16 in bf16, a UNet-32 dissolver trained for 250 steps in bf16, ood_samples 10),
# except that train.py evaluates for checkpoint selection every 5 epochs instead of every one.
#   bash benchmarks/method_study.sh [OUT]        (default runs/method_study; about 70 minutes; SEEDS="0" for one seed;
#                                                 TRANSFORMS="diffusion_rotation" for the DIA runs alone)
# Tables: OUT/fine/results.md (synth_streak, synth_streak_half) and OUT/digits/results.md;
# ROC figures per dataset: OUT/*/<dataset>_class0_roc.png. Finished runs are kept: rerun to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/method_study}
PY=${PY:-.venv/bin/python}
SEEDS=(${SEEDS:-0 1 2})
TRANSFORMS=(${TRANSFORMS:-rotation blurgaussian_rotation diffusion_rotation})
# fine-grained sets: 25 batches an epoch, 10 epochs = 250 steps
"$PY" reproduce.py --preset quick --dataset synth_streak synth_streak_half --seeds "${SEEDS[@]}" --save_step 5 \
    --shift_trans_type "${TRANSFORMS[@]}" \
    --out "$OUT/fine" || true
# coarse control: digits class 0 has 124 training images, 3 batches of 32 an epoch: 84 epochs = 252 steps
"$PY" reproduce.py --preset quick --dataset digits --seeds "${SEEDS[@]}" --save_step 20 --epochs 84 \
    --shift_trans_type "${TRANSFORMS[@]}" \
    --out "$OUT/digits" || true
