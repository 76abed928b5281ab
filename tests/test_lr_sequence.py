"""The paper's sequence of steps (docs/method.md §3, "The sequence of steps"): the learning rate
every step trains with, the number and sizes of a pass's batches, and a resumed run continuing
the same sequence. The rates are computed here independently, by stepping the paper's loop and
scheduler rule by hand, and compared with the rates the training loop sets, step by step."""
import math

import pytest
import torch

from cli.args import parse_args
from models.resnet import build_model
from training import schedule
from training.config import TrainConfig
from training.optim import lr_at
from training.trainer import Trainer

LR_INIT, WARMUP, EPOCHS, BATCH = 0.1, 2, 5, 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks: one thread is faster


def paper_rates(n, batch, max_batches, epochs=EPOCHS, warmup=WARMUP, lr_init=LR_INIT, multiplier=10.0):
    """The rates the paper's loop trains with: ``scheduler.step(epoch - 1 + b / len(loader))``
    after the optimiser step of batch ``b``, the epoch left after batch ``max_batches``, a
    ``DataLoader`` without ``drop_last`` (``len(loader) = ceil(n / batch)``). The scheduler is
    GradualWarmupScheduler(multiplier 10, total_epoch = warmup) over CosineAnnealingLR(T_max =
    epochs): at construction the warm-up at 0; the warm-up ``lr_init * ((multiplier - 1) * t /
    warmup + 1)`` while ``t <= warmup``; at the first ``t`` past it the cosine takes over from its
    construction-time position (last_epoch 0), where torch 1.11 returns the optimiser's current
    rate, so the rate stays; afterwards the cosine's closed form at ``t - warmup``."""
    length = math.ceil(n / batch)
    lr = lr_init * ((multiplier - 1) * 0 / warmup + 1)
    handed_over = False
    rates = []
    for epoch in range(1, epochs + 1):
        for b in range(length):
            rates.append(lr)  # batch b trains with the rate the scheduler holds now
            t = epoch - 1 + b / length
            if t <= warmup:
                lr = lr_init * ((multiplier - 1) * t / warmup + 1)
            elif not handed_over:
                handed_over = True
            else:
                lr = lr_init * multiplier * (1 + math.cos(math.pi * (t - warmup) / epochs)) / 2
            if b >= max_batches:
                break
    return rates


class Images:
    """The dataset interface the loop uses, recording every batch it is asked for."""

    def __init__(self, n, size=8):
        g = torch.Generator().manual_seed(n)
        self.x = torch.rand(n, 3, size, size, generator=g)
        self.y = torch.zeros(n, dtype=torch.long)
        self.asked = []

    def __len__(self):
        return len(self.x)

    def get_batch(self, idx):
        self.asked.append(idx.clone())
        return self.x[idx], self.y[idx]


class Log:
    def __init__(self, logdir):
        self.logdir = str(logdir)
        self.lines = []

    def log(self, msg, echo=True):
        self.lines.append(msg)

    def scalar(self, tag, value, step):
        pass

    def flush(self):
        pass

    def log_size(self):
        return 0


def flags(max_batches, *extra, epochs=EPOCHS):
    return parse_args("train", ["--mode", "simclr", "--shift_trans_type", "none", "--batch_size", str(BATCH),
                                "--resnet_width", "8", "--simclr_dim", "8", "--epochs", str(epochs), "--warmup",
                                str(WARMUP), "--lr_init", str(LR_INIT), "--max_batches_per_epoch", str(max_batches),
                                "--save_step", "1000", "--amp", "off", "--device", "cpu", *extra])


def make_trainer(P):
    torch.manual_seed(0)
    model = build_model("resnet18", 2, simclr_dim=8, n_shifts=P.K_shift, width=8)
    trainer = Trainer(TrainConfig.from_flags(vars(P)), model, torch.device("cpu"))
    rates = []
    step = trainer.train_step

    def recording_step(x, y):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        assert all(g["lr"] == rates[-1] for g in trainer.optimizer.param_groups)
        return step(x, y)

    trainer.train_step = recording_step
    return trainer, rates


def train(P, n, logdir, resume=None):
    """Run ``Trainer.fit`` on ``n`` images; ``(rates, batches, trainer)`` of the steps it trained."""
    trainer, rates = make_trainer(P)
    if resume is not None:
        trainer.load_state(torch.load(resume, weights_only=False))
    data = Images(n)
    trainer.fit(data, Log(logdir), meta={})
    return rates, data.asked, trainer


