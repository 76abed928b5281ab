"""One training configuration timed two ways in one run: our step, and a step that follows the
paper's code call by call (fp32, the K dissolving calls one by one, the paper's order).

    python benchmarks/bench.py --mode simclr_DIA --model resnet18 --batch_size 32 --image_size 32
    python benchmarks/bench.py --mode simclr_DIA --model resnet18_imagenet --batch_size 32 --image_size 224

Prints, for both steps: seconds per step (median over --steps after --warmup), training images
per second, the time spent dissolving, augmenting, in the ResNet (forward, losses, backward,
optimiser) and in the linear head, and the ResNet's achieved GFLOP/s against the matmul peak
measured in the same run (bf16 for a bf16 step, fp32 otherwise). Then the CSI evaluation's
throughput at --ood_samples (default 10, the paper's), and last the line
``speedup_vs_paper_style=<paper-style s/step / our s/step>``.

Images are random (a step's cost does not depend on them); the dissolver is the paper's UNet
(``--unet_dim 64``) at random weights, dissolving at 32 px as the paper does.
"""
import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cli.args import parse_args  # noqa: E402
from common.device import device_precision, pick_device, set_process_device  # noqa: E402
from datasets.base import ArrayStore, ImageDataset  # noqa: E402
from diffusion_models.ddpm import build_diffusion, ddpm_config, load_dissolver, save_dissolver  # noqa: E402
from evals.ood_pre import extract_features  # noqa: E402
from datasets.resolution import to_dissolve_resolution  # noqa: E402
from models.resnet import build_model  # noqa: E402
from models.transform_layers import simclr_augmentation  # noqa: E402
from train import build_dissolve  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trainer import Trainer, contrastive_loss  # noqa: E402
from utils import autocast_for  # noqa: E402

PARTS = ("dissolve", "augment", "resnet", "linear")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, n=2048, seconds=1.0):
    """GFLOP/s of square matmuls in ``dtype`` (best of repeated timings within ``seconds``) and
    their size: ``n``, or the largest power of two from 256 whose one product fits an eighth of
    ``seconds`` (a CPU without native bf16 emulates it hundreds of times slower than fp32)."""
    size = 256
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if size >= n or (time.perf_counter() - t0) * 8 * 8 > seconds:  # the next size costs 8x
            break
        size *= 2
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9, size


