"""Train a contrastive one-class model: CSI (``--mode simclr_CSI``) or DIA (``--mode simclr_DIA``).

Without a normal class (``--one_class_idx`` left out on cifar10 / imagenet or with ``--ood_dataset``,
or ``--one_class_idx None``) it is CSI's unlabeled multi-class setting: the whole training set is
normal, and the evaluation during training scores each ``--ood_dataset`` against the test set.

Writes ``last.model`` (the model at the end: the honest figure) and, as the paper's train.py,
evaluates on the test set every ``--save_step`` epochs and keeps the best as ``best_CSI.model``
(``selection.json`` says which rule produced which file; ``--no_eval`` skips it).

A run folder holds one run: ``config.json`` (its flags and run id) is written when the run is
created and never rewritten; the folder is locked while a train.py works in it. ``--resume_path``
continues a run exactly, in its own folder (or an empty ``--logdir``), with its own settings:
only ``cli.args.RESUME_MAY_CHANGE`` may differ
(``common.run_folder`` holds the run-folder policy). A checkpoint never holds NaN or infinity.

Example (the paper's command):
    python train.py --data_root ../data --dataset kvasir --model resnet18_imagenet --mode simclr_DIA \
        --shift_trans_type diffusion_rotation --diff_resolution 32 --batch_size 32 --one_class_idx 0 \
        --save_step 1 --diffusion_model_path diffusion_models/ckpts/kvasir_0_32px.pt
"""
import json
import os
import signal
import sys
import threading

from cli.args import RESUME_MAY_CHANGE, choose_class, parse_args
from common import distributed
from common.checkpoint_io import read_checkpoint, read_model_checkpoint
from common.device import device_facts, device_precision, make_deterministic, precision_line
from common.errors import SettingError, UserError, exit_on_user_error
from common.run_folder import RunFolder, changed_settings, check_world_size, plain_settings, resolve_resume
from datasets import get_dataset, load_ood_sets, one_class_split
from datasets.fingerprint import (check_outside_data, check_same_data, check_same_file, data_fingerprint, data_tree,
                                  file_sha256)
from datasets.normal_class import normal_class_line, recorded_class
from datasets.registry import describe_images, is_folder_dataset
from diffusion_models.ddpm import train_command_hint
from evals.scoring_reference import ScoringProtocol, compute_reference, model_digest, write_reference
from evals.selection import SelectionEvaluation
from models.dissolve import DissolveSettings, make_dissolve_fn
from models.resnet import build_model
from training.config import TrainConfig
from training.records import check_not_rewinding, reconcile_best
from training.trainer import Trainer
from utils import Logger, set_seed, warn

# flags that are no setting of a run: names of folders and files, eval.py's own flags, derived values
NOT_RUN_SETTINGS = ("logdir", "suffix", "resume_path", "local_rank", "num_workers", "program", "dissolve_type",
                    "base_shift",
                    "K_shift", "ood_score", "ood_layer", "ood_batch_size", "print_score", "save_score",
                    "save_results", "save_scores_csv", "score_folder", "threshold_quantile", "one_class_given",
                    "accept_changed_data")
CREATION_ONLY = ("load_path", "no_strict")  # a warm start, applied when the run is created
RUN_ID_KEYS = ("run_id", "resumed_from", "world_size")  # what config.json holds besides the flags
PROGRESS_FLAGS = ("progress_file", "no_progress")  # how a run shows its progress: no setting of it
RESUME_IGNORES = set(RESUME_MAY_CHANGE) | set(NOT_RUN_SETTINGS) | set(RUN_ID_KEYS) | set(PROGRESS_FLAGS)


@exit_on_user_error
def main(argv=None):
    P = parse_args("train", argv)
    check_train_flags(P)
    make_deterministic(P.deterministic)  # before any CUDA work
    with stopped_by_signals() as where, distributed.joined(P.device) as device:
        return train(P, device, where)


