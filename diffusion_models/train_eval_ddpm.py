"""Train the DIA dissolver (a DDPM on the normal class), draw its dissolving figure, count its MACs.

    python diffusion_models/train_eval_ddpm.py --mode train --dataset covid          # from the repo root
    cd diffusion_models; python train_eval_ddpm.py --mode train --dataset covid      # as the paper's README
    python diffusion_models/train_eval_ddpm.py --mode eval --dataset covid \
        --diffusion_model_path diffusion_models/ckpts/covid_1_32px.pt --out dissolving.png
    python diffusion_models/train_eval_ddpm.py --mode macs --image_size 32 64 128

Training follows the paper's recipe (its script drives the package's ``Trainer``): the normal
class of the training split, each original image resized bilinearly without antialiasing to
the dissolving resolution (MedMNIST: pad 2 -> 32; 32-px data: as is) with random horizontal
flips; micro-batches of ``--batch_size`` 256 with ``--grad_accum`` 2 (512 images per
optimiser step); Adam lr 8e-5, betas (0.9, 0.99); gradient-norm clipping at 1.0; an EMA
(``ema_pytorch``, 0.995 every 10 steps). Training counts optimiser steps: a milestone every
``--save_every`` 31,250 steps, and the default ``--train_steps`` 156,250 is the paper's
``model-5.pt``. Checkpoints are written atomically at each milestone and resume exactly
(``--resume``); a diverged (non-finite) model is never written.

Under ``torchrun --nproc_per_node=N`` training runs with DDP: ``--batch_size`` is per process,
so each micro-batch is N x ``--batch_size`` images (rank r takes the r-th block of it), the
gradients are averaged over the ranks, each rank draws its own timesteps and noise, and rank 0
alone writes the checkpoint (which records ``world_size``; a resume needs the same N).
"""
import contextlib
import argparse
import math
import os
import random
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import distributed  # noqa: E402
from common.device import pick_device  # noqa: E402
from common.errors import UserError, exit_on_user_error  # noqa: E402
from utils import autocast_for, rng_state, set_rng_state  # noqa: E402

PAPER_GMACS = {32: 2.33, 64: 3.84, 128: 9.90}
DEFAULT_SHOW_TIMESTEPS = [10, 30, 50, 70, 100, 150]


def default_one_class_idx(dataset):
    """The DDPM script's normal class: folder class 1 ('non-COVID') for covid, else 0."""
    return 1 if dataset == "covid" else 0


def default_save_path(dataset, one_class_idx, resolution):
    cls = "all" if one_class_idx is None else one_class_idx  # None: every class (--all_classes)
    return os.path.join(_HERE, "ckpts", f"{dataset}_{cls}_{resolution}px.pt")


