"""Build, save and load the DIA dissolver: the paper's DDPM from ``denoising_diffusion_pytorch==0.27.12``.

The network is that release's ``Unet`` (weight-standardised convolutions, GroupNorm, strided
4x4 downsampling, linear attention at every stage) inside its ``GaussianDiffusion``, which
takes ``loss_type='l1'`` itself and defaults to the ``pred_noise`` objective and the cosine
schedule. Later releases changed the network (and its state-dict keys), so the package is
pinned and checked (:func:`require_paper_package`).

Two checkpoint formats load (:func:`load_dissolver`):

* ours (``kind='dia_dissolver'``, format 2): describes itself (``config``: network and
  diffusion settings; ``meta``: dataset, class, steps, ...), holds the online weights
  (``model_state``), the EMA weights (``ema_state``) and, for resuming, ``train_state``;
* the paper's ``model-<milestone>.pt`` as the package's ``Trainer`` writes it
  (``{"step", "model", "opt", "ema", "scaler"}``). It does not describe itself: the paper's
  diffusion settings are assumed and the UNet's width and stages are read from the weights'
  shapes; a line on standard error says so.

Which weights dissolve is a choice (``weights='online'``, the paper's, or ``'ema'``).
"""
import os
import re
import shlex
import sys
import warnings
import zipfile
from importlib.metadata import PackageNotFoundError, version

import torch
from denoising_diffusion_pytorch import GaussianDiffusion, Unet
from denoising_diffusion_pytorch.denoising_diffusion_pytorch import cosine_beta_schedule, linear_beta_schedule

from common.errors import UserError
from utils import atomic_torch_save

CHECKPOINT_KIND = "dia_dissolver"
FORMAT_VERSION = 2
PAPER_PACKAGE_VERSION = "0.27.12"

OBJECTIVES = ("pred_noise", "pred_x0")
BETA_SCHEDULES = ("linear", "cosine")
LOSS_TYPES = ("l1", "l2")
WEIGHTS = ("online", "ema")

# Keys a config must hold (``ddpm_config`` writes all of them).
CONFIG_KEYS = (
    "image_size", "channels", "unet_dim", "dim_mults", "resnet_block_groups",
    "timesteps", "sampling_timesteps", "objective", "beta_schedule", "loss_type",
)
CHECKPOINT_KEYS = ("kind", "format_version", "config", "meta", "ema_state", "model_state", "train_state")
TRAINER_KEYS = ("step", "model", "opt", "ema")


def package_version():
    """Version string of the installed ``denoising_diffusion_pytorch``."""
    try:
        return version("denoising_diffusion_pytorch")
    except PackageNotFoundError:
        return None


def require_paper_package():
    """Refuse to build the network with another release than the paper's (its ``Unet`` differs)."""
    found = package_version()
    if found != PAPER_PACKAGE_VERSION:
        raise UserError(f"the dissolver is the paper's network from denoising_diffusion_pytorch=="
                        f"{PAPER_PACKAGE_VERSION}, but {found or 'no version'} is installed; run "
                        f"bash scripts/setup.sh (or pip install denoising_diffusion_pytorch=={PAPER_PACKAGE_VERSION})")


def train_command_hint(path=None, resolution=None, dataset=None, data_root=None, class_flags=()):
    """The command that writes a dissolver checkpoint (for error messages): on ``dataset`` (left
    out: a placeholder) under ``data_root``, its normal class given by ``class_flags`` (e.g.
    ``["--one_class_idx", "0"]``), at ``resolution`` (32), written to ``path``."""
    res = resolution if resolution is not None else 32
    words = ["python", "diffusion_models/train_eval_ddpm.py", "--mode", "train", "--dataset"]
    cmd = " ".join(words) + " " + (shlex.quote(dataset) if dataset else "<DATASET>")
    tail = (["--data_root", data_root] if data_root else []) + [str(f) for f in class_flags]
    tail += ["--image_size", str(res)] + (["--save_path", os.fspath(path)] if path else [])
    return cmd + " " + shlex.join(tail)