@pytest.mark.parametrize("n,max_batches", [
    (10, 5),  # a pass of 3 batches (4, 4, 2), fewer than --max_batches_per_epoch: every epoch a full pass
    (30, 2),  # a pass of 8 batches, more: 3 steps an epoch (batches 0, 1, 2), the fraction over 8
])
def test_rates_are_the_papers_step_by_step(tmp_path, n, max_batches):
    P = flags(max_batches)
    rates, batches, _ = train(P, n, tmp_path)
    expected = paper_rates(n, BATCH, max_batches)
    assert len(rates) == len(expected) == EPOCHS * min(math.ceil(n / BATCH), max_batches + 1)
    for s, (got, want) in enumerate(zip(rates, expected)):
        assert abs(got - want) <= 1e-12, (s, got, want)
    # the warm-up and the cosine are both reached: lr_init twice, the peak twice, then the decay
    assert rates[0] == rates[1] == LR_INIT
    peak = rates.index(max(rates))
    assert max(rates) == pytest.approx(10 * LR_INIT, abs=1e-12) and rates[peak + 1] == rates[peak]  # the hand-over
    after = rates[peak + 1:]
    assert all(b < a for a, b in zip(after, after[1:])) and after[-1] < 0.75 * max(rates)  # the cosine
    # and the pure function gives the same numbers
    plan = schedule.epoch_plan(n, BATCH, max_batches)
    assert [schedule.global_step_lr(plan, s, LR_INIT, WARMUP, EPOCHS) for s in range(len(rates))] == rates


def test_step_decay_is_the_papers_too(tmp_path):
    P = flags(2, "--lr_scheduler", "step_decay", epochs=8)
    rates, _, _ = train(P, 30, tmp_path)
    # the paper's MultiStepLR(milestones [4, 6], gamma 0.1), hand-over and all, at t - warmup
    length, lr, over, expected = 8, LR_INIT, False, []
    for epoch in range(1, 9):
        for b in range(3):
            expected.append(lr)
            t = epoch - 1 + b / length
            if t <= WARMUP:
                lr = LR_INIT * (9 * t / WARMUP + 1)
            elif not over:
                over = True
            else:
                lr = LR_INIT * 10 * 0.1 ** sum(t - WARMUP >= m for m in (4, 6))
    assert len(rates) == len(expected)
    for got, want in zip(rates, expected):
        assert abs(got - want) <= 1e-12


def test_previous_sequence_is_one_set_of_flags_away(tmp_path):
    """--lr_step_timing before --epoch_steps capped --drop_last: each batch at the rate of its own
    fraction i / (steps of the epoch), min(N // B, cap) full batches."""
    P = flags(2, "--lr_step_timing", "before", "--epoch_steps", "capped", "--drop_last")
    rates, batches, _ = train(P, 30, tmp_path)
    steps = min(30 // BATCH, 2)
    config = TrainConfig.from_flags(vars(P))
    expected = [lr_at(e - 1 + i / steps, config) for e in range(1, EPOCHS + 1) for i in range(steps)]
    assert len(rates) == len(expected) == EPOCHS * 2
    for got, want in zip(rates, expected):
        assert abs(got - want) <= 1e-12
    assert [len(b) for b in batches] == [BATCH] * len(expected)


def test_a_pass_and_its_batches(tmp_path):
    # 10 images, batch 4: a pass is ceil(10 / 4) = 3 batches of 4, 4 and 2, every image once
    _, batches, _ = train(flags(5, epochs=2), 10, tmp_path / "keep")
    assert [len(b) for b in batches] == [4, 4, 2] * 2
    for epoch in (batches[:3], batches[3:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:]))  # a new order every epoch
    # --drop_last: 10 // 4 = 2 batches of 4, the same order's first 8 images
    _, dropped, _ = train(flags(5, "--drop_last", epochs=2), 10, tmp_path / "drop")
    assert [len(b) for b in dropped] == [4, 4] * 2
    assert all(torch.equal(a, b) for a, b in zip(dropped, batches[:2] + batches[3:5]))
    # a cut epoch: 30 images (8 batches a pass), --max_batches_per_epoch 1: batches 0 and 1 (2 steps)
    _, cut, _ = train(flags(1, epochs=2), 30, tmp_path / "cut")
    assert [len(b) for b in cut] == [4, 4] * 2

    # the plan of the examples
    assert schedule.pass_batches(1000, 32) == 32 and schedule.pass_batches(1000, 32, drop_last=True) == 31
    assert schedule.pass_batches(5, 32) == schedule.pass_batches(5, 32, drop_last=True) == 1
    plan = schedule.epoch_plan(10_000, 32, 200)
    assert (plan.pass_batches, plan.steps, plan.denominator) == (313, 201, 313)
    capped = schedule.epoch_plan(10_000, 32, 200, rule="capped", drop_last=True)
    assert (capped.pass_batches, capped.steps, capped.denominator) == (312, 200, 200)
    # the rate at the end of epoch 1 (the first step of epoch 2 trains with it): 0.1575 against 0.1896
    end = schedule.step_lr(plan, 2, 0, 0.1, 10, 1000)
    assert end == pytest.approx(0.1 * (9 * (200 / 313) / 10 + 1), abs=1e-15)
    before = schedule.step_lr(capped, 1, 199, 0.1, 10, 1000, timing="before")
    assert before == pytest.approx(0.1 * (9 * 0.995 / 10 + 1), abs=1e-15)
    # the first five steps (a pass of 4 batches, warm-up 10 epochs)
    p4 = schedule.epoch_plan(4 * 32, 32, 200)
    assert [round(schedule.global_step_lr(p4, s, 0.1, 10, 1000), 12) for s in range(5)] == \
        [0.1, 0.1, 0.1225, 0.145, 0.1675]
    assert [round(schedule.global_step_lr(p4, s, 0.1, 10, 1000, timing="before"), 12) for s in range(5)] == \
        [0.1, 0.1225, 0.145, 0.1675, 0.19]


