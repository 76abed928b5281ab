#!/usr/bin/env bash
# The GPU check, in two calls of at most 8 minutes each on one H100:
#
#   bash scripts/gpu_check.sh cuda    # every program on --device cuda with a tiny budget: the dissolver's
#                                     # training and its resume, eval_dissolver.py, train.py (DIA), eval.py,
#                                     # train.py --deterministic twice and stopped-and-resumed, compared bit for
#                                     # bit, a two-process torchrun on the one GPU, torch.distributed.launch
#                                     # (--local-rank), then the benchmarks at 32 and 224 px and the dissolver's
#   bash scripts/gpu_check.sh suite   # the test suite with CUDA hidden (CUDA_VISIBLE_DEVICES=): what the CPU
#                                     # promises (bit-exact resumes, fp32 and CPU bf16) is checked on the CPU
#
# Every figure it measures (seconds and status of each step, seconds per training step, the precision
# decided, whether the repeated and the resumed runs are bit-identical, the benchmarks' lines, the suite's
# counts, the wall time) goes to one file, gpu_check_figures.txt, in $OUT when set (else /tmp), beside the
# whole log (gpu_check.log). Each call keeps to $BUDGET seconds (440): a step gets at most what is left,
# and the steps after the budget is spent are skipped, each named. The exit status is the number of steps
# that failed.
#
# On a machine without package access: on one with it, run scripts/gpu_wheels.sh (it downloads into .whl/
# the wheels the GPU machine's image lacks: denoising_diffusion_pytorch 0.27.12, ema-pytorch, kornia,
# medmnist, tensorboardX, thop, ...); carry .whl/ there with the repository (the device tool: carry
# [".whl"]); this script installs them with pip --no-index into /tmp/site. torch comes with the image.
#
# A dry run anywhere: PY=.venv/bin/python DEV=cpu QUICK=1 bash scripts/gpu_check.sh cuda (the same steps
# at their tiniest, on the CPU, no benchmarks; on a slow CPU add SCALE=10 BUDGET=3000 to the limits);
# QUICK=1 ... suite runs tests/test_gpu_ready.py's fast tests.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-cuda}
case "$PART" in cuda|suite) ;; *) echo "usage: $0 [cuda|suite]" >&2; exit 2 ;; esac
DIR=${OUT:-/tmp}
mkdir -p "$DIR"
LOG=$DIR/gpu_check.log
FIG=$DIR/gpu_check_figures.txt
: > "$FIG"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
PY=${PY:-python3}
DEV=${DEV:-cuda}  # DEV=cpu: the same programs on the CPU (a dry run of this script)
BUDGET=${BUDGET:-440}
SCALE=${SCALE:-1}  # the steps' time limits times this (a dry run on a slow CPU: SCALE=10 BUDGET=3000)
T0=$(date +%s)
FAILED=0
SKIPPED=0
figure() { echo "$1=$2" >> "$FIG"; echo "  figure: $1=$2"; }
STEP_LINE=1
# step NAME LIMIT COMMAND...: runs it with a time limit (at most what is left of $BUDGET) and records its
# seconds and status; once the budget is spent a step is skipped, and says so
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    if [ "$left" -lt 15 ]; then
        echo; echo "=== $name: skipped, the $BUDGET s budget is spent"
        figure "$name.status" skipped
        SKIPPED=$((SKIPPED + 1))
        return 1
    fi
    limit=$((limit * SCALE))
    [ "$limit" -gt "$left" ] && limit=$left
    echo; echo "=== $name ($(date +%T), ${limit} s at most)"
    sleep 0.2; STEP_LINE=$(( $(wc -l < "$LOG") + 1 ))
    local t=$(date +%s%N)
    timeout "$limit" "$@"
    local rc=$?
    local ms=$(( ($(date +%s%N) - t) / 1000000 ))
    figure "$name.seconds" "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
    figure "$name.status" "$rc"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
    return $rc
}
# grab NAME PATTERN [N]: the last N lines of the last step's output matching PATTERN, into the figures
grab() { sleep 0.2; tail -n "+$STEP_LINE" "$LOG" | grep -E "$2" | tail -n "${3:-20}" | sed "s/^/$1: /" >> "$FIG"; }
finish() {
    figure wall_seconds $(( $(date +%s) - T0 ))
    figure failed_steps "$FAILED"
    figure skipped_steps "$SKIPPED"
    echo; echo "=== done: $FAILED step(s) failed, $SKIPPED skipped; figures in $FIG"
    exit "$FAILED"
}
figure part "$PART"

if [ "$PART" = suite ]; then
    export CUDA_VISIBLE_DEVICES=
    echo "=== the test suite with CUDA hidden (CUDA_VISIBLE_DEVICES=), $(nproc) CPU cores"
    TESTS=(tests)
    [ -n "${QUICK:-}" ] && TESTS=(tests/test_gpu_ready.py -m "not slow")
    step suite "$BUDGET" $PY -m pytest -q -p no:cacheprovider --durations=10 "${TESTS[@]}"
    grab suite.result "(passed|failed|error)" 3
    finish
fi

figure device "$DEV"
echo "=== the machine"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap \
    --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$FIG"
$PY - "$DEV" <<'PYTHON' | tee -a "$FIG"
import sys, torch
from common.device import device_facts, device_precision, pick_device, set_process_device
d = set_process_device(pick_device(sys.argv[1]))
kind, cap, flags = device_facts(d)
print(f"torch={torch.__version__} cuda={torch.version.cuda} cudnn={torch.backends.cudnn.version()}")
print(f"capability={cap} precision_auto_train={device_precision('auto', d)} "
      f"precision_auto_dissolver={device_precision('auto', d, fp16=False)}")