# --------------------------------------------------------------------------- config


def ddpm_config(image_size=32, channels=3, unet_dim=64, dim_mults=(1, 2, 4, 8), timesteps=1000,
                sampling_timesteps=250, objective="pred_noise", beta_schedule="cosine", loss_type="l1",
                resnet_block_groups=8):
    """The paper's DDPM settings as a plain dict (stored verbatim in our checkpoints).

    Defaults: ``Unet(dim=64, dim_mults=(1, 2, 4, 8))`` (GroupNorm with 8 groups),
    ``GaussianDiffusion(image_size=32, timesteps=1000, sampling_timesteps=250, loss_type='l1')``
    with that release's ``pred_noise`` objective and cosine schedule.
    """
    config = {
        "image_size": int(image_size),
        "channels": int(channels),
        "unet_dim": int(unet_dim),
        "dim_mults": [int(m) for m in dim_mults],
        "resnet_block_groups": int(resnet_block_groups),
        "timesteps": int(timesteps),
        "sampling_timesteps": int(sampling_timesteps),
        "objective": str(objective),
        "beta_schedule": str(beta_schedule),
        "loss_type": str(loss_type),
    }
    validate_config(config)
    return config


def validate_config(config):
    """Raise :class:`UserError` (one line) when ``config`` cannot make a working DDPM."""
    if not isinstance(config, dict):
        raise UserError(f"dissolver config must be a dict, got {type(config).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise UserError(f"dissolver config lacks {', '.join(missing)}; rebuild it with ddpm_config()")
    if config["channels"] < 1:
        raise UserError(f"dissolver channels must be >= 1, got {config['channels']}")
    if config["unet_dim"] < 1 or not config["dim_mults"] or min(config["dim_mults"]) < 1:
        raise UserError(f"bad UNet size: --unet_dim {config['unet_dim']} --dim_mults {config['dim_mults']}; "
                        "use positive integers, e.g. --unet_dim 64 --dim_mults 1 2 4 8")
    groups = config["resnet_block_groups"]
    widths = [config["unet_dim"]] + [config["unet_dim"] * m for m in config["dim_mults"]]
    if groups < 1 or any(w % groups for w in widths):
        raise UserError(f"--unet_dim {config['unet_dim']} with --dim_mults {config['dim_mults']} gives widths "
                        f"{widths}, not all divisible by the {groups} GroupNorm groups; use a multiple of {groups}")
    factor = 2 ** (len(config["dim_mults"]) - 1)
    size = config["image_size"]
    if size < 1 or size % factor:
        raise UserError(f"--image_size {size} is not divisible by {factor} (2 ** (len(dim_mults) - 1) for "
                        f"--dim_mults {' '.join(map(str, config['dim_mults']))}); use a multiple of {factor}, e.g. 32")
    if config["timesteps"] < 1:
        raise UserError(f"--timesteps must be >= 1, got {config['timesteps']}")
    if not 1 <= config["sampling_timesteps"] <= config["timesteps"]:
        raise UserError(f"--sampling_timesteps {config['sampling_timesteps']} must lie in 1..--timesteps "
                        f"({config['timesteps']})")
    if config["objective"] not in OBJECTIVES:
        raise UserError(f"unknown DDPM objective {config['objective']!r}; use one of {', '.join(OBJECTIVES)}")
    if config["beta_schedule"] not in BETA_SCHEDULES:
        raise UserError(f"unknown beta schedule {config['beta_schedule']!r}; use one of {', '.join(BETA_SCHEDULES)}")
    if config["loss_type"] not in LOSS_TYPES:
        raise UserError(f"unknown DDPM loss {config['loss_type']!r}; use one of {', '.join(LOSS_TYPES)}")


# --------------------------------------------------------------------------- model


def build_unet(config):
    """The 0.27.12 ``Unet`` described by ``config``."""
    require_paper_package()

    validate_config(config)
    return Unet(dim=config["unet_dim"], dim_mults=tuple(config["dim_mults"]), channels=config["channels"],
                resnet_block_groups=config["resnet_block_groups"])


def build_diffusion(config):
    """A fresh (untrained) 0.27.12 ``GaussianDiffusion`` on the CPU, built from ``config``."""
    unet = build_unet(config)
    return GaussianDiffusion(unet, image_size=config["image_size"], timesteps=config["timesteps"],
                             sampling_timesteps=config["sampling_timesteps"], loss_type=config["loss_type"],
                             objective=config["objective"], beta_schedule=config["beta_schedule"])


def all_finite(state):
    """Names of the floating tensors in a (nested) state that hold NaN or infinity."""
    bad = []

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                bad.append(name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    walk(state, "")
    return bad


# --------------------------------------------------------------------------- checkpoints


def save_dissolver(path, diffusion, ema_diffusion, config, meta, train_state=None):
    """Write a self-describing dissolver checkpoint atomically.

    ``diffusion`` is the online model (what the paper's dissolver uses), ``ema_diffusion`` the
    EMA copy. ``meta`` should hold ``dataset``, ``one_class_idx`` and ``steps``;
    ``package_version`` is filled in. ``train_state`` (optimiser, step, RNG states; only
    tensors, numbers, strings and containers) makes the file resumable. A state holding a
    non-finite value is never written: :class:`UserError` names the first tensors.
    """
    validate_config(config)
    meta = dict(meta)
    meta.setdefault("package_version", package_version())
    for key in ("dataset", "one_class_idx", "steps"):
        meta.setdefault(key, None)
    ckpt = {
        "kind": CHECKPOINT_KIND,
        "format_version": FORMAT_VERSION,
        "config": dict(config),
        "meta": meta,
        "ema_state": ema_diffusion.state_dict(),
        "model_state": diffusion.state_dict(),
        "train_state": train_state,
    }
    bad = all_finite({"model": ckpt["model_state"], "ema": ckpt["ema_state"], "train": train_state})
    if bad:
        raise UserError(f"not writing {path}: {len(bad)} tensors hold NaN or infinity (first: "
                        f"{', '.join(bad[:3])}); the DDPM diverged: lower --lr or check the images")
    atomic_torch_save(ckpt, path)


def _describe_foreign(obj):
    """A short guess at what a non-dissolver checkpoint is."""
    if not isinstance(obj, dict):
        return f"a pickled {type(obj).__name__}"
    keys = list(obj.keys())
    if "kind" in obj:
        return f"a checkpoint of kind {obj['kind']!r}"
    if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "a bare state_dict of some network"
    shown = ", ".join(map(str, keys[:5])) + (", ..." if len(keys) > 5 else "")
    return f"a dict with keys {shown}"


def _unreadable_message(path, exc):
    """One line on why ``torch.load(path, weights_only=True)`` failed."""
    hint = "pass the .pt file written by train_eval_ddpm.py --mode train, or retrain with: " + train_command_hint(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        what = "is empty"
    elif zipfile.is_zipfile(path):
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found or "Unsupported global" in str(exc):
            held = f" such as {found.group(1)}" if found else ""
            what = f"is not a dissolver checkpoint (it holds pickled Python objects{held}, not only tensors)"
        else:
            reason = " ".join(str(exc).split())[:100]
            what = f"is a damaged torch file ({type(exc).__name__}: {reason})"
    elif head[:1] == b"\x80":
        what = "is a plain Python pickle, not a dissolver checkpoint"
    elif head[:2] == b"PK":
        what = "is a truncated or damaged torch file"
    else:
        what = "is not a torch checkpoint (unrecognised content; corrupt?)"
    return f"cannot use {path}: it {what}; {hint}"


def is_trainer_checkpoint(obj):
    """True for the package ``Trainer``'s ``model-<milestone>.pt`` dict."""
    return isinstance(obj, dict) and all(k in obj for k in TRAINER_KEYS) and isinstance(obj.get("model"), dict) \
        and "kind" not in obj


def read_dissolver_checkpoint(path, device="cpu", allow_trainer=False):
    """Load and validate the raw checkpoint dict (tensors mapped to ``device``).

    Raises :class:`UserError` with one line for a missing, unreadable or foreign file, and for
    an unknown format version. With ``allow_trainer`` the paper's ``Trainer`` file is returned
    as it is (check with :func:`is_trainer_checkpoint`).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"no dissolver checkpoint at {path}; train one with: {train_command_hint(path)}")
    if os.path.isdir(path):
        raise UserError(f"--diffusion_model_path {path} is a directory; pass the .pt file written by "
                        "train_eval_ddpm.py --mode train (or the paper's model-<milestone>.pt)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=torch.device(device), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the user's file
        raise UserError(_unreadable_message(path, exc)) from None
    if is_trainer_checkpoint(ckpt):
        if allow_trainer:
            return ckpt
        raise UserError(f"{path} is the package Trainer's model-<milestone>.pt, which does not describe itself; "
                        "it can dissolve (train.py, eval_dissolver.py) but not be resumed: train a new dissolver")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{path} is not a dissolver checkpoint (it is {_describe_foreign(ckpt)}); pass the .pt "
                        "file written by train_eval_ddpm.py --mode train or the paper's model-<milestone>.pt")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        why = (" (format 1 held the denoising_diffusion_pytorch 2.x network, not the paper's)"
               if version == 1 else "")
        raise UserError(f"{path} has dissolver format version {version!r}, this code reads version "
                        f"{FORMAT_VERSION}{why}; retrain with: {train_command_hint(path)}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} is a damaged dissolver checkpoint (missing {', '.join(missing)}); retrain with: "
                        f"{train_command_hint(path)}")
    try:
        validate_config(ckpt["config"])
    except UserError as exc:
        raise UserError(f"{path} holds an unusable dissolver config ({exc}); retrain with: "
                        f"{train_command_hint(path)}") from None
    return ckpt


def _schedule_betas(name, timesteps):
    fn = cosine_beta_schedule if name == "cosine" else linear_beta_schedule
    return fn(timesteps).float()


def config_from_trainer_state(state, path, image_size):
    """The paper's settings for a ``Trainer`` checkpoint's ``"model"`` state dict.

    The UNet's width, stages and channels are read from the weights' shapes, the timesteps and
    the beta schedule from its buffers; objective (``pred_noise``), loss (L1), 250 sampling
    steps and 8 GroupNorm groups are the paper's, since the file does not record them.
    """
    try:
        init = state["model.init_conv.weight"]
        dim, channels = int(init.shape[0]), int(init.shape[1])
        n_stages = 1 + max(int(m.group(1)) for k in state for m in [re.match(r"model\.downs\.(\d+)\.", k)] if m)
        mults = []
        for i in range(n_stages):
            down = state[f"model.downs.{i}.3.weight"]
            mults.append(int(down.shape[0]) // dim)
        betas = state["betas"]
    except (KeyError, ValueError, AttributeError, IndexError):
        raise UserError(f"{path} looks like a Trainer checkpoint but its 'model' entry is not a "
                        "denoising_diffusion_pytorch 0.27.12 GaussianDiffusion(Unet) state dict") from None
    timesteps = int(betas.shape[0])
    schedule = None
    for name in BETA_SCHEDULES:
        if torch.allclose(betas.float().cpu(), _schedule_betas(name, timesteps), atol=1e-6):
            schedule = name
    if schedule is None:
        raise UserError(f"{path}: the beta schedule in its weights is neither the cosine nor the linear one")
    return ddpm_config(image_size=image_size, channels=channels, unet_dim=dim, dim_mults=mults, timesteps=timesteps,
                       sampling_timesteps=min(250, timesteps), objective="pred_noise", beta_schedule=schedule,
                       loss_type="l1")


def _strip_prefix(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_dissolver(path, device, expect_resolution=None, expect_channels=None, weights="online",
                   resolution_flag="--diff_resolution", quiet=False):
    """Load a dissolver checkpoint (ours or the paper's ``model-<milestone>.pt``).

    Returns ``(diffusion, info)``: the 0.27.12 ``GaussianDiffusion`` holding the chosen
    ``weights`` (``'online'``, the paper's choice, or ``'ema'``), on ``device``, in eval mode
    with gradients off; and ``info = {"config", "meta", "format", "weights", "path"}``.
    ``expect_resolution`` / ``expect_channels`` turn a mismatch into a :class:`UserError`
    (``resolution_flag`` names the flag that asked for the resolution in that message). A
    Trainer file has no resolution: ``expect_resolution`` (default 32) is assumed.
    """
    if weights not in WEIGHTS:
        raise UserError(f"unknown dissolver weights {weights!r}; use one of {', '.join(WEIGHTS)}")
    device = torch.device(device)
    # into host memory: only the chosen weights go to the device (not the other copy, nor Adam's moments)
    ckpt = read_dissolver_checkpoint(path, "cpu", allow_trainer=True)
    if is_trainer_checkpoint(ckpt):
        res = int(expect_resolution) if expect_resolution is not None else 32
        config = config_from_trainer_state(ckpt["model"], path, res)
        if weights == "online":
            state = ckpt["model"]
        else:
            state = _strip_prefix(ckpt["ema"] or {}, "ema_model.")
            if not state:
                raise UserError(f"{path} holds no EMA weights ('ema' entry without ema_model.*); use the online "
                                "weights (--diffusion_weights online, the paper's choice)")
        meta = {"dataset": None, "one_class_idx": None, "steps": int(ckpt["step"]), "package_version": None}
        fmt = "paper_trainer"
        if not quiet:
            print(f"note: {path} is a Trainer checkpoint (step {int(ckpt['step'])}) that does not describe itself; "
                  f"assuming the paper's settings: {res} px, {config['timesteps']} steps ({config['beta_schedule']}), "
                  f"pred_noise, L1, Unet(dim={config['unet_dim']}, dim_mults={tuple(config['dim_mults'])}) "
                  f"read from its weights; dissolving with its {weights} weights", file=sys.stderr)
    else:
        config = ckpt["config"]
        state = ckpt["ema_state"] if weights == "ema" else ckpt["model_state"]
        meta = dict(ckpt["meta"])
        fmt = "ours"
    res = config["image_size"]
    if expect_resolution is not None and int(expect_resolution) != res:
        raise UserError(f"{path} is a {res} px dissolver but {resolution_flag} asks for {int(expect_resolution)} "
                        f"px; retrain at that resolution ({train_command_hint(None, int(expect_resolution))}) "
                        f"or pass {resolution_flag} {res}")
    if expect_channels is not None and int(expect_channels) != config["channels"]:
        raise UserError(f"{path} is a {config['channels']}-channel dissolver but the images have "
                        f"{int(expect_channels)} channels; retrain the dissolver on this dataset")
    bad = all_finite(state)
    if bad:
        raise UserError(f"{path}: {len(bad)} of its {weights} weights hold NaN or infinity (first: {bad[0]}); "
                        f"this dissolver diverged: retrain it with: {train_command_hint(path, res)}")
    diffusion = build_diffusion(config)
    try:
        diffusion.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: stored weights do not fit the network its config describes ({first[:100]}); "
                        f"retrain with: {train_command_hint(path, res)}") from None
    diffusion.to(device).eval().requires_grad_(False)
    info = {"config": dict(config), "meta": meta, "format": fmt, "weights": weights, "path": os.fspath(path)}
    return diffusion, info


def paper_milestone_step(milestone, save_every=31_250):
    """The optimiser step of the paper's ``model-<milestone>.pt`` (``model-5.pt``: step 156,250)."""
    return int(milestone) * int(save_every)


def unet_parameter_count(config):
    """Parameters of the UNet of ``config`` (36.25 M for the paper's)."""
    return sum(p.numel() for p in build_unet(config).parameters())

