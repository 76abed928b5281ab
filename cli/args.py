"""The command lines of ``train.py`` and ``eval.py``: one parser per program, built from groups.

==========================  ==================  =================================================
group                       programs            flags
==========================  ==================  =================================================
data                        train, eval         --dataset --data_root --one_class_idx ...
model                       train, eval         --model --mode --simclr_dim ...
dissolving                  train               --diffusion_model_path --diff_resolution ...
training                    train               --epochs --optimizer --lr_init ...
checkpoints and logs        train               --logdir --resume_path --save_step ...
evaluation during training  train               --error_step --no_eval --ood_samples ...
evaluation                  eval                --load_path --ood_score --score_folder ...
the paper's eval command    eval                --diffusion_offset --diffusion_upper_offset
runtime                     train, eval         --seed --device --amp --deterministic --multi_gpu
==========================  ==================  =================================================

``--data_root``, ``--diff_resolution``, ``--seed``, ``--device`` and ``--amp`` come from
``common/flags.py``, which reproduce.py and the dissolver's script use too; ``add_model_choice``
gives reproduce.py the ``--model`` flag. The names a flag chooses from come from the library
that owns them: the networks from ``models/resnet.py``, the optimisers from ``training/optim.py``,
the dissolving schedulers from ``models/dissolve.py``, the blur kernel's default from
``models/blur.py``, the datasets from ``datasets/names.py`` and ``datasets/ood.py``.

Flag names and defaults follow CSI and the DIA paper's code, so the paper's commands run as
written. What CSI enforced silently (e.g. the batch size rule) is a warning here, and flag
combinations that cannot work are rejected with one clear line.
"""
import argparse
import math

from common.checkpoint_io import read_model_checkpoint
from common.errors import UserError
from common.flags import DATA_ROOT
from common.flags import (HelpFormatter, add_amp, add_data_root, add_deterministic, add_device, add_diff_resolution,
                          add_seed)
from common.paths import check_run_folder
from datasets.names import ALL_DATASET_NAMES
from datasets.normal_class import check_recorded_class
from datasets.ood import DEFAULT_OOD, TRAIN_DEFAULT_OOD, check_ood_names, default_ood_names
from datasets.registry import check_dataset_name, folder_class_names, is_folder_dataset, pick_normal_class
from models.blur import KERNEL_SIZE
from models.dissolve import SCHEDULERS
from models.resnet import MODEL_NAMES
from training.optim import OPTIMIZERS
from utils import warn

PROGRAMS = ("train", "eval")
TRAIN_MODES = ("simclr", "simclr_CSI", "simclr_DIA")
EVAL_MODES = ("ood_pre", "ood")
MODES = TRAIN_MODES + EVAL_MODES
# the shifts of CSI, and the dissolving kinds put before one of them (e.g. diffusion_rotation)
CSI_SHIFTS = ("rotation", "cutperm")
DISSOLVE_TYPES = ("diffusion", "blurgaussian", "blurmedian", "blurnone")
# the paper's short names: a dissolving kind alone goes with rotation
SHORT_NAMES = {d: f"{d}_rotation" for d in DISSOLVE_TYPES}
SHIFT_TYPES = ("none",) + CSI_SHIFTS + tuple(f"{d}_{s}" for d in DISSOLVE_TYPES for s in CSI_SHIFTS) \
    + tuple(SHORT_NAMES)
OOD_SCORES = ("CSI", "simclr", "baseline", "clean_norm", "similar")
# train.py --resume_path: the flags a resumed run may change (its budget, logging, where and in which
# precision it runs, and where the data lie); any other difference from the saved flags is refused (train.py)
RESUME_MAY_CHANGE = ("epochs", "max_steps", "log_every", "device", "amp", "deterministic", "data_root",
                     "compile_dissolver")
# --one_class_idx None: the unlabeled multi-class setting, asked for by name (as CSI's README says it)
MULTI_CLASS = "None"
# the one-class setting with no class named yet: choose_class picks it (datasets.normal_class's rules)
CHOOSE_CLASS = "choose"


def model_names():
    """The networks ``--model`` chooses from: those ``models/resnet.py`` builds."""
    return MODEL_NAMES


def class_index(text):
    """``--one_class_idx``: a whole number, or ``None`` (any case) for the multi-class setting."""
    if str(text).strip().lower() == "none":
        return MULTI_CLASS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class index or None, got {text!r}") from None


# --------------------------------------------------------------------------- the groups


def add_model_choice(group, default="resnet18", help=None):
    group.add_argument("--model", default=default, choices=model_names(),
                       help=help or "the network: resnet18 (CIFAR-style) for images of <= 32 px, resnet18_imagenet "
                                    "for 224 px")