PYTHON
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
DATA=(--dataset synth_streak --data_root "$D/data")
if [ -n "${QUICK:-}" ]; then  # a dry run: the same steps at their tiniest
    B=8; DDPM_STEPS=(2 3); BATCHES=1; QUALITY=16; SCORING=0
else
    B=32; DDPM_STEPS=(20 30); BATCHES=3; QUALITY=64; SCORING=1
fi
DDPM=(diffusion_models/train_eval_ddpm.py --mode train "${DATA[@]}" --one_class_idx 0 --image_size 32
      --batch_size "$B" --grad_accum 1 --unet_dim 16 --device "$DEV" --no_progress)
step ddpm_train 120 $PY "${DDPM[@]}" --train_steps "${DDPM_STEPS[0]}" --save_every 10 --save_path "$D/ddpm.pt"
grab ddpm_train "s per optimiser step|^precision" 3
step ddpm_resume 90 $PY "${DDPM[@]}" --train_steps "${DDPM_STEPS[1]}" --save_every 10 --save_path "$D/ddpm.pt" \
    --resume
step eval_dissolver 90 $PY eval_dissolver.py "${DATA[@]}" --diffusion_model_path "$D/ddpm.pt" --out "$D/grid.png" \
    --quality_images "$QUALITY" --device "$DEV"
TRAIN=(train.py "${DATA[@]}" --one_class_idx 0 --resnet_width 16 --batch_size "$B" --ood_samples 1
       --eval_max_train "$((4 * B))" --eval_max_test "$((4 * B))" --scoring_samples "$SCORING" --device "$DEV")
DIA=(--mode simclr_DIA --shift_trans_type diffusion_rotation --diffusion_model_path "$D/ddpm.pt")
step train_dia 120 $PY "${TRAIN[@]}" "${DIA[@]}" --epochs 1 --max_batches_per_epoch "$BATCHES" --logdir "$D/dia"
grab train_dia "s/step\)|^precision" 3
step eval_csi 90 $PY eval.py --mode ood_pre "${DATA[@]}" --one_class_idx 0 --model resnet18 --resnet_width 16 \
    --ood_score CSI --shift_trans_type rotation --ood_samples 2 --resize_factor 0.54 --resize_fix \
    --load_path "$D/dia/last.model" --device "$DEV"
grab eval_csi "one_class_1 CSI|^precision" 2
# exactness: the same deterministic run twice, and the run stopped after its first epoch and resumed
EXACT=(--mode simclr_CSI --shift_trans_type rotation --epochs 2 --max_batches_per_epoch "$BATCHES" --no_eval
       --deterministic)
if step det_run_a 90 $PY "${TRAIN[@]}" "${EXACT[@]}" --logdir "$D/det_a" \
        && step det_run_b 90 $PY "${TRAIN[@]}" "${EXACT[@]}" --logdir "$D/det_b" \
        && step det_half 90 $PY "${TRAIN[@]}" "${EXACT[@]}" --max_steps "$((BATCHES + 1))" --logdir "$D/det_c" \
        && step det_resumed 90 $PY "${TRAIN[@]}" "${EXACT[@]}" --resume_path "$D/det_c"; then
    $PY - "$D" <<'PYTHON' | tee -a "$FIG"
import sys, torch
def weights(run):
    return torch.load(f"{sys.argv[1]}/{run}/last.model", map_location="cpu", weights_only=False)["model"]
a, b, c = weights("det_a"), weights("det_b"), weights("det_c")
same = lambda x, y: all(torch.equal(x[k], y[k]) for k in x)
print(f"deterministic_repeat_identical={int(same(a, b))}")
print(f"deterministic_resume_identical={int(same(a, c))}")
print(f"deterministic_max_abs_diff_resume={max((a[k].float() - c[k].float()).abs().max().item() for k in a):.3g}")
PYTHON
else
    figure deterministic_repeat_identical "not measured (a run failed)"
fi
TORCHRUN=(--nproc_per_node 2 "${TRAIN[@]}" --mode simclr_CSI --shift_trans_type rotation --epochs 1
          --max_batches_per_epoch "$BATCHES" --no_eval)
step torchrun_two_ranks_one_gpu 120 $PY -m torch.distributed.run --standalone "${TORCHRUN[@]}" --logdir "$D/ddp"
grab torchrun "share GPUs|s/step\)" 3
step launch_local_rank 120 $PY -m torch.distributed.launch --standalone --nproc_per_node 2 "${DDPM[@]}" \
    --train_steps 2 --save_every 2 --batch_size 4 --save_path "$D/ddpm_launch.pt"
if [ -n "${QUICK:-}" ]; then
    echo "=== QUICK: benchmarks skipped"
else
    step bench_32px 120 $PY benchmarks/bench.py --mode simclr_DIA --model resnet18 --batch_size 32 --image_size 32 \
        --device "$DEV" --steps 5 --warmup 2
    grab bench_32px "^(device|ours|paper-style|CSI evaluation|matmul|speedup|config)" 12
    step bench_224px 120 $PY benchmarks/bench.py --mode simclr_DIA --model resnet18_imagenet --batch_size 32 \
        --image_size 224 --device "$DEV" --steps 5 --warmup 2 --eval_images 64 --ood_samples 2
    grab bench_224px "^(ours|paper-style|CSI evaluation|matmul|speedup|config)" 12
    step bench_ddpm 90 $PY benchmarks/bench_ddpm.py --device "$DEV" --steps 3
    grab bench_ddpm "s per optimiser step|speedup" 3
fi
finish
