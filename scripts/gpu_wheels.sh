#!/usr/bin/env bash
# Fetch, on this machine, the wheels the GPU machine's image lacks (it has torch, torchvision,
# accelerate, einops, numpy, scipy, scikit-learn, matplotlib, opencv, tqdm, pytest, but not these),
# for its Python 3.12, into .whl/ (kept out of git). scripts/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    denoising_diffusion_pytorch==0.27.12 ema-pytorch==0.8.3 kornia==0.9.0 kornia_rs==0.2.0 medmnist==3.0.2 \
    tensorboardX==2.6.5 thop==0.1.1.post2209072238 fire==0.7.1 termcolor==3.3.0
ls .whl
du -sh .whl