def add_data_group(p, program):
    defaults = TRAIN_DEFAULT_OOD if program == "train" else DEFAULT_OOD
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synth_lesion" if program == "train" else None,
                   help="dataset: " + ", ".join(ALL_DATASET_NAMES) + " (imagenet: CSI's ImageNet-30)"
                        + ("; left out: the one the --load_path model was trained on" if program == "eval" else ""))
    add_data_root(g, default=DATA_ROOT if program == "train" else None)
    g.add_argument("--one_class_idx", type=class_index, default=None, metavar="IDX",
                   help="index of the normal class (one-class setting); None: CSI's unlabeled multi-class setting "
                        "(every training image normal, each --ood_dataset the anomalies); left out: the "
                        "multi-class setting where there are out-of-distribution sets (" + ", ".join(defaults)
                        + ", or --ood_dataset given), else --normal_class's rules")
    g.add_argument("--normal_class", default=None, metavar="NAME",
                   help="the normal class by name (a class folder of a folder dataset, e.g. good); left out, a "
                        "folder dataset takes the folder named good or normal (any case), else the only class "
                        "folder of train/, else asks for it; the other datasets take class 0"
                        + ("; eval.py: the class the model was trained on" if program == "eval" else ""))
    g.add_argument("--ood_dataset", nargs="+", default=None, metavar="NAME",
                   help="multi-class setting: the out-of-distribution sets, each scored against the in-distribution "
                        "test set; left out: CSI's "
                        + "; ".join(f"{name}: {' '.join(sets)}" for name, sets in defaults.items()))
    g.add_argument("--img_size", type=int, default=None, metavar="PX",
                   help="folder datasets (imagefolder and the paper's 224-px sets): side the images are read at (the "
                        "model's input); left out: 224, the paper's")
    g.add_argument("--aptos_all_grades", action="store_true",
                   help="aptos: every grade 1-4 is an anomaly (the paper's code tests grade 0 against grade 1 only)")
    g.add_argument("--accept_changed_data", action="store_true",
                   help="go on although the data (files added, removed or rewritten, classes renamed) or the "
                        "dissolver file changed since the run was trained, which is otherwise refused; the change is "
                        + ("recorded in the run's checkpoints and log" if program == "train" else
                           "recorded in --save_results"))
    if program == "train":
        g.add_argument("--contamination_ratio", type=float, default=0.0,
                       help="fraction r of the training set drawn from other classes (adds r/(1-r) times as many)")
        g.add_argument("--num_workers", type=int, default=None,
                       help="refused: the images are decoded once, by a thread pool sized to the machine, and "
                            "batched in the main process; drop the flag")
    return g


def add_model_group(p, program):
    g = p.add_argument_group("model")
    if program == "train":
        add_model_choice(g)
    else:
        add_model_choice(g, default=None, help="the network of the --load_path model (left out: the one it records)")
    modes = TRAIN_MODES if program == "train" else EVAL_MODES
    g.add_argument("--mode", default="simclr_DIA" if program == "train" else "ood_pre",
                   metavar="{" + ",".join(modes) + "}",
                   help="training objective: simclr, CSI's shifted contrast, or DIA (CSI's with dissolved views)"
                   if program == "train" else "ood_pre: CSI's scores of --ood_score; ood: the simple scores "
                                              "(baseline, clean_norm, similar)")
    g.add_argument("--simclr_dim", type=int, default=128, help="output size of the simclr head")
    g.add_argument("--resnet_width", type=int, default=64,
                   help="CIFAR-style models: channels of the first stage (64 = the paper's network; "
                        "16 or 32 for quick CPU runs)")
    if program == "train":
        g.add_argument("--shift_trans_type", default="diffusion_rotation", choices=SHIFT_TYPES,
                       help="shift transformation (diffusion_* and blur*_* add dissolved views; a dissolving kind "
                            "alone, e.g. diffusion, goes with rotation)")
    else:
        g.add_argument("--shift_trans_type", default="rotation", choices=SHIFT_TYPES,
                       help="the shift the model was trained with; --mode ood_pre scores with rotation whatever "
                            "is given (a warning names any other), and none cannot give --ood_score CSI")
    return g