def train(P, device, where):
    """The recipe: checkpoints and flags checked, the run folder claimed, then data -> model ->
    dissolver -> trainer -> fit -> files."""
    precision = device_precision(P.amp, device)  # of the device this process computes on, now set
    resume, resume_file, src_dir, warm = read_inputs(P)
    logdir = P.logdir or (src_dir if resume is not None else default_logdir(P))
    with RunFolder(logdir, writes_it, advice="wait for that training to end, or give this one another --logdir "
                                             "(or --suffix NAME)") as run:
        where["logdir"] = logdir
        if resume is not None:
            run.place_resumed((resume.get("meta") or {}).get("run_id"), resume_file, src_dir)
            if run.placement == "same":  # never from a checkpoint older than the folder's last.model
                check_not_rewinding(logdir, resume_file, resume)
        else:
            run.place_fresh(plain_settings(P), RESUME_IGNORES)

        set_seed(P.seed)
        train_set, test_set, info = get_dataset(P.dataset, P.data_root, image_size=P.img_size, seed=P.seed,
                                                aptos_all_grades=P.aptos_all_grades)
        normal_train, test_set = one_class_split(train_set, test_set, info, P.one_class_idx,
                                                 contamination_ratio=P.contamination_ratio, seed=P.seed)
        describe_data(info, P.one_class_idx)
        if P.dissolve_type == "diffusion":  # once the data are read: a wrong dataset or path is the first error
            check_dissolver_file(P)
        # the run's outputs never land among its data's files; what it is trained on, recorded and compared
        check_outside_data([("--logdir", logdir)], data_tree(train_set, test_set), P.dataset)
        inputs, accepted = run_inputs(P, train_set, test_set, info, resume, resume_file)
        # read now: missing out-of-distribution data stops the run before training
        ood_sets = load_ood_sets(P.ood_dataset, P.data_root, info) if P.one_class_idx is None and not P.no_eval else None
        if P.model.endswith("_imagenet") and info.image_size[0] < 64:
            warn(f"--model {P.model} is meant for 224-px images; {P.dataset} is {info.image_size[0]} px (use resnet18)")
        distributed.barrier()  # every rank has read the run folder before the main process writes to it

        dissolve = build_dissolve(P, device, info)
        model = build_model(P.model, n_classes=info.n_classes, simclr_dim=P.simclr_dim, n_shifts=P.K_shift,
                            width=P.resnet_width).to(device)
        if warm is not None:
            load_warm_start(model, warm, P)
        model = distributed.sync_batchnorm(model, device)  # as CSI converts its model (CUDA only)
        trainer = Trainer(TrainConfig.from_flags(vars(P)), model, device, dissolve=dissolve, precision=precision)
        notes = continue_run(trainer, run, resume, resume_file, src_dir, P) if resume is not None else []
        evaluate = (None if P.no_eval
                    else make_evaluate(P, normal_train, test_set, device, ood_sets, precision=precision))

        run.record(plain_settings(P), distributed.world_size(), resumed_from=resumed_from(resume, resume_file, trainer))
        rewound = run.rewind(trainer.keeps_row, resume.get("log_bytes") if resume is not None else None)
        logger = Logger(logdir)
        logger.log(describe_start(P, run, device, info, normal_train, test_set, trainer, resume_file))
        logger.log(precision_line(P.amp, precision, *device_facts(device)))
        if trainer.precision_change():
            logger.log(trainer.precision_change())
        if run.stale or rewound:
            logger.log(f"an interrupted attempt left {len(run.stale)} temporary file(s), {rewound.rows} scalars.csv "
                       f"row(s), {rewound.events} TensorBoard scalar(s) and {rewound.log_bytes} bytes of "
                       f"log.txt past this point: removed")
        for note in notes + accepted:
            logger.log(note)
        if notes:  # the best files as they are: selection.json names them from now on
            trainer.write_selection(logdir)
        try:
            last = trainer.fit(normal_train, logger, {**run_meta(P, run.run_id, info), **inputs}, evaluate=evaluate,
                               bars=not P.no_progress, progress_file=P.progress_file, shorten=shorter_run(P, info))
            if P.scoring_samples:
                write_scoring_reference(P, trainer, run.run_id,
                                        clean_normal_train(P, train_set, test_set, info, normal_train), info, device,
                                        precision, logger)
        finally:
            logger.close()

    best = {name: {k: b[k] for k in ("epoch", "metric", "value")} for name, b in trainer.best.items()}
    summary = {"last": last, "epoch": trainer.epoch, "step": trainer.step, "best": best, "logdir": logdir}
    distributed.main_writes(print, json.dumps(summary))
    return summary


# --------------------------------------------------------------------------- the recipe's steps


