"""Command-line flags shared by ``train.py`` and ``eval.py``.

Flag names and defaults follow CSI and the DIA paper's code, so the paper's commands run
as written. What CSI enforced silently (e.g. the batch size rule) is a warning here, and
flag combinations that cannot work are rejected with one clear line.
"""
import argparse
import math

from common.errors import UserError

MODES = ("simclr", "simclr_CSI", "simclr_DIA", "ood_pre", "ood")
MODELS = ("resnet18", "resnet34", "resnet50", "resnet18_imagenet", "resnet50_imagenet")
SHIFT_TYPES = (
    "none", "rotation", "cutperm",
    "diffusion_rotation", "diffusion_cutperm",
    "blurgaussian_rotation", "blurgaussian_cutperm",
    "blurmedian_rotation", "blurmedian_cutperm",
    "blurnone_rotation", "blurnone_cutperm",
    # the paper's short names: rotation is the shift that goes with them
    "diffusion", "blurgaussian", "blurmedian", "blurnone",
)
SCHEDULERS = ("uniform", "beta_skewed", "beta_skewed_reversed", "beta_by_epoch", "beta_by_epoch_reversed")
OOD_SCORES = ("CSI", "simclr", "baseline", "clean_norm", "similar")
# train.py --resume_path: the flags a resumed run may change (its budget, logging, where it runs and
# where the data lie); any other difference from the saved flags is refused (train.py)
RESUME_MAY_CHANGE = ("epochs", "max_steps", "log_every", "device", "num_workers", "data_root", "compile_dissolver")
# --one_class_idx None: the unlabeled multi-class setting, asked for by name (as CSI's README says it)
MULTI_CLASS = "None"


def class_index(text):
    """``--one_class_idx``: a whole number, or ``None`` (any case) for the multi-class setting."""
    if str(text).strip().lower() == "none":
        return MULTI_CLASS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class index or None, got {text!r}") from None