def add_dissolving_group(p):
    g = p.add_argument_group("dissolving (--mode simclr_DIA)")
    g.add_argument("--diffusion_model_path", default=None, metavar="CKPT",
                   help="dissolver checkpoint written by diffusion_models/train_eval_ddpm.py (needed by diffusion_*)")
    add_diff_resolution(g)
    g.add_argument("--diffusion_offset", type=float, default=0.3,
                   help="lower end of the dissolving timestep range, in hundreds of steps")
    g.add_argument("--diffusion_upper_offset", type=float, default=1.0,
                   help="upper end of the dissolving timestep range, in hundreds of steps")
    g.add_argument("--diffusion_scheduler", default="uniform", choices=SCHEDULERS,
                   help="how each chunk's timestep is drawn from that range")
    g.add_argument("--diffusion_weights", default="online", choices=("online", "ema"),
                   help="which weights of the dissolver checkpoint dissolve: online (the paper's: the Trainer "
                        "file's 'model') or ema")
    g.add_argument("--diffusion_range_correct", action="store_true",
                   help="feed the dissolver [-1,1] images and map its output back to [0,1] "
                        "(the paper feeds [0,1] and keeps the [-1,1] output)")
    g.add_argument("--compile_dissolver", action="store_true",
                   help="torch.compile the dissolver's UNet (inference only), compiled at the first step")
    g.add_argument("--kernel_size", type=int, default=KERNEL_SIZE, help="blur* types: side of the blur kernel (odd)")
    g.add_argument("--resize_to_constant", action="store_true",
                   help="blur* types: blur at --diff_resolution and resize back")
    g.add_argument("--blur_third_chunk_only", action="store_true",
                   help="blur* types: blur only the dissolved chunk, OpenCV-like borders, smooth resizing "
                        "(the paper blurs all three chunks with zero padding and nearest resizing)")
    g.add_argument("--loss_mode", default="shifted_removed", choices=("shifted_removed", "naive"),
                   help="the dissolved views are negatives of the contrastive loss: shifted_removed leaves out "
                        "each view's own dissolved counterpart, naive keeps it")
    return g


def add_training_group(p):
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=1000, help="epochs of the learning-rate schedule and of the run")
    g.add_argument("--optimizer", default="lars", choices=OPTIMIZERS,
                   help="SGD with momentum 0.9, or LARS wrapped around it")
    g.add_argument("--lr_scheduler", default="cosine", choices=("cosine", "step_decay"),
                   help="after the warm-up: cosine annealing, or x0.1 at 50%% and 75%% of --epochs")
    g.add_argument("--warmup", type=int, default=10,
                   help="warm-up epochs: the rate rises linearly from --lr_init to 10 x --lr_init")
    g.add_argument("--lr_init", type=float, default=0.1, help="learning rate at the start of the warm-up")
    g.add_argument("--weight_decay", type=float, default=1e-6, help="the optimiser's weight decay")
    g.add_argument("--batch_size", type=int, default=128,
                   help="images per step and process (CSI: 128 views per chunk, i.e. 32 images with 4 shifts)")
    g.add_argument("--sim_lambda", type=float, default=1.0, help="weight of the contrastive loss")
    g.add_argument("--temperature", type=float, default=0.5, help="temperature of the contrastive loss")
    g.add_argument("--resize_factor", type=float, default=0.08,
                   help="SimCLR augmentation: crop scale drawn from [resize_factor, 1]")
    g.add_argument("--resize_fix", action="store_true", help="SimCLR augmentation: crop scale fixed at --resize_factor")
    g.add_argument("--max_batches_per_epoch", type=int, default=200,
                   help="the paper's num_batches_per_epoch: an epoch stops after the batch numbered N, counted "
                        "from 0, so it trains at most N + 1 steps (the paper's train.py passes 200); with "
                        "--epoch_steps capped, at most N steps")
    g.add_argument("--epoch_steps", default="paper", choices=("paper", "capped"),
                   help="paper: an epoch trains up to --max_batches_per_epoch + 1 batches and a batch's fractional "
                        "epoch divides its index by the batches of a full pass; capped: at most "
                        "--max_batches_per_epoch batches, the index divided by the batches the epoch trains")
    g.add_argument("--drop_last", action="store_true",
                   help="drop each pass's last batch when it is smaller than the others (the paper's loader keeps "
                        "it: ceil(N / batch) batches a pass, the last on the N mod batch remaining images)")
    g.add_argument("--lr_step_timing", default="paper", choices=("paper", "before"),
                   help="paper: the schedule is stepped after each batch's optimiser step with that batch's "
                        "fractional epoch, so a batch trains with the rate of the batch before it (the first two "
                        "steps with --lr_init, the first step past the warm-up at the warm-up's peak); before: each "
                        "batch trains with the rate of its own fractional epoch")
    g.add_argument("--linear_main_optim", default="paper", choices=("paper", "off"),
                   help="paper: the linear head is also in the main optimiser, where it arrives with a zero "
                        "gradient from the second step on (the paper's torch 1.11 zero_grad), so it takes that "
                        "optimiser's weight decay and momentum before its own Adam step; off: only its Adam "
                        "trains it")
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many steps in total (quick runs); left out: train all --epochs")
    return g