def check_train_flags(P):
    """Flags that cannot work together, refused before anything is read."""
    if P.multi_gpu:
        raise UserError("--multi_gpu (CSI's DataParallel) is not supported: train on several GPUs with torchrun --nproc_per_node=N train.py ... "
                        "(--batch_size is per GPU)")
    if P.num_workers is not None:
        raise UserError("--num_workers is not a flag of train.py: images are decoded once, by a thread pool sized to "
                        "the machine, and batched in the main process; drop the flag")
    if P.paper_rng_replay and distributed.env_world_size() > 1:
        raise UserError("--paper_rng_replay replays one process's generator stream; it does not run under torchrun: "
                        "drop it, or train in one process")


def writes_it(name):
    """Whether train.py writes the run folder's file ``name`` (atomically)."""
    return name in ("last.model", "last.scoring.pt", "config.json", "selection.json", "scalars.csv") or (
        name.startswith("best_") and name.endswith(".model")) or name.startswith("events.out.tfevents.")


def describe_data(info, one_class_idx):
    """On the console (main process), before training: the normal class by name and index, and the
    size the images are read at (a warning when most are upsampled)."""
    line, upsampled = describe_images(info)
    distributed.main_writes(print, normal_class_line(info.name, info.class_names, one_class_idx), flush=True)
    distributed.main_writes(print, line, flush=True)
    if upsampled:
        distributed.main_writes(warn, upsampled)


def default_logdir(P):
    # as CSI names its runs: the one-class part only when there is a normal class
    setting = "" if P.one_class_idx is None else f"_one_class_{P.one_class_idx}"
    name = f"{P.dataset}_{P.model}_{P.mode}_{P.shift_trans_type}{setting}_seed{P.seed}"
    if P.suffix:
        name += f"_{P.suffix}"
    return os.path.join("logs", name)


def read_inputs(P):
    """What the training starts from, read (into host memory: ``load_state_dict`` moves what the
    model and the optimisers hold) and checked before anything is written:
    ``(resume checkpoint, its file, its run folder, warm-start checkpoint)``."""
    if not P.resume_path:
        choose_class(P)
        warm = read_model_checkpoint(P.load_path, map_location="cpu") if P.load_path else None
        return None, None, None, warm
    resume_file, src_dir = resolve_resume(P.resume_path)
    resume = read_model_checkpoint(resume_file, map_location="cpu", flag="--resume_path")
    choose_class(P, recorded_class(resume.get("meta")), what=resume_file)  # the run's class, by name
    check_resume_flags(P, resume, resume_file, src_dir)
    return resume, resume_file, src_dir, None


def may_change_text():
    return ", ".join("--" + f for f in RESUME_MAY_CHANGE)


def check_resume_flags(P, ckpt, resume_file, src_dir):
    """Refuse a resume that would change the run, or that has nothing left to do."""
    args = (ckpt.get("meta") or {}).get("args") or {}
    if P.load_path:
        raise UserError(f"--load_path starts a new run from a model; a resumed run continues from its checkpoint "
                        f"{resume_file}: drop --load_path")
    diffs = changed_settings(args, plain_settings(P), RESUME_IGNORES | set(CREATION_ONLY))
    if diffs:
        raise UserError(f"--resume_path {P.resume_path}: the run was trained with "
                        f"{', '.join(old for old, _ in diffs)} (now {', '.join(new for _, new in diffs)}); a resumed "
                        f"run keeps its settings, only {may_change_text()} may change: pass the saved values, or "
                        f"start a new run in another --logdir")
    saved_world = int((ckpt.get("meta") or {}).get("world_size", 1))
    check_world_size(f"--resume_path {P.resume_path}: the run", saved_world, distributed.env_world_size(),
                     f"the same number (a global batch of {saved_world} x --batch_size {P.batch_size}): "
                     + ("python train.py ..." if saved_world == 1 else
                        f"torchrun --nproc_per_node={saved_world} train.py ..."))
    epoch, step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
    if epoch >= P.epochs:
        raise UserError(f"the run in {src_dir} already finished {epoch} of --epochs {P.epochs}; raise --epochs to "
                        f"train further")
    if P.max_steps is not None and step >= P.max_steps:
        raise UserError(f"the run in {src_dir} already made {step} steps, --max_steps {P.max_steps}; raise "
                        f"--max_steps (or leave it out) to train further")


