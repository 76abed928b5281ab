"""What a study's rerun does with the runs an earlier command left: nothing a training wrote is
ever removed.

A run folder's ``run.json`` records the settings it was made with (its ``config``, which holds
the digest of the data's fingerprint, ``datasets.fingerprint``). When the settings now differ:

* only in evaluation settings (``--ood_samples``): the kept model is evaluated again;
* only in what ``train.py --resume_path`` lets a run change (``--epochs``, ``--max_steps``), and
  the run is not finished: its training is resumed with the new budget;
* otherwise, when the folder holds a finished run or a training's files: the command is
  refused before any work, in one line naming the flags, the run folder, and how to go on.

A run is finished when its ``results.json`` carries the study's mark (``eval_seconds``, written
once every evaluation succeeded), no ``failed.json`` says otherwise and its settings are today's:
a run whose evaluation failed after writing part of its outputs counts as failed.
"""
import json
import os

from common.checkpoint_io import read_model_checkpoint
from common.errors import UserError
from datasets.fingerprint import data_changes

# where a run's setting comes from: the flag of reproduce.py that sets it
SETTING_FLAGS = {
    "train.epochs": "--epochs", "train.batch_size": "--batch_size", "train.max_batches_per_epoch":
        "--max_batches_per_epoch", "train.max_steps": "--max_steps", "train.warmup": "--warmup",
    "train.resnet_width": "--resnet_width", "train.amp": "--amp", "train.extra": "--train_args",
    "train.nproc_per_run": "--nproc_per_run", "eval.ood_samples": "--ood_samples", "eval.amp": "--amp",
    "selection": "--save_step / --selection_samples / --selection_max_images / --no_selection",
    "dissolver": "--ddpm_unet_dim / --ddpm_train_steps / --ddpm_batch_size / --ddpm_grad_accum",
    "model": "--model", "resize_to_constant": "--resize_to_constant", "ood_dataset": "--ood_dataset",
    "img_size": "--img_size", "data": "--data_root (the data's files)",
}
EVAL_ONLY = {"eval.ood_samples", "eval.amp"}
RESUMABLE = {"train.epochs", "train.max_steps"}  # as train.py's RESUME_MAY_CHANGE lets a resume change them
TRAINING_FILES = ("last.model", "config.json")  # a folder holding one of these (or a best_*.model) holds a training


def recorded_config(run):
    """The settings a run folder's ``run.json`` records (None if there is none to read), in
    today's spelling: folders made before ``--amp`` took ``auto|on|off`` recorded it as
    true/false, which meant ``on``/``off``."""
    doc = read_run_json(run)
    config = doc.get("config") if doc else None
    if not isinstance(config, dict):
        return None
    for part in ("train", "eval"):
        section = config.get(part)
        if isinstance(section, dict) and isinstance(section.get("amp"), bool):
            section["amp"] = "on" if section["amp"] else "off"
    return config


def read_run_json(run):
    try:
        with open(run.path("run.json")) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def attach_data(runs, fingerprint):
    """Each run (and its dissolver) records the fingerprint of its dataset: its digest is one of
    the run's settings, so runs on other data never share a cell."""
    for run in runs:
        run.data_fingerprint = fingerprint
        run.config["data"] = fingerprint["digest"][:16]
        if run.dissolver is not None:
            run.dissolver["data"] = fingerprint["digest"][:16]


def config_diffs(old, new):
    """``[(setting, old value, new value)]`` where ``new`` differs from ``old`` (a setting one of
    them lacks is None there); the sections
    ``train`` and ``eval`` compare key by key (``train.epochs``). A setting that ``old`` lacks and
    that records data (``data``: folders made before runs recorded their data) is not compared."""
    new = json.loads(json.dumps(new))
    diffs = []
    for key in dict.fromkeys(list(new) + list(old)):
        if key == "data" and key not in old:
            continue
        before, value = old.get(key), new.get(key)
        if key in ("train", "eval") and isinstance(value, dict) and isinstance(before, dict):
            for sub in dict.fromkeys(list(before) + list(value)):
                if before.get(sub) != value.get(sub):
                    diffs.append((f"{key}.{sub}", before.get(sub), value.get(sub)))
        elif before != value:
            diffs.append((key, before, value))
    return diffs


