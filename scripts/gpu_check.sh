#!/usr/bin/env bash
# One call on a GPU machine (device tool, carry .whl; fetch them first with scripts/gpu_wheels.sh):
# every program on --device "$DEV" with a tiny budget, a two-process torchrun on the one GPU, the
# benchmarks (bench.py at 32 and 224 px, bench_ddpm.py), and the test suite on the machine's CPU cores. Prints what it ran and
# keeps the whole log in $OUT/gpu_check.log when $OUT is set. DEV=cpu QUICK=1 runs the programs on the CPU
# and stops before the benchmark (a dry run of the script here).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
PY=${PY:-python3}
DEV=${DEV:-cuda}  # DEV=cpu: the same programs on the CPU (a dry run of this script)
step() { echo; echo "=== $* ($(date +%T))"; }
step "the machine"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
step "DDPM dissolver, 20 steps on $DEV"
$PY diffusion_models/train_eval_ddpm.py --mode train --dataset synth_streak --data_root "$D/data" --one_class_idx 0 \
    --image_size 32 --train_steps 20 --save_every 10 --batch_size 32 --grad_accum 1 --unet_dim 16 \
    --save_path "$D/ddpm.pt" --device "$DEV" --no_progress
step "eval_dissolver.py, the dissolving grid and its measures on $DEV"
$PY eval_dissolver.py --dataset synth_streak --data_root "$D/data" --diffusion_model_path "$D/ddpm.pt" \
    --out "$D/grid.png" --quality_images 64 --device "$DEV"
step "train.py simclr_DIA, 1 epoch of 5 batches on $DEV"
$PY train.py --dataset synth_streak --data_root "$D/data" --one_class_idx 0 --mode simclr_DIA \
    --shift_trans_type diffusion_rotation --diffusion_model_path "$D/ddpm.pt" --resnet_width 16 --batch_size 32 \
    --epochs 1 --max_batches_per_epoch 5 --ood_samples 1 --eval_max_test 200 --device "$DEV" --logdir "$D/dia"
step "eval.py on $DEV"
$PY eval.py --mode ood_pre --dataset synth_streak --data_root "$D/data" --one_class_idx 0 --model resnet18 \
    --resnet_width 16 --ood_score CSI --shift_trans_type rotation --ood_samples 2 --resize_factor 0.54 --resize_fix \
    --load_path "$D/dia/last.model" --device "$DEV"
step "torchrun, two processes on the one GPU (gloo where NCCL refuses two ranks per GPU)"
$PY -m torch.distributed.run --standalone --nproc_per_node 2 train.py --dataset synth_streak --data_root "$D/data" \
    --one_class_idx 0 --mode simclr_CSI --shift_trans_type rotation --resnet_width 16 --batch_size 16 --epochs 1 \
    --max_batches_per_epoch 4 --no_eval --device "$DEV" --logdir "$D/ddp" || echo "torchrun on one GPU failed (see above)"
[ -n "${QUICK:-}" ] && { step "QUICK: benchmarks and tests skipped"; exit 0; }
step "bench.py, 32 px"
$PY benchmarks/bench.py --mode simclr_DIA --model resnet18 --batch_size 32 --image_size 32 --device "$DEV"
step "bench.py, 224 px"
$PY benchmarks/bench.py --mode simclr_DIA --model resnet18_imagenet --batch_size 32 --image_size 224 --device "$DEV" \
    --steps 5 --warmup 2
step "bench_ddpm.py, the paper's recipe (dim 64, 2 x 256 images)"
$PY benchmarks/bench_ddpm.py --device "$DEV" --steps 5
step "the test suite (CPU)"
$PY -m pytest -q -x tests -p no:cacheprovider 2>&1 | tail -5
step "done"