def build_dissolve(P, device, info):
    """The dissolving strategy of a simclr_DIA run, or None. A setting it cannot work with is
    refused in the words of the flag that gave it."""
    if P.dissolve_type is None:
        return None
    try:
        dissolve = make_dissolve_fn(P.shift_trans_type, DissolveSettings.from_flags(vars(P)), device,
                                    info.native_kind)
    except SettingError as exc:
        flags = {name: "--" + DissolveSettings.flag_name(name) for name in exc.settings}
        raise UserError(exc.worded(flags)) from None
    meta = (dissolve.info or {}).get("meta") or {}  # a dissolver checkpoint's description
    if P.one_class_idx is None and meta.get("dataset") == P.dataset and meta.get("one_class_idx") is not None:
        warn(f"the dissolver {P.diffusion_model_path} was trained on class {meta['one_class_idx']} of {P.dataset} "
             f"only, this run is multi-class (every class normal; train_eval_ddpm.py --all_classes trains one on "
             f"all of them); dissolving with it anyway")
    return dissolve


def check_dissolver_file(P):
    """A diffusion_* run's dissolver: ``--diffusion_model_path`` given and there. Checked once the
    data are read, so that a wrong dataset or path is the first error; the hint trains one on
    this run's dataset and class."""
    if P.one_class_idx is None:
        classes = ["--all_classes"]
    elif P.normal_class is not None:
        classes = ["--normal_class", P.normal_class]
    else:
        classes = ["--one_class_idx", P.one_class_idx]
    hint = dict(resolution=P.diff_resolution, dataset=P.dataset, data_root=P.data_root, class_flags=classes)
    if not P.diffusion_model_path:
        raise UserError(f"--shift_trans_type {P.shift_trans_type} needs a dissolver trained on {P.dataset}: pass "
                        f"--diffusion_model_path CKPT; train one with: {train_command_hint(**hint)}")
    if not os.path.exists(P.diffusion_model_path):
        raise UserError(f"--diffusion_model_path {P.diffusion_model_path}: no such file; train a dissolver on "
                        f"{P.dataset} with: {train_command_hint(P.diffusion_model_path, **hint)}")


def shorter_run(P, info):
    """The flags that shorten a run, with their values (for the line that estimates its end)."""
    flags = [f"--epochs (now {P.epochs})", f"--max_batches_per_epoch (now {P.max_batches_per_epoch})",
             "--max_steps" + (f" (now {P.max_steps})" if P.max_steps is not None else "")]
    if is_folder_dataset(P.dataset):
        flags.append(f"a smaller --img_size (now {info.image_size[0]})")
    if P.dissolve_type == "diffusion":
        flags.append(f"a smaller dissolver (--diff_resolution, now {P.diff_resolution})")
    if not P.no_eval:
        flags.append(f"fewer evaluations during training (--save_step / --error_step, now every {P.error_step} "
                     f"epoch(s); --ood_samples, now {P.ood_samples}; --eval_max_test; or --no_eval)")
    return ", ".join(flags)


def load_warm_start(model, warm, P):
    try:
        model.load_state_dict(warm["model"], strict=not P.no_strict)
    except RuntimeError as exc:
        raise UserError(f"--load_path {P.load_path} does not fit --model {P.model} (width {P.resnet_width}): "
                        f"{str(exc).splitlines()[0]}; pass the flags it was trained with, or --no_strict") from None


def continue_run(trainer, run, resume, resume_file, src_dir, P):
    """Load the resumed checkpoint; a run continued as a new run takes its best_*.model files."""
    try:
        trainer.load_state(resume)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UserError(f"checkpoint {P.resume_path} does not fit this run's flags "
                        f"(model {P.model}, shift {P.shift_trans_type}): {str(exc).splitlines()[0]}") from None
    if run.placement == "new":
        run.copy_from(src_dir, {name: (f"of epoch {best.get('epoch')}", _is_checkpoint_of(best))
                                for name, best in (resume.get("best") or {}).items()})
        return []
    # in its own folder: the best files are what they hold (a kill may have come between a best
    # file and the checkpoint that records it), and selection.json names them
    trainer.best, notes = reconcile_best(run.path, trainer.best, (resume.get("meta") or {}).get("run_id"))
    return notes


