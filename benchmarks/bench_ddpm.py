"""Seconds per optimiser step of the dissolver's training with the paper's recipe.

    python benchmarks/bench_ddpm.py                          # paper: dim 64, 2 x 256 images, 32 px
    python benchmarks/bench_ddpm.py --unet_dim 16 --batch_size 32 --grad_accum 1 --steps 5

Random images stand in for data (the step's cost does not depend on them). Prints the median
seconds per optimiser step over ``--steps`` timed steps after one warm-up step, and images/s.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from diffusion_models.ddpm import build_diffusion, ddpm_config  # noqa: E402
from diffusion_models.train_eval_ddpm import accumulate_and_step  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet_dim", type=int, default=64)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed optimiser steps (after one warm-up step)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    d = build_diffusion(ddpm_config(image_size=a.image_size, unet_dim=a.unet_dim)).to(a.device)
    opt = torch.optim.Adam(d.parameters(), lr=8e-5, betas=(0.9, 0.99))
    micro = [torch.rand(a.batch_size, 3, a.image_size, a.image_size, device=a.device) for _ in range(a.grad_accum)]
    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        accumulate_and_step(d, opt, micro, 1.0)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n = a.batch_size * a.grad_accum
    print(f"DDPM step: Unet(dim={a.unet_dim}), {a.grad_accum} x {a.batch_size} images at {a.image_size} px, "
          f"device {a.device}, {torch.get_num_threads()} threads: {med:.2f} s per optimiser step (median of "
          f"{len(times)}), {n / med:.1f} images/s; the paper's 156,250 steps would take {med * 156_250 / 86400:.0f} days")


if __name__ == "__main__":
    main()
