"""Train the DIA dissolver: a DDPM on the normal class.

    python diffusion_models/train_eval_ddpm.py --mode train --dataset covid          # from the repo root
    cd diffusion_models; python train_eval_ddpm.py --mode train --dataset covid      # as the paper's README

The dissolving grid and its measures are ``eval_dissolver.py``'s, the MAC counts
``benchmarks/dissolver_macs.py``'s; ``--mode eval`` and ``--mode macs`` name those commands.

Training follows the paper's recipe (its script drives the package's ``Trainer``): the normal
class of the training split, each original image resized bilinearly without antialiasing to
the dissolving resolution (MedMNIST: pad 2 -> 32; 32-px data: as is) with random horizontal
flips; micro-batches of ``--batch_size`` 256 with ``--grad_accum`` 2 (512 images per
optimiser step); Adam lr 8e-5, betas (0.9, 0.99); gradient-norm clipping at 1.0; an EMA
(``ema_pytorch``, 0.995 every 10 steps). Training counts optimiser steps: a milestone every
``--save_every`` 31,250 steps, and the default ``--train_steps`` 156,250 is the paper's
``model-5.pt``. Checkpoints are written atomically at each milestone and resume exactly
(``--resume``); a diverged (non-finite) model is never written. The loop is
``diffusion_models.trainer.DissolverTrainer``.

Under ``torchrun --nproc_per_node=N`` training runs with DDP: ``--batch_size`` is per process,
so each micro-batch is N x ``--batch_size`` images (rank r takes the r-th block of it), the
gradients are averaged over the ranks, each rank draws its own timesteps and noise, and rank 0
alone writes the checkpoint (which records ``world_size``; a resume needs the same N).
``python -m torch.distributed.launch`` (CSI's line) works too: its ``--local-rank`` is accepted.
"""
import argparse
import contextlib
import os
import shlex
import sys
from dataclasses import dataclass

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:  # run as a script from anywhere, as the paper's README does
    sys.path.insert(0, _ROOT)

from tqdm import tqdm  # noqa: E402

from common import distributed  # noqa: E402
from common.device import device_facts, device_precision, make_deterministic, precision_line  # noqa: E402
from common.errors import UserError, exit_on_user_error  # noqa: E402
from common.flags import (HelpFormatter, add_amp, add_data_root, add_deterministic, add_device,  # noqa: E402
                          add_diff_resolution, add_seed)
from common.run_folder import check_world_size, lock_file  # noqa: E402
from datasets import get_dataset, one_class_split  # noqa: E402
from datasets.fingerprint import check_outside_data, check_same_data, data_fingerprint, data_tree  # noqa: E402
from datasets.normal_class import normal_class_line  # noqa: E402
from datasets.registry import check_dataset_name  # noqa: E402
from diffusion_models.ddpm import ddpm_config, read_dissolver_checkpoint  # noqa: E402
from diffusion_models.ddpm_data import (check_normal_class, ddpm_training_images, dissolver_class,  # noqa: E402
                                        paper_dataset_name)
from diffusion_models.trainer import RECIPE_KEYS, DissolverRecipe, DissolverTrainer, check_schedule  # noqa: E402

# --mode values whose work another program does: (that program, what it does)
OTHER_PROGRAMS = {"eval": ("eval_dissolver.py", "the dissolving grid and its measures"),
                  "macs": (os.path.join("benchmarks", "dissolver_macs.py"), "the dissolver's MAC counts")}


def default_save_path(dataset, one_class_idx, resolution):
    cls = "all" if one_class_idx is None else one_class_idx  # None: every class (--all_classes)
    return os.path.join(_HERE, "ckpts", f"{dataset}_{cls}_{resolution}px.pt")