def add_checkpoint_group(p):
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--logdir", default=None, metavar="DIR",
                   help="run folder, one run per folder, locked while it trains; left out: "
                        "logs/<dataset>_<model>_<mode>_<shift>_one_class_<idx>_seed<seed>")
    g.add_argument("--suffix", default=None, help="appended to the default run folder's name")
    g.add_argument("--resume_path", default=None, metavar="PATH",
                   help="run folder or checkpoint to continue from exactly, with the run's flags: only "
                        + ", ".join("--" + f for f in RESUME_MAY_CHANGE)
                        + " may differ from the saved ones; --logdir: the run's folder, "
                          "or an empty one to continue it there as a new run")
    g.add_argument("--load_path", default=None, metavar="MODEL",
                   help="warm start: a new run begins from this model checkpoint's weights")
    g.add_argument("--no_strict", action="store_true", help="--load_path: load the weights non-strictly")
    g.add_argument("--save_step", type=int, default=10, help="save a checkpoint every N epochs")
    g.add_argument("--log_every", type=int, default=10, help="log the losses every N steps")
    g.add_argument("--progress_file", default=None, metavar="JSON",
                   help="write the training's progress (step of N, seconds per step, time to the end) to this JSON "
                        "file every few seconds (reproduce.py shows it)")
    g.add_argument("--no_progress", action="store_true",
                   help="no tqdm progress bar (there is none anyway when stderr is not a terminal)")
    return g


def add_selection_group(p):
    """train.py's evaluation during training, which keeps the best model as best_CSI.model."""
    g = p.add_argument_group("evaluation during training (best_CSI.model)")
    g.add_argument("--error_step", type=int, default=None,
                   help="evaluate on the test set every N epochs and keep the best as best_CSI.model; left out: "
                        "every --save_step epochs, as the paper's train.py")
    g.add_argument("--no_eval", action="store_true", help="no evaluation during training (no best_CSI.model)")
    g.add_argument("--ood_samples", type=int, default=10, help="augmented samples per image and shift")
    g.add_argument("--test_batch_size", type=int, default=100, help="images per batch of the evaluation")
    g.add_argument("--scoring_samples", type=int, default=10,
                   help="samples per image and shift of last.scoring.pt, the normal training images' scoring "
                        "reference written at the end (eval.py scores folders of new images with it): the paper's "
                        "eval protocol, crop scale fixed at 0.54; 0: none (eval.py then computes it from the "
                        "training data)")
    g.add_argument("--eval_max_train", type=int, default=None,
                   help="at most this many normal training images as CSI axes; left out: all, as the paper")
    g.add_argument("--eval_max_test", type=int, default=None,
                   help="at most this many test images, a fixed random subset; left out: all")
    g.add_argument("--eval_resize_factor", type=float, default=0.54,
                   help="test-time augmentation: crop scale drawn from [factor, 1], as the paper's train.py")
    g.add_argument("--eval_resize_fix", action="store_true",
                   help="test-time augmentation: crop scale fixed at --eval_resize_factor (the paper's train.py "
                        "does not fix it; its eval.py command does)")
    g.add_argument("--paper_rng_replay", action="store_true",
                   help="no per-epoch reseeding; each evaluation leaves the random generators seeded as the "
                        "paper's does, so every later epoch replays the same shuffle, flips, crops and "
                        "dissolving timesteps")
    return g


