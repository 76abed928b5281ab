"""The dissolver's training loop: the paper's DDPM recipe as a class, beside the contrastive
``training.trainer.Trainer``.

:class:`DissolverTrainer` trains a ``GaussianDiffusion`` (``diffusion_models.ddpm``) on prepared
images (``diffusion_models.ddpm_data``): each pass over the data in an order drawn from the
seed and the pass number, each micro-batch's images flipped horizontally with probability 1/2,
``grad_accum`` micro-batches per Adam step (betas 0.9, 0.99), the gradient norm clipped, an
``ema_pytorch`` EMA updated after each step. It counts optimiser steps, writes a checkpoint at
every milestone (each ``save_every`` steps) and at the last step, and resumes exactly from one
(:meth:`DissolverTrainer.load_state`): the weights, the optimiser, the EMA, the position in the
data and every random generator come back.

Under torchrun the micro-batch is ``world_size x batch_size`` images (rank r takes the r-th
block), the gradients are averaged over the ranks, and each rank draws its own timesteps and
noise from a seed computed from the recipe's seed, the step and its rank, so a resumed run needs
no per-rank generator state. A pass's last micro-batch that the ranks do not divide is padded
with the pass's first images (``common.distributed.pad_for_ranks``), so no rank gets none.

The forward passes compute in bf16 or fp32 (``precision``; fp16 would need loss scaling, which
this loop does not do); a resumed training may compute in another precision than before (the
checkpoint's ``train_state['precision']`` lists each segment's).
"""
import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from ema_pytorch import EMA
from tqdm import tqdm

from common import distributed
from common.device import PRECISION_TEXT
from common.errors import UserError
from common.progress import LoopProgress
from diffusion_models.ddpm import build_diffusion, package_version, save_dissolver
from diffusion_models.training_form import training_form
from utils import autocast_for, rng_state, run_seed, set_rng_state

# the kinds of draws of the dissolver's training, each seeded with utils.run_seed
ORDER_STREAM, NOISE_STREAM = 1, 2  # the order of the images in a pass; a step's timesteps and noise per process
# The recipe fields a resume must not change, as the checkpoint records them.
RECIPE_KEYS = ("batch_size", "grad_accum", "lr", "grad_clip", "ema_decay", "ema_every", "seed")
TRAIN_TRANSFORM = "original -> hflip -> bilinear resize without antialias (MedMNIST: pad 2)"


@dataclass(frozen=True)
class DissolverRecipe:
    """How the dissolver trains (the paper's values by default); a resume keeps all of it.

    ``batch_size``: images per micro-batch and process; ``grad_accum``: micro-batches per
    optimiser step; ``lr`` and ``grad_clip``: Adam's learning rate and the gradient-norm clip;
    ``ema_decay`` and ``ema_every``: the EMA's beta and update period (in optimiser steps);
    ``seed``: the seed of the initial weights, the data order, the flips, the timesteps and the
    noise. Bad values are a :class:`UserError` naming the flag.
    """

    batch_size: int = 256
    grad_accum: int = 2
    lr: float = 8e-5
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    ema_every: int = 10
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "ema_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.grad_clip > 0:
            raise UserError(f"--lr ({self.lr}) and --grad_clip ({self.grad_clip}) must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema_decay must lie in [0, 1), got {self.ema_decay}")

    def as_dict(self):
        """The recipe as the checkpoint's ``train_state['recipe']`` records it."""
        return asdict(self)


def check_schedule(train_steps, save_every):
    """Refuse a step count or a milestone period below 1."""
    for name, value in (("train_steps", train_steps), ("save_every", save_every)):
        if value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")


def epoch_order(n, seed, epoch):
    """The order of the ``n`` training images in pass ``epoch`` over them."""
    g = torch.Generator().manual_seed(run_seed(seed, epoch, stream=ORDER_STREAM))
    return torch.randperm(n, generator=g)


def accumulate_and_step(diffusion, opt, micro_batches, grad_clip, net=None, average=None,
                        autocast=contextlib.nullcontext):
    """One optimiser step as the package's Trainer makes it: each micro-batch's loss divided by
    their number and back-propagated, the gradient norm clipped to ``grad_clip``, then the step.

    ``net``: what the micro-batches go through (DDP under torchrun: gradients averaged over the
    ranks once, at the last micro-batch); ``average``: the loss (a tensor) averaged over the
    ranks; ``autocast``: a context factory for the forward passes (mixed precision).
    Returns ``(loss, grad_norm)``: the mean micro-batch loss and the norm before clipping, read
    back from the device together, once per step. A non-finite loss skips the update (the
    caller stops with an error).
    """
    net = diffusion if net is None else net
    total = 0.0
    for i, x in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
            with autocast():
                loss = net(x) / len(micro_batches)
            loss.backward()
        total = total + loss.detach().float()  # summed on the device: no host sync per micro-batch
    if average is not None:
        total = average(total)  # every rank sees the same number, so all stop together
    norm = torch.nn.utils.clip_grad_norm_(diffusion.parameters(), grad_clip)
    total, norm = torch.stack([total, norm.float()]).tolist()  # the step's one host sync
    if not math.isfinite(total):
        opt.zero_grad(set_to_none=True)
        return total, float("nan")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, norm


