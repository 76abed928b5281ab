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
"""
import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from common.errors import UserError, exit_on_user_error

ROOT = os.path.dirname(os.path.abspath(__file__))

CSI_SHIFTS = ("rotation", "cutperm")
DISSOLVE_TYPES = ("diffusion", "blurgaussian", "blurmedian", "blurnone")
TRANSFORMATIONS = CSI_SHIFTS + tuple(f"{d}_{s}" for d in DISSOLVE_TYPES for s in CSI_SHIFTS)
SHORT_NAMES = {d: f"{d}_rotation" for d in DISSOLVE_TYPES}
MODELS = ("resnet18", "resnet34", "resnet50", "resnet18_imagenet", "resnet50_imagenet")

# Values a flag takes when neither the command line nor a preset sets it.
DEFAULTS = {
    "dataset": None, "data_root": "../data", "one_class_idx": None, "ood_dataset": None,
    "shift_trans_type": ["rotation", "blurgaussian_rotation", "diffusion_rotation"], "seeds": [0],
    "diff_resolution": [32], "resize_to_constant": False, "model": None,
    "epochs": None, "batch_size": 32, "max_batches_per_epoch": None, "max_steps": None, "warmup": None,
    "resnet_width": None, "log_every": None, "ood_samples": 10, "amp": "auto", "device": None,
    "devices": None, "nproc_per_run": 1,
    "ddpm_train_steps": 156_250, "ddpm_unet_dim": 64, "ddpm_batch_size": 256, "ddpm_grad_accum": 2,
    "save_step": 1, "selection": True, "selection_samples": 10, "selection_max_images": None,
    "train_args": "", "out": None,
}

# --preset quick: the README's main job, sized (by measurement) to finish in about ten
# minutes on a 2-core CPU: a small UNet trained briefly, a narrow ResNet-18 in bf16.
PRESETS = {
    "quick": {
        "dataset": ["synth_streak"], "one_class_idx": [0], "seeds": [0], "diff_resolution": [32],
        "shift_trans_type": ["rotation", "blurgaussian_rotation", "diffusion_rotation"],
        "epochs": 10, "max_batches_per_epoch": 25, "batch_size": 32, "warmup": 1, "resnet_width": 16,
        "log_every": 5, "ood_samples": 10, "amp": "on", "selection_samples": 1,
        "ddpm_train_steps": 250, "ddpm_unet_dim": 16, "ddpm_batch_size": 32, "ddpm_grad_accum": 1,
        "out": os.path.join("runs", "synth_streak_quick"),
    },
}

FIGURES = ("roc.png", "score_hist.png", "loss_curves.png", "selection.png")
BEST_FILE = "best_CSI.model"  # train.py's selection: the highest test AUROC during training
BEST_LABEL = "best on test (paper's selection)"
GRID_TIMESTEPS = (10, 30, 50, 70, 100, 150)  # rows of the dissolving grid (the training range is 30..100)
TRAIN_T = (30, 100)
DISSOLVER_TABLE_NOTE = (
    "Per timestep t of the dissolving grid: lesion removal ratio / tissue change, measured on 256 images of "
    "the same tissue drawn with and without lesions (removal ratio = 1 - ||D(lesioned) - D(clean)||^2 / "
    "||lesioned - clean||^2: 1 removes the lesions entirely, 0 keeps them; tissue change = ||D(clean) - clean||^2 "
    "/ ||clean - mean(clean)||^2). Other datasets: the share of high-frequency energy removed. The last column "
    "averages the removal ratio over the grid's timesteps inside training's range.")  # the timesteps training draws from (the paper's offsets 0.3 and 1.0)


# --------------------------------------------------------------------------- flags


def build_parser():
    p = argparse.ArgumentParser(
        prog="reproduce.py",
        description="DIA reproduction pipeline: dissolver, training, evaluation, figures and the paper's "
                    "table for every dataset x class x transformation x resolution x seed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags left out take the preset's value (--preset), else the default shown. Runs already "
               "finished in --out are skipped.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="quick: synth_streak, rotation vs blurgaussian_rotation vs diffusion_rotation, a "
                        "CPU-sized budget (about 10 minutes on 2 cores)")
    g = p.add_argument_group("what to run")
    g.add_argument("--dataset", nargs="+", default=None, help="one or more dataset names (required without --preset)")
    g.add_argument("--data_root", default=None, help="folder holding the datasets (default ../data)")
    g.add_argument("--one_class_idx", type=class_index, nargs="+", default=None,
                   help="normal class(es), or None for CSI's unlabeled multi-class setting; left out: multi-class "
                        "for datasets with out-of-distribution sets (cifar10, imagenet, or --ood_dataset given), "
                        "class 0 for the others")
    g.add_argument("--ood_dataset", nargs="+", default=None, metavar="NAME",
                   help="multi-class setting: the out-of-distribution sets (default CSI's for cifar10 and imagenet)")
    g.add_argument("--shift_trans_type", nargs="+", default=None, metavar="TRANSFORMATION",
                   help=f"transformations to compare (default rotation blurgaussian_rotation diffusion_rotation; "
                        f"any of {', '.join(TRANSFORMATIONS)})")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0)")
    g.add_argument("--diff_resolution", type=int, nargs="+", default=None,
                   help="dissolving resolution(s) (default 32); one dissolver is trained per resolution")
    g.add_argument("--resize_to_constant", action="store_true", default=None,
                   help="blur* transformations blur at --diff_resolution (otherwise at the image size)")
    g.add_argument("--out", default=None, help="run folder (default runs/<dataset>)")
    g = p.add_argument_group("training and evaluation budget (passed to train.py / eval.py)")
    g.add_argument("--model", choices=MODELS, default=None,
                   help="default: resnet18 for datasets of <= 64 px, resnet18_imagenet for larger ones")
    g.add_argument("--epochs", type=int, default=None, help="train.py --epochs (default: train.py's)")
    g.add_argument("--batch_size", type=int, default=None, help="train.py --batch_size (default 32, the paper's)")
    g.add_argument("--max_batches_per_epoch", type=int, default=None, help="train.py --max_batches_per_epoch")
    g.add_argument("--max_steps", type=int, default=None, help="train.py --max_steps")
    g.add_argument("--warmup", type=int, default=None, help="train.py --warmup (epochs)")
    g.add_argument("--resnet_width", type=int, default=None, help="train.py --resnet_width (default 64)")
    g.add_argument("--log_every", type=int, default=None, help="train.py --log_every (steps between loss records)")
    g.add_argument("--ood_samples", type=int, default=None, help="eval.py --ood_samples (default 10, the paper's)")
    g.add_argument("--amp", nargs="?", const="on", default=None, choices=("auto", "on", "off"),
                   help="train.py / eval.py --amp: bf16 autocast; auto (default) = where the device computes bf16 "
                        "in hardware; --amp alone = on; off = fp32, as the paper's code")
    g.add_argument("--no_amp", action="store_const", const="off", dest="amp", default=None, help="--amp off")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N for every step (default: CUDA when present)")
    g.add_argument("--devices", nargs="+", default=None, metavar="DEV",
                   help="run the study's runs concurrently, one run at a time per listed device (cpu, cuda or "
                        "cuda:N; a device listed twice takes two runs at once), each run's train.py and eval.py "
                        "getting --device DEV; every dissolver the runs need is trained first, one after another, "
                        "on the first listed device. Results, tables and figures are those of a sequential run "
                        "(rows in plan order), the tables rewritten as runs finish. Not with --device")
    g.add_argument("--nproc_per_run", type=int, default=None, metavar="N",
                   help="N > 1 trains each run under torchrun (python -m torch.distributed.run --standalone "
                        "--nproc_per_node N train.py ...): DDP, --batch_size per process, so a global batch of N x "
                        "--batch_size; evaluation stays one process (default 1). On CPU (gloo) the N processes share "
                        "the run's CPU (with --devices: each cpu entry runs one run of N processes). On CUDA rank r "
                        "uses GPU r of those visible, so with --device cuda a run takes GPUs 0..N-1; with --devices "
                        "the cuda:K entries are taken N at a time, each group running one run that sees only its "
                        "GPUs (CUDA_VISIBLE_DEVICES), e.g. --devices cuda:0 cuda:1 cuda:2 cuda:3 --nproc_per_run 2 "
                        "runs two runs at once on GPUs 0,1 and 2,3")
    g.add_argument("--train_args", default=None,
                   help="more train.py flags as one string, written with '=' "
                        "(e.g. --train_args='--diffusion_scheduler beta_skewed')")
    g = p.add_argument_group("checkpoint selection (train.py's evaluation during training, as the paper's)")
    g.add_argument("--save_step", type=int, default=None,
                   help="train.py --save_step: save and evaluate every N epochs (default 1, the paper's command)")
    g.add_argument("--selection_samples", type=int, default=None,
                   help="samples per image of that evaluation (train.py --ood_samples; default 10, the paper's)")
    g.add_argument("--selection_max_images", type=int, default=None,
                   help="evaluate on at most N normal training and N test images (default: all, as the paper)")
    g.add_argument("--no_selection", action="store_false", dest="selection", default=None,
                   help="no evaluation during training (train.py --no_eval): no best_CSI.model column")
    g = p.add_argument_group("dissolver budget (passed to diffusion_models/train_eval_ddpm.py)")
    g.add_argument("--ddpm_train_steps", type=int, default=None,
                   help="optimiser steps (default 156,250: the paper's model-5.pt)")
    g.add_argument("--ddpm_unet_dim", type=int, default=None, help="UNet width (default 64, the paper's)")
    g.add_argument("--ddpm_batch_size", type=int, default=None, help="images per micro-batch (default 256, the paper's)")
    g.add_argument("--ddpm_grad_accum", type=int, default=None,
                   help="micro-batches per optimiser step (default 2, the paper's)")
    return p


def class_index(text):
    """``--one_class_idx``: a class index, or ``None`` (the multi-class setting)."""
    from common.args import MULTI_CLASS, class_index as parse

    value = parse(text)
    return None if value == MULTI_CLASS else value


def resolve_args(argv=None):
    """Parse ``argv`` and fill unset flags from the preset, then from ``DEFAULTS``."""
    ns = build_parser().parse_args(argv)
    preset = PRESETS.get(ns.preset, {})
    for key, default in DEFAULTS.items():
        if getattr(ns, key) is None:
            setattr(ns, key, preset.get(key, default))
    return ns


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
    if a.one_class_idx is not None:
        a.one_class_idx = list(dict.fromkeys(a.one_class_idx))
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
                 "ood_samples", "nproc_per_run", "save_step", "selection_samples", "selection_max_images",
                 "ddpm_train_steps", "ddpm_unet_dim", "ddpm_batch_size", "ddpm_grad_accum"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be at least 1, got {v}")
    if a.warmup is not None and a.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {a.warmup}")
    bad = [s for s in a.seeds if s < 0]
    if bad:
        raise UserError(f"--seeds must be >= 0, got {' '.join(map(str, bad))}")
    bad = [r for r in a.diff_resolution if r < 8 or r % 8]
    if bad and any(uses_resolution(t, a) for t in a.shift_trans_type):
        raise UserError(f"--diff_resolution {' '.join(map(str, bad))}: use multiples of 8 (e.g. 32, 64, 128); the "
                        f"dissolver's UNet halves the image three times")
    try:
        a.train_args = shlex.split(a.train_args or "")
    except ValueError as exc:
        raise UserError(f"--train_args {a.train_args!r} cannot be split into flags: {exc}") from None
    a.img_size, a.aptos_all_grades = data_shaping_flags(a.train_args)
    owned = {"--dataset", "--data_root", "--one_class_idx", "--mode", "--shift_trans_type", "--logdir", "--seed",
             "--diffusion_model_path", "--diff_resolution", "--no_eval", "--resume_path", "--load_path", "--model",
             "--resnet_width", "--amp", "--device", "--save_step", "--error_step", "--ood_samples",
             "--eval_max_train", "--eval_max_test", "--ood_dataset"}
    clash = [f for f in a.train_args if f.split("=")[0] in owned]
    if clash:
        raise UserError(f"--train_args must not set {' '.join(clash)}: reproduce.py sets those per run")
    if a.device:
        from common.device import pick_device

        pick_device(a.device)
    if a.devices is not None:
        check_devices(a)
    a.data_root = os.path.abspath(a.data_root)
    if a.out is None:
        a.out = os.path.join("runs", "+".join(a.dataset))
    a.out = os.path.abspath(a.out)
    return a


def device_slots(devices, nproc=1):
    """Where ``--devices`` runs the runs: a list of ``(label, device, gpus)``, one per run at a time.

    ``nproc`` 1: each entry is a slot (``gpus`` None). ``nproc`` N > 1 (``--nproc_per_run``): a
    ``cpu`` entry is still a slot (its run's N processes share the CPU), while the CUDA entries,
    each ``cuda:K``, are taken N at a time in the order given: a group's run sees only its GPUs
    (``CUDA_VISIBLE_DEVICES`` = their indices, ``gpus``) and gets ``--device cuda``, so its
    rank r uses the group's r-th GPU. Raises :class:`UserError` when the CUDA entries cannot be
    grouped so (no index, a count not a multiple of N, a GPU twice in one group).
    """
    if nproc <= 1:
        return [(dev, dev, None) for dev in devices]
    slots, cuda = [], []
    for dev in devices:
        kind, _, index = str(dev).strip().lower().partition(":")
        if kind != "cuda":
            slots.append((dev, dev, None))
            continue
        if not index.isdigit():
            raise UserError(f"--devices {dev} with --nproc_per_run {nproc}: name each GPU as cuda:K, {nproc} entries "
                            f"per run (e.g. --devices " + " ".join(f"cuda:{i}" for i in range(nproc)) + ")")
        cuda.append(int(index))
    if len(cuda) % nproc:
        raise UserError(f"--devices lists {len(cuda)} GPUs but --nproc_per_run {nproc} takes them {nproc} at a time "
                        f"(one run per {nproc} GPUs): list a multiple of {nproc} cuda:K entries")
    for i in range(0, len(cuda), nproc):
        group = cuda[i:i + nproc]
        if len(set(group)) < nproc:
            raise UserError(f"--devices group {' '.join(f'cuda:{g}' for g in group)} names a GPU twice: under "
                            f"torchrun each of a run's {nproc} processes needs a GPU of its own (NCCL)")
        gpus = ",".join(map(str, group))
        slots.append((f"cuda:{gpus}", "cuda", gpus))
    return slots


def check_devices(a):
    """``--devices``: each entry as ``--device`` is checked, and grouped by ``--nproc_per_run``
    (:func:`device_slots`; one line, exit 2, before any work)."""
    from common.device import pick_device

    if a.device:
        raise UserError(f"give --devices {' '.join(a.devices)} or --device {a.device}, not both: --devices runs the "
                        f"runs concurrently, one per listed device")
    device_slots(a.devices, a.nproc_per_run)
    for dev in a.devices:
        try:
            pick_device(dev)
        except UserError as exc:
            raise UserError(str(exc).replace("--device ", "--devices ")) from None


def data_shaping_flags(train_args):
    """The flags of ``--train_args`` that shape the data (the image size, APTOS's grades): eval.py
    and the plan (the run folders' ``<res>px``) must read the data as train.py does."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--img_size", type=int, default=None)
    p.add_argument("--aptos_all_grades", action="store_true")
    try:
        known, _ = p.parse_known_args(train_args)
    except SystemExit:
        raise UserError(f"--train_args: --img_size needs a whole number, got {' '.join(train_args)}") from None
    if known.img_size is not None and known.img_size < 1:
        raise UserError(f"--train_args: --img_size must be at least 1, got {known.img_size}")
    return known.img_size, known.aptos_all_grades


def uses_resolution(transformation, a):
    """Whether the transformation depends on the dissolving resolution."""
    kind = transformation.split("_")[0] if "_" in transformation else None
    return kind == "diffusion" or (kind is not None and a.resize_to_constant)


# --------------------------------------------------------------------------- the plan


class Run:
    """One training + evaluation: dataset, class, transformation, resolution, seed."""

    def __init__(self, a, dataset, info, cls, transformation, resolution, seed, model):
        self.dataset, self.cls, self.transformation = dataset, cls, transformation
        self.resolution, self.seed, self.model = resolution, seed, model
        self.info, self.out = info, a.out
        self.dissolve_type = transformation.split("_")[0] if "_" in transformation else None
        self.multi = cls is None  # CSI's unlabeled multi-class setting
        setting = "multi_class" if self.multi else f"class_{cls}"
        self.dir = os.path.join(a.out, dataset, setting, f"{transformation}_{resolution}px", f"seed_{seed}")
        # the out-of-distribution sets eval.py scores (the columns of the multi-class table)
        self.ood_names = ood_names_of(a, dataset) if self.multi else []
        self.dissolver = dissolver_spec(a, dataset, cls, resolution) if self.dissolve_type == "diffusion" else None
        self.config = {
            "dataset": dataset, "one_class_idx": cls, "transformation": transformation, "resolution": resolution,
            "seed": seed, "model": model, "train": train_budget(a), "eval": {"ood_samples": a.ood_samples,
                                                                            "amp": a.amp},
            "selection": selection_budget(a),
            "dissolver": self.dissolver["name"] if self.dissolver else None,
            "resize_to_constant": bool(a.resize_to_constant) if self.dissolve_type else None,
        }
        if self.multi:  # only then: the settings of earlier (one-class) runs stay as they were recorded
            self.config["ood_dataset"] = a.ood_dataset
        self.status, self.error, self.reused = "pending", "", False
        self.results, self.train_seconds, self.eval_seconds, self.gmacs = None, None, None, None
        self.removal = None  # the dissolver's lesion removal ratio (synthetic lesions only)
        self.best = None  # results["best"]: best_CSI.model's epoch, AUROCs and what selected it
        self.notes = []
        self.log = None

    @property
    def label(self):
        return (f"{self.dataset} {class_text(self.cls)} {self.transformation} {self.resolution}px seed {self.seed}")

    def path(self, name):
        return os.path.join(self.dir, name)


def class_text(cls):
    return "multi-class" if cls is None else f"class {cls}"


def ood_names_of(a, dataset):
    """The out-of-distribution sets eval.py scores for ``dataset`` (``--ood_dataset`` or CSI's)."""
    from datasets.ood import default_ood_names

    return list(a.ood_dataset) if a.ood_dataset else list(default_ood_names(dataset, "eval"))


def classes_of(a, dataset):
    """The normal classes planned for ``dataset`` (None: multi-class); ``--one_class_idx`` left
    out means multi-class where there are out-of-distribution sets, class 0 elsewhere."""
    from datasets.ood import default_ood_names

    if a.one_class_idx is not None:
        return list(a.one_class_idx)
    return [None] if (a.ood_dataset or default_ood_names(dataset, "eval")) else [0]


def train_budget(a):
    budget = {k: getattr(a, k) for k in ("epochs", "batch_size", "max_batches_per_epoch", "max_steps", "warmup",
                                         "resnet_width")}
    budget.update(amp=a.amp, extra=list(a.train_args))
    if getattr(a, "nproc_per_run", 1) > 1:  # only then: the settings of earlier runs stay as they were recorded
        budget["nproc_per_run"] = a.nproc_per_run  # a global batch of nproc_per_run x batch_size
    return budget


def selection_budget(a):
    """train.py's evaluation during training (None: off), part of a run's settings."""
    if not a.selection:
        return None
    return {"every": a.save_step, "samples": a.selection_samples, "max_images": a.selection_max_images}


def ddpm_save_every(train_steps):
    """Milestones of the pipeline's dissolver: the paper's 31,250 steps, or five per training
    when it is shorter, so an interrupted training resumes from a recent checkpoint."""
    return max(1, min(31_250, -(-int(train_steps) // 5)))


def dissolver_spec(a, dataset, cls, resolution):
    which = "all" if cls is None else f"class{cls}"  # None: trained on every class (--all_classes)
    name = (f"{dataset}_{which}_{resolution}px_unet{a.ddpm_unet_dim}_s{a.ddpm_train_steps}"
            f"_b{a.ddpm_batch_size}x{a.ddpm_grad_accum}")
    folder = os.path.join(a.out, "dissolvers")
    return {"name": name, "dataset": dataset, "cls": cls, "resolution": resolution,
            "ckpt": os.path.join(folder, name + ".pt"), "done": os.path.join(folder, name + ".json"),
            "log": os.path.join(folder, name + ".train.log"), "grid": os.path.join(folder, name + "_dissolving.png"),
            "grid_log": os.path.join(folder, name + ".grid.log")}


def default_model(info):
    return "resnet18" if info.image_size[0] <= 64 else "resnet18_imagenet"


def make_plan(a):
    """Check the datasets (through ``datasets.get_dataset``) and list the runs in table order."""
    from datasets import get_dataset

    runs = []
    for dataset in a.dataset:
        _, _, info = get_dataset(dataset, a.data_root, image_size=a.img_size,  # bad name or files: UserError
                                 aptos_all_grades=a.aptos_all_grades)
        classes = classes_of(a, dataset)
        if None in classes:  # multi-class: the out-of-distribution sets are read now, as the dataset is
            from datasets.ood import check_ood_names, load_ood_sets

            names = check_ood_names(ood_names_of(a, dataset), dataset)
            if not names:
                raise UserError(f"the multi-class setting scores out-of-distribution sets and {dataset} has no "
                                f"default ones: name them with --ood_dataset NAME ...")
            load_ood_sets(names, a.data_root, info)
        bad = [c for c in classes if c is not None and not 0 <= c < info.n_classes]
        if bad:
            names = ", ".join(f"{i}={n}" for i, n in enumerate(info.class_names))
            raise UserError(f"--one_class_idx {' '.join(map(str, bad))} is out of range for {dataset}: use "
                            f"0..{info.n_classes - 1} ({names})")
        model = a.model or default_model(info)
        native = info.image_size[0]
        for cls in classes:
            for transformation in a.shift_trans_type:
                resolutions = a.diff_resolution if uses_resolution(transformation, a) else [native]
                for res in resolutions:
                    for seed in a.seeds:
                        runs.append(Run(a, dataset, info, cls, transformation, res, seed, model))
    if any(r.dissolver for r in runs):
        from diffusion_models.ddpm import ddpm_config

        for res in a.diff_resolution:
            ddpm_config(image_size=res, unet_dim=a.ddpm_unet_dim)  # UserError for an impossible UNet
    for run in runs:  # a finished run made with other settings must not slip into this table
        if os.path.exists(run.path("results.json")) and os.path.exists(run.path("run.json")):
            try:
                with open(run.path("run.json")) as fh:
                    old = json.load(fh).get("config")
            except (OSError, ValueError):
                old = None
            if old is not None and old != json.loads(json.dumps(run.config)):
                diff = [f"{k}: {old.get(k)} (now {run.config[k]})" for k in run.config if old.get(k) != run.config[k]]
                raise UserError(f"{run.dir} holds a finished run made with other settings ({'; '.join(diff)[:300]}); "
                                f"use another --out, or delete that folder to redo it")
    return runs


# --------------------------------------------------------------------------- subprocesses


def last_line(log_path, rc):
    """The line that says why a step failed: the ``error: ...`` line, else the log's last line."""
    try:
        with open(log_path, errors="replace") as fh:
            lines = [ln.strip() for ln in fh.read().replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        lines = []
    for ln in reversed(lines[-30:]):
        if ln.startswith("error:"):
            return ln[len("error:"):].strip()
    if rc is not None and rc < 0:
        return f"killed by signal {-rc}" + (" (out of memory?)" if -rc == 9 else "")
    return lines[-1] if lines else f"exit status {rc} without output"


class Interrupted(Exception):
    """SIGTERM or SIGINT reached reproduce.py: the running step is stopped and the command ends."""


# What runs now, for the interruption message: ``procs`` maps every running step (a Popen) to what
# it does; ``stopping`` (the signal number) is set when an interruption stops them all, so that no
# step starts after it and a stopped step is not reported as a failure (``--devices``' threads).
CURRENT = {"procs": {}, "what": None, "stopped": False, "stopping": None}
_CURRENT_LOCK = threading.Lock()


def _on_signal(signum, frame):
    raise Interrupted(signum)


def _die_with_parent():
    """Runs in the child between fork and exec (Linux): the kernel sends it SIGKILL when
    reproduce.py ends in any way, even by SIGKILL, so no step goes on writing alone."""
    if _LIBC is None:
        return
    _LIBC.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != _PARENT[0]:  # the parent was already gone before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
_PARENT = [os.getpid()]


def stop_child(proc, grace=10.0):
    """SIGTERM (train.py then removes its temporary files and lock), SIGKILL after ``grace`` s."""
    stop_children([proc], grace)


def stop_children(procs, grace=10.0):
    """:func:`stop_child` for several steps at once: SIGTERM to all, then SIGKILL to those still
    running ``grace`` s later."""
    procs = [p for p in procs if p.poll() is None]
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
            proc.send_signal(signal.SIGCONT)  # a stopped step (Ctrl-Z, a debugger) gets it too
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def step_env(a):
    """What a step's environment adds for the device slot ``a`` runs on (a GPU group's
    ``CUDA_VISIBLE_DEVICES``), or None."""
    gpus = getattr(a, "gpus", None)
    return {"CUDA_VISIBLE_DEVICES": gpus} if gpus else None


def run_step(cmd, log_path, what=None, append=False, env=None):
    """Run ``cmd`` (a list, ``python`` first) from the repository root, stdout and stderr into
    ``log_path`` (appended to with ``append``), ``env`` added to this process's environment (and
    written in the log); returns ``(ok, seconds, reason)``. The step dies with this process; a
    signal to this process stops it first."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    extra = dict(env or {})
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    what = what or os.path.basename(cmd[1])
    main_thread = threading.current_thread() is threading.main_thread()
    with open(log_path, "a" if append else "w") as log:
        log.write("$ " + "".join(f"{k}={shlex.quote(v)} " for k, v in extra.items())
                  + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        with _CURRENT_LOCK:  # one fork at a time; none once an interruption stops the steps
            if CURRENT["stopping"] is not None:
                raise Interrupted(CURRENT["stopping"])
            _PARENT[0] = os.getpid()
            # (PR_SET_PDEATHSIG follows the thread that forks: run_step's thread waits for its step)
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, preexec_fn=_die_with_parent if _LIBC is not None else None)
            CURRENT["procs"][proc] = what
        before = CURRENT["what"]
        if main_thread:
            CURRENT["what"] = what
        try:
            rc = proc.wait()
        except BaseException:
            stop_child(proc)
            CURRENT["stopped"] = True
            raise
        finally:
            with _CURRENT_LOCK:
                CURRENT["procs"].pop(proc, None)
        if main_thread:
            CURRENT["what"] = before
    if CURRENT["stopping"] is not None:  # stopped by the interruption (another thread's): not a failure
        raise Interrupted(CURRENT["stopping"])
    seconds = time.time() - t0
    return rc == 0, seconds, ("" if rc == 0 else last_line(log_path, rc))


def class_flags(cls, multi=()):
    """The class flags of a step: ``--one_class_idx C``, or for the multi-class setting ``multi``."""
    if cls is None:
        return [multi] if isinstance(multi, str) else list(multi)
    return ["--one_class_idx", cls]


def py(script, *args):
    return [sys.executable, os.path.join(ROOT, script)] + [str(x) for x in args]


# --------------------------------------------------------------------------- dissolvers


class Dissolvers:
    """Trains (or reuses) each dissolver once, draws its grid and counts its MACs."""

    def __init__(self, a):
        self.a = a
        self.state = {}  # name -> dict(ok, reason, gmacs, seconds)

    def get(self, spec):
        if spec["name"] in self.state:
            return self.state[spec["name"]]
        a, t0 = self.a, time.time()
        head = f"dissolver {spec['dataset']} {class_text(spec['cls'])} {spec['resolution']}px ({spec['name']})"
        print(f"{head} ...", end="", flush=True)
        info = None
        if os.path.exists(spec["done"]):
            try:
                with open(spec["done"]) as fh:
                    info = json.load(fh)
            except (OSError, ValueError):
                info = None
        if info is not None and os.path.exists(spec["ckpt"]):
            state = dict(info, ok=True, reason="", reused=True)
        else:
            cmd = py("diffusion_models/train_eval_ddpm.py", "--mode", "train", "--dataset", spec["dataset"],
                     "--data_root", a.data_root, *class_flags(spec["cls"], "--all_classes"),
                     "--image_size", spec["resolution"],
                     "--train_steps", a.ddpm_train_steps, "--save_every", ddpm_save_every(a.ddpm_train_steps),
                     "--batch_size", a.ddpm_batch_size, "--grad_accum", a.ddpm_grad_accum,
                     "--unet_dim", a.ddpm_unet_dim, "--save_path", spec["ckpt"], "--seed", 0, "--no_progress")
            if a.device:
                cmd += ["--device", a.device]
            resuming = os.path.exists(spec["ckpt"])
            if resuming:  # an interrupted training: continue it exactly
                cmd.append("--resume")
            ok, seconds, reason = run_step(cmd, spec["log"], what=f"training the dissolver {spec['name']}",
                                           append=resuming)
            if not ok:
                state = {"ok": False, "reason": f"training failed: {reason}", "gmacs": None,
                         "train_seconds": seconds, "log": spec["log"]}
                self.state[spec["name"]] = state
                print(f" FAILED after {seconds:.0f} s: {reason} (log {rel(spec['log'], a.out)})", flush=True)
                return state
            gmacs = dissolver_gmacs(spec["ckpt"])
            state = {"ok": True, "reason": "", "gmacs": gmacs, "train_seconds": round(seconds, 2), "reused": False}
            from utils import atomic_write_json

            atomic_write_json({"gmacs": gmacs, "train_seconds": round(seconds, 2), "checkpoint": spec["ckpt"],
                               "ddpm": {"unet_dim": a.ddpm_unet_dim, "train_steps": a.ddpm_train_steps,
                                        "batch_size": a.ddpm_batch_size, "grad_accum": a.ddpm_grad_accum}},
                              spec["done"])
        if not os.path.exists(spec["grid"]):
            cmd = py("diffusion_models/train_eval_ddpm.py", "--mode", "eval", "--dataset", spec["dataset"],
                     "--data_root", a.data_root, *class_flags(spec["cls"]),
                     "--diffusion_model_path", spec["ckpt"], "--out", spec["grid"],
                     "--timesteps_to_show", *GRID_TIMESTEPS)
            if a.device:
                cmd += ["--device", a.device]
            ok, _, reason = run_step(cmd, spec["grid_log"], what=f"drawing the grid of the dissolver {spec['name']}")
            if not ok:
                state["grid_error"] = reason
                print(f" (grid failed: {reason})", end="")
        state["spec"] = spec
        state["quality"] = read_quality(spec)
        self.state[spec["name"]] = state
        what = "reused" if state.get("reused") else f"trained in {state['train_seconds']:.0f} s"
        macs = f"{state['gmacs']:.3f} GMACs/image" if state.get("gmacs") is not None else "MACs unknown"
        removal = removal_ratio(state)
        removal = "" if removal is None else f", lesion removal ratio {removal:.2f}"
        print(f" {what}, {macs}{removal} ({time.time() - t0:.0f} s)", flush=True)
        return state


def read_quality(spec):
    """The dissolving-quality rows (``train_eval_ddpm.py --mode eval``'s JSON beside the grid), or []."""
    path = os.path.splitext(spec["grid"])[0] + ".json"
    try:
        with open(path) as fh:
            return list(json.load(fh).get("timesteps") or [])
    except (OSError, ValueError, AttributeError):
        return []


def removal_ratio(state):
    """The dissolver's lesion removal ratio averaged over the grid's timesteps inside the training
    range (30..100 of the paper's offsets): None where it was not measured (no synthetic lesions)."""
    values = [row["removal_ratio"] for row in (state or {}).get("quality", [])
              if "removal_ratio" in row and TRAIN_T[0] <= row["t"] <= TRAIN_T[1]]
    if not values:
        return None
    import numpy as np

    return float(np.mean(values))


def dissolver_table(runs):
    """One row per dissolver the runs used: its lesion removal ratio and tissue change per
    timestep of its grid (train_eval_ddpm.py --mode eval's measurement; see docs/method.md),
    and the removal ratio averaged over the training range. None when no run dissolves."""
    specs = list({r.dissolver["name"]: r.dissolver for r in runs if r.dissolver}.values())
    rows = [(spec, read_quality(spec)) for spec in specs]
    rows = [(spec, q) for spec, q in rows if q]
    if not rows:
        return None
    ts = sorted({row["t"] for _, q in rows for row in q})
    lines = ["| dissolver | " + " | ".join(f"t={t}" for t in ts) + " | removal ratio, t in 30..100 |",
             "|---|" + "---|" * (len(ts) + 1)]
    for spec, q in rows:
        by_t = {row["t"]: row for row in q}
        cells = []
        for t in ts:
            row = by_t.get(t, {})
            cells.append(f"{row['removal_ratio']:.2f} / {row['tissue_change']:.3f}" if "removal_ratio" in row
                         else (f"hf removed {row['hf_removed']:.2f}" if "hf_removed" in row else ""))
        mean = removal_ratio({"quality": q})
        lines.append(f"| {spec['name']} | " + " | ".join(cells) + f" | {fmt(mean, 2)} |")
    return "\n".join(lines)


def dissolver_gmacs(ckpt_path):
    """GMACs of one dissolving call (the UNet on one image), counted as ``train_eval_ddpm.py
    --mode macs`` does; None when it cannot be counted."""
    try:
        import warnings

        import torch

        from diffusion_models.ddpm import build_unet, read_dissolver_checkpoint

        cfg = read_dissolver_checkpoint(ckpt_path, "cpu")["config"]
        unet = build_unet(cfg).eval()
        r = cfg["image_size"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # thop still uses distutils' LooseVersion
            import thop

            n_macs, _ = thop.profile(unet, inputs=(torch.randn(1, cfg["channels"], r, r),
                                                   torch.zeros(1, dtype=torch.long)), verbose=False)
        return round(float(n_macs) / 1e9, 4)
    except Exception as exc:  # noqa: BLE001 - a figure of merit, not worth failing the run for
        from utils import warn

        warn(f"could not count the MACs of {ckpt_path}: {type(exc).__name__}: {exc}")
        return None


# --------------------------------------------------------------------------- one run


TRAIN_FILES = ("last.model", "scalars.csv", "log.txt", "config.json", "train_done.json", "selection.json")
BEST_EVAL_FILES = ("results_best.json", "scores_best.csv", "eval_best.log")


def clean_partial_training(run):
    """Remove what an interrupted or failed training left, so train.py starts afresh."""
    for name in os.listdir(run.dir):
        if name in TRAIN_FILES or name.startswith("events.out.tfevents") or (
                name.startswith("best_") and name.endswith(".model")):
            os.remove(run.path(name))


def interrupted_training(run, same_settings):
    """What an interrupted training of ``run`` left: ``"resume"`` (a last.model of these
    settings, to continue exactly), ``"finished"`` (train.py got to the end but its record was
    not written) or None (nothing to continue: train afresh)."""
    if not same_settings or not os.path.exists(run.path("last.model")):
        return None
    from common.checkpoint_io import read_model_checkpoint

    try:
        ckpt = read_model_checkpoint(run.path("last.model"), "cpu")
    except UserError:
        return None
    args = (ckpt.get("meta") or {}).get("args") or {}
    epoch, step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
    if "epochs" not in args:
        return None
    if epoch >= args["epochs"] or (args.get("max_steps") is not None and step >= args["max_steps"]):
        return "finished"
    return "resume"


def train_command(a, run, dissolver_ckpt):
    mode = "simclr_DIA" if run.dissolve_type else "simclr_CSI"
    cmd = py("train.py", "--dataset", run.dataset, "--data_root", a.data_root,
             *class_flags(run.cls, multi_class_flags(a)),
             "--model", run.model, "--mode", mode, "--shift_trans_type", run.transformation, "--seed", run.seed,
             "--logdir", run.dir, "--save_step", a.save_step)
    if a.selection:
        cmd += ["--ood_samples", str(a.selection_samples)]
        if a.selection_max_images:
            cmd += ["--eval_max_train", str(a.selection_max_images), "--eval_max_test", str(a.selection_max_images)]
    else:
        cmd.append("--no_eval")
    for flag in ("epochs", "batch_size", "max_batches_per_epoch", "max_steps", "warmup", "resnet_width",
                 "log_every"):
        v = getattr(a, flag)
        if v is not None:
            cmd += [f"--{flag}", str(v)]
    if run.dissolve_type:
        cmd += ["--diff_resolution", str(run.resolution)]
        if a.resize_to_constant:
            cmd.append("--resize_to_constant")
    if dissolver_ckpt:
        cmd += ["--diffusion_model_path", dissolver_ckpt]
    cmd += ["--amp", a.amp]
    if a.device:
        cmd += ["--device", a.device]
    cmd += list(a.train_args)
    n = getattr(a, "nproc_per_run", 1)
    if n > 1:  # DDP under torchrun (rank 0 writes the run folder); cmd[0] is this python
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    return cmd


def eval_command(a, run, model="last.model", results="results.json", scores="scores.csv"):
    cmd = py("eval.py", "--mode", "ood_pre", "--dataset", run.dataset, "--data_root", a.data_root,
             "--model", run.model, "--ood_score", "CSI", "--shift_trans_type", "rotation",
             "--ood_samples", a.ood_samples, "--resize_factor", 0.54, "--resize_fix",
             *class_flags(run.cls, multi_class_flags(a)), "--seed", run.seed, "--load_path", run.path(model),
             "--save_results", run.path(results), "--save_scores_csv", run.path(scores))
    if a.resnet_width is not None:
        cmd += ["--resnet_width", str(a.resnet_width)]
    if a.img_size is not None:  # the data as train.py read it (--train_args)
        cmd += ["--img_size", str(a.img_size)]
    if a.aptos_all_grades:
        cmd.append("--aptos_all_grades")
    cmd += ["--amp", a.amp]
    if a.device:
        cmd += ["--device", a.device]
    return cmd


def multi_class_flags(a):
    """train.py's and eval.py's flags for the multi-class setting."""
    return ["--one_class_idx", "None"] + (["--ood_dataset", *a.ood_dataset] if a.ood_dataset else [])


def needs_dissolver(run):
    """Whether the run still needs its dissolver (to train, or to draw its grid)."""
    return run.dissolver is not None and not (os.path.exists(run.path("results.json"))
                                              and os.path.exists(run.path("dissolving.png")))


def read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def execute(a, run, dissolvers):
    """Train, evaluate and draw one run (or reuse it when finished); fills ``run``'s fields."""
    from utils import atomic_write_json

    results = read_json(run.path("results.json"))
    dissolver = None
    if run.dissolver is not None:  # a finished run only reads the dissolver's record
        dissolver = dissolvers.get(run.dissolver) if needs_dissolver(run) else (read_json(run.dissolver["done"]) or {})
        run.gmacs = dissolver.get("gmacs")
        run.removal = removal_ratio({"quality": read_quality(run.dissolver)})
    if results is not None:
        run.reused = True
    else:
        os.makedirs(run.dir, exist_ok=True)
        for name in ("failed.json", "dissolving.png") + FIGURES + BEST_EVAL_FILES:  # nothing stale from before
            if os.path.exists(run.path(name)):
                os.remove(run.path(name))
        if dissolver is not None and not dissolver["ok"]:
            return fail(run, "dissolver", dissolver["reason"], log=dissolver["log"])
        ckpt = run.dissolver["ckpt"] if run.dissolver else None
        train_cmd, eval_cmd = train_command(a, run, ckpt), eval_command(a, run)
        old = (read_json(run.path("run.json")) or {}).get("config")
        if old is not None and old != json.loads(json.dumps(run.config)):
            with contextlib.suppress(FileNotFoundError):  # trained with other settings: train again
                os.remove(run.path("train_done.json"))
        atomic_write_json({"config": run.config, "train_command": train_cmd, "eval_command": eval_cmd,
                           "eval_best_command": eval_command(a, run, BEST_FILE, *BEST_EVAL_FILES[:2])},
                          run.path("run.json"))
        done = read_json(run.path("train_done.json"))
        if done is None or not os.path.exists(run.path("last.model")):
            state = interrupted_training(run, old == json.loads(json.dumps(run.config)))
            if state == "finished":  # train.py ended, the record of it did not get written
                seconds = None
            else:
                cmd = train_cmd + (["--resume_path", run.dir] if state == "resume" else [])
                if state is None:
                    clean_partial_training(run)
                ok, seconds, reason = run_step(cmd, run.path("train.log"), what=f"training {run.label}",
                                               append=state == "resume", env=step_env(a))
                if not ok:
                    return fail(run, "train", reason, seconds=seconds)
            atomic_write_json({"seconds": None if seconds is None else round(seconds, 2),
                               "resumed": state is not None}, run.path("train_done.json"))
        best, reason = evaluate_best(a, run)  # before last.model's: results.json marks a finished run
        if reason:
            return fail(run, "eval", reason, log=run.path("eval_best.log"))
        ok, seconds, reason = run_step(eval_cmd, run.path("eval.log"), what=f"evaluating {run.label}",
                                       env=step_env(a))
        if not ok:
            return fail(run, "eval", reason)
        results = read_json(run.path("results.json"))
        if results is None:
            return fail(run, "eval", "eval.py finished without writing results.json")
        results["eval_seconds"] = round(seconds, 2)
        if best is not None:
            if best["same_as_last"]:
                best["auroc"] = results["auroc"]
            results["best"] = best
        atomic_write_json(results, run.path("results.json"))
    run.results = results
    run.best = results.get("best")
    run.status = "ok"
    run.train_seconds = (read_json(run.path("train_done.json")) or {}).get("seconds")
    run.eval_seconds = results.get("eval_seconds")
    with _PLOT_LOCK:  # matplotlib, one figure at a time (--devices runs several runs in threads)
        draw_run_figures(run, dissolver)
    return run


_PLOT_LOCK = threading.Lock()


def evaluate_best(a, run):
    """Evaluate ``best_CSI.model`` as ``last.model`` is evaluated; returns ``(best, error)``.

    ``best`` (None when train.py kept no such file: ``--no_selection``, or no evaluation epoch
    was reached) holds the epoch, what selected it (train.py's test AUROC and its protocol) and
    eval.py's AUROCs; a best epoch equal to last.model's is the same weights, not evaluated twice.
    """
    if not a.selection:
        return None, ""
    selection = read_json(run.path("selection.json")) or {}
    info = selection.get(BEST_FILE)
    if info is None or not os.path.exists(run.path(BEST_FILE)):
        return None, ""
    last_epoch = (selection.get("last.model") or {}).get("epoch")
    best = {"file": BEST_FILE, "label": BEST_LABEL, "rule": info["rule"], "epoch": info["epoch"],
            "last_epoch": last_epoch, "selected_on": {"metric": info["metric"], "value": info["value"],
                                                      "protocol": info["protocol"]},
            "same_as_last": info["epoch"] == last_epoch}
    if best["same_as_last"]:
        return best, ""
    ok, seconds, reason = run_step(eval_command(a, run, BEST_FILE, *BEST_EVAL_FILES[:2]), run.path("eval_best.log"),
                                   what=f"evaluating {BEST_FILE} of {run.label}", env=step_env(a))
    res = read_json(run.path("results_best.json")) if ok else None
    if res is None:
        return None, f"{BEST_FILE}: " + (reason or "eval.py finished without writing results_best.json")
    best.update(auroc=res["auroc"], eval_seconds=round(seconds, 2))
    return best, ""


def fail(run, stage, reason, seconds=None, log=None):
    from utils import atomic_write_json

    reason = reason.replace(run.out + os.sep, "")  # paths inside the run folder, relative to it
    run.status, run.error = "failed", f"{stage}: {reason}"
    run.log = log or run.path(f"{stage}.log")
    run.train_seconds = round(seconds, 2) if seconds is not None and stage == "train" else None
    os.makedirs(run.dir, exist_ok=True)
    atomic_write_json({"stage": stage, "reason": reason, "log": run.log}, run.path("failed.json"))
    return run


def draw_run_figures(run, dissolver):
    """The run's figures; a figure that cannot be drawn is a note, not a failure."""
    from evals import plots

    title = f"{run.dataset} {class_text(run.cls)}, {run.transformation} {run.resolution}px, seed {run.seed}"
    jobs = [("roc.png", plots.plot_roc, "scores.csv"), ("score_hist.png", plots.plot_score_hist, "scores.csv"),
            ("loss_curves.png", plots.plot_loss_curves, "scalars.csv")]
    if run.best is not None:  # train.py evaluated during training and kept best_CSI.model
        jobs.append(("selection.png", plots.plot_selection, "selection.json"))
    for out, fn, src in jobs:
        if os.path.exists(run.path(out)):
            continue
        try:
            fn(run.path(src), run.path(out), title=title)
        except Exception as exc:  # noqa: BLE001
            run.notes.append(f"{out} not drawn: {type(exc).__name__}: {exc}")
    if dissolver is not None and not os.path.exists(run.path("dissolving.png")):
        grid = run.dissolver["grid"]
        if os.path.exists(grid):
            labels = ["input"] + [f"t = {t}" for t in GRID_TIMESTEPS]
            try:
                plots.plot_image_grid(grid, run.path("dissolving.png"), labels,
                                      title=f"dissolving ({run.dissolver['name']}): first half normal, "
                                            f"second half anomalous test images")
            except Exception as exc:  # noqa: BLE001 - the dissolver's own grid then
                run.notes.append(f"dissolving grid not labelled ({type(exc).__name__}: {exc}); copied as is")
                shutil.copyfile(grid, run.path("dissolving.png"))
        else:
            run.notes.append("dissolving.png missing: " + dissolver.get("grid_error", "grid not drawn"))


def draw_comparisons(a, runs):
    """``<out>/<dataset>_class<i>_roc.png``: the ROC curves of every transformation."""
    from evals import plots

    written = []
    groups = {}
    for r in runs:
        if r.status == "ok" and os.path.exists(r.path("scores.csv")):
            groups.setdefault((r.dataset, r.cls), {}).setdefault(column_key(r), []).append(r.path("scores.csv"))
    labels = column_labels(runs)
    for (dataset, cls), by_col in groups.items():
        which = "multi_class" if cls is None else f"class{cls}"
        out = os.path.join(a.out, f"{dataset}_{which}_roc.png")
        what = ("multi-class, in-distribution test set against every out-of-distribution set" if cls is None
                else f"normal class {cls}")
        try:
            plots.plot_roc_comparison([(labels[k], v) for k, v in by_col.items()], out,
                                      title=f"{dataset}, {what}: ROC per transformation")
            written.append(out)
        except Exception as exc:  # noqa: BLE001
            from utils import warn

            warn(f"{out} not drawn: {type(exc).__name__}: {exc}")
    return written


# --------------------------------------------------------------------------- tables


CSV_FIELDS = ["dataset", "one_class_idx", "transformation", "resolution", "seed", "status", "auroc_pooled",
              "auroc_one_class_mean", "auroc_per_class", "auroc_pooled_best", "auroc_one_class_mean_best",
              "best_epoch", "last_epoch", "best_selection_auroc", "train_seconds", "eval_seconds", "dissolver_gmacs",
              "model", "reused", "run_dir", "error", "auroc_ood_mean", "auroc_per_ood", "auroc_ood_mean_best",
              "dissolver_removal_ratio"]
# auroc_*: last.model (the honest figure); auroc_*_best: best_CSI.model, the best on test (the paper's
# selection), both by eval.py; best_selection_auroc: the test AUROC during training that selected it;
# multi-class runs (one_class_idx None): auroc_ood_mean, auroc_per_ood (<set>:<AUROC>;...), auroc_ood_mean_best;
# dissolver_removal_ratio: the run's dissolver's lesion removal ratio averaged over t = 30..100 of its grid
# (synthetic lesions only)


def csv_row(a, r):
    auroc = (r.results or {}).get("auroc", {})
    per_class = ";".join(f"{k[len('one_class_'):]}:{v:.6g}" for k, v in auroc.items()
                         if k.startswith("one_class_") and k != "one_class_mean")
    best = r.best or {}
    order = (r.results or {}).get("ood_dataset") or [k for k in auroc if k != "ood_mean"]  # eval.py's order
    per_ood = ";".join(f"{k}:{auroc[k]:.6g}" for k in order if k in auroc) if r.multi else ""
    return {"dataset": r.dataset, "one_class_idx": "None" if r.multi else r.cls, "transformation": r.transformation,
            "resolution": r.resolution, "seed": r.seed, "status": r.status,
            "auroc_pooled": num(auroc.get("pooled")), "auroc_one_class_mean": num(auroc.get("one_class_mean")),
            "auroc_per_class": per_class,
            "auroc_pooled_best": num(best.get("auroc", {}).get("pooled")),
            "auroc_one_class_mean_best": num(best.get("auroc", {}).get("one_class_mean")),
            "best_epoch": best.get("epoch", ""), "last_epoch": best.get("last_epoch", ""),
            "best_selection_auroc": num(best.get("selected_on", {}).get("value")),
            "train_seconds": "" if r.train_seconds is None else r.train_seconds,
            "eval_seconds": "" if r.eval_seconds is None else r.eval_seconds,
            "dissolver_gmacs": "" if r.gmacs is None else r.gmacs, "model": r.model, "reused": int(r.reused),
            "run_dir": rel(r.dir, a.out), "error": r.error,
            "auroc_ood_mean": num(auroc.get("ood_mean")) if r.multi else "", "auroc_per_ood": per_ood,
            "auroc_ood_mean_best": num(best.get("auroc", {}).get("ood_mean")) if r.multi else "",
            "dissolver_removal_ratio": "" if r.removal is None else round(r.removal, 4)}


def num(v):
    return "" if v is None else round(float(v), 10)


def rel(path, start):
    return os.path.relpath(path, start)


def column_key(r):
    return (r.transformation, r.resolution if r.dissolve_type else None)


def column_labels(runs):
    """Column of each (transformation, resolution): the transformation's name, plus the
    resolution when it was run at several."""
    keys = list(dict.fromkeys(column_key(r) for r in runs))
    counts = {}
    for t, _ in keys:
        counts[t] = counts.get(t, 0) + 1
    return {k: (f"{k[0]} @ {k[1]}px" if counts[k[0]] > 1 else k[0]) for k in keys}


def md_escape(text, limit=None, first_clause=False):
    """``text`` on one line for a table cell; ``first_clause`` keeps what comes before the first
    '; ' (the messages say what is wrong, then what to do); ``limit`` cuts it with an ellipsis."""
    text = " ".join(str(text).split())
    if first_clause:
        text = text.split("; ")[0]
    if limit and len(text) > limit:
        text = text[:limit - 1].rstrip() + "…"
    return text.replace("|", "\\|")


def pooled_auroc(r, which="last", key="pooled"):
    """eval.py's pooled AUROC (or its ``key``) of a finished run's last.model or best_CSI.model
    (None: none)."""
    if r.status != "ok":
        return None
    auroc = r.results["auroc"] if which == "last" else (r.best or {}).get("auroc", {})
    return auroc.get(key)


def headline_auroc(r, which="last"):
    """The AUROC a run is summed up by: pooled (one-class), the mean over the
    out-of-distribution sets (multi-class)."""
    return pooled_auroc(r, which, "ood_mean" if r.multi else "pooled")


def summary_cell(group, which="last", key="pooled"):
    """``mean ± std (n)`` of the pooled AUROC, or of ``key`` (std: numpy's, over the seeds that finished)."""
    import numpy as np

    ok = [float(v) for v in (pooled_auroc(r, which, key) for r in group) if v is not None]
    failed = [r for r in group if r.status == "failed"]
    if not ok:
        if failed:
            return "failed: " + md_escape(failed[0].error, 160, first_clause=True)
        return "—"
    cell = f"{np.mean(ok):.3f} ± {np.std(ok):.3f} ({len(ok)})"
    if failed:
        cell += f"; {len(failed)} failed: " + md_escape(failed[0].error, 120, first_clause=True)
    return cell


def summary_table(runs, which="last"):
    """The "Different transformations" table of ``last.model`` or (``which="best"``) of
    ``best_CSI.model``: rows dataset (and class), columns transformations. One-class runs only."""
    runs = [r for r in runs if not r.multi]
    labels = column_labels(runs)
    classes = {r.cls for r in runs}
    rows = list(dict.fromkeys((r.dataset, r.cls) for r in runs))
    lines = ["| Dataset | " + " | ".join(labels.values()) + " |",
             "|---|" + "---|" * len(labels)]
    for dataset, cls in rows:
        name = dataset + (f" (class {cls})" if len(classes) > 1 else "")
        cells = [summary_cell([r for r in runs if (r.dataset, r.cls) == (dataset, cls) and column_key(r) == key],
                              which) for key in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multi_class_table(runs, which="last"):
    """CSI's unlabeled multi-class table of ``last.model`` or (``which="best"``) ``best_CSI.model``:
    one row per dataset and transformation, one column per out-of-distribution set, then their
    mean; cells mean ± std (n) over seeds."""
    runs = [r for r in runs if r.multi]
    labels = column_labels(runs)
    names = list(dict.fromkeys(n for r in runs for n in r.ood_names))
    lines = ["| Dataset | Transformation | " + " | ".join(names + ["mean"]) + " |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for dataset in dict.fromkeys(r.dataset for r in runs):
        for key, label in labels.items():
            group = [r for r in runs if r.dataset == dataset and column_key(r) == key]
            if group:
                cells = [summary_cell(group, which, name) for name in names + ["ood_mean"]]
                lines.append(f"| {dataset} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multi_class_runs_table(runs):
    """One row per multi-class run: its AUROC per out-of-distribution set and their mean."""
    runs = [r for r in runs if r.multi]
    names = list(dict.fromkeys(n for r in runs for n in r.ood_names))
    lines = ["| dataset | transformation | res | seed | " + " | ".join(names) + " | mean (last) | "
             "mean (best on test) | best epoch / last | train s | eval s | dissolver GMACs | status |",
             "|---|---|---|---|" + "---|" * (len(names) + 7)]
    for r in runs:
        auroc = (r.results or {}).get("auroc", {})
        best = r.best or {}
        epochs = f"{best['epoch']} / {best['last_epoch']}" if best else ""
        lines.append(f"| {r.dataset} | {r.transformation} | {r.resolution} | {r.seed} | "
                     + " | ".join(fmt(auroc.get(n)) for n in names)
                     + f" | {fmt(auroc.get('ood_mean'))} | {fmt(best.get('auroc', {}).get('ood_mean'))} | {epochs} | "
                       f"{fmt(r.train_seconds, 1)} | {fmt(r.eval_seconds, 1)} | {fmt(r.gmacs, 3)} | {run_status(r)} |")
    return "\n".join(lines)


def run_status(r):
    if r.status == "ok":
        status = "ok (reused)" if r.reused else "ok"
        if r.notes:
            status += "; " + md_escape("; ".join(r.notes), 200)
        return status
    return r.status if r.status != "failed" else "failed: " + md_escape(r.error, 300)


def fmt(v, digits=3):
    return "" if v is None or v == "" else f"{float(v):.{digits}f}"


def runs_table(a, runs):
    lines = ["| dataset | class | transformation | res | seed | AUROC pooled (last) | AUROC class mean (last) | "
             "AUROC pooled (best on test) | best epoch / last | train s | eval s | dissolver GMACs | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.multi:
            continue  # multi_class_runs_table
        auroc = (r.results or {}).get("auroc", {})
        status = run_status(r)
        best = r.best or {}
        epochs = f"{best['epoch']} / {best['last_epoch']}" if best else ""
        lines.append(f"| {r.dataset} | {r.cls} | {r.transformation} | {r.resolution} | {r.seed} | "
                     f"{fmt(auroc.get('pooled'))} | {fmt(auroc.get('one_class_mean'))} | "
                     f"{fmt(best.get('auroc', {}).get('pooled'))} | {epochs} | {fmt(r.train_seconds, 1)} | "
                     f"{fmt(r.eval_seconds, 1)} | {fmt(r.gmacs, 3)} | {status} |")
    return "\n".join(lines)


def write_tables(a, runs, command):
    from utils import atomic_write_csv, atomic_write_text

    done = [r for r in runs if r.status != "pending"]
    atomic_write_csv([csv_row(a, r) for r in done], CSV_FIELDS, os.path.join(a.out, "results.csv"))
    budget = train_budget(a)
    text = [
        f"# DIA reproduction: {', '.join(a.dataset)}",
        "",
        f"Command: `{command}`",
        "",
    ]
    if any(not r.multi for r in runs):
        text += one_class_sections(a, runs)
    if any(r.multi for r in runs):
        text += multi_class_sections(a, runs)
    dissolvers = dissolver_table(runs)
    if dissolvers:
        text += ["## Dissolvers: what they dissolve", "", DISSOLVER_TABLE_NOTE, "", dissolvers, ""]
    text += [
        "## Budget",
        "",
        f"- train.py: model {', '.join(sorted({r.model for r in runs}))}, "
        + ", ".join((k if v is True else f"{k} {v}") for k, v in budget.items() if v not in (None, [], False)),
        f"- eval.py: ood_samples {a.ood_samples}, resize_factor 0.54 (fixed)",
        (f"- checkpoint selection (train.py's evaluation during training, as the paper's): every {a.save_step} "
         f"epoch(s), CSI score, {a.selection_samples} sample(s), crop scale in [0.54, 1], "
         + (f"at most {a.selection_max_images}" if a.selection_max_images else "all")
         + " normal training and test images" if a.selection else "- checkpoint selection: off (--no_selection)"),
        f"- dissolver: Unet(dim={a.ddpm_unet_dim}), {a.ddpm_train_steps} optimiser steps of {a.ddpm_grad_accum} x "
        f"{a.ddpm_batch_size} images (the paper's: 156,250 of 2 x 256, dim 64)",
        "- std: numpy's (population) standard deviation over the seeds; MACs: one dissolving call on one image "
        "(thop, as train_eval_ddpm.py --mode macs).",
        "- figures per run: roc.png, score_hist.png (last.model), loss_curves.png, selection.png (test AUROC during "
        "training and the selected epoch), dissolving.png (diffusion_*); "
        "per dataset and class: <dataset>_class<i>_roc.png (multi-class: <dataset>_multi_class_roc.png)",
        "",
    ]
    atomic_write_text("\n".join(text), os.path.join(a.out, "results.md"))


def one_class_sections(a, runs):
    """results.md's one-class part: the paper's "Different transformations" tables and the runs."""
    return [
        "## Different transformations",
        "",
        "Pooled AUROC (normal test images against all others; eval.py --mode ood_pre --ood_score CSI, rotation), "
        "mean ± std over seeds (number of finished runs), of two checkpoints of each run.",
        "",
        "### last.model: the model at the end of training (the honest figure)",
        "",
        summary_table(runs),
        "",
        f"### {BEST_FILE}: {BEST_LABEL}",
        "",
        *(["The checkpoint whose test AUROC during training (CSI score, mean over the anomalous classes) was "
           "highest: chosen on the test set itself, so an optimistic figure. The paper's train.py keeps this "
           "file; which file its tables report is not said. Same evaluation as above; the AUROC that selected it "
           "(train.py's evaluation, budget below) is results.csv's best_selection_auroc.",
           "",
           summary_table(runs, "best")] if a.selection else ["Not computed (--no_selection)."]),
        "",
        "## Runs",
        "",
        runs_table(a, runs),
        "",
    ]


def multi_class_sections(a, runs):
    """results.md's multi-class part: CSI's table (a column per out-of-distribution set) and the runs."""
    return [
        "## Unlabeled multi-class (CSI)",
        "",
        "AUROC of the in-distribution test set (every class normal) against each out-of-distribution set, and "
        "their mean (eval.py --mode ood_pre --ood_score CSI, rotation; CSI's layout), mean ± std over seeds "
        "(number of finished runs).",
        "",
        "### last.model: the model at the end of training (the honest figure)",
        "",
        multi_class_table(runs),
        "",
        f"### {BEST_FILE}: {BEST_LABEL}",
        "",
        *(["Chosen during training by the highest mean AUROC over the out-of-distribution sets of train.py's "
           "evaluation, on the test sets themselves: an optimistic figure.",
           "",
           multi_class_table(runs, "best")] if a.selection else ["Not computed (--no_selection)."]),
        "",
        "## Runs (multi-class)",
        "",
        multi_class_runs_table(runs),
        "",
    ]


# --------------------------------------------------------------------------- main


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = check_args(resolve_args(argv))
    runs = make_plan(a)
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {a.out}: {exc.strerror}") from None
    if not os.access(a.out, os.W_OK):
        raise UserError(f"--out {a.out} is not writable")
    from utils import ProcessLock, LOCK_NAME

    # one reproduce.py per --out: the lock dies with the process; the steps die with it too
    lock = ProcessLock(os.path.join(a.out, LOCK_NAME), f"--out {a.out}",
                       "another reproduce.py is working there: wait for it to end, or choose another --out").acquire()
    remove_own_stale_temps(a.out)
    handlers = {}
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, _on_signal)
    CURRENT.update(procs={}, what=None, stopped=False, stopping=None)
    try:
        return run_all(a, runs, argv)
    except (Interrupted, KeyboardInterrupt) as exc:
        sig = exc.args[0] if isinstance(exc, Interrupted) and exc.args else signal.SIGINT
        what = CURRENT["what"] or "preparing"
        n_stopped = int(CURRENT["stopped"])
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


def remove_own_stale_temps(out):
    """The temporary files a killed reproduce.py (or eval.py, a plot) left in ``--out``: tables,
    records, scores, figures. Checkpoints' are left to train.py and the DDPM script, which
    remove theirs under their own locks."""
    from train import writes_it
    from utils import remove_stale_temps

    for folder, _, _ in os.walk(out):
        remove_stale_temps(folder, lambda name: not (writes_it(name) or name.endswith(".pt")))


def report_run(a, run, t0):
    """The end of a run's progress line (after its ``[i/n] label:``) and its notes."""
    if run.status == "ok":
        auroc = headline_auroc(run)
        if run.reused:
            what = "finished before, skipped"
        else:
            trained = "trained" if run.train_seconds is None else f"trained {run.train_seconds:.0f} s"
            what = f"{trained}, evaluated {run.eval_seconds:.0f} s"
        best = headline_auroc(run, "best")
        best = f", {best:.3f} (best on test, epoch {run.best['epoch']})" if best is not None else ""
        kind = "AUROC mean over the out-of-distribution sets" if run.multi else "AUROC"
        print(f" {what}; {kind} {auroc:.3f} (last){best} ({time.time() - t0:.0f} s)", flush=True)
        for note in run.notes:
            print(f"    note: {note}", flush=True)
    else:
        print(f" FAILED ({run.error}); log {rel(run.log, a.out)} ({time.time() - t0:.0f} s)", flush=True)


def run_concurrently(a, runs, command):
    """``--devices``: every dissolver the runs need is trained first (one after another, on the
    first device), then one thread per listed device takes the runs in plan order, one at a time,
    its steps getting ``--device <its device>``. This thread prints the progress and rewrites the
    tables (rows in plan order) as runs finish; an interruption stops every running step."""
    import copy
    import queue

    on_first = copy.copy(a)
    on_first.device = a.devices[0]
    dissolvers = Dissolvers(on_first)
    CURRENT["what"] = "preparing the dissolvers"
    for run in runs:
        if needs_dissolver(run):
            dissolvers.get(run.dissolver)
    slots = device_slots(a.devices, getattr(a, "nproc_per_run", 1))
    print(f"running the runs {len(slots)} at a time: on {', '.join(label for label, _, _ in slots)}", flush=True)
    shown = []  # what the tables show: the finished runs, and pending copies of the others
    for run in runs:
        pending = copy.copy(run)
        pending.notes = []
        shown.append(pending)
    todo, events = queue.Queue(), queue.Queue()
    for i in range(len(runs)):
        todo.put(i)

    def work(label, device, gpus):
        on_device = copy.copy(a)
        on_device.device, on_device.gpus = device, gpus
        while CURRENT["stopping"] is None:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            events.put(("start", i, label))
            try:
                execute(on_device, runs[i], dissolvers)
            except Interrupted:
                return  # stopped: left for the next command to resume
            except Exception as exc:  # noqa: BLE001 - one run's trouble must not stop the others
                fail(runs[i], "reproduce", f"{type(exc).__name__}: {exc}", log=runs[i].path("train.log"))
            events.put(("done", i, label))

    threads = [threading.Thread(target=work, args=slot, name=f"runs on {slot[0]}", daemon=True) for slot in slots]
    started = {}
    CURRENT["what"] = "starting the runs"
    try:
        for t in threads:
            t.start()
        n_done = 0
        while n_done < len(runs):
            try:
                kind, i, device = events.get(timeout=1.0)
            except queue.Empty:
                if events.empty() and not any(t.is_alive() for t in threads):
                    raise RuntimeError("the threads running the runs ended early") from None
                continue
            run, head = runs[i], f"[{i + 1}/{len(runs)}] {runs[i].label}"
            if kind == "start":
                started[i] = time.time()
                print(f"{head}: started on {device}", flush=True)
                continue
            n_done += 1
            print(f"{head} ({device}):", end="", flush=True)
            report_run(a, run, started[i])
            shown[i] = run
            write_tables(a, shown, command)
    except BaseException as exc:
        sig = exc.args[0] if isinstance(exc, Interrupted) and exc.args else (
            signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 0)
        with _CURRENT_LOCK:  # no step starts from now on
            CURRENT["stopping"] = sig
            running = dict(CURRENT["procs"])
        CURRENT["what"] = " and ".join(running.values()) or "running the runs"
        if running:
            stop_children(list(running))
            CURRENT["stopped"] = len(running)
        for t in threads:
            t.join()
        raise
    for t in threads:
        t.join()


def run_all(a, runs, argv):
    command = "python reproduce.py " + " ".join(shlex.quote(x) for x in argv)
    n_todo = sum(not os.path.exists(r.path("results.json")) for r in runs)
    print(f"{len(runs)} run(s) in {a.out} ({len(runs) - n_todo} finished already, {n_todo} to do)", flush=True)

    t_all = time.time()
    if a.devices:
        run_concurrently(a, runs, command)
    else:
        dissolvers = Dissolvers(a)
        for i, run in enumerate(runs, 1):
            if needs_dissolver(run):
                dissolvers.get(run.dissolver)  # its own progress line, before the run's
            t0 = time.time()
            print(f"[{i}/{len(runs)}] {run.label}:", end="", flush=True)
            CURRENT["what"] = f"working on {run.label}"
            execute(a, run, dissolvers)
            report_run(a, run, t0)
            write_tables(a, runs, command)
    CURRENT["what"] = "drawing the comparison figures"
    draw_comparisons(a, runs)
    write_tables(a, runs, command)

    n_failed = sum(r.status == "failed" for r in runs)
    print()
    for table, multi in ((summary_table, False), (multi_class_table, True)):
        if not any(r.multi == multi for r in runs):
            continue
        print(("multi-class, " if multi else "") + "last.model (the honest figure):")
        print(table(runs))
        if a.selection:
            print(f"\n{BEST_FILE}, {BEST_LABEL}:")
            print(table(runs, "best"))
        print()
    dissolvers = dissolver_table(runs)
    if dissolvers:
        print("dissolvers, lesion removal ratio / tissue change per timestep:")
        print(dissolvers)
        print()
    print(f"{len(runs) - n_failed} of {len(runs)} run(s) finished, {n_failed} failed; {time.time() - t_all:.0f} s. "
          f"Tables: {os.path.join(a.out, 'results.md')}, {os.path.join(a.out, 'results.csv')}", flush=True)
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