def run_inputs(P, train_set, test_set, info, resume, resume_file):
    """What the run is trained on, for every checkpoint's meta: the data's fingerprint and the
    dissolver file's SHA-256. A resumed run compares them with what its checkpoint recorded and
    refuses a change unless --accept_changed_data, which records it (``accepted_changes``).
    Returns ``(inputs, log lines of the changes accepted now)``."""
    data = data_fingerprint(P.dataset, train_set, test_set, info)
    dissolver = None
    if P.dissolve_type == "diffusion" and P.diffusion_model_path:
        dissolver = {"path": os.path.abspath(P.diffusion_model_path), "sha256": file_sha256(P.diffusion_model_path)}
    inputs = {"data": data, "dissolver": dissolver, "accepted_changes": []}
    if resume is None:
        return inputs, []
    meta = resume.get("meta") or {}
    what = f"--resume_path {resume_file}: the run"
    advice = "start a new run in another --logdir"
    changes = check_same_data(meta.get("data"), data, what, P.accept_changed_data, where=f"--data_root {P.data_root}",
                              advice=advice)
    if dissolver is not None and check_same_file((meta.get("dissolver") or {}).get("sha256"), dissolver["sha256"],
                                                 what, P.diffusion_model_path, P.accept_changed_data, advice=advice):
        changes.append(f"the dissolver {P.diffusion_model_path} changed (SHA-256 {dissolver['sha256'][:12]})")
    inputs["accepted_changes"] = list(meta.get("accepted_changes") or [])
    if not changes:
        return inputs, []
    epoch, step = int(resume.get("epoch", 0)), int(resume.get("step", 0))
    inputs["accepted_changes"].append({"epoch": epoch, "step": step, "flag": "--accept_changed_data",
                                       "changes": changes})
    return inputs, [f"--accept_changed_data: going on from epoch {epoch} (step {step}) with changed inputs: "
                    + "; ".join(changes)]


def _is_checkpoint_of(best):
    def recorded(path):
        other = read_checkpoint(path, "checkpoint")
        return isinstance(other, dict) and (other.get("epoch"), other.get("step")) == (best.get("epoch"),
                                                                                       best.get("step"))
    return recorded


def resumed_from(resume, resume_file, trainer):
    if resume is None:
        return None
    return {"checkpoint": os.path.abspath(resume_file), "run_id": (resume.get("meta") or {}).get("run_id"),
            "epoch": trainer.epoch, "step": trainer.step}


def run_meta(P, run_id, info):
    """What every checkpoint of the run records about it."""
    return {
        "args": plain_settings(P), "run_id": run_id,
        "arch": P.model, "n_classes": info.n_classes, "n_shifts": P.K_shift, "simclr_dim": P.simclr_dim,
        "resnet_width": P.resnet_width, "world_size": distributed.world_size(),
        "dataset": P.dataset, "one_class_idx": P.one_class_idx, "image_size": list(info.image_size),
        "setting": "one_class" if P.one_class_idx is not None else "multi_class",
        "ood_dataset": None if P.one_class_idx is not None else list(P.ood_dataset or []),
        "class_names": list(info.class_names), "native_kind": info.native_kind,
        "normal_class": None if P.one_class_idx is None else str(info.class_names[P.one_class_idx]),
    }


def clean_normal_train(P, train_set, test_set, info, normal_train):
    """The normal training images without ``--contamination_ratio``'s others: eval.py's CSI axes."""
    if not P.contamination_ratio:
        return normal_train
    return one_class_split(train_set, test_set, info, P.one_class_idx, seed=P.seed)[0]


def write_scoring_reference(P, trainer, run_id, normal_train, info, device, precision, logger):
    """``last.scoring.pt`` next to ``last.model`` (``evals.scoring_reference``): the normal
    training images' CSI statistics, their leave-one-out scores and the threshold, taken with
    the paper's eval protocol (rotation, ``--scoring_samples`` samples, crop scale fixed at
    0.54), so that ``eval.py --score_folder`` scores new images without the training data.
    Under torchrun every rank extracts its share; the main process writes."""
    distributed.buffers_from_main(trainer.model)  # the BatchNorm statistics last.model holds (CPU ranks differ)
    protocol = ScoringProtocol(samples=P.scoring_samples, batch_size=P.test_batch_size, amp=precision)
    identity = {"model_file": "last.model", "model_digest": model_digest(trainer.model.state_dict()),
                "run_id": run_id, "epoch": trainer.epoch, "step": trainer.step, "dataset": P.dataset,
                "one_class_idx": P.one_class_idx,
                "normal_class": None if P.one_class_idx is None else str(info.class_names[P.one_class_idx]),
                "image_size": list(info.image_size)}
    ref = compute_reference(trainer.model, normal_train, device, protocol, identity,
                            sharded=distributed.is_distributed())
    path = os.path.join(logger.logdir, "last.scoring.pt")
    if distributed.is_main():
        write_reference(ref, path)
    few = "" if ref["train_scores"] else f"; no threshold: {ref['n_train']} normal training image(s), fewer than 2"
    logger.log(f"scoring reference {path}: {ref['n_train']} normal training images, {protocol.samples} sample(s), "
               f"crop scale {protocol.resize_factor:g} fixed; threshold "
               + (", ".join(f"{s} {v:.4f}" for s, v in ref["threshold"].items()) or "none")
               + f" ({ref['threshold_quantile']:g} quantile of the leave-one-out scores){few}")