def build_parser():
    d = DissolverRecipe()
    p = argparse.ArgumentParser(prog="train_eval_ddpm.py", formatter_class=HelpFormatter,
                                description="Train the DIA dissolver (a DDPM on the normal class).")
    p.add_argument("--mode", choices=["train", "eval", "macs"], default="train",
                   help="train (the only mode here); eval and macs answer with the command of the program that "
                        "does that work (eval_dissolver.py, benchmarks/dissolver_macs.py)")
    p.add_argument("--dataset", default=None, help="dataset name (required; the paper's names, e.g. sars-covid, "
                                                   "are understood)")
    add_data_root(p)
    p.add_argument("--one_class_idx", "--on_label", type=int, default=None,
                   help="normal class by index (left out: --normal_class's rules; covid: 1, the non-COVID folder, "
                        "as the paper's script)")
    p.add_argument("--normal_class", default=None, metavar="NAME",
                   help="normal class by name (a class folder of a folder dataset); left out: the folder named good "
                        "or normal, else the only class folder of train/; class 0 for the other datasets")
    p.add_argument("--all_classes", action="store_true",
                   help="train on every class of the training split (CSI's unlabeled multi-class setting; the "
                        "paper's script does this for CIFAR without --on_label); the checkpoint records class None")
    add_diff_resolution(p, "--image_size", dest="image_size",
                        help="side in pixels of the images the dissolver learns (--image_size: the paper's script's "
                             "spelling)")
    p.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="images per micro-batch and process (the paper's 16 * 16)")
    p.add_argument("--grad_accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimiser step (the paper's 2)")
    p.add_argument("--train_steps", type=int, default=156_250,
                   help="optimiser steps in total: the paper's model-5.pt, 5 milestones of 31,250 (its Trainer is "
                        "set to run on to 312,500)")
    p.add_argument("--save_every", type=int, default=31_250, help="optimiser steps per milestone checkpoint")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam's learning rate")
    p.add_argument("--grad_clip", type=float, default=d.grad_clip,
                   help="gradient-norm clipping (the package Trainer's 1.0)")
    p.add_argument("--unet_dim", type=int, default=64, help="the UNet's base width")
    p.add_argument("--dim_mults", type=int, nargs="+", default=[1, 2, 4, 8], help="the UNet's width per stage")
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion timesteps")
    p.add_argument("--sampling_timesteps", type=int, default=250,
                   help="the package's sampling steps (recorded in the checkpoint; dissolving takes one step)")
    p.add_argument("--objective", default="pred_noise", choices=["pred_noise", "pred_x0"],
                   help="what the network predicts")
    p.add_argument("--beta_schedule", default="cosine", choices=["linear", "cosine"], help="the noise schedule")
    p.add_argument("--loss_type", default="l1", choices=["l1", "l2"], help="the training loss")
    p.add_argument("--ema_decay", type=float, default=d.ema_decay, help="the EMA's beta")
    p.add_argument("--ema_every", type=int, default=d.ema_every, help="optimiser steps between EMA updates")
    p.add_argument("--save_path", default=None,
                   help="checkpoint file (left out: diffusion_models/ckpts/<dataset>_<idx>_<res>px.pt)")
    p.add_argument("--resume", action="store_true", help="continue exactly from --save_path (by steps)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_path instead of refusing")
    add_seed(p, "seed of the initial weights, the data order, the flips, the timesteps and the noise",
             default=d.seed)
    add_device(p)
    p.add_argument("--accept_changed_data", action="store_true",
                   help="--resume although the data changed since the checkpoint was trained (files added, removed "
                        "or rewritten, classes renamed), which is otherwise refused; the checkpoint records the change")
    add_amp(p, what="the forward pass (fp32 weights, optimiser and EMA; off is the paper's Trainer)",
            older_gpu="fp32 (this training runs no fp16)")
    add_deterministic(p)
    # torch.distributed.launch passes --local-rank (or --local_rank); torchrun sets LOCAL_RANK instead
    p.add_argument("--local_rank", "--local-rank", type=int, default=0,
                   help="set by torch.distributed.launch; the process's rank on its machine")
    p.add_argument("--no_progress", action="store_true",
                   help="no tqdm progress bar (there is none anyway when stderr is not a terminal)")
    p.add_argument("--progress_file", default=None, metavar="JSON",
                   help="write the training's progress (step of N, seconds per step, time to the end) to this JSON "
                        "file every few seconds (reproduce.py shows it)")
    return p


