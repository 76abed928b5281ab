"""One command from a dataset to the paper's table: dissolvers, training, evaluation, figures.

    python reproduce.py --preset quick                  # synth_streak, CPU-sized, about 10 minutes
    python reproduce.py --dataset kvasir --data_root ../data --one_class_idx 0 \
        --shift_trans_type rotation blurgaussian_rotation diffusion_rotation --seeds 0 1 2

For every combination of dataset, normal class, transformation, resolution and seed it

1. trains the dissolver (a DDPM, ``diffusion_models/train_eval_ddpm.py``) when a
   ``diffusion_*`` transformation needs it: one per dataset, class, resolution and DDPM
   budget, cached under ``<out>/dissolvers/`` with its dissolving grid and MACs;
2. trains the model (``train.py``: ``--mode simclr_CSI`` for ``rotation``/``cutperm``,
   ``--mode simclr_DIA`` for the dissolving transformations);
3. evaluates it (``eval.py --mode ood_pre --ood_score CSI``, the paper's protocol) with
   per-image scores: ``last.model`` (the honest figure) and ``best_CSI.model``, the checkpoint
   train.py's evaluation during training found best on the test set (the paper's selection);
4. draws the figures (ROC, score histograms, loss curves, dissolving grid);

each step as a subprocess whose output goes to a log in the run's folder
``<out>/<dataset>/class_<i>/<transformation>_<res>px/seed_<s>/``. The command writes
``<out>/results.csv`` (one row per run) and ``<out>/results.md`` (the seed README's
"Different transformations" table, once for ``last.model`` and once for ``best_CSI.model``:
mean ± std of the pooled AUROC over seeds, then one row per run) and prints the tables.

A run is finished when its ``results.json`` exists; repeating the command skips it (and a
dissolver whose checkpoint is complete). A failed run is reported in the table and the
other runs go on; the command then exits with status 1 (2 for bad flags or data).

One reproduce.py works in an ``--out`` at a time (a lock). Its steps die with it, however it
ends; SIGTERM or Ctrl-C stop the running step, print one line saying what was interrupted,
and exit with 128 + the signal number. Repeating the command resumes: finished runs are
kept, an interrupted training continues from its last checkpoint (``train.py --resume_path``).
``--train_args`` flags that shape the data (``--img_size``, ``--aptos_all_grades``) reach
eval.py too, and the run folders are named by the size trained at.

``--devices cuda:0 cuda:1`` runs the runs concurrently, one at a time per listed device (the
dissolvers are trained first); ``--nproc_per_run N`` trains each run under torchrun (N processes).

CSI's unlabeled multi-class setting (``--one_class_idx`` left out on cifar10 / imagenet or with
``--ood_dataset``, or ``--one_class_idx None``): every training image is normal, the dissolver is
trained on every class, each run lives in ``<out>/<dataset>/multi_class/...``, and results.md
gets CSI's table: one row per dataset and transformation, one column per out-of-distribution set
and their mean.

This file is the command (its flags and ``main``); the study itself lives in the package
``study/``, one module per job: ``plan`` (the runs), ``steps`` (the subprocesses), ``dissolvers``,
``runs`` (one run), ``figures``, ``tables``, ``text`` (cell formatting) and ``schedule`` (running
the runs, one after another or over devices).
"""
import argparse
import os
import shlex
import signal
import sys
import threading

from cli.args import CSI_SHIFTS, DISSOLVE_TYPES, MULTI_CLASS, SHORT_NAMES, add_model_choice
from cli.args import class_index as parse_class_index
from common.device import pick_device
from common.errors import UserError, exit_on_user_error
from common.flags import (DATA_ROOT, DIFF_RESOLUTION, HelpFormatter, add_amp, add_data_root, add_device,
                          add_diff_resolution)
from common.run_folder import LOCK_NAME, ProcessLock
from datasets import get_dataset
from datasets.normal_class import normal_class_line
from datasets.registry import check_dataset_name, describe_images
from study.plan import image_size_of, make_plan, uses_resolution
from study.schedule import device_slots, run_all
from study.slurm import (busy_folders, check_slurm_commands, parse_sbatch_line, parse_time, partition_has_gpus,
                         run_on_slurm, uses_gpus)
from study.steps import Interrupted, Steps, _on_signal
from train import writes_it
from utils import remove_stale_temps, warn

