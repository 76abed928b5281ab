"""The settings of one training run, as :class:`training.trainer.Trainer` reads them.

Every field is required: the defaults live in the program's parser (``cli/args.py``), and
``TrainConfig.from_flags(vars(P))`` takes the parsed values once, at the program's boundary.
"""
import dataclasses
from typing import Any, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the training loop, its losses, optimisers and schedule need of a run's flags."""

    # the shift transformation and the views
    base_shift: str  # rotation, cutperm or none (the shift part of --shift_trans_type)
    resize_factor: float
    resize_fix: bool
    # the losses
    temperature: float
    sim_lambda: float
    loss_mode: str
    # the optimisers and the learning rate
    optimizer: str
    lr_init: float
    weight_decay: float
    linear_main_optim: str
    lr_scheduler: str
    warmup: int
    lr_step_timing: str
    # the sequence of steps
    epochs: int
    batch_size: int  # per process
    max_batches_per_epoch: int
    epoch_steps: str
    drop_last: bool
    max_steps: Optional[int]
    seed: int
    paper_rng_replay: bool
    # logging, evaluation and checkpoints (the precision is the device's: Trainer's ``precision``)
    log_every: int
    error_step: int
    save_step: int

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "TrainConfig":
        """The config from a mapping of parsed flags (``vars(P)``); other keys are left out, a
        missing field is a KeyError."""
        return cls(**{f.name: flags[f.name] for f in dataclasses.fields(cls)})
