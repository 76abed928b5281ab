"""LARS over SGD, and the learning rate at a fractional epoch (CSI's schedule).

LARS is a few lines (docs/method.md §3, step 8); a package exists (torchlars) but it compiles a CUDA
extension at install time, so it is written here.
"""
import torch

from training.config import TrainConfig
from training.schedule import WARMUP_MULTIPLIER, lr_at_fraction

OPTIMIZERS = ("sgd", "lars")


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling around an SGD optimiser.

    Before each step every gradient becomes ``(g + wd*w) * trust * ||w|| / (||g|| + wd*||w|| + eps)``
    (factor 1 where either norm is 0) and the wrapped SGD runs with weight decay 0.
    """

    def __init__(self, optimizer, eps=1e-8, trust_coef=0.001):
        self.optim = optimizer
        self.eps, self.trust_coef = eps, trust_coef

    # expose the wrapped optimiser's state so schedulers and checkpoints see one object
    @property
    def param_groups(self):
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state):
        self.optim.load_state_dict(state)

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _rescale(self, group):
        wd = group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = self.trust_coef * w_norm / (g_norm + wd * w_norm + self.eps)
        ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
        if wd != 0:
            torch._foreach_add_(grads, params, alpha=wd)
        torch._foreach_mul_(grads, list(ratio.unbind()))

    def step(self, closure=None):
        saved = []
        for group in self.optim.param_groups:
            self._rescale(group)
            saved.append(group["weight_decay"])
            group["weight_decay"] = 0
        try:
            return self.optim.step(closure)
        finally:
            for group, wd in zip(self.optim.param_groups, saved):
                group["weight_decay"] = wd


def make_optimizer(params, name, lr_init, weight_decay):
    """SGD with momentum 0.9 over ``params``, wrapped in LARS when ``name`` is ``'lars'``
    (``'sgd'``: SGD alone)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    sgd = torch.optim.SGD(params, lr=lr_init, momentum=0.9, weight_decay=weight_decay)
    return LARS(sgd) if name == "lars" else sgd


def lr_at(epoch, config: TrainConfig, multiplier=WARMUP_MULTIPLIER):
    """Learning rate at a fractional epoch: linear warm-up from lr_init to lr_init*multiplier
    over ``config.warmup`` epochs, then cosine annealing over ``config.epochs`` (or x0.1 at 50%
    and 75%) (``training.schedule.lr_at_fraction`` with the config's numbers; which fraction a
    step trains with is ``training.schedule.step_lr``'s)."""
    return lr_at_fraction(epoch, config.lr_init, config.warmup, config.epochs, config.lr_scheduler, multiplier)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