def _without_mode(argv):
    """``argv`` without its ``--mode X`` (or ``--mode=X``, or an abbreviation of ``--mode``)."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        flag = tok.split("=", 1)[0]
        if len(flag) >= 3 and "--mode".startswith(flag):
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def parse_args(argv=None):
    """The flags; ``--mode eval`` and ``--mode macs`` are a :class:`UserError` naming the program
    to run instead, with the same flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.mode in OTHER_PROGRAMS:
        program, what = OTHER_PROGRAMS[args.mode]
        cmd = shlex.join(["python", os.path.relpath(os.path.join(_ROOT, program)), *_without_mode(argv)])
        raise UserError(f"--mode {args.mode}: {what} are {program}'s work; run: {cmd}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    ours = paper_dataset_name(args.dataset)
    if ours != args.dataset:
        print(f"note: --dataset {args.dataset} is the paper's name for {ours}")
        args.dataset = ours
    if args.mode == "train" and not args.dataset:
        raise UserError("--mode train needs --dataset (e.g. --dataset covid, or synth_lesion to try it out)")
    check_dataset_name(args.dataset)  # first: a near miss gets a suggestion
    return args


@dataclass(frozen=True)
class Plan:
    """What one training run is: its network, recipe, normal class, checkpoint file and the
    precision of its forward passes on this process's device (bf16 or fp32)."""

    resolution: int
    config: dict
    recipe: DissolverRecipe
    one_class_idx: object  # an int, or None for every class
    save_path: str
    precision: str


def plan_training(args, device):
    """Check every flag and decide the run, before anything is locked or written: the dataset's
    class first (a folder dataset's folders: a wrong path is the first error), then the
    dissolver's flags."""
    if args.all_classes and (args.one_class_idx is not None or args.normal_class is not None):
        which = (f"--one_class_idx {args.one_class_idx}" if args.one_class_idx is not None
                 else f"--normal_class {args.normal_class}")
        raise UserError(f"--all_classes trains on every class; {which} names one: leave out one of the two")
    if args.all_classes:
        idx = None
    else:  # from the folders' names alone: the class decides the default --save_path
        idx = dissolver_class(args.dataset, args.data_root, args.one_class_idx, args.normal_class)[0]
    try:
        check_schedule(args.train_steps, args.save_every)
        recipe = DissolverRecipe(**{k: getattr(args, k) for k in RECIPE_KEYS})
        config = ddpm_config(image_size=args.image_size, channels=3, unet_dim=args.unet_dim, dim_mults=args.dim_mults,
                             timesteps=args.timesteps, sampling_timesteps=args.sampling_timesteps,
                             objective=args.objective, beta_schedule=args.beta_schedule, loss_type=args.loss_type)
    except UserError:
        _load_data(args)  # the data's files first (MedMNIST, CIFAR: read by the loader): a wrong path comes first
        raise
    precision = device_precision(args.amp, device, fp16=False)  # the device is set: joined() set it
    save_path = args.save_path or default_save_path(args.dataset, idx, args.image_size)
    return Plan(args.image_size, config, recipe, idx, save_path, precision)


# --------------------------------------------------------------------------- the checkpoint file's bookkeeping


@contextlib.contextmanager
def locked_save_path(save_path):
    """Hold ``save_path``'s lock (rank 0 takes it; a lock file beside it, released by the
    kernel when the process ends) while the block runs, so two trainings never write one
    checkpoint; what is there cannot change under the block."""
    held = []
    try:
        held.append(distributed.main_writes(lock_file, save_path, "--save_path",
                                            "another train_eval_ddpm.py is training it: wait for it to end, or "
                                            "choose another --save_path"))
        distributed.barrier()
        yield
    finally:
        for lock in held:
            if lock is not None:
                lock.release()


def checkpoint_to_resume(args, plan, device):
    """The checkpoint ``--resume`` continues (None without it), checked against this run: the
    same network, recipe, number of processes, dataset and class. Without ``--resume`` an
    existing file is refused unless ``--overwrite``."""
    save_path, world = plan.save_path, distributed.world_size()
    if args.resume and not os.path.exists(save_path):
        raise UserError(f"--resume: nothing to resume at {save_path}; drop --resume to start training")
    if not args.resume and os.path.exists(save_path) and not args.overwrite:
        raise UserError(f"{save_path} already exists; pass --resume to continue it, --overwrite to start over, "
                        "or another --save_path")
    if not args.resume:
        return None
    ckpt = read_dissolver_checkpoint(save_path, "cpu")  # into host memory: the trainer moves what it uses
    recipe = plan.recipe.as_dict()
    stored = ckpt["config"]
    diffs = [f"{k} {stored.get(k)} (now {v})" for k, v in plan.config.items() if stored.get(k) != v]
    saved = (ckpt["train_state"] or {}).get("recipe", {})
    diffs += [f"--{k} {saved[k]} (now {recipe[k]})" for k in RECIPE_KEYS if k in saved and saved[k] != recipe[k]]
    saved_world = int((ckpt["meta"] or {}).get("world_size", 1))
    how = (f"torchrun --nproc_per_node={saved_world} diffusion_models/train_eval_ddpm.py ..."
           if saved_world > 1 else "one process (python diffusion_models/train_eval_ddpm.py ...)")
    check_world_size(f"--resume: {save_path}", saved_world, world,
                     f"{how} (the micro-batch is processes x --batch_size)")
    if diffs:
        raise UserError(f"--resume: {save_path} was trained with {', '.join(diffs)}; pass the same flags "
                        "(only --train_steps, --save_every, --device, --amp and --deterministic may change) or another "
                        "--save_path")
    meta, idx = ckpt["meta"], plan.one_class_idx
    if meta.get("dataset") != args.dataset or meta.get("one_class_idx") != idx:
        def what(c):
            return "all classes" if c is None else f"class {c}"

        raise UserError(f"--resume: {save_path} was trained on {meta.get('dataset')} "
                        f"{what(meta.get('one_class_idx'))}, not {args.dataset} {what(idx)}; use another "
                        f"--save_path")
    if ckpt["train_state"] is None:
        raise UserError(f"--resume: {save_path} holds no training state; start over with --overwrite")
    return ckpt


# --------------------------------------------------------------------------- data


def _load_data(args):
    return get_dataset(args.dataset, args.data_root, image_size=None, seed=args.seed)


def training_images(args, plan, loaded):
    """The normal training images at the dissolving resolution, and what they are (the
    checkpoint's meta: dataset, one_class_idx, class_name, native_kind); ``loaded``: what
    ``_load_data`` returned."""
    train_set, test_set, info = loaded
    # the checkpoint never lands among the data's files; what it is trained on, recorded
    check_outside_data([("--save_path", plan.save_path)], data_tree(train_set, test_set), args.dataset)
    fingerprint = data_fingerprint(args.dataset, train_set, test_set, info)
    idx = plan.one_class_idx
    if idx is not None:
        check_normal_class(idx, info)
    normal_train, _ = one_class_split(train_set, test_set, info, idx)  # idx None: the whole training split
    print(normal_class_line(info.name, info.class_names, idx))
    images = ddpm_training_images(normal_train, info.native_kind, plan.resolution,
                                  progress=lambda it: tqdm(it, desc="decoding originals", leave=False,
                                                           disable=True if args.no_progress else None))
    data = {"dataset": args.dataset, "one_class_idx": idx,
            "class_name": "all" if idx is None else str(info.class_names[idx]), "native_kind": info.native_kind}
    data["data_fingerprint"] = fingerprint
    return images, data


def check_dissolver_data(args, ckpt, data, save_path):
    """A resumed dissolver goes on with the data its checkpoint records (their fingerprint), or
    with ``--accept_changed_data``, which each later checkpoint records (``accepted_changes``)."""
    if ckpt is None:
        return
    meta = ckpt.get("meta") or {}
    changes = check_same_data(meta.get("data_fingerprint"), data["data_fingerprint"], f"--resume: {save_path}",
                              args.accept_changed_data, where=f"--data_root {args.data_root}",
                              advice="train a new dissolver with another --save_path")
    data["accepted_changes"] = list(meta.get("accepted_changes") or [])
    if changes:
        step = int((ckpt.get("train_state") or {}).get("step", 0))
        data["accepted_changes"].append({"step": step, "flag": "--accept_changed_data", "changes": changes})
        print(f"--accept_changed_data: going on from step {step} with changed data: {'; '.join(changes)}")


def shorter_training(args):
    """The flags that shorten the training, with their values (for the line that estimates its end)."""
    return (f"--train_steps (now {args.train_steps:,}; the paper's 156,250), --batch_size (now {args.batch_size}) x "
            f"--grad_accum (now {args.grad_accum}), a smaller UNet (--unet_dim, now {args.unet_dim}) or --image_size "
            f"(now {args.image_size})")


def describe(args, plan, trainer, data, n, device):
    """One line: what this training is."""
    world, gb, config = trainer.world_size, trainer.global_batch, plan.config
    idx = data["one_class_idx"]
    classes = "all classes" if idx is None else f"class {idx} ({data['class_name']})"
    processes = f" ({world} processes x {args.batch_size})" if world > 1 else ""
    return (f"dissolver: {args.dataset} {classes}, {n} normal training images ({data['native_kind']}) -> "
            f"{plan.resolution} px, {args.train_steps} optimiser steps of {args.grad_accum} x {gb} images{processes} "
            f"({trainer.images_per_step * args.train_steps / max(n, 1):.1f} passes over the data), "
            f"milestone every {args.save_every} steps, device {device} "
            f"({'bf16 autocast' if plan.precision == 'bf16' else 'fp32'}), Unet(dim={config['unet_dim']}, "
            f"dim_mults={tuple(config['dim_mults'])}), {config['objective']}, {config['beta_schedule']}, "
            f"{config['loss_type']}")


# --------------------------------------------------------------------------- the program


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    make_deterministic(args.deterministic)  # before any CUDA work
    with distributed.joined(args.device) as device:  # torchrun's process group, when there is one
        distributed.quiet_unless_main()
        plan = plan_training(args, device)
        with locked_save_path(plan.save_path):
            loaded = _load_data(args)  # the dataset and its files, before the checkpoint's flags
            ckpt = checkpoint_to_resume(args, plan, device)
            images, data = training_images(args, plan, loaded)
            check_dissolver_data(args, ckpt, data, plan.save_path)
            trainer = DissolverTrainer(plan.config, plan.recipe, device, progress=not args.no_progress,
                                       precision=plan.precision)
            if ckpt is not None:
                trainer.load_state(ckpt)
                print(f"resuming {plan.save_path} at step {trainer.step}")
                ckpt = None  # the trainer holds its state now
            print(describe(args, plan, trainer, data, len(images), device))
            print(precision_line(args.amp, plan.precision, *device_facts(device), fp16=False))
            if trainer.precision_change():
                print(trainer.precision_change())
            if trainer.step >= args.train_steps:
                print(f"nothing to do: {plan.save_path} is at step {trainer.step} of --train_steps {args.train_steps}")
                return
            trainer.fit(images, data, plan.save_path, args.train_steps, args.save_every,
                        progress_file=args.progress_file, shorten=shorter_training(args))


if __name__ == "__main__":
    main()
