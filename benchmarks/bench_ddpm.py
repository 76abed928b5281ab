"""Seconds per optimiser step of the dissolver's training, the paper's way and ours, in one run.

    python benchmarks/bench_ddpm.py                          # paper: dim 64, 2 x 256 images, 32 px
    python benchmarks/bench_ddpm.py --unet_dim 16 --batch_size 32 --grad_accum 1 --steps 5

Two steps on the same random images (a step's cost does not depend on them): the paper's (the
package's layers, fp32, as its ``Trainer`` with ``amp=False``) and ours (``DissolverTrainer``'s:
the training form of the UNet, bf16 autocast as ``--amp`` decides). Prints, for each, the median
seconds per optimiser step over ``--steps`` timed steps after one warm-up step and images/s, then
``speedup_vs_paper_style=<ratio>``.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.device import device_precision, pick_device, set_process_device  # noqa: E402
from diffusion_models.ddpm import build_diffusion, ddpm_config  # noqa: E402
from diffusion_models.trainer import accumulate_and_step  # noqa: E402
from diffusion_models.training_form import training_form  # noqa: E402
from utils import autocast_for  # noqa: E402


def time_steps(a, device, ours, amp):
    torch.manual_seed(0)
    d = build_diffusion(ddpm_config(image_size=a.image_size, unet_dim=a.unet_dim)).to(device)
    if ours:
        training_form(d.model)
    opt = torch.optim.Adam(d.parameters(), lr=8e-5, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(1)
    micro = [torch.rand(a.batch_size, 3, a.image_size, a.image_size, generator=g).to(device)
             for _ in range(a.grad_accum)]
    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        accumulate_and_step(d, opt, micro, 1.0, autocast=lambda: autocast_for(device, amp))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet_dim", type=int, default=64)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed optimiser steps of each kind (after one warm-up step)")
    p.add_argument("--amp", default="auto", choices=("auto", "on", "off"), help="ours: train_eval_ddpm.py --amp")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    device = set_process_device(pick_device(a.device))
    amp = device_precision(a.amp, device, fp16=False)  # bf16 or fp32, as train_eval_ddpm.py decides
    n = a.batch_size * a.grad_accum
    head = (f"DDPM step: Unet(dim={a.unet_dim}), {a.grad_accum} x {a.batch_size} images at {a.image_size} px, "
            f"device {device}, {torch.get_num_threads()} threads")
    print(head, flush=True)
    results = {}
    for name, ours, on in (("paper-style", False, "fp32"), ("ours", True, amp)):
        med = time_steps(a, device, ours, on)
        results[name] = med
        print(f"{name:<12} ({'training form, bf16 autocast' if on == 'bf16' else ('training form, ' if ours else 'package layers, ') + 'fp32'}): "
              f"{med:.2f} s per optimiser step (median of {a.steps}), {n / med:.1f} images/s; the paper's 156,250 "
              f"steps would take {med * 156_250 / 86400:.0f} days", flush=True)
    print(f"speedup_vs_paper_style={results['paper-style'] / results['ours']:.2f}", flush=True)


if __name__ == "__main__":
    main()