class Timer:
    """``timer(name)`` contexts add the (device-synchronised) seconds spent under ``name``."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, name):
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def paper_style_step(tr, x, y, dissolver, library_diffusion, timer):
    """One step written as the paper's simclr_DIA / simclr_CSI loop writes it: fp32, each of the K
    dissolved chunks made by its own call (dissolve, then rotate), images1/2/3 shifted one
    chunk at a time, one SimCLR augmentation of the whole batch, then the network. Each dissolving
    call is the library's ``GaussianDiffusion.p_sample(x, t)[1]`` on the library's own UNet, as
    the paper's code calls it (our dissolver's timestep sampler drawing ``t``)."""
    K, b = tr.K, x.shape[0]
    x1, x2 = tr.hflip(x.repeat(2, 1, 1, 1)).chunk(2)
    chunks = [x1, x2]
    if dissolver is not None:
        with timer("dissolve"):
            x3 = []
            for k in range(K):  # the paper's P.shift_trans(hflip(images), k, diffusion=True)
                t = dissolver.draw_timesteps(1)[0]
                small, undo = to_dissolve_resolution(tr.hflip(x), dissolver.native_kind, dissolver.diff_resolution)
                x3.append(tr.shift(undo(library_diffusion.p_sample(small, t)[1]), k))  # the library's network
            x3 = torch.cat(x3)
    views = [torch.cat([tr.shift(c, k) for k in range(K)]) for c in chunks]
    if dissolver is not None:
        views.append(x3)
    with timer("augment"):
        views = tr.aug(torch.cat(views))
    with timer("resnet"):
        _, aux = tr.net(views, penultimate=True, simclr=True, shift=True)
        z = F.normalize(aux["simclr"], dim=1)
        cfg = tr.config
        loss = contrastive_loss(z, len(chunks) + (dissolver is not None), K, b, cfg.temperature, cfg.sim_lambda,
                                cfg.loss_mode)
        labels = torch.arange(K, device=x.device).repeat_interleave(b).repeat(len(chunks) + (dissolver is not None))
        loss = loss + F.cross_entropy(aux["shift"], labels)
        tr.optimizer.zero_grad()
        loss.backward()
        tr.optimizer.step()
    with timer("linear"):
        tr.linear_step(aux, y, b)


def time_steps(step, device, warmup, steps):
    """Median seconds per step, the median seconds of each part, and the first step's seconds."""
    totals, parts, first = [], {p: [] for p in PARTS}, None
    for i in range(warmup + steps):
        timer = Timer(device)
        sync(device)
        t0 = time.perf_counter()
        step(timer)
        sync(device)
        first = time.perf_counter() - t0 if first is None else first
        if i >= warmup:
            totals.append(time.perf_counter() - t0)
            for p in PARTS:
                parts[p].append(timer.seconds.get(p, 0.0))
    return statistics.median(totals), {p: statistics.median(v) for p, v in parts.items()}, first


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def report(name, s, parts, batch, resnet_flops, peak, peak_name):
    other = max(0.0, s - sum(parts.values()))
    shares = ", ".join(f"{p} {parts[p]:.3f} s ({parts[p] / s:.0%})" for p in PARTS if parts[p] > 0)
    gflops = resnet_flops / parts["resnet"] / 1e9 if parts["resnet"] > 0 else float("nan")
    print(f"{name:<12} {s:.3f} s/step, {batch / s:.1f} img/s; {shares}, other {other:.3f} s; ResNet "
          f"{resnet_flops / 1e9:.1f} GFLOP in {parts['resnet']:.3f} s = {gflops:.0f} GFLOP/s, "
          f"{gflops / peak:.2f} of the {peak_name} matmul peak", flush=True)