def add_evaluation_group(p):
    g = p.add_argument_group("evaluation")
    g.add_argument("--load_path", default=None, metavar="MODEL",
                   help="the model to evaluate: a checkpoint written by train.py (required)")
    g.add_argument("--no_strict", action="store_true", help="load the model's weights non-strictly")
    g.add_argument("--ood_score", nargs="+", default=None, choices=OOD_SCORES,
                   help="scores to compute; left out: CSI for --mode ood_pre, baseline for --mode ood")
    g.add_argument("--ood_layer", nargs="+", default=["simclr", "shift"], choices=("penultimate", "simclr", "shift"),
                   help="--mode ood: the layer the simple scores read (the first one given)")
    g.add_argument("--ood_samples", type=int, default=None,
                   help="augmented samples per image and shift; left out: 1 (--score_folder: the model's scoring "
                        "reference's, 10 by default)")
    g.add_argument("--ood_batch_size", type=int, default=100, help="images per batch while scoring")
    g.add_argument("--test_batch_size", type=int, default=100,
                   help="images per batch of CSI's interp set (out-of-distribution images made from the test set)")
    g.add_argument("--resize_factor", type=float, default=None,
                   help="test-time augmentation: crop scale drawn from [resize_factor, 1]; left out: 0.08 "
                        "(--score_folder: the scoring reference's, 0.54)")
    g.add_argument("--resize_fix", action="store_true", default=None,
                   help="test-time augmentation: crop scale fixed at --resize_factor (--score_folder: as the "
                        "scoring reference, fixed)")
    g.add_argument("--print_score", action="store_true", help="print quantiles of the scores")
    g.add_argument("--save_score", action="store_true", help="save the raw scores next to the model")
    g.add_argument("--save_results", default=None, metavar="JSON", help="write the AUROCs as JSON to this path")
    g.add_argument("--save_scores_csv", default=None, metavar="CSV", help="write every test image's score to this CSV")
    g.add_argument("--score_folder", default=None, metavar="DIR",
                   help="score the images of this folder (recursively) instead of the test set, with everything "
                        "else from the --load_path run and its scoring reference <model stem>.scoring.pt (the "
                        "training data need not be there), and write --save_scores_csv")
    g.add_argument("--threshold_quantile", type=float, default=None,
                   help="--score_folder: images scoring below this quantile of the normal training images' "
                        "leave-one-out scores are flagged; left out: the scoring reference's, 0.05")
    return g


def add_paper_eval_group(p):
    """Flags of the paper's eval.py command that evaluation has no use for: accepted, so that the
    command runs as written."""
    g = p.add_argument_group("the paper's eval.py command")
    for flag in ("--diffusion_offset", "--diffusion_upper_offset"):
        g.add_argument(flag, type=float, default=None,
                       help="accepted so that the paper's command runs as written; evaluation does not dissolve")
    return g


def add_runtime_group(p, program):
    g = p.add_argument_group("runtime")
    add_seed(g, "seed of the data split and of every random draw" + (" (initial weights, data order, "
                "augmentations, dissolving timesteps)" if program == "train" else " (the augmented samples)"))
    add_device(g)
    add_amp(g, what="the forward passes" + (" (train.py: with torch.amp.GradScaler in fp16)" if program == "train"
                                            else ""))
    add_deterministic(g)
    g.add_argument("--multi_gpu", action="store_true",
                   help="refused with the command to run instead: several GPUs take torchrun --nproc_per_node=N")
    # torch.distributed.launch passes --local-rank (or --local_rank); torchrun sets LOCAL_RANK instead
    g.add_argument("--local_rank", "--local-rank", type=int, default=0,
                   help="set by torch.distributed.launch; the process's rank on its machine")
    return g


# --------------------------------------------------------------------------- the parsers


def build_train_parser():
    p = argparse.ArgumentParser(prog="train.py", formatter_class=HelpFormatter,
                                description="DIA (Dissolving Is Amplifying) on top of CSI: train a contrastive "
                                            "one-class model.")
    add_data_group(p, "train")
    add_model_group(p, "train")
    add_dissolving_group(p)
    add_training_group(p)
    add_checkpoint_group(p)
    add_selection_group(p)
    add_runtime_group(p, "train")
    return p


def build_eval_parser():
    p = argparse.ArgumentParser(prog="eval.py", formatter_class=HelpFormatter,
                                description="DIA (Dissolving Is Amplifying) on top of CSI: score a test set with a "
                                            "model trained by train.py and report AUROC.")
    add_data_group(p, "eval")
    add_model_group(p, "eval")
    add_evaluation_group(p)
    add_paper_eval_group(p)
    add_runtime_group(p, "eval")
    return p


def choose_class(P, recorded=None, what="the model"):
    """Settle ``P.one_class_idx`` to the normal class's index (multi-class stays ``None``) and
    ``P.normal_class`` to its name where the dataset's folders name it.

    The class comes from ``--one_class_idx`` / ``--normal_class``, else from ``recorded`` (the
    ``(name, index)`` a run or checkpoint was trained on: evaluating and resuming keep it), else
    from the rules of ``datasets.normal_class``. A folder dataset whose class folders no longer
    give ``recorded``'s name its index is refused (``what`` names the model in the message).
    Its classes are read from its folder names only, so this runs before any run folder or
    checkpoint is touched.
    """
    if P.one_class_idx is None:
        return P
    if recorded is not None and recorded[0] is not None:
        names = folder_class_names(P.dataset, P.data_root, P.aptos_all_grades)
        if names is not None:
            check_recorded_class(P.dataset, names, recorded[0], recorded[1], what)
    idx = None if P.one_class_idx == CHOOSE_CLASS else P.one_class_idx
    name = P.normal_class
    if name is None and idx is None and recorded is not None:
        idx = recorded[1]
    P.one_class_idx, P.normal_class = pick_normal_class(P.dataset, P.data_root, idx, name,
                                                        aptos_all_grades=P.aptos_all_grades)
    return P