def recorded_segments(train_state):
    """The precision segments a checkpoint's ``train_state`` records; one that records none gives
    one from its recipe's ``amp`` (bf16 autocast or fp32)."""
    if isinstance(train_state.get("precision"), list):
        return [dict(s) for s in train_state["precision"]]
    amp = (train_state.get("recipe") or {}).get("amp", False)
    return [{"step": 0, "device": None, "precision": "bf16" if amp else "fp32"}]


class DissolverTrainer:
    """The dissolver, its EMA, its optimiser and its place in the data, trained by :meth:`fit`.

    ``config``: the network (``diffusion_models.ddpm.ddpm_config``); ``recipe``: a
    :class:`DissolverRecipe`; ``progress``: show a tqdm bar (on the main process);
    ``precision``: ``'bf16'`` (autocast of the forward passes; fp32 weights, optimiser and EMA)
    or ``'fp32'`` (``common.device.device_precision(..., fp16=False)`` decides it). Building it
    seeds Python's, numpy's and torch's generators with ``recipe.seed``, so the initial weights
    are the seed's.
    """

    def __init__(self, config, recipe, device, progress=True, precision="fp32"):
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"the dissolver trains in bf16 or fp32, not {precision!r}")
        self.config, self.recipe, self.device, self.progress = config, recipe, device, progress
        self.precision = precision
        random.seed(recipe.seed)
        np.random.seed(recipe.seed)
        torch.manual_seed(recipe.seed)
        self.diffusion = build_diffusion(config).to(device)
        training_form(self.diffusion.model)  # the fp32 network's epsilons under bf16 too (same parameters, same names)
        self.ema = EMA(self.diffusion, beta=recipe.ema_decay, update_every=recipe.ema_every,
                       include_online_model=False)
        self.ema.to(device)
        self.optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=recipe.lr, betas=(0.9, 0.99))
        self.flip_gen = torch.Generator().manual_seed(recipe.seed)
        self.step, self.epoch, self.pos = 0, 0, 0  # optimiser steps; pass over the data; next micro-batch within it
        self.world_size = distributed.world_size()
        self.segments = [self.segment()]  # where each start of the training began, and its precision

    @property
    def global_batch(self):
        """Images per micro-batch: every process's ``batch_size`` together."""
        return self.recipe.batch_size * self.world_size

    @property
    def images_per_step(self):
        return self.global_batch * self.recipe.grad_accum

    # ----- checkpoints ------------------------------------------------------------------
    def state(self):
        """What a resume needs besides the weights (the checkpoint's ``train_state``)."""
        return {
            "optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch, "pos": self.pos,
            "ema_step": int(self.ema.step.item()), "ema_initted": bool(self.ema.initted.item()),
            "rng": dict(rng_state(), flip=self.flip_gen.get_state()), "recipe": self.recipe.as_dict(),
            "precision": [dict(s) for s in self.segments],
        }

    def segment(self):
        """Where the training stands and what it computes in from here."""
        return {"step": self.step, "device": str(self.device), "precision": self.precision}

    def precision_change(self):
        """One line when this start computes in another precision than the segment before, else None."""
        if len(self.segments) < 2 or self.segments[-2]["precision"] == self.precision:
            return None
        before = self.segments[-2]
        where = f" (on {before['device']})" if before.get("device") else ""
        return (f"precision changes on resume: {before['precision']}{where} up to step {self.step}, "
                f"{self.precision} (on {self.device}) from here")

    def load_state(self, ckpt):
        """Continue from a dissolver checkpoint (``read_dissolver_checkpoint``) holding a
        ``train_state``: weights, EMA, optimiser, position in the data and generators. Read it
        into host memory: each ``load_state_dict`` copies onto the device what it holds (Adam's
        step counters stay on the host, as a fresh Adam keeps them)."""
        ts = ckpt["train_state"]
        self.diffusion.load_state_dict(ckpt["model_state"])
        self.ema.ema_model.load_state_dict(ckpt["ema_state"])
        self.optimizer.load_state_dict(ts["optimizer"])
        self.ema.step.fill_(int(ts["ema_step"]))
        self.ema.initted.fill_(bool(ts["ema_initted"]))
        self.step, self.epoch, self.pos = int(ts["step"]), int(ts["epoch"]), int(ts["pos"])
        set_rng_state(ts["rng"])
        self.flip_gen.set_state(ts["rng"]["flip"].cpu())
        self.segments = recorded_segments(ts) + [self.segment()]

    def checkpoint_meta(self, data, n_images, save_every):
        """The checkpoint's ``meta``: ``data`` (what the images are: dataset, one_class_idx,
        class_name, native_kind), then the training so far and its recipe."""
        r = self.recipe
        return {
            **data, "package_version": package_version(),
            "steps": self.step, "milestone": self.step // save_every, "images_seen": self.step * self.images_per_step,
            "normal_train_images": n_images, "seed": r.seed, "batch_size": r.batch_size,
            "world_size": self.world_size, "grad_accum": r.grad_accum, "lr": r.lr, "grad_clip": r.grad_clip,
            "precision": PRECISION_TEXT[self.precision],
            "ema": f"ema_pytorch EMA(beta={r.ema_decay}, update_every={r.ema_every}, defaults otherwise)",
            "train_transform": TRAIN_TRANSFORM,
        }

    def save(self, path, meta):
        """Write the dissolver checkpoint atomically (the main process only; never a non-finite one)."""
        save_dissolver(path, self.diffusion, self.ema.ema_model, self.config, meta, self.state())

    # ----- the loop -----------------------------------------------------------------------
    def _average(self, value):
        return distributed.mean_all(value)

    def _micro_batch(self, images, order, n_micro):
        """The next micro-batch of this process (its block of the global one), flipped, on the
        device; moves to the next pass over the data when this one is used up."""
        if self.pos >= n_micro:
            self.epoch, self.pos = self.epoch + 1, 0
            order = epoch_order(len(images), self.recipe.seed, self.epoch)
        gb = self.global_batch
        idx = order[self.pos * gb:(self.pos + 1) * gb]
        self.pos += 1
        idx = distributed.pad_global_batch(idx, order)  # every rank an equal block, never none
        flip = torch.rand(len(idx), generator=self.flip_gen) < 0.5  # the global micro-batch's flips
        idx, flip = distributed.shard(idx), distributed.shard(flip)  # this rank's block of it
        x = images.index_select(0, idx).to(self.device)
        return torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x), order

    def fit(self, images, data, save_path, train_steps, save_every, progress_file=None, shorten=""):
        """Train from the current step to ``train_steps`` on ``images`` (``N x 3 x r x r`` in
        [0, 1], on the CPU), writing ``save_path`` at every milestone (each ``save_every``
        steps) and at ``train_steps``; ``data`` goes into each checkpoint's meta
        (:meth:`checkpoint_meta`). A non-finite loss stops the training with a
        :class:`UserError`; what was written before stays.

        After the first steps one line says the measured seconds per step, the time to the end
        and ``shorten`` (the flags that shorten the training); ``progress_file``: a JSON file with
        the same figures, rewritten every few seconds (``common.progress.LoopProgress``)."""
        check_schedule(train_steps, save_every)
        r, device = self.recipe, self.device
        n = len(images)
        n_micro = (n + self.global_batch - 1) // self.global_batch
        net = distributed.wrap_model(self.diffusion, device)
        average = self._average if distributed.is_distributed() else None
        self.diffusion.train()
        bar = tqdm(total=train_steps, initial=self.step, desc="DDPM steps", dynamic_ncols=True,
                   disable=True if not self.progress or not distributed.is_main() else None)  # None: a terminal only
        pace = LoopProgress(train_steps, self.step, what="dissolver training", shorten=shorten, path=progress_file)
        t0, t_steps, recent = time.time(), 0, []
        order = epoch_order(n, r.seed, self.epoch)
        while self.step < train_steps:
            micro = []
            for _ in range(r.grad_accum):
                x, order = self._micro_batch(images, order, n_micro)
                micro.append(x)
            if distributed.is_distributed():  # each rank its own timesteps and noise, resumable without state
                torch.manual_seed(run_seed(r.seed, self.step, distributed.rank(), stream=NOISE_STREAM))
            total, _ = accumulate_and_step(self.diffusion, self.optimizer, micro, r.grad_clip, net=net,
                                           average=average, autocast=lambda: autocast_for(device, self.precision))
            if not math.isfinite(total):
                bar.close()
                raise UserError(f"the DDPM loss became {total} at step {self.step + 1}; nothing was written after "
                                f"the last milestone. Lower --lr (now {r.lr}) or check the training images")
            self.step += 1
            self.ema.update()
            t_steps += 1
            recent.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", s_per_step=f"{(time.time() - t0) / t_steps:.2f}")
            pace.step(self.step)
            if self.step % save_every == 0 or self.step == train_steps:
                print(f"step {self.step}: mean loss {sum(recent) / len(recent):.4f} over the last {len(recent)} "
                      f"steps, {(time.time() - t0) / t_steps:.2f} s per optimiser step")
                recent = []
                meta = self.checkpoint_meta(data, n, save_every)
                self.save(save_path, meta)
                reason = "milestone" if self.step % save_every == 0 else "final"
                print(f"saved {save_path} ({reason}: step {self.step}, milestone {meta['milestone']})")
        bar.close()
        pace.close()
