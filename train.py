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
only ``cli.args.RESUME_MAY_CHANGE`` may differ. A checkpoint never holds NaN or infinity.

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
import uuid

from common import distributed
from cli.args import RESUME_MAY_CHANGE, parse_args
from common.errors import UserError, exit_on_user_error
from common.paths import check_run_folder, same_path
from common.run_folder import Rewound, lock_folder, rewind_records
from utils import Logger, atomic_write_json, remove_stale_temps, set_seed

# flags that are no setting of a run: names of folders and files, eval.py's own flags, derived values
NOT_RUN_SETTINGS = ("logdir", "suffix", "resume_path", "local_rank", "program", "dissolve_type", "base_shift",
                    "K_shift", "ood_score", "ood_layer", "ood_batch_size", "print_score", "save_score",
                    "save_results", "save_scores_csv", "score_folder", "threshold_quantile", "one_class_given")
CREATION_ONLY = ("load_path", "no_strict")  # a warm start, applied when the run is created
RUN_ID_KEYS = ("run_id", "resumed_from", "world_size")  # what config.json holds besides the flags


def writes_it(name):
    """Whether train.py writes the run folder's file ``name`` (atomically)."""
    return name in ("last.model", "config.json", "selection.json", "scalars.csv") or (
        name.startswith("best_") and name.endswith(".model")) or name.startswith("events.out.tfevents.")


def default_logdir(P):
    # as CSI names its runs: the one-class part only when there is a normal class
    setting = "" if P.one_class_idx is None else f"_one_class_{P.one_class_idx}"
    name = f"{P.dataset}_{P.model}_{P.mode}_{P.shift_trans_type}{setting}_seed{P.seed}"
    if P.suffix:
        name += f"_{P.suffix}"
    return os.path.join("logs", name)


def resolve_resume(path):
    """A run folder or a checkpoint file -> (checkpoint path, run folder)."""
    if os.path.isdir(path):
        ckpt = os.path.join(path, "last.model")
        if not os.path.isfile(ckpt):
            raise UserError(f"--resume_path {path} is a folder without last.model; point it at a run folder "
                            f"written by train.py or at a .model checkpoint")
        return ckpt, path
    if not os.path.lexists(path):
        raise UserError(f"--resume_path {path} does not exist")
    return path, os.path.dirname(os.path.abspath(path))


def load_model_checkpoint(path, device, flag="--load_path"):
    """Read a checkpoint written by train.py; one plain line for anything else
    (``common.checkpoint_io``: unreadable, truncated, foreign, a dissolver, ...)."""
    from common.checkpoint_io import read_model_checkpoint

    return read_model_checkpoint(path, map_location=device, flag=flag)