# Re-exported: tests and users import these from reproduce.
from study.runs import eval_command  # noqa: F401,E402  isort:skip
from study.steps import step_env  # noqa: F401,E402  isort:skip

TRANSFORMATIONS = CSI_SHIFTS + tuple(f"{d}_{s}" for d in DISSOLVE_TYPES for s in CSI_SHIFTS)

# Values a flag takes when neither the command line nor a preset sets it (None: the step's own
# default, or the words of the flag's help).
DEFAULTS = {
    "dataset": None, "data_root": DATA_ROOT, "one_class_idx": None, "normal_class": None, "img_size": None,
    "ood_dataset": None, "preset": None,
    "shift_trans_type": ["rotation", "blurgaussian_rotation", "diffusion_rotation"], "seeds": [0],
    "diff_resolution": [DIFF_RESOLUTION], "resize_to_constant": False, "model": None,
    "epochs": None, "batch_size": 32, "max_batches_per_epoch": None, "max_steps": None, "warmup": None,
    "resnet_width": None, "log_every": None, "ood_samples": 10, "amp": "auto", "device": None,
    "devices": None, "nproc_per_run": 1,
    "ddpm_train_steps": 156_250, "ddpm_unet_dim": 64, "ddpm_batch_size": 256, "ddpm_grad_accum": 2,
    "dissolver_quality_images": 256,
    "save_step": 1, "selection": True, "selection_samples": 10, "selection_max_images": None,
    "train_args": None, "out": None,
    "launcher": "local", "slurm_partition": None, "slurm_account": None, "slurm_qos": None, "slurm_time": "24:00:00",
    "slurm_nodes": 1, "slurm_cpus_per_task": None, "slurm_mem_gb": None, "slurm_extra": None, "slurm_setup": None,
    "slurm_folder": None, "slurm_max_timeouts": 10, "slurm_poll": 10.0, "cancel_on_exit": False,
}
SLURM_FLAGS = ("slurm_partition", "slurm_account", "slurm_qos", "slurm_time", "slurm_nodes", "slurm_cpus_per_task",
               "slurm_mem_gb", "slurm_extra", "slurm_setup", "slurm_folder", "slurm_max_timeouts", "slurm_poll",
               "cancel_on_exit")

# --preset quick: a budget sized (by measurement) for a 2-core CPU: about ten minutes for the
# built-in synth_streak, tens of minutes for a few hundred images of one's own: a small UNet
# trained briefly, a narrow ResNet-18 (bf16 where the CPU computes it natively: an emulated bf16 is ten
# times slower than fp32), and folder datasets read at QUICK_FOLDER_SIZE px.
# The dissolver's width was chosen by its own measurement, never by an AUROC: of the dissolvers
# that train within about two minutes here (benchmarks/dissolver_study.py on synth_streak,
# bf16), dim 32 for 250 steps removes the most of the streaks (removal ratio 0.53 over
# t = 30..100, against 0.38 for dim 16 at 250 steps and 0.40 at 500).
# --preset paper: the paper's budget, named (train.py's and the DDPM script's own defaults).
QUICK_FOLDER_SIZE = 64
PRESETS = {
    "quick": {
        "dataset": ["synth_streak"], "seeds": [0], "diff_resolution": [32],
        "shift_trans_type": ["rotation", "blurgaussian_rotation", "diffusion_rotation"],
        "epochs": 10, "max_batches_per_epoch": 25, "batch_size": 32, "warmup": 1, "resnet_width": 16,
        "log_every": 5, "ood_samples": 10, "amp": "auto", "selection_samples": 1,
        "ddpm_train_steps": 250, "ddpm_unet_dim": 32, "ddpm_batch_size": 32, "ddpm_grad_accum": 1,
    },
    "paper": {
        "epochs": 1000, "max_batches_per_epoch": 200, "batch_size": 32, "warmup": 10, "resnet_width": 64,
        "ood_samples": 10, "save_step": 1, "selection_samples": 10,
        "ddpm_train_steps": 156_250, "ddpm_unet_dim": 64, "ddpm_batch_size": 256, "ddpm_grad_accum": 2,
    },
}
PRESET_HELP = {
    "quick": f"a CPU-sized budget for any dataset (folder datasets read at {QUICK_FOLDER_SIZE} px unless --img_size; "
             "left out --dataset: the built-in synth_streak), rotation vs blurgaussian_rotation vs diffusion_rotation",
    "paper": "the paper's budget (the default of every flag it sets): days on one GPU per run",
}


