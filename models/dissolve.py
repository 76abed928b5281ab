"""Dissolving as a shift transformation (DIA, docs/method.md §2 and §3).

A *dissolve generator* takes ``K`` chunks of ``B`` images (float, ``[0, 1]``,
``B x 3 x H x W``) and returns ``K`` chunks of the same shape, one random strength per
chunk::

    gen = make_dissolve_fn("diffusion_rotation", settings, device, native_kind)
    x3 = gen.dissolve_chunks([x3_0, x3_1, x3_2, x3_3], epoch)

Three kinds exist: :class:`Dissolver` (one reverse DDPM step with a random timestep),
``models.blur.BlurShift`` with ``'gaussian'`` / ``'median'`` / ``'none'``. All run without
gradients, keep the input's device, and bring images to the dissolving resolution and back
the same way (:func:`to_dissolve_resolution`). What the training step calls on them is
``models.strategies.DissolveStrategy``; :class:`DissolveSettings` holds what builds them.
"""

import copy
import dataclasses
from typing import Any, ClassVar, Mapping, Optional

import numpy as np
import torch

from common.errors import SettingError
from datasets.resolution import check_kind, to_dissolve_resolution
from diffusion_models.ddpm import load_dissolver
from diffusion_models.inference_form import AutocastWeights, inference_form
from models.blur import BlurShift
from utils import warn

SCHEDULERS = ("uniform", "beta_skewed", "beta_skewed_reversed", "beta_by_epoch", "beta_by_epoch_reversed")
STEP_SCALE = 100
# On CPU the frozen UNet dissolves at most this many pixels per call (32 images at 32 px): smaller
# calls stay in the CPU's caches and give the same bits (benchmarks/README.md measures it).
CHUNK_PIXELS = 32 * 32 * 32

# beta_by_epoch: a 30-epoch cycle of Beta(a, b) parameters between a floor of 2 and 20.
BETA_CYCLE = 30
BETA_HIGH = 20.0
BETA_FLOOR = 2.0


# --------------------------------------------------------------------------- timesteps


def timestep(u, offset, upper, step_scale=STEP_SCALE):
    """The dissolving timestep ``int(step_scale * (offset + u * (upper - offset)))``."""
    return int(step_scale * (offset + u * (upper - offset)))


def beta_by_epoch_params(epoch, reversed_=False):
    """``(a, b)`` of the ``beta_by_epoch`` sampler at ``epoch`` (30-epoch cycle).

    ``e = epoch % 30``, ``step = 2 * (20 - 2) / 30``; ``e < 15``: ``a = 20, b = 2 + step * e``,
    else ``b = 20, a = 2 + step * (29 - e)``. The reversed sampler swaps ``a`` and ``b``.
    """
    e = int(epoch) % BETA_CYCLE
    step = 2 * (BETA_HIGH - BETA_FLOOR) / BETA_CYCLE
    if e < BETA_CYCLE // 2:
        a, b = BETA_HIGH, BETA_FLOOR + step * e
    else:
        a, b = BETA_FLOOR + step * (BETA_CYCLE - 1 - e), BETA_HIGH
    return (b, a) if reversed_ else (a, b)


class StepSampler:
    """Draws the dissolving strength ``u`` in ``[0, 1]`` with the scheduler ``name``.

    ``generator``: ``None`` uses numpy's global RNG (so ``np.random.seed`` makes runs
    repeatable), an ``int`` seeds a private ``numpy.random.Generator``, or pass a
    ``numpy.random.Generator``.
    """

    def __init__(self, name="uniform", generator=None):
        if name not in SCHEDULERS:
            raise SettingError(f"unknown {{scheduler}} {name!r}; use one of {', '.join(SCHEDULERS)}", "scheduler")
        self.name = name
        if generator is None:
            self.rng = np.random  # the legacy global RNG
        elif isinstance(generator, (int, np.integer)):
            self.rng = np.random.default_rng(int(generator))
        else:
            self.rng = generator

    def params(self, epoch=0):
        """``None`` for ``uniform``, else the ``(a, b)`` of the Beta law used at ``epoch``."""
        if self.name == "uniform":
            return None
        if self.name == "beta_skewed":
            return (1.0, 1.7)
        if self.name == "beta_skewed_reversed":
            return (1.7, 1.0)
        return beta_by_epoch_params(epoch, reversed_=self.name.endswith("_reversed"))

    def sample(self, epoch=0):
        ab = self.params(epoch)
        if ab is None:
            return float(self.rng.uniform(0.0, 1.0))
        return float(self.rng.beta(*ab))