def build_parser():
    p = argparse.ArgumentParser(description="Train / show / cost the DIA dissolver (DDPM).")
    p.add_argument("--mode", choices=["train", "eval", "macs"], default="train")
    p.add_argument("--dataset", default=None, help="dataset name (required for train and eval)")
    p.add_argument("--data_root", default="../data")
    p.add_argument("--one_class_idx", "--on_label", type=int, default=None,
                   help="normal class (default: 1 for covid, the non-COVID folder; else 0; eval: the checkpoint's)")
    p.add_argument("--all_classes", action="store_true",
                   help="train: on every class of the training split (CSI's unlabeled multi-class setting; the "
                        "paper's script does this for CIFAR without --on_label); the checkpoint records class None")
    p.add_argument("--image_size", type=int, nargs="+", default=None,
                   help="dissolving resolution (train: default 32; macs: list, default 32 64 128)")
    p.add_argument("--batch_size", type=int, default=256, help="images per micro-batch (the paper's 16 * 16)")
    p.add_argument("--grad_accum", type=int, default=2, help="micro-batches per optimiser step (the paper's 2)")
    p.add_argument("--train_steps", type=int, default=156_250,
                   help="optimiser steps in total (default: the paper's model-5.pt, 5 milestones of 31,250; its "
                        "Trainer was set to run on to 312,500)")
    p.add_argument("--save_every", type=int, default=31_250, help="optimiser steps per milestone checkpoint")
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping (the package Trainer's 1.0)")
    p.add_argument("--unet_dim", type=int, default=64)
    p.add_argument("--dim_mults", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--sampling_timesteps", type=int, default=250)
    p.add_argument("--objective", default="pred_noise", choices=["pred_noise", "pred_x0"])
    p.add_argument("--beta_schedule", default="cosine", choices=["linear", "cosine"])
    p.add_argument("--loss_type", default="l1", choices=["l1", "l2"])
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--ema_every", type=int, default=10)
    p.add_argument("--save_path", default=None,
                   help="checkpoint file (default diffusion_models/ckpts/<dataset>_<idx>_<res>px.pt)")
    p.add_argument("--resume", action="store_true", help="continue exactly from --save_path (by steps)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_path instead of refusing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if present)")
    p.add_argument("--amp", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="train: bf16 autocast of the forward pass (fp32 weights, optimiser and EMA); auto (default) = "
                        "where the device computes bf16 in hardware (CUDA with bf16, a CPU with AVX512-BF16 or "
                        "AMX); --amp alone = on; off = fp32 throughout, as the paper's Trainer")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    # eval
    p.add_argument("--diffusion_model_path", default=None, help="dissolver checkpoint (eval; macs: optional)")
    p.add_argument("--timesteps_to_show", type=int, nargs="+", default=None,
                   help=f"eval: timesteps of the rows (default {' '.join(map(str, DEFAULT_SHOW_TIMESTEPS))})")
    p.add_argument("--n_show", type=int, default=8, help="eval: images per row (half normal, half anomalous)")
    p.add_argument("--diffusion_weights", default="online", choices=["online", "ema"],
                   help="eval: which weights dissolve (online: the paper's, the Trainer file's 'model')")
    p.add_argument("--range_correct", action="store_true",
                   help="eval: feed x*2-1 and show (x0+1)/2 (default: the paper's raw [0,1] in, [-1,1] out)")
    p.add_argument("--out", default=None,
                   help="eval: PNG path (default: next to the checkpoint); the dissolving-quality JSON goes beside it")
    p.add_argument("--quality_images", type=int, default=256,
                   help="eval: images measured per timestep (frequency split; lesion removal on synth_lesion and its variants)")
    return p


# --------------------------------------------------------------------------- helpers


def _single_size(args, default):
    if args.image_size is None:
        return default
    if len(args.image_size) != 1:
        raise UserError(f"--mode {args.mode} takes one --image_size, got {' '.join(map(str, args.image_size))}")
    return args.image_size[0]


def _config_from_args(args, resolution):
    from diffusion_models.ddpm import ddpm_config

    return ddpm_config(image_size=resolution, channels=3, unet_dim=args.unet_dim, dim_mults=args.dim_mults,
                       timesteps=args.timesteps, sampling_timesteps=args.sampling_timesteps,
                       objective=args.objective, beta_schedule=args.beta_schedule, loss_type=args.loss_type)


def _load_data(args):
    from datasets import get_dataset

    if not args.dataset:
        raise UserError(f"--mode {args.mode} needs --dataset (e.g. --dataset covid, or synth_lesion to try it out)")
    return get_dataset(args.dataset, args.data_root, image_size=None, seed=args.seed)


def _check_class(idx, info):
    n = len(info.class_names)
    if not 0 <= idx < n:
        raise UserError(f"--one_class_idx {idx} is out of range: this dataset has {n} classes "
                        f"({', '.join(map(str, info.class_names))}); use 0..{n - 1}")


def decide_training_amp(request, device):
    """``--amp`` for training: bf16 or nothing (fp16 would need loss scaling, which this loop has not)."""
    from common.device import bf16_supported, decide_amp

    amp = decide_amp(request, device)
    if amp and not bf16_supported(device) and device.type == "cuda":
        raise UserError(f"--amp {request}: {device} has no bf16, and the dissolver trains in bf16 or fp32 only; "
                        f"pass --amp off (or --amp auto, which decides the same here)")
    return amp


def _epoch_order(n, seed, epoch):
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


# --------------------------------------------------------------------------- train


RECIPE_KEYS = ("batch_size", "grad_accum", "lr", "grad_clip", "ema_decay", "ema_every", "seed")


def _check_writable(path, flag="--save_path"):
    """Fail before any work when ``path`` cannot be written (a real write probe: as root,
    ``os.access`` says yes even on read-only file systems)."""
    from common.paths import check_output_file

    check_output_file(path, flag)


def accumulate_and_step(diffusion, opt, micro_batches, grad_clip, net=None, average=None,
                        autocast=contextlib.nullcontext):
    """One optimiser step as the package's Trainer makes it: each micro-batch's loss divided by
    their number and back-propagated, the gradient norm clipped to ``grad_clip``, then the step.

    ``net``: what the micro-batches go through (DDP under torchrun: gradients averaged over the
    ranks once, at the last micro-batch); ``average``: the loss averaged over the ranks;
    ``autocast``: a context factory for the forward passes (mixed precision).
    Returns ``(loss, grad_norm)``: the mean micro-batch loss and the norm before clipping. A
    non-finite loss skips the update (the caller stops with an error).
    """
    net = diffusion if net is None else net
    total = 0.0
    for i, x in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
            with autocast():
                loss = net(x) / len(micro_batches)
            loss.backward()
        total += loss.item()
    if average is not None:
        total = average(total)  # every rank sees the same number, so all stop together
    if not math.isfinite(total):
        opt.zero_grad(set_to_none=True)
        return total, float("nan")
    norm = torch.nn.utils.clip_grad_norm_(diffusion.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, float(norm)


def train(args):
    """Train (or resume) a dissolver; ``--save_path`` is locked while it trains (a lock file
    beside it, released by the kernel when the process ends), so two trainings never write one
    checkpoint."""
    held = []
    with distributed.joined(args.device) as device:  # torchrun's process group, when there is one
        distributed.quiet_unless_main()
        try:
            return _train(args, held, device)
        finally:
            for lock in held:
                lock.release()


def _lock_save_path(save_path, held):
    """Lock ``save_path`` (``.<name>.lock`` beside it) and remove the temporary files a killed
    write of it left."""
    from common.run_folder import ProcessLock
    from utils import remove_stale_temps

    folder, name = os.path.split(os.path.abspath(save_path))
    created = None if os.path.isdir(folder) else folder
    _check_writable(save_path)
    os.makedirs(folder, exist_ok=True)
    held.append(ProcessLock(os.path.join(folder, f".{name}.lock"), f"--save_path {save_path}",
                            "another train_eval_ddpm.py is training it: wait for it to end, or choose another "
                            "--save_path", remove_folder=created).acquire())
    remove_stale_temps(folder, name)


def _train(args, held, device):
    from ema_pytorch import EMA
    from tqdm import tqdm

    from datasets import one_class_split
    from diffusion_models.ddpm import build_diffusion, package_version, read_dissolver_checkpoint, save_dissolver
    from diffusion_models.ddpm_data import ddpm_training_images
    from diffusion_models.training_form import training_form

    resolution = _single_size(args, 32)
    for name in ("train_steps", "batch_size", "grad_accum", "save_every", "ema_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0 or not args.grad_clip > 0:
        raise UserError(f"--lr ({args.lr}) and --grad_clip ({args.grad_clip}) must be positive")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema_decay must lie in [0, 1), got {args.ema_decay}")
    config = _config_from_args(args, resolution)
    amp = decide_training_amp(args.amp, device)  # before anything is locked or written
    if not args.dataset:
        raise UserError("--mode train needs --dataset (e.g. --dataset covid, or synth_lesion to try it out)")
    if args.all_classes and args.one_class_idx is not None:
        raise UserError(f"--all_classes trains on every class; --one_class_idx {args.one_class_idx} names one: "
                        f"leave out one of the two")
    if args.all_classes:
        idx = None
    else:
        idx = default_one_class_idx(args.dataset) if args.one_class_idx is None else args.one_class_idx
    save_path = args.save_path or default_save_path(args.dataset, idx, resolution)
    # before looking at it (rank 0 holds the lock): what is there cannot change under us
    distributed.main_writes(_lock_save_path, save_path, held)
    distributed.barrier()
    world = distributed.world_size()
    if args.resume and not os.path.exists(save_path):
        raise UserError(f"--resume: nothing to resume at {save_path}; drop --resume to start training")
    if not args.resume and os.path.exists(save_path) and not args.overwrite:
        raise UserError(f"{save_path} already exists; pass --resume to continue it, --overwrite to start over, "
                        "or another --save_path")
    ckpt = read_dissolver_checkpoint(save_path, device) if args.resume else None
    recipe = dict({k: getattr(args, k) for k in RECIPE_KEYS}, amp=amp)
    if ckpt is not None:
        stored = ckpt["config"]
        diffs = [f"{k} {stored.get(k)} (now {v})" for k, v in config.items() if stored.get(k) != v]
        saved = (ckpt["train_state"] or {}).get("recipe", {})
        diffs += [f"--{k} {saved[k]} (now {recipe[k]})" for k in RECIPE_KEYS if k in saved and saved[k] != recipe[k]]
        if saved and bool(saved.get("amp", False)) != amp:  # trained before --amp existed: fp32
            was = "on" if saved.get("amp", False) else "off"
            diffs.append(f"--amp {was} (now {'on' if amp else 'off'})")
        saved_world = int((ckpt["meta"] or {}).get("world_size", 1))
        if saved_world != world:
            how = (f"torchrun --nproc_per_node={saved_world} diffusion_models/train_eval_ddpm.py ..."
                   if saved_world > 1 else "one process (python diffusion_models/train_eval_ddpm.py ...)")
            raise UserError(f"--resume: {save_path} was trained by {saved_world} process(es), this is {world}; "
                            f"resume it with {how} (the micro-batch is processes x --batch_size)")
        if diffs:
            raise UserError(f"--resume: {save_path} was trained with {', '.join(diffs)}; pass the same flags "
                            "(only --train_steps and --save_every may change) or another --save_path")
        meta = ckpt["meta"]
        if meta.get("dataset") != args.dataset or meta.get("one_class_idx") != idx:
            def what(c):
                return "all classes" if c is None else f"class {c}"

            raise UserError(f"--resume: {save_path} was trained on {meta.get('dataset')} "
                            f"{what(meta.get('one_class_idx'))}, not {args.dataset} {what(idx)}; use another "
                            f"--save_path")
        if ckpt["train_state"] is None:
            raise UserError(f"--resume: {save_path} holds no training state; start over with --overwrite")

    train_set, test_set, info = _load_data(args)
    if idx is not None:
        _check_class(idx, info)
    normal_train, _ = one_class_split(train_set, test_set, info, idx)  # idx None: the whole training split
    class_text = "all classes" if idx is None else f"class {idx} ({info.class_names[idx]})"
    n = len(normal_train)
    images = ddpm_training_images(normal_train, info.native_kind, resolution,
                                  progress=lambda it: tqdm(it, desc="decoding originals", disable=args.no_progress,
                                                           leave=False))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    diffusion = build_diffusion(config).to(device)
    training_form(diffusion.model)  # the fp32 network's epsilons under bf16 too (same parameters, same names)
    ema = EMA(diffusion, beta=args.ema_decay, update_every=args.ema_every, include_online_model=False)
    ema.to(device)
    opt = torch.optim.Adam(diffusion.parameters(), lr=args.lr, betas=(0.9, 0.99))
    flip_gen = torch.Generator().manual_seed(args.seed)
    step, epoch, pos = 0, 0, 0  # optimiser steps; pass over the data; next micro-batch within it

    if ckpt is not None:
        ts = ckpt["train_state"]
        diffusion.load_state_dict(ckpt["model_state"])
        ema.ema_model.load_state_dict(ckpt["ema_state"])
        opt.load_state_dict(ts["optimizer"])
        ema.step.fill_(int(ts["ema_step"]))
        ema.initted.fill_(bool(ts["ema_initted"]))
        step, epoch, pos = int(ts["step"]), int(ts["epoch"]), int(ts["pos"])
        set_rng_state(ts["rng"])
        flip_gen.set_state(ts["rng"]["flip"].cpu())
        print(f"resuming {save_path} at step {step}")
        del ckpt

    net = distributed.wrap_model(diffusion, device)
    gb = args.batch_size * world  # a micro-batch of every rank together

    def average(value):
        return distributed.mean_all(torch.tensor(float(value), device=device)).item()

    n_micro = (n + gb - 1) // gb
    per_step = gb * args.grad_accum
    print(f"dissolver: {args.dataset} {class_text}, {n} normal training images "
          f"({info.native_kind}) -> {resolution} px, {args.train_steps} optimiser steps of {args.grad_accum} x "
          f"{gb} images{f' ({world} processes x {args.batch_size})' if world > 1 else ''} ({per_step * args.train_steps / max(n, 1):.1f} passes over the data), "
          f"milestone every {args.save_every} steps, device {device} ({'bf16 autocast' if amp else 'fp32'}), "
          f"Unet(dim={config['unet_dim']}, dim_mults={tuple(config['dim_mults'])}), {config['objective']}, "
          f"{config['beta_schedule']}, {config['loss_type']}")

    def checkpoint(reason):
        train_state = {
            "optimizer": opt.state_dict(), "step": step, "epoch": epoch, "pos": pos,
            "ema_step": int(ema.step.item()), "ema_initted": bool(ema.initted.item()),
            "rng": dict(rng_state(), flip=flip_gen.get_state()), "recipe": recipe,
        }
        meta = {
            "dataset": args.dataset, "one_class_idx": idx,
            "class_name": "all" if idx is None else str(info.class_names[idx]),
            "native_kind": info.native_kind, "package_version": package_version(),
            "steps": step, "milestone": step // args.save_every, "images_seen": step * per_step,
            "normal_train_images": n, "seed": args.seed, "batch_size": args.batch_size, "world_size": world,
            "grad_accum": args.grad_accum, "lr": args.lr, "grad_clip": args.grad_clip,
            "precision": "bf16 autocast (fp32 weights)" if amp else "fp32",
            "ema": f"ema_pytorch EMA(beta={args.ema_decay}, update_every={args.ema_every}, defaults otherwise)",
            "train_transform": "original -> hflip -> bilinear resize without antialias (MedMNIST: pad 2)",
        }
        save_dissolver(save_path, diffusion, ema.ema_model, config, meta, train_state)
        print(f"saved {save_path} ({reason}: step {step}, milestone {meta['milestone']})")

    if step >= args.train_steps:
        print(f"nothing to do: {save_path} is at step {step} of --train_steps {args.train_steps}")
        return
    diffusion.train()
    bar = tqdm(total=args.train_steps, initial=step, desc="DDPM steps",
               disable=args.no_progress or not distributed.is_main(), dynamic_ncols=True)
    t0, t_steps, recent = time.time(), 0, []
    order = _epoch_order(n, args.seed, epoch)
    while step < args.train_steps:
        micro = []
        for _ in range(args.grad_accum):
            if pos >= n_micro:
                epoch, pos = epoch + 1, 0
                order = _epoch_order(n, args.seed, epoch)
            idx_b = order[pos * gb:(pos + 1) * gb]
            pos += 1
            flip = torch.rand(len(idx_b), generator=flip_gen) < 0.5  # the global micro-batch's flips
            idx_b, flip = distributed.shard(idx_b), distributed.shard(flip)  # this rank's block of it
            x = images.index_select(0, idx_b).to(device)
            micro.append(torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x))
        if distributed.is_distributed():  # each rank its own timesteps and noise, resumable without state
            torch.manual_seed((args.seed * 1_000_003 + step) * 1_009 + distributed.rank())
        total, _ = accumulate_and_step(diffusion, opt, micro, args.grad_clip, net=net,
                                       average=average if distributed.is_distributed() else None,
                                       autocast=lambda: autocast_for(device, amp))
        if not math.isfinite(total):
            bar.close()
            raise UserError(f"the DDPM loss became {total} at step {step + 1}; nothing was written after the last "
                            f"milestone. Lower --lr (now {args.lr}) or check the training images")
        step += 1
        ema.update()
        t_steps += 1
        recent.append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", s_per_step=f"{(time.time() - t0) / t_steps:.2f}")
        if step % args.save_every == 0 or step == args.train_steps:
            print(f"step {step}: mean loss {sum(recent) / len(recent):.4f} over the last {len(recent)} steps, "
                  f"{(time.time() - t0) / t_steps:.2f} s per optimiser step")
            recent = []
            checkpoint("milestone" if step % args.save_every == 0 else "final")
    bar.close()


# --------------------------------------------------------------------------- eval


def _atomic_save_png(tensor, path, nrow):
    from torchvision.utils import save_image

    from utils import atomic_write

    atomic_write(path, lambda fh: save_image(tensor, fh, nrow=nrow, padding=2, format="png"))


def evaluate(args):
    from diffusion_models.ddpm import load_dissolver
    from models.dissolve import Dissolver

    if not args.diffusion_model_path:
        raise UserError("--mode eval needs --diffusion_model_path CKPT (written by --mode train)")
    if args.n_show < 1:
        raise UserError(f"--n_show must be >= 1, got {args.n_show}")
    device = pick_device(args.device)
    resolution = _single_size(args, None)
    diffusion, ck = load_dissolver(args.diffusion_model_path, device, expect_resolution=resolution,
                                   expect_channels=3, resolution_flag="--image_size",
                                   weights=args.diffusion_weights)
    resolution = ck["config"]["image_size"]
    out = args.out or os.path.splitext(args.diffusion_model_path)[0] + "_dissolving.png"
    quality_path = os.path.splitext(out)[0] + ".json"
    for path in (out, quality_path):
        _check_writable(path, "--out")
    show = args.timesteps_to_show or DEFAULT_SHOW_TIMESTEPS
    bad = [t for t in show if not 0 <= t < diffusion.num_timesteps]
    if bad:
        raise UserError(f"--timesteps_to_show {' '.join(map(str, bad))} outside 0..{diffusion.num_timesteps - 1}")
    _, test_set, info = _load_data(args)
    meta = ck["meta"]
    idx = args.one_class_idx
    if idx is None:
        idx = meta.get("one_class_idx") if meta.get("dataset") == args.dataset else None
        idx = default_one_class_idx(args.dataset) if idx is None else idx
    _check_class(idx, info)
    if meta.get("dataset") is not None and meta.get("dataset") != args.dataset:
        print(f"note: the dissolver was trained on {meta.get('dataset')}, shown here on {args.dataset}")

    labels = torch.as_tensor(test_set.labels).long()
    g = torch.Generator().manual_seed(args.seed)
    normal = torch.nonzero(labels == idx).flatten()
    anomal = torch.nonzero(labels != idx).flatten()
    normal = normal[torch.randperm(len(normal), generator=g)]
    anomal = anomal[torch.randperm(len(anomal), generator=g)]
    n_norm = min(len(normal), (args.n_show + 1) // 2)
    n_anom = min(len(anomal), args.n_show - n_norm)
    n_norm = min(len(normal), args.n_show - n_anom)
    pick = torch.cat([normal[:n_norm], anomal[:n_anom]])
    if len(pick) == 0:
        raise UserError(f"the {args.dataset} test split under {args.data_root} holds no images")
    x, _ = test_set.get_batch(pick)
    x = x.to(device, torch.float32)
    dissolver = Dissolver(diffusion, info.native_kind, diff_resolution=resolution, offset=0.0, upper=0.0,
                          range_correct=args.range_correct)
    rows = [x] + [dissolver(x, [t]) for t in show]
    grid = torch.cat(rows).clamp(0, 1).cpu()
    if grid.shape[-1] < 96:  # small images: enlarge (nearest) so the fine details stay visible
        grid = torch.nn.functional.interpolate(grid, scale_factor=96 // grid.shape[-1], mode="nearest")
    _atomic_save_png(grid, out, nrow=len(pick))
    mode = "range-correct ([-1,1] in, (x0+1)/2 shown)" if args.range_correct else \
        "paper range ([0,1] in as is, [-1,1] prediction shown clipped to [0,1])"
    print(f"wrote {out}: row 0 = {n_norm} normal + {n_anom} anomalous {args.dataset} test images; rows 1.."
          f"{len(show)} = dissolved at t = {', '.join(map(str, show))} ({resolution} px, {mode})")
    report = dissolving_quality(dissolver, test_set, labels, idx, show, args, device)
    report.update(checkpoint=args.diffusion_model_path, weights=args.diffusion_weights, mode=mode,
                  dataset=args.dataset, resolution=resolution)
    from utils import atomic_write_json

    atomic_write_json(report, quality_path)
    for row in report["timesteps"]:
        extra = (f", lesion removal ratio {row['removal_ratio']:.3f}, tissue change {row['tissue_change']:.3f}"
                 if "removal_ratio" in row else "")
        print(f"  t={row['t']:>4}: high-frequency energy removed {row['hf_removed']:.3f}, low-frequency change "
              f"{row['lf_change']:.3f}{extra}")
    print(f"wrote {quality_path}")


def dissolving_quality(dissolver, test_set, labels, idx, show, args, device):
    """Per timestep: the frequency report on up to ``--quality_images`` normal test images and,
    on ``synth_lesion`` and its variants, the lesion report on the same tissue drawn with and
    without that variant's lesions."""
    from datasets.synth_lesion import VARIANTS, generate_synth_lesion
    from evals.dissolve_quality import frequency_report, lesion_report

    normal = torch.nonzero(labels == idx).flatten()[:args.quality_images]
    x, _ = test_set.get_batch(normal)
    x = x.to(device, torch.float32)
    pairs = None
    if args.dataset in VARIANTS:
        lesioned, _, clean, _ = generate_synth_lesion(0, args.quality_images, seed=args.seed + 7919, split_id=5,
                                                      return_parts=True, variant=args.dataset)
        pairs = (lesioned.float().div(255).to(device), clean.float().div(255).to(device))
    rows = []
    for t in show:
        row = {"t": int(t), **frequency_report(x, dissolver(x, [t]))}
        if pairs is not None:
            row.update(lesion_report(lambda z, t=t: dissolver(z, [t]), *pairs))
        rows.append(row)
    return {"n_images": int(x.shape[0]), "timesteps": rows}


# --------------------------------------------------------------------------- macs


def unet_macs(unet, size, channels=3):
    """``(as_paper, all_convs)`` multiply-accumulates of one UNet call on one image (thop).

    thop hooks modules by their exact type, so by default it skips the package's
    ``WeightStandardizedConv2d`` (a ``Conv2d`` subclass): that count is the one the paper's
    table reports. The second count adds those convolutions.
    """
    import thop
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch import WeightStandardizedConv2d
    from thop.vision.basic_hooks import count_convNd

    x, t = torch.randn(1, channels, size, size), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        as_paper = thop.profile(unet, inputs=(x, t), verbose=False)[0]
        every = thop.profile(unet, inputs=(x, t), verbose=False,
                             custom_ops={WeightStandardizedConv2d: count_convNd})[0]
    for m in unet.modules():  # thop leaves its counters on the modules
        for name in ("total_ops", "total_params"):
            if name in m._buffers:
                del m._buffers[name]
    return as_paper, every


def macs(args):
    import thop
    import torchvision

    from diffusion_models.ddpm import build_unet, read_dissolver_checkpoint, validate_config

    sizes = args.image_size or [32, 64, 128]
    base = None
    if args.diffusion_model_path:
        base = read_dissolver_checkpoint(args.diffusion_model_path, "cpu")["config"]
    with torch.no_grad():
        resnet_macs = thop.profile(torchvision.models.resnet18(weights=None), verbose=False,
                                   inputs=(torch.randn(1, 3, 224, 224),))[0]
    print("dissolver UNet cost per image and call (thop; attention products not counted). 'thop' is thop's "
          "default count, which skips the weight-standardised convolutions; 'all convolutions' adds them")
    for r in sizes:
        cfg = dict(base, image_size=r) if base else _config_from_args(args, r)
        validate_config(cfg)
        unet = build_unet(cfg).eval()
        n_params = sum(p.numel() for p in unet.parameters())
        as_paper, every = unet_macs(unet, r, cfg["channels"])
        paper = PAPER_GMACS.get(r)
        paper_s = f"{paper:.2f} G" if paper else "-"
        print(f"{r:>4} px: thop {as_paper / 1e9:6.2f} GMACs, all convolutions {every / 1e9:6.2f} GMACs, "
              f"{n_params / 1e6:.2f} M parameters; thop count + ResNet-18 at 224 px ({resnet_macs / 1e9:.2f} G): "
              f"{(as_paper + resnet_macs) / 1e9:6.2f} G   (paper: {paper_s})")
    print("note: the paper's 2.33 / 3.84 / 9.90 G are thop's default count of this UNet plus ResNet-18 at 224 px")


# The paper's DDPM script names some datasets differently.
PAPER_DATASET_NAMES = {"sars-covid": "covid", "pneumonia": "pneumoniamnist", "breast": "breastmnist",
                       "chest": "chestmnist"}


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.dataset in PAPER_DATASET_NAMES:
        print(f"note: --dataset {args.dataset} is the paper's name for {PAPER_DATASET_NAMES[args.dataset]}")
        args.dataset = PAPER_DATASET_NAMES[args.dataset]
    if args.mode == "train":
        train(args)
    elif args.mode == "eval":
        evaluate(args)
    else:
        macs(args)


if __name__ == "__main__":
    main()