def describe_start(P, run, device, info, normal_train, test_set, trainer, resume_file):
    """The first line of the run's log: where, on what, from where."""
    what = {"same": f"; resuming after epoch {trainer.epoch} (step {trainer.step})",
            "new": f"; continuing {resume_file} (epoch {trainer.epoch}, step {trainer.step}) as a new run",
            "restart": "; restarting: the interrupted attempt wrote no checkpoint"}.get(run.placement, "")
    if P.one_class_idx is None:
        normal = (f"{len(normal_train)} training images of all {info.n_classes} classes (unlabeled multi-class "
                  f"setting)")
    else:
        normal = f"{len(normal_train)} training images of class {P.one_class_idx} ({info.class_names[P.one_class_idx]})"
    world = distributed.world_size()
    procs = (f"{world} processes (torchrun), global batch {world} x --batch_size {P.batch_size}; " if world > 1
             else "")
    return (f"run folder {run.path}; device {device}; {procs}{normal}; {len(test_set)} test images; "
            f"mode {P.mode}, shift {P.shift_trans_type}" + what)


def make_evaluate(P, normal_train, test_set, device, ood_sets=None, precision="fp32"):
    """The evaluation during training that selects ``best_CSI.model`` (``evals.selection``):
    by default the paper's (CSI, 10 samples, crop scale in [0.54, 1], the full sets); in the
    multi-class setting against ``ood_sets`` (``datasets.load_ood_sets``); its forward passes in
    ``precision`` (the training's)."""
    try:
        return SelectionEvaluation(normal_train, test_set, P.one_class_idx, device, n_shifts=P.K_shift,
                                   samples=P.ood_samples, resize_factor=P.eval_resize_factor,
                                   resize_fix=P.eval_resize_fix, max_train=P.eval_max_train,
                                   max_test=P.eval_max_test, batch_size=P.test_batch_size, amp=precision,
                                   seed=P.seed, ood_sets=ood_sets, interp_batch=P.test_batch_size)
    except SettingError as exc:  # e.g. --eval_max_test leaving one class only: an undefined AUROC
        raise UserError(exc.worded({"max_test": "--eval_max_test", "max_train": "--eval_max_train"})) from None


# --------------------------------------------------------------------------- signals


class Interrupted(Exception):
    """SIGTERM (or SIGINT) arrived: unwind, so that temporary files and the lock go away."""


def _on_signal(signum, frame):
    raise Interrupted(signum)


class stopped_by_signals:
    """SIGTERM and SIGINT unwind the training (temporary files and the lock go away) and end the
    process with ``128 + signal`` and one line saying how to continue. Yields a dict in which
    the program puts ``logdir`` once it has one."""

    def __enter__(self):
        self.where = {"logdir": None}
        self.handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.handlers[sig] = signal.signal(sig, _on_signal)
        return self.where

    def __exit__(self, kind, exc, tb):
        for sig, old in self.handlers.items():
            signal.signal(sig, old)
        if kind is None or not issubclass(kind, (Interrupted, KeyboardInterrupt)):
            return False
        sig = exc.args[0] if isinstance(exc, Interrupted) else signal.SIGINT
        where = self.where["logdir"]
        if where and os.path.exists(os.path.join(where, "last.model")):
            how = f"continue it with the same flags and --resume_path {where}"
        else:
            how = "no checkpoint was written yet: run the same command again"
        print(f"interrupted by {signal.Signals(sig).name}: training in {where or 'no run folder yet'} stopped; {how}",
              file=sys.stderr, flush=True)
        sys.exit(128 + int(sig))


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