# --------------------------------------------------------------------------- dissolvers


class Dissolver(torch.nn.Module):
    """One reverse step of a trained DDPM, used as a feature dissolver.

    ``forward(x, ts)``: ``x`` holds ``K`` chunks of ``B`` images (``(K*B) x C x H x W``), ``ts``
    ``K`` timesteps (one per chunk). The images are brought to ``diff_resolution``, taken as
    ``x_t`` at their chunk's timestep, and the network's clipped ``x_0`` prediction is returned
    (the second output of ``GaussianDiffusion.p_sample``, deterministic) in one batched network
    call (on CPU, calls of ``chunk_pixels`` pixels: the same images), brought back to the input size.

    Range: by default (as the paper's code) the ``[0, 1]`` image enters the network as is and the
    ``[-1, 1]`` prediction is returned unscaled. ``range_correct=True`` maps ``x * 2 - 1`` before
    and ``(x0 + 1) / 2`` after.

    The dissolver keeps its own frozen copy of ``diffusion`` (eval mode, no gradients; the given
    object is left as it was), whose UNet is in inference form
    (``diffusion_models.inference_form``: weight standardisation computed once, a fast channel
    LayerNorm, the fp32 network's epsilons at every precision). The copy is a registered
    submodule (``.to(device)`` moves it), so keep a ``Dissolver`` outside the trained network: as
    an attribute of it, its 35 M DDPM weights would join that network's ``parameters()`` and
    ``state_dict()``.

    As a ``models.strategies.DissolveStrategy`` it dissolves the third chunk only and leaves the
    shift to the training step; ``info`` describes the checkpoint it was loaded from.
    """

    applies_to = (2,)
    shift_inside = False

    def __init__(self, diffusion, native_kind, diff_resolution=32, offset=0.3, upper=1.0, scheduler="uniform",
                 range_correct=False, step_scale=STEP_SCALE, generator=None, compile=False,
                 chunk_pixels=CHUNK_PIXELS):
        super().__init__()
        self.chunk_pixels = int(chunk_pixels)  # images per UNet call on CPU: this many pixels; 0: all at once
        check_kind(native_kind)
        res = diffusion.image_size
        res = int(res[0]) if isinstance(res, (tuple, list)) else int(res)
        if res != int(diff_resolution):
            raise SettingError(f"the dissolver works at {res} px but {{diff_resolution}} is {diff_resolution}; "
                               f"pass {{diff_resolution}} {res} or retrain the dissolver at {diff_resolution} px",
                               "diff_resolution")
        # our own frozen copy, its UNet in inference form (the same function, computed faster) and
        # channels-last (faster convolutions on CPU with oneDNN and on CUDA under mixed precision)
        net, _ = inference_form(diffusion.model)
        diffusion = copy.deepcopy(diffusion, memo={id(diffusion.model): net})
        self.diffusion = diffusion.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        # under autocast, its conv and linear weights are held in autocast's dtype (cast once, not per call);
        # a compiled UNet keeps fp32 weights (a dtype change would recompile it)
        self._weights = None if compile else AutocastWeights(self.diffusion.model)
        if compile:  # the frozen UNet only: the same weights, fused kernels, compiled at the first call
            self.diffusion.model = torch.compile(self.diffusion.model, dynamic=False)
        self.native_kind = native_kind
        self.diff_resolution = int(diff_resolution)
        self.offset = float(offset)
        self.upper = float(upper)
        self.step_scale = step_scale
        self.range_correct = bool(range_correct)
        self.sampler = scheduler if isinstance(scheduler, StepSampler) else StepSampler(scheduler, generator)
        self.info = None  # set by from_checkpoint
        t_lo = timestep(0.0, self.offset, self.upper, step_scale)
        t_hi = timestep(1.0, self.offset, self.upper, step_scale)
        n = diffusion.num_timesteps
        if min(t_lo, t_hi) < 0 or max(t_lo, t_hi) > n - 1:
            raise SettingError(f"{{offset}} {offset} / {{upper}} {upper} give timesteps {min(t_lo, t_hi)}.."
                               f"{max(t_lo, t_hi)} but the dissolver has timesteps 0..{n - 1}; keep {step_scale} * "
                               f"{{offset}} and {step_scale} * {{upper}} within that range", "offset", "upper")

    @classmethod
    def from_checkpoint(cls, path, device="cpu", native_kind="small32", diff_resolution=32, weights="online",
                        **kwargs):
        """A dissolver from our checkpoint or the paper's ``model-<milestone>.pt``.

        ``weights``: ``'online'`` (the paper's dissolver loads the Trainer file's ``"model"``) or
        ``'ema'``. ``kwargs`` go to the constructor (``offset``, ``upper``, ``scheduler``,
        ``range_correct``). Calling the result as ``dissolver(x, ts)`` returns what the paper's
        ``pre_process -> p_sample(x, t)[1] -> post_process`` returns for each chunk. The
        checkpoint's description is kept in ``.info``.
        """
        diffusion, info = load_dissolver(path, device, expect_resolution=diff_resolution, expect_channels=3,
                                         weights=weights)
        dissolver = cls(diffusion, native_kind, diff_resolution=diff_resolution, **kwargs)
        dissolver.info = info
        return dissolver

    def train(self, mode=True):
        # The network stays frozen in eval mode whatever the surrounding model does.
        super().train(mode)
        self.diffusion.eval()
        return self

    @property
    def device(self):
        return self.diffusion.betas.device

    def draw_timesteps(self, k, epoch=0):
        """``k`` timesteps, one sampler call each."""
        return [timestep(self.sampler.sample(epoch), self.offset, self.upper, self.step_scale) for _ in range(k)]

    @torch.no_grad()
    def forward(self, x, ts):
        ts = [int(t) for t in ts]
        k = len(ts)
        if k == 0 or x.shape[0] % k:
            raise ValueError(f"{x.shape[0]} images cannot be split into {k} equal chunks")
        n = self.diffusion.num_timesteps
        if any(t < 0 or t >= n for t in ts):
            raise ValueError(f"timesteps {ts} outside 0..{n - 1}")
        in_device, in_dtype = x.device, x.dtype
        x = x.to(self.device, torch.float32)
        y, undo = to_dissolve_resolution(x, self.native_kind, self.diff_resolution)
        if self.range_correct:
            y = y * 2 - 1
        t = torch.tensor(ts, device=self.device, dtype=torch.long).repeat_interleave(x.shape[0] // k)
        y = y.contiguous(memory_format=torch.channels_last)
        x0 = self._predict_x0(y, t)
        if self.range_correct:
            x0 = (x0 + 1) / 2
        return undo(x0).to(in_device, in_dtype)

    def _predict_x0(self, y, t):
        """The network's clipped ``x_0`` prediction for each image of ``y`` at its timestep ``t``.

        On CPU the UNet takes a few images at a time (``chunk_pixels`` pixels), so that its
        activations stay in cache. Every layer works per image (eval mode: no batch statistics),
        so the result is the one-call result up to float rounding, which may differ with the
        batch size (tested: the same bits in 32-image calls under bf16, 1e-5 in fp32 for odd ones)."""
        if self._weights is not None:
            self._weights.match(y.device.type)
        per_chunk = y.shape[0]
        if y.device.type == "cpu" and self.chunk_pixels:
            per_chunk = max(1, self.chunk_pixels // (y.shape[2] * y.shape[3]))
        if per_chunk >= y.shape[0]:
            return self.diffusion.model_predictions(y, t, clip_x_start=True).pred_x_start
        return torch.cat([self.diffusion.model_predictions(yc, tc, clip_x_start=True).pred_x_start
                          for yc, tc in zip(y.split(per_chunk), t.split(per_chunk))])

    def dissolve_chunks(self, x_chunks, epoch=0):
        """Dissolve each chunk with its own random timestep (one batched network call for all)."""
        sizes = [c.shape[0] for c in x_chunks]
        if len(set(sizes)) != 1:
            raise ValueError(f"chunks must have equal sizes, got {sizes}")
        ts = self.draw_timesteps(len(x_chunks), epoch)
        out = self.forward(torch.cat(list(x_chunks)), ts)
        return list(out.split(sizes[0]))


# --------------------------------------------------------------------------- factory


@dataclasses.dataclass(frozen=True)
class DissolveSettings:
    """What :func:`make_dissolve_fn` builds a dissolving strategy from. Every field is required:
    the defaults live in the program's parser (``cli/args.py``).

    ``diffusion_*``, ``diff_resolution``, ``range_correct`` and ``compile_dissolver``: the
    diffusion dissolver (:meth:`Dissolver.from_checkpoint`); ``kernel_size``,
    ``resize_to_constant``, ``third_chunk_only`` and ``diff_resolution``: the blurs
    (``models.blur.BlurShift``); ``dataset`` and ``one_class_idx``: the run's data, which a
    dissolver trained on other data is warned about.
    """

    diffusion_model_path: Optional[str]
    diff_resolution: int
    diffusion_weights: str
    diffusion_offset: float
    diffusion_upper_offset: float
    diffusion_scheduler: str
    range_correct: bool
    compile_dissolver: bool
    kernel_size: int
    resize_to_constant: bool
    third_chunk_only: bool
    dataset: Optional[str]
    one_class_idx: Optional[int]

    # the fields whose flag (cli/args.py's dest) has another name
    FLAG_NAMES: ClassVar[Mapping[str, str]] = {"range_correct": "diffusion_range_correct",
                                               "third_chunk_only": "blur_third_chunk_only"}

    @classmethod
    def flag_name(cls, field: str) -> str:
        """The name of the flag a field is read from."""
        return cls.FLAG_NAMES.get(field, field)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "DissolveSettings":
        """The settings from a mapping of parsed flags (``vars(P)``); other keys are left out, a
        missing one is a KeyError."""
        return cls(**{f.name: flags[cls.flag_name(f.name)] for f in dataclasses.fields(cls)})


# the DissolveSettings field each argument of the strategies is read from (make_dissolve_fn)
_SETTING_OF = {"offset": "diffusion_offset", "upper": "diffusion_upper_offset", "scheduler": "diffusion_scheduler"}


def warn_if_other_data(info, dataset, one_class_idx):
    """One warning line when a dissolver was trained on another dataset or normal class.

    Using one is allowed (it can be a deliberate experiment); a Trainer file records neither.
    """
    meta = info.get("meta") or {}
    trained = (meta.get("dataset"), meta.get("one_class_idx"))
    if trained[0] is None or dataset is None:
        return
    if trained[0] != dataset or (one_class_idx is not None and trained[1] != one_class_idx):
        warn(f"the dissolver {info.get('path')} was trained on {trained[0]} class {trained[1]}, this run is "
             f"{dataset} class {one_class_idx}; dissolving with it anyway")


def make_dissolve_fn(shift_trans_type, settings: DissolveSettings, device, native_kind):
    """The dissolving strategy for ``shift_trans_type`` (``None`` when it has no dissolving part).

    Prefixes: ``diffusion_*`` (``Dissolver.from_checkpoint(settings.diffusion_model_path)`` at
    ``settings.diff_resolution`` with ``settings.diffusion_weights``), ``blurgaussian_*``,
    ``blurmedian_*``, ``blurnone_*`` (``models.blur.BlurShift``). A setting the strategy cannot
    work with is a ``SettingError`` naming the ``settings`` field (or ``shift_trans_type``).
    """
    prefix = str(shift_trans_type).split("_", 1)[0]
    try:
        return _build(prefix, shift_trans_type, settings, device, native_kind)
    except SettingError as exc:
        raise exc.renamed(_SETTING_OF) from None


def _build(prefix, shift_trans_type, settings, device, native_kind):
    if prefix == "diffusion":
        if not settings.diffusion_model_path:
            raise SettingError(f"{{shift_trans_type}} {shift_trans_type} needs a dissolver: give "
                               f"{{diffusion_model_path}} CKPT (train one with python "
                               f"diffusion_models/train_eval_ddpm.py --mode train --dataset "
                               f"{settings.dataset or '<DATASET>'})",
                               "shift_trans_type", "diffusion_model_path")
        dissolver = Dissolver.from_checkpoint(
            settings.diffusion_model_path, device, native_kind, diff_resolution=settings.diff_resolution,
            weights=settings.diffusion_weights,
            offset=settings.diffusion_offset,
            upper=settings.diffusion_upper_offset,
            scheduler=settings.diffusion_scheduler,
            range_correct=settings.range_correct,
            compile=settings.compile_dissolver,
        )
        warn_if_other_data(dissolver.info, settings.dataset, settings.one_class_idx)
        return dissolver
    blurs = {"blurgaussian": "gaussian", "blurmedian": "median", "blurnone": "none"}
    if prefix in blurs:
        return BlurShift(blurs[prefix], kernel_size=settings.kernel_size, native_kind=native_kind,
                         diff_resolution=settings.diff_resolution, resize_to_constant=settings.resize_to_constant,
                         third_chunk_only=settings.third_chunk_only).to(device)
    return None
