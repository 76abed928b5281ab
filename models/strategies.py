"""What the training step asks of a dissolving strategy (``training.trainer.Trainer.make_views``).

Two strategies exist: the diffusion dissolver (``models.dissolve.Dissolver``) and the blurs
(``models.blur.BlurShift``); ``models.dissolve.make_dissolve_fn`` builds either.
"""
from typing import List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch


@runtime_checkable
class DissolveStrategy(Protocol):
    """A dissolving strategy of ``--mode simclr_DIA``.

    The step makes the chunks ``x1``, ``x2`` (two flips of the batch) and ``x3`` (K fresh
    flips), each a list of K tensors, one per shift. The chunks named by ``applies_to``
    (0-based) go through ``dissolve_chunks``; the others are only shifted.
    """

    applies_to: Tuple[int, ...]
    """The chunks the strategy changes: 0 = x1, 1 = x2, 2 = x3."""

    shift_inside: bool
    """True: ``dissolve_chunks(chunks, epoch, shift=shift)`` applies the shift itself (the
    paper's blurs shift before resizing back); False: the step shifts chunk k of the result by k."""

    info: Optional[dict]
    """The description of the checkpoint the strategy was loaded from, None when there is none."""

    def dissolve_chunks(self, x_chunks: Sequence[torch.Tensor], epoch: int) -> List[torch.Tensor]:
        """K chunks of ``B x 3 x H x W`` images in ``[0, 1]`` -> K chunks of the same shapes, each
        dissolved with its own random strength; ``epoch`` is the 1-based running epoch (the
        timestep samplers depend on it). A strategy with ``shift_inside`` also takes ``shift``,
        and applies ``shift(., k)`` to chunk k."""
        ...
