"""LARS against the formula by hand; the learning-rate schedule at known points; the linear head
under the main optimiser as the paper's code ran it."""
import math

import pytest
import torch

from cli.args import parse_args
from models.resnet import build_model
from training.config import TrainConfig
from training.optim import LARS, lr_at
from training.trainer import Trainer


def test_lars_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    z = torch.nn.Parameter(torch.zeros(2))  # ||w|| = 0 -> factor 1
    wd, lr = 0.1, 0.5
    opt = LARS(torch.optim.SGD([w, z], lr=lr, momentum=0.0, weight_decay=wd))
    w.grad = torch.tensor([0.0, 2.0])  # ||g|| = 2
    z.grad = torch.tensor([1.0, -1.0])
    opt.step()
    trust = 0.001 * 5 / (2 + wd * 5 + 1e-8)
    g = (torch.tensor([0.0, 2.0]) + wd * torch.tensor([3.0, 4.0])) * trust
    torch.testing.assert_close(w.data, torch.tensor([3.0, 4.0]) - lr * g)
    torch.testing.assert_close(z.data, -lr * torch.tensor([1.0, -1.0]))
    assert opt.param_groups[0]["weight_decay"] == wd  # restored after the step


def test_lars_state_dict_round_trip():
    w = torch.nn.Parameter(torch.ones(3))
    opt = LARS(torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-6))
    w.grad = torch.ones(3)
    opt.step()
    opt2 = LARS(torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-6))
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state[w]["momentum_buffer"], opt.state[w]["momentum_buffer"])


def config(*flags):
    """The training settings of train.py's command line: --lr_init 0.1 --warmup 10 --epochs 100
    (cosine), then ``flags``."""
    P = parse_args("train", ["--mode", "simclr", "--shift_trans_type", "none", "--lr_init", "0.1", "--warmup", "10",
                             "--epochs", "100", "--lr_scheduler", "cosine", *flags])
    return TrainConfig.from_flags(vars(P))


def test_schedule_points():
    P = config()
    assert lr_at(0, P) == pytest.approx(0.1)
    assert lr_at(5, P) == pytest.approx(0.55)
    assert lr_at(10, P) == pytest.approx(1.0)
    assert lr_at(60, P) == pytest.approx((1 + math.cos(math.pi * 50 / 100)) / 2)
    assert lr_at(110, P) == pytest.approx(0.0, abs=1e-12)
    S = config("--lr_scheduler", "step_decay")
    assert lr_at(20, S) == pytest.approx(1.0)
    assert lr_at(10 + 50, S) == pytest.approx(0.1)
    assert lr_at(10 + 75, S) == pytest.approx(0.01)
    assert lr_at(3, config("--warmup", "0")) == pytest.approx((1 + math.cos(math.pi * 3 / 100)) / 2)


def _head_before_adam(extra):
    """The linear head's weights as the trainer's first two steps leave them just before the
    head's own Adam step: ``[(before the step, at the Adam step), ...]``."""
    P = parse_args("train", ["--mode", "simclr", "--shift_trans_type", "none", "--batch_size", "4",
                             "--resnet_width", "8", "--simclr_dim", "8", "--amp", "off", "--device", "cpu", *extra])
    torch.manual_seed(0)
    model = build_model("resnet18", 2, simclr_dim=8, n_shifts=1, width=8)
    trainer = Trainer(TrainConfig.from_flags(vars(P)), model, torch.device("cpu"))
    head = list(trainer.model.linear.parameters())
    seen = []
    linear_step = trainer.linear_step

    def recording(aux, y, b):
        seen.append([p.detach().clone() for p in head])
        return linear_step(aux, y, b)

    trainer.linear_step = recording
    x, y = torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    out = []
    for step, lr in enumerate((0.1, 0.7)):
        trainer.set_lr(lr)
        before = [p.detach().clone() for p in head]
        trainer.train_step(x, y)
        trainer.step += 1  # as the loop counts it
        out.append((before, seen[-1]))
    return P, trainer, out


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_linear_head_takes_the_main_optimisers_decay_from_the_second_step(optimizer):
    """--linear_main_optim paper: the paper's main optimiser holds the linear head, whose gradient
    torch 1.11's zero_grad leaves at zero after the head's first Adam step. So step 1 leaves the
    head alone, and from step 2 the head takes, before its Adam step, the SGD step of a zero
    gradient: weight decay through momentum (LARS: factor 1 on a zero gradient, SGD: its decay)."""
    P, trainer, ((b0, a0), (b1, a1)) = _head_before_adam(["--optimizer", optimizer])
    wd, lr = P.weight_decay, 0.7
    assert P.linear_main_optim == "paper" and wd > 0
    for before, at in zip(b0, a0):
        assert torch.equal(before, at)  # no gradient yet: untouched
    for before, at in zip(b1, a1):
        buf = wd * before  # the first momentum buffer is the step itself
        torch.testing.assert_close(at, before - lr * buf, rtol=0, atol=1e-9)
        assert not torch.equal(at, before)
    # off: only Adam moves the head
    _, off, ((c0, d0), (c1, d1)) = _head_before_adam(["--optimizer", optimizer, "--linear_main_optim", "off"])
    assert off.linear_decay is None
    for before, at in zip(c0 + c1, d0 + d1):
        assert torch.equal(before, at)