def change_kind(diffs):
    """``None`` (the same settings), ``"eval"`` (only evaluation settings differ), ``"resume"``
    (only what a resume may change, and evaluation settings) or ``"train"``."""
    keys = {k for k, _, _ in diffs}
    if not keys:
        return None
    if keys <= EVAL_ONLY:
        return "eval"
    if keys <= EVAL_ONLY | RESUMABLE:
        return "resume"
    return "train"


def _value(v):
    if isinstance(v, list):
        return " ".join(map(str, v)) or "(none)"
    return "(not set)" if v is None else str(v)


def describe(diffs, run):
    """The differences as flags: ``--epochs 2 (now 3)``, the data's changes in words."""
    out = []
    doc = read_run_json(run) or {}
    for key, old, new in diffs:
        flag = SETTING_FLAGS.get(key, key)
        if key == "data":
            changes = data_changes(doc.get("data_fingerprint"), run.data_fingerprint)
            out.append(f"{flag}: {'; '.join(changes)[:200]}" if changes else f"{flag}: other data")
        elif key in ("selection", "dissolver") or isinstance(old, dict) or isinstance(new, dict):
            out.append(f"{flag}: {key} {old} (now {new})")
        else:
            out.append(f"{flag} {_value(old)} (now {_value(new)})")
    return "; ".join(out)


def is_finished(run):
    """Whether the run's evaluation completed with today's settings: ``results.json`` carries
    the study's mark and no ``failed.json`` says otherwise."""
    try:
        with open(run.path("results.json")) as fh:
            results = json.load(fh)
    except (OSError, ValueError):
        return False
    if not isinstance(results, dict) or "eval_seconds" not in results or os.path.exists(run.path("failed.json")):
        return False
    old = recorded_config(run)
    return old is not None and change_kind(config_diffs(old, run.config)) is None


def holds_training(run):
    """Whether the run folder holds what a training wrote (a checkpoint or a run's config)."""
    try:
        names = os.listdir(run.dir)
    except OSError:
        return False
    return any(n in TRAINING_FILES or (n.startswith("best_") and n.endswith(".model")) for n in names)


def check_reruns(runs):
    """Before any work: refuse a rerun whose settings would change a run that a folder already
    holds (a finished run, or a training's files) in a way that neither a new evaluation nor a
    resume can give (one line: the flags, the folder, how to go on)."""
    for run in runs:
        old = recorded_config(run)
        if old is None:
            continue
        diffs = config_diffs(old, run.config)
        kind = change_kind(diffs)
        results = os.path.exists(run.path("results.json"))
        if kind in (None, "eval") or (kind == "resume" and not results) or not (results or holds_training(run)):
            continue
        what = "a finished run" if results else "the training of a run"
        top = dict.fromkeys(k.split(".")[0] for k, _, _ in diffs)
        detail = "; ".join(f"{k}: {old.get(k)} (now {run.config.get(k)})" for k in top)
        raise UserError(f"{run.dir} holds {what} made with other settings: {describe(diffs, run)} "
                        f"[{detail[:300]}]. A rerun keeps what a training wrote: pass the recorded values, or use "
                        f"another --out")


def training_state(a, run):
    """What the run's ``last.model`` says is left to do with the budget of ``a``: ``"finished"``,
    ``"resume"``, ``"beyond"`` (it has trained past the budget: a lowered ``--epochs`` or
    ``--max_steps``), or None (no checkpoint: train from the start, or restart an attempt that
    wrote none). An unreadable ``last.model`` is a UserError (the file is kept)."""
    path = run.path("last.model")
    if not os.path.exists(path):
        return None
    ckpt = read_model_checkpoint(path, "cpu", flag="--resume_path")
    args = (ckpt.get("meta") or {}).get("args") or {}
    epoch, step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
    epochs = a.epochs if a.epochs is not None else args.get("epochs")
    max_steps = a.max_steps
    if epochs is None:
        return "resume"
    if epoch > epochs or (max_steps is not None and step > max_steps):
        return "beyond"
    if epoch == epochs or (max_steps is not None and step == max_steps):
        return "finished"
    return "resume"