def build_parser(program="train"):
    from datasets.ood import CIFAR10_OOD, IMAGENET30_OOD

    p = argparse.ArgumentParser(
        prog=f"{program}.py",
        description=("DIA (Dissolving Is Amplifying) on top of CSI: "
                     + ("train a contrastive one-class model" if program == "train"
                        else "score a test set with a trained model and report AUROC")),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synth_lesion",
                   help="dataset name (see README: covid, kvasir, retina, aptos, breakhis, chestxray, pneumoniamnist, "
                        "breastmnist, chestmnist, cifar10, cifar100, imagefolder, digits, synth_lesion, "
                        "synth_lesion_half, synth_streak, synth_streak_half; imagenet: "
                        "CSI's ImageNet-30)")
    g.add_argument("--data_root", default="../data", help="folder that holds the datasets in their distributed layout")
    g.add_argument("--one_class_idx", type=class_index, default=None,
                   help="index of the normal class (one-class setting). Left out: CSI's unlabeled multi-class "
                        "setting (every training image normal, each --ood_dataset the anomalies) where there are "
                        "out-of-distribution sets (cifar10, imagenet, or --ood_dataset given), else class 0; "
                        "None: the multi-class setting always")
    g.add_argument("--ood_dataset", nargs="+", default=None, metavar="NAME",
                   help="multi-class setting: the out-of-distribution sets, each scored against the in-distribution "
                        "test set (default CSI's: cifar10 " + " ".join(CIFAR10_OOD) + "; imagenet "
                        + " ".join(IMAGENET30_OOD) + " (train.py: the first three, as CSI's train.py))")
    g.add_argument("--img_size", type=int, default=None, help="imagefolder only: side the images are resized to (default 224)")
    g.add_argument("--contamination_ratio", type=float, default=0.0,
                   help="fraction r of the training set drawn from other classes (adds r/(1-r) times as many)")
    g.add_argument("--num_workers", type=int, default=0, help="data loading worker processes (folder datasets)")
    g.add_argument("--aptos_all_grades", action="store_true",
                   help="aptos: every grade 1-4 is an anomaly (the paper's code tests grade 0 against grade 1 only)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", choices=MODELS,
                   help="resnet18 (CIFAR-style) for <= 32 px, resnet18_imagenet for 224 px")
    g.add_argument("--mode", default="simclr_DIA" if program == "train" else "ood_pre", choices=MODES)
    g.add_argument("--simclr_dim", type=int, default=128, help="output size of the simclr head")
    g.add_argument("--resnet_width", type=int, default=64,
                   help="CIFAR-style models: channels of the first stage (64 = the paper's network; "
                        "16 or 32 for quick CPU runs)")
    g.add_argument("--shift_trans_type", default="diffusion_rotation" if program == "train" else "rotation",
                   choices=SHIFT_TYPES, help="shift transformation (diffusion_*/blur*_* add dissolved views)")

    g = p.add_argument_group("dissolving")
    g.add_argument("--diffusion_model_path", default=None, help="dissolver checkpoint from diffusion_models/train_eval_ddpm.py")
    g.add_argument("--diff_resolution", type=int, default=32, help="dissolving resolution")
    g.add_argument("--diffusion_offset", type=float, default=0.3, help="lower end of the timestep range (x100)")
    g.add_argument("--diffusion_upper_offset", type=float, default=1.0, help="upper end of the timestep range (x100)")
    g.add_argument("--diffusion_scheduler", default="uniform", choices=SCHEDULERS, help="how the timestep is drawn")
    g.add_argument("--diffusion_weights", default="online", choices=("online", "ema"),
                   help="which weights of the dissolver checkpoint dissolve: online (the paper's: the Trainer "
                        "file's 'model') or ema")
    g.add_argument("--compile_dissolver", action="store_true",
                   help="torch.compile the dissolver's UNet (inference only; compiled at the first step: seconds "
                        "with a warm cache, minutes the first time). On a 2-core CPU in bf16 it no longer pays: a "
                        "DIA step's dissolving took 0.85 s eager, 0.84 s compiled (benchmarks/bench.py)")
    g.add_argument("--diffusion_range_correct", action="store_true",
                   help="feed the dissolver [-1,1] images and map its output back to [0,1] "
                        "(the paper feeds [0,1] and keeps the [-1,1] output)")
    g.add_argument("--kernel_size", type=int, default=7, help="blur kernel size for blur* shift types")
    g.add_argument("--resize_to_constant", action="store_true",
                   help="blur* types: blur at --diff_resolution and resize back")
    g.add_argument("--blur_third_chunk_only", action="store_true",
                   help="blur* types: blur only the dissolved chunk, OpenCV-like borders, smooth resizing "
                        "(the paper blurs all three chunks with zero padding and nearest resizing)")
    g.add_argument("--loss_mode", default="shifted_removed", choices=("shifted_removed", "naive"),
                   help="NT_xent_neg masking of a view and its own dissolved counterpart")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=1000)
    g.add_argument("--optimizer", default="lars", choices=("sgd", "lars"))
    g.add_argument("--lr_scheduler", default="cosine", choices=("cosine", "step_decay"))
    g.add_argument("--warmup", type=int, default=10, help="warm-up epochs")
    g.add_argument("--lr_init", type=float, default=0.1)
    g.add_argument("--weight_decay", type=float, default=1e-6)
    g.add_argument("--batch_size", type=int, default=128)
    g.add_argument("--test_batch_size", type=int, default=100)
    g.add_argument("--sim_lambda", type=float, default=1.0, help="weight of the contrastive loss")
    g.add_argument("--temperature", type=float, default=0.5)
    g.add_argument("--max_batches_per_epoch", type=int, default=200,
                   help="an epoch is capped at this many batches (the paper's code uses 200)")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many steps in total (quick runs)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    g.add_argument("--amp", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="mixed precision (bf16 autocast; fp16 on a GPU without bf16): auto = where the device "
                        "computes bf16 in hardware (CUDA with bf16, a CPU with AVX512-BF16 or AMX); --amp alone = "
                        "on; --amp off = fp32 throughout, as the paper's code")
    g.add_argument("--multi_gpu", action="store_true",
                   help="gone (it was DataParallel): train.py and eval.py run on several GPUs under torchrun "
                        "--nproc_per_node=N; passing it is an error that says so")

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--logdir", default=None,
                   help="run folder (default logs/<dataset>_<model>_<mode>_<shift>_one_class_<idx>_seed<seed>); "
                        "one run per folder, locked while it trains")
    g.add_argument("--suffix", default=None, help="suffix for the default run folder name")
    g.add_argument("--resume_path", default=None,
                   help="run folder or checkpoint to continue from exactly, with the run's flags: only "
                        + ", ".join("--" + f for f in RESUME_MAY_CHANGE)
                        + " (and eval.py's own flags) may differ from the saved ones; --logdir: the run's folder, "
                          "or an empty one to continue it there as a new run")
    g.add_argument("--load_path", default=None, help="model checkpoint to load (eval, or warm start)")
    g.add_argument("--no_strict", action="store_true", help="load state dicts non-strictly")
    g.add_argument("--save_step", type=int, default=10, help="save a checkpoint every N epochs")
    g.add_argument("--error_step", type=int, default=None,
                   help="train.py: evaluate on the test set every N epochs and keep the best as best_CSI.model "
                        "(default: every --save_step epochs, as the paper's train.py)")
    g.add_argument("--no_eval", action="store_true", help="train.py: no evaluation during training (no best_CSI.model)")
    g.add_argument("--eval_max_train", type=int, default=None,
                   help="train.py's evaluation: at most this many normal training images as CSI axes "
                        "(default: all, as the paper)")
    g.add_argument("--eval_max_test", type=int, default=None,
                   help="train.py's evaluation: at most this many test images, a fixed random subset (default: all)")
    g.add_argument("--eval_resize_factor", type=float, default=0.54,
                   help="train.py's evaluation: crop scale drawn from [factor, 1] (the paper's 0.54)")
    g.add_argument("--eval_resize_fix", action="store_true",
                   help="train.py's evaluation: crop scale fixed at --eval_resize_factor (the paper's train.py "
                        "does not fix it; its eval.py command does)")
    g.add_argument("--paper_rng_replay", action="store_true",
                   help="train.py: no per-epoch reseeding; each evaluation leaves the random generators seeded "
                        "as the paper's does, so every later epoch replays the same shuffle, flips, crops and "
                        "dissolving timesteps")
    g.add_argument("--log_every", type=int, default=10, help="log the losses every N steps")
    # torch.distributed.launch passes --local-rank (older: --local_rank); torchrun sets LOCAL_RANK instead
    g.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)

    g = p.add_argument_group("evaluation")
    g.add_argument("--ood_score", nargs="+", default=None, choices=OOD_SCORES,
                   help="scores to compute (default: CSI for --mode ood_pre, baseline for --mode ood)")
    g.add_argument("--ood_layer", nargs="+", default=["simclr", "shift"], choices=("penultimate", "simclr", "shift"))
    g.add_argument("--ood_samples", type=int, default=10 if program == "train" else 1,
                   help="augmented samples per image and shift (train.py: of its evaluation, the paper's 10)")
    g.add_argument("--ood_batch_size", type=int, default=100)
    g.add_argument("--resize_factor", type=float, default=0.08, help="crop scale drawn from [resize_factor, 1]")
    g.add_argument("--resize_fix", action="store_true", help="crop scale fixed at resize_factor")
    g.add_argument("--print_score", action="store_true", help="print quantiles of the scores")
    g.add_argument("--save_score", action="store_true", help="save raw scores next to the model")
    g.add_argument("--save_results", default=None, help="write the AUROCs as JSON to this path")
    g.add_argument("--save_scores_csv", default=None, help="write every test image's score to this CSV")
    g.add_argument("--score_folder", default=None,
                   help="score the images of this folder instead of the test set (writes --save_scores_csv)")
    g.add_argument("--threshold_quantile", type=float, default=0.05,
                   help="--score_folder: images scoring below this quantile of the normal training scores are flagged")
    return p