def run_args(P):
    """The flags as recorded in config.json and the checkpoints."""
    return {k: v for k, v in vars(P).items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def show_flag(key, value):
    if key == "amp":  # decided once (--amp auto/on/off): recorded as on or off
        return f"--amp {'on' if value else 'off'}"
    if isinstance(value, bool) or value is None:
        return f"--{key}" if value else f"no --{key}"
    if isinstance(value, (list, tuple)):
        return f"--{key} {' '.join(map(str, value))}"
    return f"--{key} {value}"


def changed_settings(saved, P, skip=()):
    """``(saved, given)`` pairs of the run settings in which ``P`` differs from ``saved`` (a dict of
    recorded flags); the flags a run may change, and those in ``skip``, are left out."""
    ignore = set(RESUME_MAY_CHANGE) | set(NOT_RUN_SETTINGS) | set(RUN_ID_KEYS) | set(skip)
    now = run_args(P)
    diffs = []
    for key, old in saved.items():
        if key in ignore or key not in now:
            continue  # a flag this version does not know, or one that may change
        new = now[key]
        if key == "diffusion_model_path" and old and new and same_path(old, new):
            continue
        if isinstance(old, tuple):
            old = list(old)
        if old != new:
            diffs.append((show_flag(key, old), show_flag(key, new)))
    return diffs


def may_change_text():
    return ", ".join("--" + f for f in RESUME_MAY_CHANGE)


def read_run_config(logdir):
    """config.json of a run folder: a dict, {} when unreadable, None when there is none."""
    path = os.path.join(logdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def check_resume_flags(P, ckpt, resume_file, src_dir):
    """Refuse a resume that would change the run, or that has nothing left to do."""
    args = (ckpt.get("meta") or {}).get("args") or {}
    if P.load_path:
        raise UserError(f"--load_path starts a new run from a model; a resumed run continues from its checkpoint "
                        f"{resume_file}: drop --load_path")
    diffs = changed_settings(args, P, skip=CREATION_ONLY)
    if diffs:
        raise UserError(f"--resume_path {P.resume_path}: the run was trained with "
                        f"{', '.join(old for old, _ in diffs)} (now {', '.join(new for _, new in diffs)}); a resumed "
                        f"run keeps its settings, only {may_change_text()} may change: pass the saved values, or "
                        f"start a new run in another --logdir")
    saved_world, world = int((ckpt.get("meta") or {}).get("world_size", 1)), distributed.env_world_size()
    if saved_world != world:
        raise UserError(f"--resume_path {P.resume_path}: the run was trained by {saved_world} process(es) (a global "
                        f"batch of {saved_world} x --batch_size {P.batch_size}), this is {world}; resume it with "
                        f"the same number: " + ("python train.py ..." if saved_world == 1 else
                                                f"torchrun --nproc_per_node={saved_world} train.py ..."))
    epoch, step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
    if epoch >= P.epochs:
        raise UserError(f"the run in {src_dir} already finished {epoch} of --epochs {P.epochs}; raise --epochs to "
                        f"train further")
    if P.max_steps is not None and step >= P.max_steps:
        raise UserError(f"the run in {src_dir} already made {step} steps, --max_steps {P.max_steps}; raise "
                        f"--max_steps (or leave it out) to train further")


def check_resume_target(ckpt, resume_file, src_dir, logdir):
    """Where the resumed run goes (called holding the folder's lock): ``"same"`` (on in its own
    folder) or ``"new"`` (on as a new run in an empty --logdir); another run's folder is refused."""
    run_id = (ckpt.get("meta") or {}).get("run_id")
    config = read_run_config(logdir)
    holds_run = config is not None or os.path.exists(os.path.join(logdir, "last.model"))
    if not holds_run:
        return "same" if same_path(logdir, src_dir) else "new"
    folder_id = (config or {}).get("run_id")
    if folder_id and run_id:
        if folder_id == run_id:
            return "same"
    elif same_path(logdir, src_dir):  # a run folder of an earlier version (no run id): its own checkpoint
        return "same"
    raise UserError(f"--logdir {logdir} holds another training run (run {folder_id or 'without id'}); "
                    f"{resume_file} belongs to run {run_id or 'without id'} of {src_dir}: continue it there "
                    f"(leave out --logdir), or give an empty --logdir to continue it as a new run")


def check_fresh_start(P, logdir):
    """A new run: refuse a folder holding another run; ``(config, restart)``: the folder's
    config.json when it holds this very run, which was interrupted before its first checkpoint."""
    if os.path.exists(os.path.join(logdir, "last.model")):
        raise UserError(f"{logdir} already holds a training run; continue it with --resume_path {logdir}, "
                        f"or start a new one with --suffix NAME or --logdir DIR")
    config = read_run_config(logdir)
    if config is None:
        return None
    diffs = changed_settings(config, P)
    if diffs or not config:
        what = (f"was started with {', '.join(old for old, _ in diffs)} (now {', '.join(new for _, new in diffs)})"
                if diffs else "has an unreadable config.json")
        raise UserError(f"{logdir} holds another run that saved no checkpoint yet: it {what}; start this run in "
                        f"another --logdir (or with --suffix NAME), or repeat that run's flags to restart it")
    return config


def copy_best_files(ckpt, src_dir, logdir):
    """A run continued as a new run in another folder takes the best_*.model files its
    checkpoint refers to (when they are the ones it recorded), so its selection stays whole."""
    import shutil

    from common.checkpoint_io import read_checkpoint
    from utils import atomic_write

    for name, best in (ckpt.get("best") or {}).items():
        src = os.path.join(src_dir, name)
        other = read_checkpoint(src, "checkpoint") if os.path.isfile(src) else None
        if not isinstance(other, dict) or (other.get("epoch"), other.get("step")) != (best.get("epoch"),
                                                                                     best.get("step")):
            raise UserError(f"cannot continue the run of {src_dir} as a new run in {logdir}: its {name} of epoch "
                            f"{best.get('epoch')} is no longer in {src_dir}; continue it in {src_dir} itself")

        def copy(fh, src=src):
            with open(src, "rb") as s:
                shutil.copyfileobj(s, fh)

        atomic_write(os.path.join(logdir, name), copy)


def build_dissolve(P, device, info):
    """The dissolving function of a simclr_DIA run, or None."""
    if P.dissolve_type is None:
        return None
    from models.dissolve import make_dissolve_fn

    dissolve = make_dissolve_fn(P.shift_trans_type, P, device, info.native_kind)
    described = getattr(dissolve, "info", None)  # a dissolver checkpoint's description (models/dissolve.py)
    meta = (described.get("meta") or {}) if isinstance(described, dict) else {}
    if P.one_class_idx is None and meta.get("dataset") == P.dataset and meta.get("one_class_idx") is not None:
        from utils import warn

        warn(f"the dissolver {P.diffusion_model_path} was trained on class {meta['one_class_idx']} of {P.dataset} "
             f"only, this run is multi-class (every class normal; train_eval_ddpm.py --all_classes trains one on "
             f"all of them); dissolving with it anyway")
    return dissolve


def make_evaluate(P, normal_train, test_set, device, ood_sets=None):
    """The evaluation during training that selects ``best_CSI.model`` (``evals.selection``):
    by default the paper's (CSI, 10 samples, crop scale in [0.54, 1], the full sets); in the
    multi-class setting against ``ood_sets`` (``datasets.load_ood_sets``)."""
    from evals.selection import SelectionEvaluation

    return SelectionEvaluation(normal_train, test_set, P.one_class_idx, device, n_shifts=P.K_shift,
                               samples=P.ood_samples, resize_factor=P.eval_resize_factor,
                               resize_fix=P.eval_resize_fix, max_train=P.eval_max_train,
                               max_test=P.eval_max_test, batch_size=P.test_batch_size, amp=P.amp, seed=P.seed,
                               ood_sets=ood_sets, interp_batch=P.test_batch_size)


class Interrupted(Exception):
    """SIGTERM (or SIGINT) arrived: unwind, so that temporary files and the lock go away."""


def _on_signal(signum, frame):
    raise Interrupted(signum)


@exit_on_user_error
def main(argv=None):
    P = parse_args("train", argv)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, _on_signal)
    logdir = [None]
    try:
        return train(P, logdir)
    except (Interrupted, KeyboardInterrupt) as exc:
        sig = exc.args[0] if isinstance(exc, Interrupted) else signal.SIGINT
        name = signal.Signals(sig).name
        where = logdir[0]
        if where and os.path.exists(os.path.join(where, "last.model")):
            how = f"continue it with the same flags and --resume_path {where}"
        else:
            how = "no checkpoint was written yet: run the same command again"
        print(f"interrupted by {name}: training in {where or 'no run folder yet'} stopped; {how}", file=sys.stderr,
              flush=True)
        sys.exit(128 + int(sig))
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


class Inputs:
    """What a training starts from, read and checked before anything is written: the checkpoint
    of ``--resume_path`` (with its file and run folder) or the model of ``--load_path``."""

    def __init__(self, resume=None, resume_file=None, src_dir=None, warm=None):
        self.resume, self.resume_file, self.src_dir, self.warm = resume, resume_file, src_dir, warm


def train(P, logdir_out):
    """Check the flags, join torchrun's process group when there is one, train."""
    if P.multi_gpu:
        raise UserError("--multi_gpu is gone: train on several GPUs with torchrun --nproc_per_node=N train.py ... "
                        "(--batch_size is per GPU)")
    if P.paper_rng_replay and distributed.env_world_size() > 1:
        raise UserError("--paper_rng_replay replays one process's generator stream; it does not run under torchrun: "
                        "drop it, or train in one process")
    with distributed.joined(P.device) as device:
        return train_on(P, device, logdir_out)


def train_on(P, device, logdir_out):
    """Check the flags against the run folder, lock it (the main process), train; ``logdir_out[0]``
    gets the folder."""

    # everything that can fail on user input is checked before anything is written
    if P.resume_path:
        resume_file, src_dir = resolve_resume(P.resume_path)
        inputs = Inputs(load_model_checkpoint(resume_file, device, flag="--resume_path"), resume_file, src_dir)
        check_resume_flags(P, inputs.resume, resume_file, src_dir)
        logdir = P.logdir or src_dir
    else:
        inputs = Inputs(warm=load_model_checkpoint(P.load_path, device) if P.load_path else None)
        logdir = P.logdir or default_logdir(P)
    check_run_folder(logdir, "--logdir")
    # one process per run folder: the lock dies with the process (a folder made for it goes if refused)
    lock = distributed.main_writes(lock_folder, logdir, f"run folder {logdir}",
                                   "wait for that training to end, or give this one another --logdir (or --suffix "
                                   "NAME)")
    logdir_out[0] = logdir
    try:
        # what a killed write of ours left, under the lock
        stale = distributed.main_writes(remove_stale_temps, logdir, writes_it) or ()
        return train_locked(P, device, logdir, inputs, stale)
    finally:
        if lock is not None:
            lock.release()


def train_locked(P, device, logdir, inputs, stale=()):
    from datasets import get_dataset, one_class_split
    from models.resnet import build_model
    from training.trainer import Trainer

    resume_ckpt, resume_file, src_dir, warm = inputs.resume, inputs.resume_file, inputs.src_dir, inputs.warm
    if resume_ckpt is not None:
        placement = check_resume_target(resume_ckpt, resume_file, src_dir, logdir)  # "same" or "new"
        config = None
    else:
        config = check_fresh_start(P, logdir)
        placement = "restart" if config is not None else "create"
    set_seed(P.seed)
    train_set, test_set, info = get_dataset(P.dataset, P.data_root, image_size=P.img_size, seed=P.seed,
                                            aptos_all_grades=P.aptos_all_grades)
    normal_train, test_set = one_class_split(train_set, test_set, info, P.one_class_idx,
                                             contamination_ratio=P.contamination_ratio, seed=P.seed)
    ood_sets = None
    if P.one_class_idx is None and not P.no_eval:  # read now: missing data stops the run before training
        from datasets import load_ood_sets

        ood_sets = load_ood_sets(P.ood_dataset, P.data_root, info)
    if P.model.endswith("_imagenet") and info.image_size[0] < 64:
        from utils import warn

        warn(f"--model {P.model} is meant for 224-px images; {P.dataset} is {info.image_size[0]} px (use resnet18)")
    distributed.barrier()  # every rank has read the run folder before the main process writes to it
    dissolve = build_dissolve(P, device, info)
    model = build_model(P.model, n_classes=info.n_classes, simclr_dim=P.simclr_dim, n_shifts=P.K_shift,
                        width=P.resnet_width).to(device)
    if warm is not None:
        try:
            model.load_state_dict(warm["model"], strict=not P.no_strict)
        except RuntimeError as exc:
            raise UserError(f"--load_path {P.load_path} does not fit --model {P.model} (width {P.resnet_width}): "
                            f"{str(exc).splitlines()[0]}; pass the flags it was trained with, or --no_strict") from None
    model = distributed.sync_batchnorm(model, device)  # as CSI converts its model (CUDA only)
    trainer = Trainer(P, model, device, dissolve=dissolve)
    if resume_ckpt is not None:
        try:
            trainer.load_state(resume_ckpt)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"checkpoint {P.resume_path} does not fit this run's flags "
                            f"(model {P.model}, shift {P.shift_trans_type}): {str(exc).splitlines()[0]}") from None
        if placement == "new":
            copy_best_files(resume_ckpt, src_dir, logdir)

    # the run's identity: config.json is written once, when the run is created
    args = run_args(P)
    if placement == "same":
        run_id = (resume_ckpt.get("meta") or {}).get("run_id")
        config = read_run_config(logdir)
        if config is None:  # a folder of an earlier version that lost it
            atomic_write_json(dict(args, run_id=run_id, world_size=distributed.world_size()),
                              os.path.join(logdir, "config.json"))
    elif placement == "restart":
        run_id = config.get("run_id")
    else:  # "create", or "new": a checkpoint continued as a new run in an empty folder
        run_id = uuid.uuid4().hex
        record = dict(args, run_id=run_id, world_size=distributed.world_size())
        if resume_ckpt is not None:
            record["resumed_from"] = {"checkpoint": os.path.abspath(resume_file),
                                      "run_id": (resume_ckpt.get("meta") or {}).get("run_id"),
                                      "epoch": trainer.epoch, "step": trainer.step}
        atomic_write_json(record, os.path.join(logdir, "config.json"))

    rewound = None
    if placement != "create":  # the interrupted attempt's records past this point go
        rewound = distributed.main_writes(rewind_records, logdir, trainer.keeps_row,
                                          resume_ckpt.get("log_bytes") if placement == "same" else None)
    logger = Logger(logdir)
    meta = {
        "args": args, "run_id": run_id,
        "arch": P.model, "n_classes": info.n_classes, "n_shifts": P.K_shift, "simclr_dim": P.simclr_dim,
        "resnet_width": P.resnet_width, "world_size": distributed.world_size(),
        "dataset": P.dataset, "one_class_idx": P.one_class_idx, "image_size": list(info.image_size),
        "setting": "one_class" if P.one_class_idx is not None else "multi_class",
        "ood_dataset": None if P.one_class_idx is not None else list(P.ood_dataset or []),
        "class_names": list(info.class_names), "native_kind": info.native_kind,
    }
    what = {"same": f"; resuming after epoch {trainer.epoch} (step {trainer.step})",
            "new": f"; continuing {resume_file} (epoch {trainer.epoch}, step {trainer.step}) as a new run",
            "restart": "; restarting: the interrupted attempt wrote no checkpoint"}.get(placement, "")
    if P.one_class_idx is None:
        normal = (f"{len(normal_train)} training images of all {info.n_classes} classes (unlabeled multi-class "
                  f"setting)")
    else:
        normal = f"{len(normal_train)} training images of class {P.one_class_idx} ({info.class_names[P.one_class_idx]})"
    world = distributed.world_size()
    procs = (f"{world} processes (torchrun), global batch {world} x --batch_size {P.batch_size}; " if world > 1
             else "")
    logger.log(f"run folder {logdir}; device {device}; {procs}{normal}; {len(test_set)} test images; "
               f"mode {P.mode}, shift {P.shift_trans_type}" + what)
    if stale or rewound:
        rewound = rewound or Rewound()
        logger.log(f"an interrupted attempt left {len(stale)} temporary file(s), {rewound.rows} scalars.csv "
                   f"row(s), {rewound.events} TensorBoard scalar(s) and {rewound.log_bytes} bytes of "
                   f"log.txt past this point: removed")
    evaluate = None if P.no_eval else make_evaluate(P, normal_train, test_set, device, ood_sets)
    try:
        last = trainer.fit(normal_train, logger, meta, evaluate=evaluate)
    finally:
        logger.close()
    best = {name: {k: b[k] for k in ("epoch", "metric", "value")} for name, b in trainer.best.items()}
    summary = {"last": last, "epoch": trainer.epoch, "step": trainer.step, "best": best, "logdir": logdir}
    distributed.main_writes(print, json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
