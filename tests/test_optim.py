"""LARS against the formula by hand; the learning-rate schedule at known points."""
import math
from types import SimpleNamespace

import pytest
import torch

from training.optim import LARS, lr_at


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


def args(**kw):
    base = dict(lr_init=0.1, warmup=10, epochs=100, lr_scheduler="cosine")
    base.update(kw)
    return SimpleNamespace(**base)


def test_schedule_points():
    P = args()
    assert lr_at(0, P) == pytest.approx(0.1)
    assert lr_at(5, P) == pytest.approx(0.55)
    assert lr_at(10, P) == pytest.approx(1.0)
    assert lr_at(60, P) == pytest.approx((1 + math.cos(math.pi * 50 / 100)) / 2)
    assert lr_at(110, P) == pytest.approx(0.0, abs=1e-12)
    S = args(lr_scheduler="step_decay")
    assert lr_at(20, S) == pytest.approx(1.0)
    assert lr_at(10 + 50, S) == pytest.approx(0.1)
    assert lr_at(10 + 75, S) == pytest.approx(0.01)
    assert lr_at(3, args(warmup=0)) == pytest.approx((1 + math.cos(math.pi * 3 / 100)) / 2)