def parse_args(program="train", argv=None):
    """Parse and check the flags; raise UserError for combinations that make no sense."""
    P = build_parser(program).parse_args(argv)
    P.program = program
    normalise_args(P)
    from common.device import decide_amp

    P.amp = decide_amp(P.amp, P.device)  # decided once: a bool from here on
    return P


AT_LEAST_ONE = ("test_batch_size", "ood_batch_size", "simclr_dim", "resnet_width", "diff_resolution", "log_every",
                "img_size")
POSITIVE = ("lr_init", "temperature")
NOT_NEGATIVE = ("num_workers", "weight_decay", "sim_lambda")


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
    """Derive the shift bookkeeping and reject contradictions."""
    short = {"diffusion": "diffusion_rotation", "blurgaussian": "blurgaussian_rotation",
             "blurmedian": "blurmedian_rotation", "blurnone": "blurnone_rotation"}
    P.shift_trans_type = short.get(P.shift_trans_type, P.shift_trans_type)
    P.dissolve_type = P.shift_trans_type.split("_")[0] if "_" in P.shift_trans_type else None
    P.base_shift = P.shift_trans_type.split("_")[-1]  # rotation | cutperm | none
    if P.ood_score is None:  # before any check reads it
        P.ood_score = ["baseline"] if P.mode == "ood" else ["CSI"]
    check_numbers(P)

    if P.program == "train":
        if P.mode in ("ood_pre", "ood"):
            raise UserError(f"--mode {P.mode} is an evaluation mode: run eval.py")
        if P.mode == "simclr_DIA" and P.dissolve_type is None:
            raise UserError(f"--mode simclr_DIA needs a dissolving shift type (e.g. diffusion_rotation, "
                            f"blurgaussian_rotation), got --shift_trans_type {P.shift_trans_type}")
        if P.mode != "simclr_DIA" and P.dissolve_type is not None:
            raise UserError(f"--shift_trans_type {P.shift_trans_type} dissolves images and only works with "
                            f"--mode simclr_DIA (got --mode {P.mode}); use --shift_trans_type {P.base_shift}")
        if P.dissolve_type == "diffusion" and not P.diffusion_model_path:
            raise UserError("--shift_trans_type diffusion_* needs --diffusion_model_path CKPT "
                            "(train one with: python diffusion_models/train_eval_ddpm.py --mode train --dataset D)")
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
            from common.paths import check_run_folder

            check_run_folder(P.logdir, "--logdir")
    else:
        if P.mode not in ("ood_pre", "ood"):
            raise UserError(f"eval.py runs --mode ood_pre or ood, got --mode {P.mode} (training modes belong to train.py)")
        if not P.load_path:
            raise UserError("eval.py needs --load_path MODEL (a checkpoint written by train.py, e.g. logs/<run>/last.model)")
        if P.base_shift != "rotation" and P.mode == "ood_pre" and "CSI" in P.ood_score and P.base_shift == "none":
            raise UserError("--ood_score CSI needs a shift transformation: use --shift_trans_type rotation")
        if P.score_folder and not P.save_scores_csv:
            raise UserError("--score_folder DIR needs --save_scores_csv OUT.csv to write the per-image scores to")
        if not 0.0 < P.threshold_quantile < 1.0:
            raise UserError(f"--threshold_quantile must lie in (0, 1), got {P.threshold_quantile}")
        if P.ood_samples < 1:
            raise UserError(f"--ood_samples must be at least 1, got {P.ood_samples}")
    if not 0.0 < P.resize_factor <= 1.0:
        raise UserError(f"--resize_factor must lie in (0, 1], got {P.resize_factor}")
    if not 0.0 <= P.contamination_ratio < 1.0:
        raise UserError(f"--contamination_ratio must lie in [0, 1), got {P.contamination_ratio}")
    if P.diffusion_offset > P.diffusion_upper_offset:
        raise UserError(f"--diffusion_offset ({P.diffusion_offset}) is above --diffusion_upper_offset "
                        f"({P.diffusion_upper_offset})")
    if P.kernel_size < 1 or P.kernel_size % 2 == 0:
        raise UserError(f"--kernel_size must be a positive odd number, got {P.kernel_size}")

    resolve_setting(P)

    P.K_shift = 1 if P.base_shift == "none" else 4
    if P.program == "train" and P.K_shift > 1 and P.batch_size * P.K_shift != 128:
        from utils import warn

        warn(f"CSI uses --batch_size {128 // P.K_shift} with {P.K_shift} shifts "
             f"(128 views per chunk); running with --batch_size {P.batch_size}")
    return P


def resolve_setting(P):
    """One-class or CSI's unlabeled multi-class setting, from ``--one_class_idx`` and ``--ood_dataset``.

    ``P.one_class_idx`` becomes the class (int) or ``None`` (multi-class); ``P.one_class_given``
    says whether the flag was on the command line; in the multi-class setting ``P.ood_dataset``
    becomes the list of out-of-distribution sets (CSI's defaults when left out).
    """
    given = P.one_class_idx is not None
    P.one_class_given = given
    if P.one_class_idx == MULTI_CLASS:
        P.one_class_idx = None
    elif not given:  # left out: multi-class where there is something to score against, as CSI
        from datasets.ood import default_ood_names

        P.one_class_idx = None if (P.ood_dataset or default_ood_names(P.dataset, P.program)) else 0
    if P.one_class_idx is not None:
        if P.ood_dataset:
            raise UserError(f"--ood_dataset belongs to the unlabeled multi-class setting; with --one_class_idx "
                            f"{P.one_class_idx} every other class of {P.dataset} is the anomaly: leave out one of "
                            f"the two")
        return P
    from datasets.ood import check_ood_names, default_ood_names

    if P.contamination_ratio:
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
