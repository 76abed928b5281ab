"""Build, save and load the DIA dissolver (a DDPM from ``denoising_diffusion_pytorch`` 2.x).

The paper trained with ``denoising_diffusion_pytorch`` 0.27.12, whose ``GaussianDiffusion``
defaulted to objective ``pred_noise``, a cosine beta schedule and took ``loss_type='l1'``.
The 2.x package defaults to ``pred_v`` / ``sigmoid`` / MSE and has no ``loss_type``; here the
objective and schedule are set explicitly and the L1 loss comes from
:class:`DissolverDiffusion`, a small subclass that overrides only ``p_losses``.

A dissolver checkpoint describes itself (``kind``, ``format_version``, the full network and
diffusion ``config``, and ``meta`` on the data it was trained on), so loading builds the
network from the file and never relies on hard-coded sizes.
"""
import os
import re
import warnings
import zipfile

import torch

from common.errors import UserError
from utils import atomic_torch_save

CHECKPOINT_KIND = "dia_dissolver"
FORMAT_VERSION = 1

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")
BETA_SCHEDULES = ("linear", "cosine", "sigmoid")
LOSS_TYPES = ("l1", "l2")

# Keys a config must hold (``ddpm_config`` writes all of them).
CONFIG_KEYS = (
    "image_size", "channels", "unet_dim", "dim_mults", "attn_heads", "attn_dim_head", "dropout",
    "timesteps", "sampling_timesteps", "objective", "beta_schedule", "loss_type", "auto_normalize",
)
CHECKPOINT_KEYS = ("kind", "format_version", "config", "meta", "ema_state", "model_state", "train_state")


def package_version():
    """Version string of the installed ``denoising_diffusion_pytorch``."""
    from denoising_diffusion_pytorch.version import __version__

    return __version__


def train_command_hint(path=None, resolution=None):
    """The command that writes a dissolver checkpoint (for error messages)."""
    res = resolution if resolution is not None else 32
    cmd = f"python diffusion_models/train_eval_ddpm.py --mode train --dataset <DATASET> --image_size {res}"
    if path:
        cmd += f" --save_path {path}"
    return cmd


# --------------------------------------------------------------------------- config


