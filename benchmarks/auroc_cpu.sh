#!/usr/bin/env bash
# AUROC comparisons that fit a 2-core CPU (the figures in benchmarks/README.md).
# Every transformation gets the same budget; the dissolver is trained once and shared.
#   bash benchmarks/auroc_cpu.sh [OUT]      (default runs/bench_cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_cpu}
PY=${PY:-.venv/bin/python}
BUDGET=(--epochs 6 --max_batches_per_epoch 25 --batch_size 32 --warmup 1 --resnet_width 16 --amp
        --ood_samples 4 --ddpm_unet_dim 16 --ddpm_train_steps 188 --ddpm_batch_size 32 --ddpm_grad_accum 1)

# CSI vs blur vs DIA (the paper's input range) on the built-in dataset
"$PY" reproduce.py --dataset synth_lesion --one_class_idx 0 \
    --shift_trans_type rotation blurgaussian_rotation diffusion_rotation --out "$OUT/dia" "${BUDGET[@]}" || true
# DIA with the range-correct input, on the same dissolver
mkdir -p "$OUT/dia_range_correct"
cp -rn "$OUT/dia/dissolvers" "$OUT/dia_range_correct/" 2>/dev/null || true
"$PY" reproduce.py --dataset synth_lesion --one_class_idx 0 --shift_trans_type diffusion_rotation \
    --train_args="--diffusion_range_correct" --out "$OUT/dia_range_correct" "${BUDGET[@]}" || true
# CSI (simclr_CSI + rotation) on scikit-learn's digits: ~125 images of class 0 make 3 batches
# an epoch, so 50 epochs give the same 150 steps
"$PY" reproduce.py --dataset digits --one_class_idx 0 --shift_trans_type rotation --out "$OUT/digits" "${BUDGET[@]}" \
    --epochs 50 || true