# --------------------------------------------------------------------------- flags


def build_parser(preset=None):
    """reproduce.py's flags; a flag left out takes ``preset``'s value, else ``DEFAULTS``'s (both
    shown by --help)."""
    p = argparse.ArgumentParser(
        prog="reproduce.py",
        description="DIA reproduction pipeline: dissolver, training, evaluation, figures and the paper's "
                    "table for every dataset x class x transformation x resolution x seed.",
        formatter_class=HelpFormatter,
        epilog="Flags left out take the preset's value (--preset), else the default shown. Runs already "
               "finished in --out are skipped.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="; ".join(f"{name}: {text}" for name, text in PRESET_HELP.items()))
    g = p.add_argument_group("what to run")
    g.add_argument("--dataset", nargs="+", help="one or more dataset names (required without --preset)")
    add_data_root(g)
    g.add_argument("--one_class_idx", type=class_index, nargs="+", metavar="IDX",
                   help="normal class(es) by index, or None for CSI's unlabeled multi-class setting; left out: "
                        "multi-class for datasets with out-of-distribution sets (cifar10, imagenet, or --ood_dataset "
                        "given), else --normal_class's rules")
    g.add_argument("--normal_class", nargs="+", metavar="NAME",
                   help="normal class(es) by name (class folders of a folder dataset, e.g. good); left out: a folder "
                        "dataset takes the folder named good or normal (any case), else the only class folder of "
                        "train/, else asks for it; the other datasets take class 0")
    g.add_argument("--img_size", type=int, metavar="PX",
                   help="folder datasets: side the images are read at (the model's input; train.py and eval.py "
                        f"--img_size); left out: 224, or {QUICK_FOLDER_SIZE} with --preset quick")
    g.add_argument("--ood_dataset", nargs="+", metavar="NAME",
                   help="multi-class setting: the out-of-distribution sets; left out: CSI's for cifar10 and "
                        "imagenet")
    g.add_argument("--shift_trans_type", nargs="+", metavar="TRANSFORMATION",
                   help=f"transformations to compare, any of {', '.join(TRANSFORMATIONS)}")
    g.add_argument("--seeds", type=int, nargs="+", help="seeds, one run each")
    add_diff_resolution(g, nargs="+", help="dissolving resolution(s) in pixels; one dissolver is trained per "
                                           "resolution")
    g.add_argument("--resize_to_constant", action="store_true",
                   help="blur* transformations blur at --diff_resolution (otherwise at the image size)")
    g.add_argument("--out", help="run folder; left out: runs/<dataset> (runs/<dataset>_<preset> with --preset)")
    g = p.add_argument_group("training and evaluation budget (passed to train.py / eval.py)")
    add_model_choice(g, default=None,
                     help="left out: resnet18 for datasets of <= 64 px, resnet18_imagenet for larger ones")
    g.add_argument("--epochs", type=int, help="train.py --epochs; left out: train.py's")
    g.add_argument("--batch_size", type=int, help="train.py --batch_size, as the paper's")
    g.add_argument("--max_batches_per_epoch", type=int, help="train.py --max_batches_per_epoch; left out: train.py's")
    g.add_argument("--max_steps", type=int, help="train.py --max_steps; left out: no cap")
    g.add_argument("--warmup", type=int, help="train.py --warmup (epochs); left out: train.py's")
    g.add_argument("--resnet_width", type=int, help="train.py --resnet_width; left out: train.py's")
    g.add_argument("--log_every", type=int, help="train.py --log_every (steps between loss records); left out: "
                                                 "train.py's")
    g.add_argument("--ood_samples", type=int, help="eval.py --ood_samples, as the paper's")
    add_amp(g, what="the forward passes of train.py, eval.py and the dissolver's training")
    g.add_argument("--no_amp", action="store_const", const="off", dest="amp", help="--amp off")
    add_device(g, help="cpu, cuda or cuda:N for every step; left out: CUDA when present, else the CPU")
    g.add_argument("--devices", nargs="+", metavar="DEV",
                   help="run the study's runs concurrently, one run at a time per listed device (cpu, cuda or "
                        "cuda:N; a device listed twice takes two runs at once), each run's train.py and eval.py "
                        "getting --device DEV; every dissolver the runs need is trained first, one after another, "
                        "on the first listed device. Results, tables and figures are those of a sequential run "
                        "(rows in plan order), the tables rewritten as runs finish. Not with --device")
    g.add_argument("--nproc_per_run", type=int, metavar="N",
                   help="N > 1 trains each run under torchrun (python -m torch.distributed.run --standalone "
                        "--nproc_per_node N train.py ...): DDP, --batch_size per process, so a global batch of N x "
                        "--batch_size; evaluation stays one process. On CPU (gloo) the N processes share "
                        "the run's CPU (with --devices: each cpu entry runs one run of N processes). On CUDA rank r "
                        "uses GPU r of those visible, so with --device cuda a run takes GPUs 0..N-1 (--device cuda:K: "
                        "every rank on GPU K, sharing it over gloo); with --devices the cuda:K entries are taken N at "
                        "a time, each group running one run that sees only its GPUs (CUDA_VISIBLE_DEVICES; cuda:K is "
                        "this command's GPU K, its own CUDA_VISIBLE_DEVICES mapped through), e.g. --devices cuda:0 "
                        "cuda:1 cuda:2 cuda:3 --nproc_per_run 2 runs two runs at once on GPUs 0,1 and 2,3")
    g.add_argument("--train_args",
                   help="more train.py flags as one string, written with '=' "
                        "(e.g. --train_args='--diffusion_scheduler beta_skewed')")
    g = p.add_argument_group("checkpoint selection (train.py's evaluation during training, as the paper's)")
    g.add_argument("--save_step", type=int,
                   help="train.py --save_step: save and evaluate every N epochs, as the paper's command")
    g.add_argument("--selection_samples", type=int,
                   help="samples per image of that evaluation (train.py --ood_samples), as the paper's")
    g.add_argument("--selection_max_images", type=int,
                   help="evaluate on at most N normal training and N test images; left out: all, as the paper")
    g.add_argument("--no_selection", action="store_false", dest="selection",
                   help="no evaluation during training (train.py --no_eval): no best_CSI.model column")
    g = p.add_argument_group("dissolver budget (passed to diffusion_models/train_eval_ddpm.py)")
    g.add_argument("--ddpm_train_steps", type=int,
                   help="optimiser steps, as the paper's model-5.pt")
    g.add_argument("--ddpm_unet_dim", type=int, help="UNet width, as the paper's")
    g.add_argument("--ddpm_batch_size", type=int, help="images per micro-batch, as the paper's")
    g.add_argument("--ddpm_grad_accum", type=int, help="micro-batches per optimiser step, as the paper's")
    g.add_argument("--dissolver_quality_images", type=int, metavar="N",
                   help="normal test images on which each dissolver's dissolving is measured per timestep of its "
                        "grid (eval_dissolver.py --quality_images): fewer measure faster (default: %(default)s)")
    g = p.add_argument_group("launcher (docs/slurm.md: a study on a SLURM cluster)")
    g.add_argument("--launcher", choices=("local", "slurm"),
                   help="local: the steps run on this machine; slurm: every dissolver and every run is a SLURM job "
                        "(submitit), submitted and followed by this command until each has finished or failed; "
                        "the same command again collects what ended meanwhile and resubmits what failed")
    g.add_argument("--slurm_partition", metavar="NAME", help="#SBATCH --partition")
    g.add_argument("--slurm_account", metavar="NAME", help="#SBATCH --account")
    g.add_argument("--slurm_qos", metavar="NAME", help="#SBATCH --qos")
    g.add_argument("--slurm_time", metavar="LIMIT",
                   help="#SBATCH --time of every job, minutes or [D-]HH:MM[:SS]; a job at its limit checkpoints and "
                        "is requeued (at most --slurm_max_timeouts times)")
    g.add_argument("--slurm_nodes", type=int, metavar="M",
                   help="nodes per run (#SBATCH --nodes); its --nproc_per_run N processes run N/M per node, each with "
                        "a GPU (#SBATCH --gpus-per-node N/M; none with --device cpu). A dissolver: one GPU, one node")
    g.add_argument("--slurm_cpus_per_task", type=int, metavar="C", help="#SBATCH --cpus-per-task (one task per node)")
    g.add_argument("--slurm_mem_gb", type=float, metavar="GB", help="#SBATCH --mem, per node")
    g.add_argument("--slurm_extra", action="append", metavar="OPTION",
                   help="one more #SBATCH option in its long form, e.g. --slurm_extra=--constraint=a100 (repeatable)")
    g.add_argument("--slurm_setup", action="append", metavar="COMMAND",
                   help="a shell line every job runs first, e.g. --slurm_setup='module load cuda' (repeatable)")
    g.add_argument("--slurm_folder", metavar="DIR",
                   help="the jobs' scripts and logs (submitit's folder), on a file system the nodes share; left out: "
                        "<out>/slurm")
    g.add_argument("--slurm_max_timeouts", type=int, metavar="K",
                   help="how often a job may be requeued at its time limit before it fails")
    g.add_argument("--slurm_poll", type=float, metavar="SECONDS", help="seconds between two looks at the jobs")
    g.add_argument("--cancel_on_exit", action="store_true",
                   help="Ctrl-C or SIGTERM of this command cancels the study's queued and running jobs (without it "
                        "they go on, and the same command collects them later)")
    p.set_defaults(**DEFAULTS)
    p.set_defaults(**PRESETS.get(preset, {}))
    return p


def class_index(text):
    """``--one_class_idx``: a class index, or ``None`` (the multi-class setting)."""
    value = parse_class_index(text)
    return None if value == MULTI_CLASS else value


def resolve_args(argv=None):
    """Parse ``argv``; a flag left out takes the preset's value (``--preset``), else ``DEFAULTS``'s."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(PRESETS), default=None)
    known, _ = first.parse_known_args(argv)
    return build_parser(known.preset).parse_args(argv)


def normalise_transformations(names):
    out = []
    for name in names:
        full = SHORT_NAMES.get(name, name)
        if full not in TRANSFORMATIONS:
            raise UserError(f"unknown transformation {name!r}; use any of {', '.join(TRANSFORMATIONS)}")
        if full not in out:
            out.append(full)
    return out


def check_args(a):
    """Everything that can be wrong with the flags, before anything runs."""
    if not a.dataset:
        raise UserError("give --dataset NAME [NAME ...] (or --preset quick for the built-in synth_streak)")
    a.dataset = list(dict.fromkeys(a.dataset))
    for name in a.dataset:
        check_dataset_name(name)
    if a.one_class_idx is not None:
        a.one_class_idx = list(dict.fromkeys(a.one_class_idx))
    if a.normal_class is not None:
        a.normal_class = list(dict.fromkeys(a.normal_class))
        if a.one_class_idx is not None:
            raise UserError("give the normal classes with --one_class_idx or with --normal_class, not both")
    if a.ood_dataset is not None:
        a.ood_dataset = list(dict.fromkeys(a.ood_dataset))
        if a.one_class_idx is not None and None not in a.one_class_idx:
            raise UserError(f"--ood_dataset belongs to the unlabeled multi-class setting; with --one_class_idx "
                            f"{' '.join(map(str, a.one_class_idx))} every other class is the anomaly: leave out one "
                            f"of the two (or add None to --one_class_idx)")
    a.seeds = list(dict.fromkeys(a.seeds))
    a.diff_resolution = sorted(set(a.diff_resolution))
    a.shift_trans_type = normalise_transformations(a.shift_trans_type)
    for name in ("epochs", "batch_size", "max_batches_per_epoch", "max_steps", "resnet_width", "log_every",
                 "ood_samples", "nproc_per_run", "save_step", "selection_samples", "selection_max_images"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be at least 1, got {v}")
    if a.warmup is not None and a.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {a.warmup}")
    bad = [s for s in a.seeds if s < 0]
    if bad:
        raise UserError(f"--seeds must be >= 0, got {' '.join(map(str, bad))}")
    try:
        a.train_args = shlex.split(a.train_args or "")
    except ValueError as exc:
        raise UserError(f"--train_args {a.train_args!r} cannot be split into flags: {exc}") from None
    a.aptos_all_grades = data_shaping_flags(a.train_args)
    if a.img_size is not None and a.img_size < 1:
        raise UserError(f"--img_size must be at least 1, got {a.img_size}")
    owned = {"--dataset", "--data_root", "--one_class_idx", "--mode", "--shift_trans_type", "--logdir", "--seed",
             "--diffusion_model_path", "--diff_resolution", "--no_eval", "--resume_path", "--load_path", "--model",
             "--resnet_width", "--amp", "--device", "--save_step", "--error_step", "--ood_samples",
             "--eval_max_train", "--eval_max_test", "--ood_dataset"}
    clash = [f for f in a.train_args if f.split("=")[0] in owned]
    if clash:
        raise UserError(f"--train_args must not set {' '.join(clash)}: reproduce.py sets those per run")
    if a.device:
        pick_device(a.device)
    if a.devices is not None:
        check_devices(a)
    a.data_root = os.path.abspath(a.data_root)
    a.folder_img_size = QUICK_FOLDER_SIZE if a.preset == "quick" else None
    if a.out is None:
        a.out = os.path.join("runs", "+".join(a.dataset) + (f"_{a.preset}" if a.preset else ""))
    a.out = os.path.abspath(a.out)
    check_launcher(a)
    return a


def check_launcher(a):
    """``--launcher`` and the ``--slurm_*`` flags (one line, exit 2, before anything is written or submitted)."""
    given = [f for f in SLURM_FLAGS if getattr(a, f) != DEFAULTS[f]]
    if a.launcher == "local":
        if given:
            raise UserError(f"--{given[0]} belongs to --launcher slurm: add --launcher slurm, or leave it out")
        return
    if a.devices is not None:
        raise UserError("--devices spreads a study over this machine's devices; with --launcher slurm SLURM places "
                        "the jobs: leave out --devices")
    try:
        a.slurm_time = parse_time(a.slurm_time)
    except ValueError as exc:
        raise UserError(f"--slurm_time {exc}") from None
    extra = {}
    for line in a.slurm_extra or []:
        try:
            name, value = parse_sbatch_line(line)
        except ValueError as exc:
            raise UserError(f"--slurm_extra {exc}") from None
        extra[name] = value
    a.slurm_extra, a.slurm_setup = extra, list(a.slurm_setup or [])
    for name, least in (("slurm_nodes", 1), ("slurm_cpus_per_task", 1), ("slurm_max_timeouts", 0)):
        v = getattr(a, name)
        if v is not None and v < least:
            raise UserError(f"--{name} must be at least {least}, got {v}")
    for name in ("slurm_mem_gb", "slurm_poll"):
        v = getattr(a, name)
        if v is not None and not v > 0:
            raise UserError(f"--{name} must be positive, got {v:g}")
    if a.nproc_per_run % a.slurm_nodes:
        raise UserError(f"--nproc_per_run {a.nproc_per_run} over --slurm_nodes {a.slurm_nodes}: every node runs as many "
                        f"processes, so give a multiple of {a.slurm_nodes}")
    check_slurm_commands()
    a.slurm_folder = os.path.abspath(a.slurm_folder or os.path.join(a.out, "slurm"))
    # a job asks for GPUs unless --device cpu, or the partition has none (its steps then take the CPU)
    a.slurm_gpus = uses_gpus(a) and partition_has_gpus(a.slurm_partition)


def check_dissolver_args(a):
    """The dissolver's flags (--diff_resolution, --ddpm_*). Refused only once the datasets were read
    (each through ``datasets.get_dataset``, as the plan reads them): a wrong dataset or path is
    the first error."""
    try:
        for name in ("ddpm_train_steps", "ddpm_unet_dim", "ddpm_batch_size", "ddpm_grad_accum",
                     "dissolver_quality_images"):
            v = getattr(a, name)
            if v is not None and v < 1:
                raise UserError(f"--{name} must be at least 1, got {v}")
        dissolving = any(uses_resolution(t, a) for t in a.shift_trans_type)
        bad = [r for r in a.diff_resolution if r < 8 or r % 8]
        if bad and dissolving:
            raise UserError(f"--diff_resolution {' '.join(map(str, bad))}: use multiples of 8 (e.g. 32, 64, 128); the "
                            f"dissolver's UNet halves the image three times")
        if a.ddpm_unet_dim % 8 and any(t.startswith("diffusion_") for t in a.shift_trans_type):
            raise UserError(f"--ddpm_unet_dim {a.ddpm_unet_dim}: use a multiple of 8 (e.g. 32, 64): the dissolver's "
                            f"UNet normalises its channels in 8 groups")
    except UserError:
        for dataset in a.dataset:
            get_dataset(dataset, a.data_root, image_size=image_size_of(a, dataset), aptos_all_grades=a.aptos_all_grades)
        raise


def check_devices(a):
    """``--devices``: each entry as ``--device`` is checked, and grouped by ``--nproc_per_run``
    (:func:`device_slots`; one line, exit 2, before any work)."""
    if a.device:
        raise UserError(f"give --devices {' '.join(a.devices)} or --device {a.device}, not both: --devices runs the "
                        f"runs concurrently, one per listed device")
    device_slots(a.devices, a.nproc_per_run, os.environ.get("CUDA_VISIBLE_DEVICES"))
    for dev in a.devices:
        try:
            pick_device(dev)
        except UserError as exc:
            raise UserError(str(exc).replace("--device ", "--devices ")) from None


def data_shaping_flags(train_args):
    """``--aptos_all_grades`` from ``--train_args`` (it shapes the data: eval.py must read it as
    train.py does); ``--img_size`` there is refused in favour of reproduce.py's own flag."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--img_size", default=None)
    p.add_argument("--aptos_all_grades", action="store_true")
    known, _ = p.parse_known_args(train_args)
    if known.img_size is not None:
        raise UserError(f"--train_args: give the image size as reproduce.py --img_size {known.img_size} (it reaches "
                        f"train.py and eval.py alike)")
    return known.aptos_all_grades


# --------------------------------------------------------------------------- main


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = check_args(resolve_args(argv))
    check_dissolver_args(a)
    runs = make_plan(a)
    describe_data(runs)
    busy = busy_folders(a.out)  # folders where SLURM jobs of this study work now
    if busy and a.launcher == "local":
        raise UserError(f"SLURM jobs of this study are still queued or running in --out {a.out} (jobs "
                        f"{' '.join(sorted(set(busy.values())))}): follow them with --launcher slurm, or scancel them")
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {a.out}: {exc.strerror}") from None
    if not os.access(a.out, os.W_OK):
        raise UserError(f"--out {a.out} is not writable")

    # one reproduce.py per --out: the lock dies with the process; the steps die with it too
    lock = ProcessLock(os.path.join(a.out, LOCK_NAME), f"--out {a.out}",
                       "another reproduce.py is working there: wait for it to end, or choose another --out").acquire()
    remove_own_stale_temps(a.out, skip=busy)
    handlers = {}

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, _on_signal)
    steps = Steps()  # this command's steps: what runs, for the interruption message
    try:
        return run_all(a, runs, argv, steps, runner=run_on_slurm if a.launcher == "slurm" else None)
    except (Interrupted, KeyboardInterrupt) as exc:
        sig = exc.args[0] if isinstance(exc, Interrupted) and exc.args else signal.SIGINT
        what = steps.what or "preparing"
        n_stopped = steps.stopped
        stopped = (f" (those {n_stopped} steps were stopped)" if n_stopped > 1
                   else " (that step was stopped)" if n_stopped else "")
        print(f"\ninterrupted by {signal.Signals(sig).name} while {what}{stopped}; finished runs are kept: run the "
              f"same command again to resume (an interrupted training continues from its last checkpoint)",
              file=sys.stderr, flush=True)
        return 128 + int(sig)
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        lock.release()


def describe_data(runs):
    """Each dataset's normal class(es), by name and index, and the size its images are read at
    (a warning when most are upsampled): printed before anything runs."""
    seen = set()
    for run in runs:
        if (run.dataset, run.cls) not in seen:
            if not any(d == run.dataset for d, _ in seen):
                line, upsampled = describe_images(run.info)
                print(line)
                if upsampled:
                    warn(upsampled)
            seen.add((run.dataset, run.cls))
            print(normal_class_line(run.dataset, run.info.class_names, run.cls), flush=True)


def remove_own_stale_temps(out, skip=()):
    """The temporary files a killed reproduce.py (or eval.py, a plot) left in ``--out``: tables,
    records, scores, figures. Checkpoints' are left to train.py and the DDPM script, which
    remove theirs under their own locks; the folders in ``skip`` (where SLURM jobs work now) are left alone."""
    for folder, _, _ in os.walk(out):
        if any(folder == s or folder.startswith(s + os.sep) for s in skip):
            continue
        remove_stale_temps(folder, lambda name: not (writes_it(name) or name.endswith(".pt")))


if __name__ == "__main__":
    sys.exit(main())
