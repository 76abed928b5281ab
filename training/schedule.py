"""The sequence of training steps: the batches of a pass, the steps of an epoch and the learning
rate of every step (docs/method.md §3, "The sequence of steps").

Pure functions of explicit numbers, so that outside checks can call them. By default they give
the paper's sequence:

- a pass over ``n`` images has ``ceil(n / G)`` batches of the global batch ``G``, the last one
  with the ``n mod G`` images left (the paper's ``DataLoader`` keeps it); with ``drop_last``,
  ``n // G`` full batches;
- an epoch stops after the batch numbered ``max_batches`` (counted from 0), so it trains
  ``min(pass, max_batches + 1)`` steps, and the fractional epoch of batch ``i`` of epoch ``e`` is
  ``e - 1 + i / pass`` (the batches of a *full* pass); ``epoch_steps="capped"`` trains
  ``min(pass, max_batches)`` steps and divides by them;
- the learning rate is the warm-up (``lr_init * ((10 - 1) * x / warmup + 1)``) then cosine
  annealing (or step decay) at a fractional epoch ``x``; with ``timing="paper"`` the scheduler is
  stepped *after* the optimiser step of each batch with that batch's ``x``, so a batch trains with
  the rate of the batch before it (the first two steps of a run both use ``lr_init``), and at the
  first step past the warm-up the rate stays where it was (the cosine scheduler takes over from
  its construction-time position, where it returns the optimiser's current rate); with
  ``timing="before"`` every batch trains with the rate of its own ``x``.

A batch is named by its epoch (from 1) and its index in that epoch (from 0); every rate is a
function of that name alone, so a resumed run gives each batch the rate the uninterrupted run
gives it.
"""
import bisect
import math
from dataclasses import dataclass

from common import distributed

EPOCH_STEP_RULES = ("paper", "capped")
LR_TIMINGS = ("paper", "before")
WARMUP_MULTIPLIER = 10.0  # the paper's GradualWarmupScheduler(multiplier=10.0)