def build_parser(program="train"):
    """The parser of ``train.py`` or ``eval.py``."""
    if program not in PROGRAMS:
        raise ValueError(f"program must be one of {', '.join(PROGRAMS)}, got {program!r}")
    return build_train_parser() if program == "train" else build_eval_parser()


def parse_args(program="train", argv=None):
    """Parse ``program``'s flags (``"train"`` or ``"eval"``) and check them; raise UserError for
    combinations that make no sense."""
    P = build_parser(program).parse_args(argv)
    P.program = program
    normalise_args(P)
    return P  # --amp stays the request: the program decides the precision once its device is set


AT_LEAST_ONE = ("test_batch_size", "ood_batch_size", "simclr_dim", "resnet_width", "diff_resolution", "log_every",
                "img_size")
POSITIVE = ("lr_init", "temperature")
NOT_NEGATIVE = ("weight_decay", "sim_lambda")


def check_numbers(P):
    """Numbers every program reads: finite floats, counts of at least 1, rates above 0."""
    for name, value in sorted(vars(P).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    for name in AT_LEAST_ONE:
        value = getattr(P, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    for name in POSITIVE:
        value = getattr(P, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be above 0, got {value}")
    for name in NOT_NEGATIVE:
        value = getattr(P, name, None)
        if value is not None and value < 0:
            raise UserError(f"--{name} must be >= 0, got {value}")
    if not 0 <= P.seed < 2 ** 32:  # what numpy's generators accept
        raise UserError(f"--seed must lie in 0..{2 ** 32 - 1}, got {P.seed}")


def normalise_args(P):
    """Derive the shift bookkeeping and reject contradictions. The dataset's name comes first (a
    near miss gets a suggestion); the dissolver a diffusion_* run needs is checked once the data
    are read (train.py), so a wrong name or path is the first error."""
    if P.dataset is not None:
        check_dataset_name(P.dataset)
    P.shift_trans_type = SHORT_NAMES.get(P.shift_trans_type, P.shift_trans_type)
    P.dissolve_type = P.shift_trans_type.split("_")[0] if "_" in P.shift_trans_type else None
    P.base_shift = P.shift_trans_type.split("_")[-1]  # rotation | cutperm | none
    if P.program == "eval":
        P.ood_score_given = P.ood_score is not None
    if P.program == "eval" and P.ood_score is None:  # before any check reads it
        P.ood_score = ["baseline"] if P.mode == "ood" else ["CSI"]
    check_numbers(P)
    own, other = (TRAIN_MODES, "eval.py") if P.program == "train" else (EVAL_MODES, "train.py")
    if P.mode not in own:
        if P.mode in MODES:
            what = "an evaluation mode" if P.program == "train" else "a training mode"
            raise UserError(f"--mode {P.mode} is {what}: run {other}")
        raise UserError(f"unknown --mode {P.mode}; use one of {', '.join(own)}")

    if P.program == "train":
        if P.mode == "simclr_DIA" and P.dissolve_type is None:
            raise UserError(f"--mode simclr_DIA needs a dissolving shift type (e.g. diffusion_rotation, "
                            f"blurgaussian_rotation), got --shift_trans_type {P.shift_trans_type}")
        if P.mode != "simclr_DIA" and P.dissolve_type is not None:
            raise UserError(f"--shift_trans_type {P.shift_trans_type} dissolves images and only works with "
                            f"--mode simclr_DIA (got --mode {P.mode}); use --shift_trans_type {P.base_shift}")
        if P.mode == "simclr" and P.base_shift != "none":
            P.base_shift = "none"
        if P.error_step is None:
            P.error_step = P.save_step
        for name in ("epochs", "batch_size", "save_step", "error_step", "max_batches_per_epoch", "ood_samples"):
            if getattr(P, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(P, name)}")
        if P.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {P.warmup}")
        for name in ("eval_max_train", "eval_max_test"):
            if getattr(P, name) is not None and getattr(P, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(P, name)}")
        if not 0.0 < P.eval_resize_factor <= 1.0:
            raise UserError(f"--eval_resize_factor must lie in (0, 1], got {P.eval_resize_factor}")
        if P.max_steps is not None and P.max_steps < 1:
            raise UserError(f"--max_steps must be at least 1, got {P.max_steps}")
        if P.logdir is not None:  # an existing file, or a place that cannot be written: refused now

            check_run_folder(P.logdir, "--logdir")
    else:
        if not P.load_path:
            raise UserError("eval.py needs --load_path MODEL (a checkpoint written by train.py, e.g. logs/<run>/last.model)")
        if P.base_shift != "rotation" and P.mode == "ood_pre" and "CSI" in P.ood_score and P.base_shift == "none":
            raise UserError("--ood_score CSI needs a shift transformation: use --shift_trans_type rotation")
        if P.score_folder and not P.save_scores_csv:
            raise UserError("--score_folder DIR needs --save_scores_csv OUT.csv to write the per-image scores to")
        if P.threshold_quantile is not None and not 0.0 < P.threshold_quantile < 1.0:
            raise UserError(f"--threshold_quantile must lie in (0, 1), got {P.threshold_quantile}")
        if P.ood_samples is not None and P.ood_samples < 1:
            raise UserError(f"--ood_samples must be at least 1, got {P.ood_samples}")
    if P.resize_factor is not None and not 0.0 < P.resize_factor <= 1.0:
        raise UserError(f"--resize_factor must lie in (0, 1], got {P.resize_factor}")
    if P.program == "train" and P.scoring_samples < 0:
        raise UserError(f"--scoring_samples must be 0 (no scoring reference) or more, got {P.scoring_samples}")
    if P.program == "train":
        if not 0.0 <= P.contamination_ratio < 1.0:
            raise UserError(f"--contamination_ratio must lie in [0, 1), got {P.contamination_ratio}")
        if P.diffusion_offset > P.diffusion_upper_offset:
            raise UserError(f"--diffusion_offset ({P.diffusion_offset}) is above --diffusion_upper_offset "
                            f"({P.diffusion_upper_offset})")
        if P.kernel_size < 1 or P.kernel_size % 2 == 0:
            raise UserError(f"--kernel_size must be a positive odd number, got {P.kernel_size}")

    if P.program == "eval":
        take_eval_flags(P)
    resolve_setting(P)

    P.K_shift = 1 if P.base_shift == "none" else 4
    if P.program == "train" and P.K_shift > 1 and P.batch_size * P.K_shift != 128:
        warn(f"CSI uses --batch_size {128 // P.K_shift} with {P.K_shift} shifts "
             f"(128 views per chunk); running with --batch_size {P.batch_size}")
    return P


# eval.py's flags left out (None) that the run does not give: the values they always had
EVAL_FALLBACKS = {"data_root": DATA_ROOT}
# ... and, except under --score_folder (where the model's scoring reference gives them), these
EVAL_TEST_FALLBACKS = {"ood_samples": 1, "resize_factor": 0.08, "resize_fix": False}


def take_eval_flags(P):
    """eval.py: with --dataset left out, or with --score_folder (which needs nothing but the
    model), the flags left out come from the run of --load_path and flags that contradict it
    are refused (:func:`take_from_run`); the others keep their defaults (--model left out is
    the checkpoint's network in any case: eval.py reads it)."""
    if P.dataset is None or P.score_folder:
        take_from_run(P, read_model_checkpoint(P.load_path).get("meta") or {})
    for name, value in list(EVAL_FALLBACKS.items()) + ([] if P.score_folder else list(EVAL_TEST_FALLBACKS.items())):
        if getattr(P, name) is None:
            setattr(P, name, value)
    return P


def take_from_run(P, meta):
    """Fill eval.py's flags left out from the run that wrote ``P.load_path`` (its checkpoint's
    ``meta``: train.py's ``run_meta``): the dataset, the normal class (or the multi-class
    setting and its out-of-distribution sets), the image size, the network, where the data
    lay and the score (simclr for a model without the 4-way shift head). A given --dataset,
    --one_class_idx, --normal_class or (--score_folder) --img_size that contradicts the run is
    refused in one line."""
    args = meta.get("args") or {}
    where = P.load_path
    ds = meta.get("dataset")
    if P.dataset is None:
        if ds is None:
            raise UserError(f"{where} does not record the dataset it was trained on: pass --dataset NAME (and the "
                            f"flags it was trained with)")
        P.dataset = ds
    elif ds is not None and P.dataset != ds:
        raise UserError(f"{where} was trained on --dataset {ds}, not --dataset {P.dataset}: leave out --dataset (the "
                        f"run's is taken) or pass --dataset {ds}")
    multi = meta.get("setting") == "multi_class"
    idx, name = meta.get("one_class_idx"), meta.get("normal_class")
    trained = ("the unlabeled multi-class setting (--one_class_idx None)" if multi
               else f"normal class {name} (--one_class_idx {idx})" if name is not None
               else f"--one_class_idx {idx}")
    fix = "leave out --one_class_idx and --normal_class (the run's class is taken)"
    if P.one_class_idx == MULTI_CLASS and not multi and idx is not None \
            or isinstance(P.one_class_idx, int) and (multi or idx is not None and P.one_class_idx != idx):
        raise UserError(f"{where} was trained with {trained}, not --one_class_idx {P.one_class_idx}: {fix}")
    if P.normal_class is not None and (multi or name is not None and P.normal_class != name):
        raise UserError(f"{where} was trained with {trained}, not --normal_class {P.normal_class}: {fix}")
    if P.one_class_idx is None and P.normal_class is None:
        if multi:
            P.one_class_idx = MULTI_CLASS
            if P.ood_dataset is None and not P.score_folder:
                P.ood_dataset = list(meta.get("ood_dataset") or []) or None
        elif isinstance(idx, int) and not isinstance(idx, bool):
            P.one_class_idx = idx
    size = (meta.get("image_size") or [None])[0]
    if P.img_size is None:
        P.img_size = args.get("img_size")
    elif P.score_folder and size is not None and P.img_size != size:
        raise UserError(f"{where} was trained on {size}-px images, not --img_size {P.img_size}: leave out --img_size "
                        f"(the run's is taken)")
    if P.model is None:
        P.model = meta.get("arch")
    if P.data_root is None:
        P.data_root = args.get("data_root")
    if args.get("aptos_all_grades"):
        P.aptos_all_grades = True
    if not P.ood_score_given and P.mode == "ood_pre" and int(meta.get("n_shifts", 4)) < 4:
        P.ood_score = ["simclr"]  # a model without the 4-way shift head (--mode simclr)
    return P


def resolve_setting(P):
    """One-class or CSI's unlabeled multi-class setting, from ``--one_class_idx``, ``--normal_class``
    and ``--ood_dataset``.

    ``P.one_class_idx`` becomes the class (int; 0 left out on a dataset of fixed classes, as the
    paper), :data:`CHOOSE_CLASS` (a folder dataset's class, or one named by ``--normal_class``,
    chosen by :func:`choose_class` once the folders can be looked at) or ``None`` (multi-class);
    ``P.one_class_given`` says whether ``--one_class_idx`` was on the command line; in the
    multi-class setting ``P.ood_dataset`` becomes the list of out-of-distribution sets (CSI's
    defaults when left out).
    """
    given = P.one_class_idx is not None
    P.one_class_given = given
    if P.one_class_idx == MULTI_CLASS:
        if P.normal_class is not None:
            raise UserError(f"--normal_class {P.normal_class} names a normal class, --one_class_idx None asks for the "
                            f"multi-class setting (every class normal): give one of the two")
        P.one_class_idx = None
    elif not given:  # left out: multi-class where there is something to score against, as CSI
        multi = P.normal_class is None and bool(P.ood_dataset or default_ood_names(P.dataset, P.program))
        # a folder dataset's class is chosen from its folders; the others keep the paper's class 0
        P.one_class_idx = None if multi else CHOOSE_CLASS if (is_folder_dataset(P.dataset) or P.normal_class) else 0
    if P.one_class_idx is not None:
        if P.ood_dataset:
            what = (f"--one_class_idx {P.one_class_idx}" if given else f"--normal_class {P.normal_class}")
            raise UserError(f"--ood_dataset belongs to the unlabeled multi-class setting; with {what} every other "
                            f"class of {P.dataset} is the anomaly: leave out one of the two")
        return P

    if getattr(P, "contamination_ratio", 0.0):  # a train.py flag
        raise UserError(f"--contamination_ratio {P.contamination_ratio} needs a normal class: in the multi-class "
                        f"setting every training image is normal (give --one_class_idx)")
    names = P.ood_dataset if P.ood_dataset is not None else list(default_ood_names(P.dataset, P.program))
    P.ood_dataset = check_ood_names(names, P.dataset)
    needs_sets = P.program == "eval" and not P.score_folder or P.program == "train" and not P.no_eval
    if needs_sets and not P.ood_dataset:
        what = ("train.py's evaluation during training" if P.program == "train"
                else "the multi-class setting")
        extra = ", or --no_eval" if P.program == "train" else ""
        raise UserError(f"{what} scores out-of-distribution sets and {P.dataset} has no default ones: name them "
                        f"with --ood_dataset NAME ... (e.g. svhn lsun_fix interp){extra}")
    return P
