"""Seconds per training step of simclr_CSI and simclr_DIA, and evaluation throughput.

    python benchmarks/bench_step.py [--batch_size 32] [--widths 64 16] [--amp both] [--steps 3]

Uses synth_lesion (32 px) and a dissolver with the paper's UNet (dim 64) at random weights
(the cost of a step does not depend on the weights). Prints one row per setting.
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cli.args import parse_args  # noqa: E402
from common.device import pick_device  # noqa: E402
from datasets import get_dataset, one_class_split  # noqa: E402
from diffusion_models.ddpm import build_diffusion, ddpm_config, save_dissolver  # noqa: E402
from evals.ood_pre import extract_features  # noqa: E402
from models.resnet import build_model  # noqa: E402
from train import build_dissolve  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trainer import Trainer  # noqa: E402


def time_steps(trainer, data, batch_size, steps):
    x, y = data.get_batch(torch.arange(batch_size))
    x, y = x.to(trainer.device), y.to(trainer.device)
    trainer.train_step(x, y)  # warm-up
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--amp", choices=("on", "off", "both"), default="both")
    ap.add_argument("--modes", nargs="+", default=["simclr_CSI", "simclr_DIA"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--unet_dim", type=int, default=64)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    device = pick_device(a.device)
    train_set, test_set, info = get_dataset("synth_lesion", "../data")
    normal, test_set = one_class_split(train_set, test_set, info, 0)
    tmp = tempfile.mkdtemp()
    ckpt = os.path.join(tmp, "ddpm.pt")
    cfg = ddpm_config(unet_dim=a.unet_dim)
    d = build_diffusion(cfg)
    save_dissolver(ckpt, d, d, cfg, {"dataset": "synth_lesion", "one_class_idx": 0})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {a.batch_size}, 32 px, dissolver UNet dim {a.unet_dim}")
    print(f"{'mode':<12} {'width':>5} {'amp':>4} {'s/step':>8} {'img/s':>8} {'eval img/s':>10}")
    amps = {"on": [True], "off": [False], "both": [False, True]}[a.amp]
    for mode in a.modes:
        for width in a.widths:
            for amp in amps:
                argv = ["--mode", mode, "--batch_size", str(a.batch_size), "--resnet_width", str(width)]
                if mode == "simclr_DIA":
                    argv += ["--shift_trans_type", "diffusion_rotation", "--diffusion_model_path", ckpt]
                else:
                    argv += ["--shift_trans_type", "rotation"]
                if amp:
                    argv.append("--amp")
                if a.device:
                    argv += ["--device", a.device]
                P = parse_args("train", argv)
                torch.manual_seed(0)
                model = build_model("resnet18", 2, n_shifts=4, width=width).to(device)
                trainer = Trainer(TrainConfig.from_flags(vars(P)), model, device,
                                  dissolve=build_dissolve(P, device, info), precision="bf16" if amp else "fp32")
                s = time_steps(trainer, normal, a.batch_size, a.steps)
                sub = normal.subset(torch.arange(256))
                t0 = time.perf_counter()
                extract_features(model, sub, "rotation", 1, device, batch_size=128, amp=amp)
                ev = 256 / (time.perf_counter() - t0)
                print(f"{mode:<12} {width:>5} {str(amp):>4} {s:>8.3f} {a.batch_size / s:>8.1f} {ev:>10.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