def build_parser():
    ap = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("simclr_CSI", "simclr_DIA"), default="simclr_DIA")
    ap.add_argument("--model", default="resnet18",
                    choices=("resnet18", "resnet34", "resnet50", "resnet18_imagenet", "resnet50_imagenet"))
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--image_size", type=int, default=32)
    ap.add_argument("--resnet_width", type=int, default=64, help="CIFAR-style models only (64: the paper's)")
    ap.add_argument("--unet_dim", type=int, default=64, help="the dissolver's UNet width (64: the paper's)")
    ap.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="our step's mixed precision")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each kind (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--ood_samples", type=int, default=10, help="samples per image of the CSI evaluation")
    ap.add_argument("--eval_images", type=int, default=128, help="images the evaluation throughput is timed on")
    ap.add_argument("--compile_dissolver", action="store_true",
                    help="our step with train.py --compile_dissolver (torch.compile of the UNet; compiled in the "
                         "first warm-up step, whose time is printed)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    device = set_process_device(pick_device(a.device))
    amp = device_precision(a.amp, device)  # bf16, fp16 (older GPUs: with loss scaling) or fp32
    torch.manual_seed(a.seed)
    n = max(a.batch_size, a.eval_images)
    images = torch.randint(0, 256, (n, 3, a.image_size, a.image_size), dtype=torch.uint8)
    data = ImageDataset(ArrayStore(images), torch.zeros(n, dtype=torch.long), [str(i) for i in range(n)])
    native_kind = "small32" if a.image_size <= 64 else "large224"
    info = type("Info", (), {"native_kind": native_kind, "name": "random", "image_size": (a.image_size,) * 2 + (3,)})

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    fp32_peak, fp32_n = matmul_peak(device, torch.float32)
    low = torch.float16 if amp == "fp16" else torch.bfloat16
    low_peak, low_n = matmul_peak(device, low)
    low_name = "fp16" if amp == "fp16" else "bf16"
    print(f"matmul peak: fp32 {fp32_peak:.0f} GFLOP/s ({fp32_n} x {fp32_n}), {low_name} {low_peak:.2f} GFLOP/s "
          f"({low_n} x {low_n})", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if a.mode == "simclr_DIA":
            ckpt = os.path.join(tmp, "ddpm.pt")
            cfg = ddpm_config(image_size=32, unet_dim=a.unet_dim)
            d = build_diffusion(cfg)
            save_dissolver(ckpt, d, d, cfg, {"dataset": "random", "one_class_idx": 0})

        def trainer(amp_on, memory_format):
            argv = ["--mode", a.mode, "--batch_size", str(a.batch_size), "--model", a.model,
                    "--shift_trans_type", "diffusion_rotation" if ckpt else "rotation"]
            if ckpt:
                argv += ["--diffusion_model_path", ckpt]
            if a.compile_dissolver and memory_format == torch.channels_last:  # ours only
                argv.append("--compile_dissolver")
            P = parse_args("train", argv)
            P.dataset = "random"
            torch.manual_seed(a.seed)
            kw = {"width": a.resnet_width} if not a.model.endswith("imagenet") else {}
            model = build_model(a.model, 2, n_shifts=4, **kw).to(device)
            model.memory_format = memory_format
            model.to(memory_format=memory_format)
            tr = Trainer(TrainConfig.from_flags(vars(P)), model, device,
                         dissolve=build_dissolve(P, device, info), precision=amp_on)
            return tr

        x, y = data.get_batch(torch.arange(a.batch_size))
        x, y = x.to(device), y.to(device)
        print(f"config: {a.mode}, {a.model}" + (f" width {a.resnet_width}" if not a.model.endswith("imagenet") else "")
              + f", batch {a.batch_size} at {a.image_size} px" + (f", dissolver UNet dim {a.unet_dim} at 32 px" if ckpt
                                                                 else "")
              + f"; ours: {amp if amp == 'fp32' else amp + ' autocast'}, channels-last, the K dissolving calls batched"
              + (", the UNet compiled" if a.compile_dissolver else ""), flush=True)

        ours = trainer(amp, torch.channels_last)

        def our_step(timer):
            ours.timer = timer
            ours.train_step(x, y)

        s_ours, p_ours, first = time_steps(our_step, device, a.warmup, a.steps)
        if a.compile_dissolver:
            print(f"first step of ours, compiling the dissolver: {first:.1f} s", flush=True)
        views, chunks = ours.make_views(x)
        views = ours.aug(views)
        flops_ours = count_flops(lambda: ours.resnet_step(views, chunks, a.batch_size))
        report("ours", s_ours, p_ours, a.batch_size, flops_ours, fp32_peak if amp == "fp32" else low_peak, amp)

        paper = trainer("fp32", torch.contiguous_format)
        # CSI's colour jitter and crop take the whole batch in one pass (ours a few images at a time)
        paper.aug = simclr_augmentation(paper.config.resize_factor, paper.config.resize_fix, chunk_pixels=0)

        library_diffusion = load_dissolver(ckpt, device)[0].eval() if ckpt else None

        def paper_step(timer):
            paper_style_step(paper, x, y, paper.dissolve, library_diffusion, timer)

        s_paper, p_paper, _ = time_steps(paper_step, device, a.warmup, a.steps)
        report("paper-style", s_paper, p_paper, a.batch_size, flops_ours, fp32_peak, "fp32")

        sub = data.subset(torch.arange(a.eval_images))
        for label, tr, amp_on in (("ours", ours, amp), ("paper-style", paper, "fp32")):
            aug_kw = {} if label == "ours" else {"chunk_pixels": 0}
            extract_features(tr.model, sub, "rotation", 1, device, batch_size=100, amp=amp_on, **aug_kw)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            extract_features(tr.model, sub, "rotation", a.ood_samples, device, batch_size=100, amp=amp_on, **aug_kw)
            sync(device)
            ev = a.eval_images / (time.perf_counter() - t0)
            print(f"CSI evaluation ({label}, {amp_on}): {ev:.1f} images/s at "
                  f"--ood_samples {a.ood_samples} ({ev * a.ood_samples * ours.K:.0f} network passes/s)", flush=True)
    print(f"speedup_vs_paper_style={s_paper / s_ours:.2f}", flush=True)


if __name__ == "__main__":
    main()