def ddpm_config(image_size=32, channels=3, unet_dim=64, dim_mults=(1, 2, 4, 8), timesteps=1000,
                sampling_timesteps=250, objective="pred_noise", beta_schedule="cosine", loss_type="l1"):
    """The paper's DDPM settings as a plain dict (stored verbatim in the checkpoint).

    Defaults: ``Unet(dim=64, dim_mults=(1, 2, 4, 8))``, 32 px, 1000 steps (250 DDIM sampling
    steps), ``pred_noise``, cosine schedule, L1 loss. The attention sizes and dropout are the
    package's current ``Unet`` defaults, written out so a later package default change cannot
    silently change the network a checkpoint is rebuilt into.
    """
    config = {
        "image_size": int(image_size),
        "channels": int(channels),
        "unet_dim": int(unet_dim),
        "dim_mults": [int(m) for m in dim_mults],
        "attn_heads": 4,
        "attn_dim_head": 32,
        "dropout": 0.0,
        "timesteps": int(timesteps),
        "sampling_timesteps": int(sampling_timesteps),
        "objective": str(objective),
        "beta_schedule": str(beta_schedule),
        "loss_type": str(loss_type),
        "auto_normalize": True,
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


def _gaussian_diffusion_class():
    from denoising_diffusion_pytorch import GaussianDiffusion

    class DissolverDiffusion(GaussianDiffusion):
        """``GaussianDiffusion`` with the paper's choice of L1 (or L2) training loss.

        Only ``p_losses`` is overridden. For ``loss_type='l2'`` it defers to the package.
        For L1 it computes, per sample, ``mean |model(x_t, t) - target|`` times the package's
        ``loss_weight[t]`` (1 for ``pred_noise`` without min-SNR weighting), where
        ``x_t = q_sample(x_start, t, noise)`` and the target follows ``objective`` -- the
        same quantity as the package's MSE path with the square replaced by an absolute value.
        Self-conditioning and offset noise are not used by DIA and are refused here.
        """

        def __init__(self, model, *, loss_type="l1", **kwargs):
            super().__init__(model, **kwargs)
            if loss_type not in LOSS_TYPES:
                raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
            self.loss_type = loss_type

        def p_losses(self, x_start, t, noise=None, offset_noise_strength=None, loss_reduction="mean"):
            if self.loss_type == "l2":
                return super().p_losses(x_start, t, noise=noise, offset_noise_strength=offset_noise_strength,
                                        loss_reduction=loss_reduction)
            if self.self_condition or (offset_noise_strength or self.offset_noise_strength):
                raise NotImplementedError("L1 DissolverDiffusion supports neither self-conditioning nor offset noise")
            noise = torch.randn_like(x_start) if noise is None else noise
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            pred = self.model(x_t, t)
            if self.objective == "pred_noise":
                target = noise
            elif self.objective == "pred_x0":
                target = x_start
            else:
                target = self.predict_v(x_start, t, noise)
            loss = (pred - target).abs().flatten(1).mean(dim=1) * self.loss_weight[t]
            return loss if loss_reduction == "none" else loss.mean()

    DissolverDiffusion.__module__ = __name__
    DissolverDiffusion.__qualname__ = "DissolverDiffusion"
    return DissolverDiffusion


_DISSOLVER_DIFFUSION = None


def dissolver_diffusion_class():
    """The :class:`DissolverDiffusion` class (created lazily to keep imports light)."""
    global _DISSOLVER_DIFFUSION
    if _DISSOLVER_DIFFUSION is None:
        _DISSOLVER_DIFFUSION = _gaussian_diffusion_class()
    return _DISSOLVER_DIFFUSION


def build_unet(config):
    """The ``denoising_diffusion_pytorch.Unet`` described by ``config``."""
    from denoising_diffusion_pytorch import Unet

    validate_config(config)
    return Unet(
        dim=config["unet_dim"],
        dim_mults=tuple(config["dim_mults"]),
        channels=config["channels"],
        dropout=config["dropout"],
        attn_heads=config["attn_heads"],
        attn_dim_head=config["attn_dim_head"],
    )


def build_diffusion(config):
    """A fresh (untrained) :class:`DissolverDiffusion` on the CPU, built from ``config``."""
    validate_config(config)
    cls = dissolver_diffusion_class()
    return cls(
        build_unet(config),
        image_size=config["image_size"],
        timesteps=config["timesteps"],
        sampling_timesteps=config["sampling_timesteps"],
        objective=config["objective"],
        beta_schedule=config["beta_schedule"],
        auto_normalize=config["auto_normalize"],
        loss_type=config["loss_type"],
    )


# --------------------------------------------------------------------------- checkpoints


def save_dissolver(path, diffusion, ema_diffusion, config, meta, train_state=None):
    """Write a self-describing dissolver checkpoint atomically.

    ``diffusion`` is the online model, ``ema_diffusion`` the EMA copy (what dissolving uses);
    both are ``GaussianDiffusion`` modules. ``meta`` should hold ``dataset``, ``one_class_idx``,
    ``epochs`` and ``steps``; ``package_version`` is filled in. ``train_state`` (optimiser,
    step, epoch, RNG states; only tensors, numbers, strings and containers) makes the file
    resumable.
    """
    validate_config(config)
    meta = dict(meta)
    meta.setdefault("package_version", package_version())
    for key in ("dataset", "one_class_idx", "epochs", "steps"):
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
    atomic_torch_save(ckpt, path)


def _describe_foreign(obj):
    """A short guess at what a non-dissolver checkpoint is."""
    if not isinstance(obj, dict):
        return f"a pickled {type(obj).__name__}"
    keys = list(obj.keys())
    if {"model", "ema", "step"} <= set(keys):
        return "a denoising_diffusion_pytorch Trainer checkpoint, which does not describe its network"
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


def read_dissolver_checkpoint(path, device="cpu"):
    """Load and validate the raw checkpoint dict (tensors mapped to ``device``).

    Raises :class:`UserError` with one line for a missing, unreadable or foreign file, and for
    an unknown format version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"no dissolver checkpoint at {path}; train one with: {train_command_hint(path)}")
    if os.path.isdir(path):
        raise UserError(f"--diffusion_model_path {path} is a directory; pass the .pt file written by "
                        "train_eval_ddpm.py --mode train")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=torch.device(device), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the user's file
        raise UserError(_unreadable_message(path, exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{path} is not a dissolver checkpoint (it is {_describe_foreign(ckpt)}); pass the .pt "
                        "file written by train_eval_ddpm.py --mode train")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has dissolver format version {version!r}, this code reads version "
                        f"{FORMAT_VERSION}; use the matching code or retrain with: {train_command_hint(path)}")
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


def load_dissolver(path, device, expect_resolution=None, expect_channels=None, use_ema=True,
                   resolution_flag="--diff_resolution"):
    """Load a dissolver checkpoint.

    Returns ``(diffusion, info)``: the ``GaussianDiffusion`` rebuilt from the stored config,
    holding the EMA weights (or the online weights with ``use_ema=False``), on ``device``, in
    eval mode with gradients off; and ``info = {"config", "meta", "format_version", "path"}``.
    ``expect_resolution`` / ``expect_channels`` turn a mismatch into a :class:`UserError`
    (``resolution_flag`` names the flag that asked for the resolution in that message).
    """
    device = torch.device(device)
    ckpt = read_dissolver_checkpoint(path, device)
    config = ckpt["config"]
    res = config["image_size"]
    if expect_resolution is not None and int(expect_resolution) != res:
        raise UserError(f"{path} is a {res} px dissolver but {resolution_flag} asks for {int(expect_resolution)} "
                        f"px; retrain at that resolution ({train_command_hint(None, int(expect_resolution))}) "
                        f"or pass {resolution_flag} {res}")
    if expect_channels is not None and int(expect_channels) != config["channels"]:
        raise UserError(f"{path} is a {config['channels']}-channel dissolver but the images have "
                        f"{int(expect_channels)} channels; retrain the dissolver on this dataset")
    diffusion = build_diffusion(config)
    state = ckpt["ema_state"] if use_ema else ckpt["model_state"]
    try:
        diffusion.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        made = ckpt["meta"].get("package_version") if isinstance(ckpt["meta"], dict) else None
        raise UserError(f"{path}: stored weights do not fit the network its config describes ({first[:100]}); it "
                        f"was written with denoising_diffusion_pytorch {made}, this is {package_version()}; "
                        f"retrain with: {train_command_hint(path, res)}") from None
    diffusion.to(device).eval().requires_grad_(False)
    info = {"config": dict(config), "meta": dict(ckpt["meta"]), "format_version": ckpt["format_version"],
            "path": os.fspath(path)}
    return diffusion, info


def __getattr__(name):
    # ``from diffusion_models.ddpm import DissolverDiffusion`` without importing the heavy
    # denoising_diffusion_pytorch package at module import time.
    if name == "DissolverDiffusion":
        return dissolver_diffusion_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