def pass_batches(n, global_batch, drop_last=False):
    """Batches in one pass over ``n`` images: ``ceil(n / global_batch)``, the last one smaller
    when ``global_batch`` does not divide ``n``; with ``drop_last``, ``n // global_batch`` (one
    batch of all ``n`` images when there are fewer than ``global_batch``)."""
    if n < 1 or global_batch < 1:
        raise ValueError(f"need at least one image and a batch of at least 1, got n={n}, batch={global_batch}")
    if drop_last:
        return max(1, n // global_batch)
    return -(-n // global_batch)


def batch_bounds(i, n, global_batch):
    """``(start, stop)`` of batch ``i`` of a pass in the epoch's order of the ``n`` images."""
    start = i * global_batch
    return start, min(n, start + global_batch)


@dataclass(frozen=True)
class EpochPlan:
    """How an epoch runs: ``pass_batches`` batches in a full pass (the paper's ``len(loader)``),
    ``steps`` of them trained, and ``denominator``, what a batch's index is divided by in its
    fractional epoch."""
    pass_batches: int
    steps: int
    denominator: int

    def fraction(self, epoch, i):
        """The fractional epoch of batch ``i`` of ``epoch`` (from 1): ``epoch - 1 + i / denominator``,
        computed as the paper's loop computes it."""
        return epoch - 1 + i / self.denominator

    def previous(self, epoch, i):
        """The batch trained before batch ``i`` of ``epoch``, or None for the run's first batch."""
        if i > 0:
            return epoch, i - 1
        if epoch > 1:
            return epoch - 1, self.steps - 1
        return None


def epoch_plan(n, global_batch, max_batches, rule="paper", drop_last=False):
    """The :class:`EpochPlan` for ``n`` images, a global batch of ``global_batch`` images and the
    cap ``max_batches`` (``--max_batches_per_epoch``).

    ``rule="paper"``: the epoch stops after the batch numbered ``max_batches`` (counted from 0:
    ``max_batches + 1`` steps), and the fraction divides by the batches of a full pass.
    ``rule="capped"``: at most ``max_batches`` steps, and the fraction divides by the steps the
    epoch trains."""
    if rule not in EPOCH_STEP_RULES:
        raise ValueError(f"unknown epoch step rule {rule!r} (one of {', '.join(EPOCH_STEP_RULES)})")
    if max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, got {max_batches}")
    full = pass_batches(n, global_batch, drop_last)
    if rule == "paper":
        steps = min(full, max_batches + 1)
        return EpochPlan(full, steps, full)
    steps = min(full, max_batches)
    return EpochPlan(full, steps, steps)


def lr_at_fraction(x, lr_init, warmup, epochs, lr_scheduler="cosine", multiplier=WARMUP_MULTIPLIER):
    """The rate the paper's schedulers compute in closed form at fractional epoch ``x``: for
    ``x <= warmup`` (and ``warmup > 0``) the linear warm-up from ``lr_init`` to
    ``lr_init * multiplier``, then cosine annealing over ``epochs`` (``T_max``) of ``x - warmup``
    from that peak, or step decay (x0.1 at ``int(0.5 * epochs)`` and ``int(0.75 * epochs)``)."""
    if warmup > 0 and x <= warmup:
        return lr_init * ((multiplier - 1.0) * x / warmup + 1.0)
    peak = lr_init * multiplier
    e = x - warmup
    if lr_scheduler == "cosine":
        return peak * (1 + math.cos(math.pi * e / epochs)) / 2
    if lr_scheduler == "step_decay":
        milestones = [int(0.5 * epochs), int(0.75 * epochs)]
        return peak * 0.1 ** bisect.bisect_right(milestones, e)
    raise ValueError(f"unknown lr scheduler {lr_scheduler!r}")


def _rate_after(plan, batch, lr_init, warmup, epochs, lr_scheduler):
    """The rate the paper's scheduler holds after it was stepped with ``batch``'s fraction
    (``batch`` None: at its construction, the warm-up's start)."""
    if batch is None:
        return lr_at_fraction(0, lr_init, warmup, epochs, lr_scheduler)
    x = plan.fraction(*batch)
    if x > warmup:
        before = plan.previous(*batch)
        x_before = 0 if before is None else plan.fraction(*before)
        if x_before <= warmup:  # the hand-over to the cosine (or step decay): the rate stays
            return _rate_after(plan, before, lr_init, warmup, epochs, lr_scheduler)
    return lr_at_fraction(x, lr_init, warmup, epochs, lr_scheduler)


def step_lr(plan, epoch, i, lr_init, warmup, epochs, lr_scheduler="cosine", timing="paper"):
    """The learning rate batch ``i`` (from 0) of ``epoch`` (from 1) trains with.

    ``timing="paper"``: the rate the scheduler set after the batch before (``lr_init`` for the
    run's first batch), the hand-over step included; ``timing="before"``: the rate of the
    batch's own fractional epoch."""
    if timing == "before":
        return lr_at_fraction(plan.fraction(epoch, i), lr_init, warmup, epochs, lr_scheduler)
    if timing != "paper":
        raise ValueError(f"unknown lr step timing {timing!r} (one of {', '.join(LR_TIMINGS)})")
    return _rate_after(plan, plan.previous(epoch, i), lr_init, warmup, epochs, lr_scheduler)


def global_step_lr(plan, s, lr_init, warmup, epochs, lr_scheduler="cosine", timing="paper"):
    """The rate of global step ``s`` (from 0) of a run that trains every epoch whole."""
    return step_lr(plan, s // plan.steps + 1, s % plan.steps, lr_init, warmup, epochs, lr_scheduler, timing)


def rank_share(idx, world_size, rank, fill):
    """Rank ``rank``'s contiguous block of the global batch ``idx`` (a 1-D tensor of image
    indices). A batch the ranks do not divide (a pass's last, smaller one) is first padded, as
    ``DistributedSampler`` pads, with the first images of ``fill`` (the epoch's order), so every
    rank gets ``ceil(len(idx) / world_size)`` images: the same number on every rank (the gathered
    similarity matrix needs it) and never none (``common.distributed.pad_for_ranks``)."""
    return distributed.rank_block(distributed.pad_for_ranks(idx, world_size, fill), world_size, rank)
