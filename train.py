"""Train a contrastive one-class model: CSI (``--mode simclr_CSI``) or DIA (``--mode simclr_DIA``).

Writes ``last.model`` (the model at the end: the honest figure) and, as the paper's train.py,
evaluates on the test set every ``--save_step`` epochs and keeps the best as ``best_CSI.model``
(``selection.json`` says which rule produced which file; ``--no_eval`` skips it).

Example (the paper's command):
    python train.py --data_root ../data --dataset kvasir --model resnet18_imagenet --mode simclr_DIA \
        --shift_trans_type diffusion_rotation --diff_resolution 32 --batch_size 32 --one_class_idx 0 \
        --save_step 1 --diffusion_model_path diffusion_models/ckpts/kvasir_0_32px.pt
"""
import json
import os
import sys

import torch

from common.args import parse_args
from common.device import pick_device
from common.errors import UserError, exit_on_user_error
from utils import Logger, atomic_write_json, set_seed

RUN_FILES = ("last.model",)


def default_logdir(P):
    name = f"{P.dataset}_{P.model}_{P.mode}_{P.shift_trans_type}_one_class_{P.one_class_idx}"
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
    if not os.path.isfile(path):
        raise UserError(f"--resume_path {path} does not exist")
    return path, os.path.dirname(os.path.abspath(path))


def load_model_checkpoint(path, device):
    """Read a checkpoint written by train.py; one clear error for anything else."""
    from training.trainer import CHECKPOINT_KIND

    if not os.path.isfile(path):
        raise UserError(f"model checkpoint {path} does not exist (train.py writes <logdir>/last.model)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise UserError(f"cannot read model checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        what = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a model checkpoint written by train.py (found {what!r}); "
                        f"a dissolver checkpoint goes to --diffusion_model_path")
    return ckpt


def build_dissolve(P, device, info):
    """The dissolving function of a simclr_DIA run, or None."""
    if P.dissolve_type is None:
        return None
    from models.dissolve import make_dissolve_fn

    return make_dissolve_fn(P.shift_trans_type, P, device, info.native_kind)


def make_evaluate(P, normal_train, test_set, device):
    """The evaluation during training that selects ``best_CSI.model`` (``evals.selection``):
    by default the paper's (CSI, 10 samples, crop scale in [0.54, 1], the full sets)."""
    from evals.selection import SelectionEvaluation

    return SelectionEvaluation(normal_train, test_set, P.one_class_idx, device, n_shifts=P.K_shift,
                               samples=P.ood_samples, resize_factor=P.eval_resize_factor,
                               resize_fix=P.eval_resize_fix, max_train=P.eval_max_train,
                               max_test=P.eval_max_test, batch_size=P.test_batch_size, amp=P.amp, seed=P.seed)


@exit_on_user_error
def main(argv=None):
    P = parse_args("train", argv)
    from datasets import get_dataset, one_class_split
    from models.resnet import build_model
    from training.trainer import Trainer

    device = pick_device(P.device)
    set_seed(P.seed)

    # everything that can fail on user input is checked before anything is written
    resume_ckpt = None
    if P.resume_path:
        resume_path, run_dir = resolve_resume(P.resume_path)
        resume_ckpt = load_model_checkpoint(resume_path, device)
        logdir = P.logdir or run_dir
    else:
        logdir = P.logdir or default_logdir(P)
        if os.path.exists(os.path.join(logdir, "last.model")):
            raise UserError(f"{logdir} already holds a training run; continue it with --resume_path {logdir}, "
                            f"or start a new one with --suffix NAME or --logdir DIR")
    train_set, test_set, info = get_dataset(P.dataset, P.data_root, image_size=P.img_size, seed=P.seed,
                                            aptos_all_grades=P.aptos_all_grades)
    normal_train, test_set = one_class_split(train_set, test_set, info, P.one_class_idx,
                                             contamination_ratio=P.contamination_ratio, seed=P.seed)
    if P.model.endswith("_imagenet") and info.image_size[0] < 64:
        from utils import warn

        warn(f"--model {P.model} is meant for 224-px images; {P.dataset} is {info.image_size[0]} px (use resnet18)")
    dissolve = build_dissolve(P, device, info)
    model = build_model(P.model, n_classes=info.n_classes, simclr_dim=P.simclr_dim, n_shifts=P.K_shift,
                        width=P.resnet_width).to(device)
    if P.load_path and not resume_ckpt:
        ckpt = load_model_checkpoint(P.load_path, device)
        model.load_state_dict(ckpt["model"], strict=not P.no_strict)
    trainer = Trainer(P, model, device, dissolve=dissolve)
    if resume_ckpt is not None:
        try:
            trainer.load_state(resume_ckpt)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"checkpoint {P.resume_path} does not fit this run's flags "
                            f"(model {P.model}, shift {P.shift_trans_type}): {str(exc).splitlines()[0]}") from None
        if trainer.epoch >= P.epochs:
            raise UserError(f"the run in {logdir} already finished {trainer.epoch} of --epochs {P.epochs}; "
                            f"raise --epochs to train further")
        before = resume_ckpt.get("meta", {}).get("args", {})
        changed = [f"--{k}" for k in ("paper_rng_replay", "error_step") if k in before and before[k] != getattr(P, k)]
        if changed:
            from utils import warn

            warn(f"{' '.join(changed)} differ from the interrupted run's: the resumed run will not repeat an "
                 f"uninterrupted one")

    logger = Logger(logdir)
    meta = {
        "args": {k: v for k, v in vars(P).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        "arch": P.model, "n_classes": info.n_classes, "n_shifts": P.K_shift, "simclr_dim": P.simclr_dim,
        "resnet_width": P.resnet_width,
        "dataset": P.dataset, "one_class_idx": P.one_class_idx, "image_size": list(info.image_size),
        "class_names": list(info.class_names), "native_kind": info.native_kind,
    }
    atomic_write_json(meta["args"], os.path.join(logdir, "config.json"))
    logger.log(f"run folder {logdir}; device {device}; {len(normal_train)} training images of class "
               f"{P.one_class_idx} ({info.class_names[P.one_class_idx]}); {len(test_set)} test images; "
               f"mode {P.mode}, shift {P.shift_trans_type}"
               + (f"; resuming after epoch {trainer.epoch}" if resume_ckpt is not None else ""))
    evaluate = None if P.no_eval else make_evaluate(P, normal_train, test_set, device)
    try:
        last = trainer.fit(normal_train, logger, meta, evaluate=evaluate)
    finally:
        logger.close()
    best = {name: {k: b[k] for k in ("epoch", "metric", "value")} for name, b in trainer.best.items()}
    summary = {"last": last, "epoch": trainer.epoch, "step": trainer.step, "best": best}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