def test_ranks_share_a_smaller_last_batch():
    perm = torch.tensor([7, 3, 9, 0, 5, 1, 8, 2, 6, 4])
    full = perm[:6]
    assert [schedule.rank_share(full, 3, r, perm).tolist() for r in range(3)] == [[7, 3], [9, 0], [5, 1]]
    # a last batch of 5 images on 3 ranks: padded with the epoch's first image to 6, 2 each
    last = perm[5:]
    parts = [schedule.rank_share(last, 3, r, perm).tolist() for r in range(3)]
    assert parts == [[1, 8], [2, 6], [4, 7]]
    # one image on 4 ranks: every rank still gets one (none gets an empty batch)
    one = perm[9:]
    assert [schedule.rank_share(one, 4, r, perm).tolist() for r in range(4)] == [[4], [7], [3], [9]]
    # a single process takes the batch as it is
    assert torch.equal(schedule.rank_share(last, 1, 0, perm), last)
    # the number of images a rank takes in its last step is DistributedSampler's: ceil(N / W) - (steps - 1) * B
    for n, b, w in [(10, 2, 3), (1000, 32, 4), (33, 4, 8), (7, 8, 2)]:
        steps = schedule.pass_batches(n, b * w)
        start, stop = schedule.batch_bounds(steps - 1, n, b * w)
        idx = torch.arange(n)
        assert len(schedule.rank_share(idx[start:stop], w, 0, idx)) == math.ceil(n / w) - (steps - 1) * b


@pytest.mark.parametrize("stop", [6, 4])  # after epoch 2 (3 steps an epoch); inside epoch 2
def test_resumed_run_continues_the_sequence(tmp_path, stop):
    """A run stopped by --max_steps and resumed from its last.model trains every later batch with
    the rate and images the uninterrupted run gives that batch; a stop inside an epoch ends that
    epoch, so the resumed run starts at the next one."""
    straight_rates, straight_batches, straight = train(flags(2), 30, tmp_path / "straight")
    first = flags(2)
    first.max_steps = stop
    rates_a, batches_a, part = train(first, 30, tmp_path / "parts")
    assert part.epoch == 2 and part.step == stop
    rates_b, batches_b, resumed = train(flags(2), 30, tmp_path / "parts", resume=tmp_path / "parts" / "last.model")
    assert (resumed.epoch, resumed.step) == (EPOCHS, EPOCHS * 3 - (6 - stop))
    assert rates_a == straight_rates[:stop] and rates_b == straight_rates[6:]
    assert all(torch.equal(a, b) for a, b in zip(batches_a + batches_b, straight_batches[:stop] + straight_batches[6:]))
    if stop == 6:  # the same steps: the same weights and optimiser moments, the head's too
        a, b = straight.model.state_dict(), resumed.model.state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        ma, mb = (t.linear_decay.state_dict()["state"] for t in (straight, resumed))
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k]["momentum_buffer"], mb[k]["momentum_buffer"])
                                              for k in ma)
