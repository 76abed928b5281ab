"""Checkpoint selection as the paper's train.py does it (best_CSI.model by test AUROC after
every --save_step epochs) and the randomness its evaluation leaves behind (--paper_rng_replay)."""
import json
import random

import numpy as np
import pytest
import torch

import eval as eval_program
import train as train_program
from cli.args import parse_args
from common.errors import UserError
from helpers import CSI, TINY_TRAIN, TINY_TRAIN_DIGITS, load
from utils import set_seed


def torch_state_after_seed(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.get_rng_state()


def numpy_keys_after_seed(seed):
    return np.random.RandomState(seed).get_state()[1]


def python_state_after_seed(seed):
    r = random.Random()
    r.seed(seed)
    return r.getstate()


def test_paper_command_gets_the_paper_selection_by_default():
    from datasets import get_dataset, one_class_split

    paper = ["--dataset", "digits", "--model", "resnet18", "--mode", "simclr_CSI", "--shift_trans_type", "rotation",
             "--batch_size", "32", "--one_class_idx", "0", "--save_step", "1"]
    P = parse_args("train", paper)
    assert (P.error_step, P.no_eval, P.ood_samples) == (1, False, 10)
    assert (P.eval_resize_factor, P.eval_resize_fix, P.eval_max_train, P.eval_max_test) == (0.54, False, None, None)
    assert P.paper_rng_replay is False
    assert parse_args("train", paper[:-1] + ["3"]).error_step == 3  # evaluation follows --save_step
    assert parse_args("train", paper + ["--error_step", "2"]).error_step == 2
    # eval.py's own default is CSI's
    assert parse_args("eval", ["--load_path", "x.model", "--dataset", "synth_lesion"]).ood_samples == 1

    train_set, test_set, info = get_dataset("digits", "../data")
    normal, test = one_class_split(train_set, test_set, info, 0)
    ev = train_program.make_evaluate(P, normal, test, torch.device("cpu"))
    assert ev.protocol() == {"score": "CSI", "shift": "rotation", "samples": 10, "resize_factor": 0.54,
                             "resize_fix": False, "n_train": len(normal), "n_test": len(test), "split": "test",
                             "metric": "auroc_CSI_one_class_mean"}
    assert ev.filename == "best_CSI.model" and len(test) > 500
    capped = train_program.make_evaluate(parse_args("train", paper + ["--eval_max_test", "50"]), normal, test,
                                         torch.device("cpu"))
    assert capped.protocol()["n_test"] == 50 and capped.protocol()["n_train"] == len(normal)
    for bad in (["--eval_max_test", "0"], ["--ood_samples", "0"], ["--eval_resize_factor", "1.5"]):
        with pytest.raises(UserError, match=bad[0]):
            parse_args("train", paper + bad)


def test_evaluation_leaves_the_generators_as_the_paper_does(one_torch_thread):
    """restore_rng=False: the same features, and the generators left seeded with the last
    sample's seed and advanced by the last batch's draws; restore_rng=True: left untouched."""
    from datasets import get_dataset
    from evals.ood_pre import extract_features
    from models.resnet import build_model

    _, test_set, _ = get_dataset("digits", "../data")
    data = test_set.subset(torch.arange(25))  # batches of 10, 10 and 5
    torch.manual_seed(0)
    model = build_model("resnet18", n_classes=10, simclr_dim=16, n_shifts=4, width=8)
    kw = dict(base_shift="rotation", n_samples=3, device=torch.device("cpu"), batch_size=10, resize_factor=0.54,
              resize_fix=False)

    set_seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    kept = extract_features(model, data, **kw)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]

    left = extract_features(model, data, restore_rng=False, **kw)
    for key in kept:
        assert torch.equal(kept[key], left[key]), key
    torch_after = torch.get_rng_state()
    assert np.array_equal(np.random.get_state()[1], numpy_keys_after_seed(2))  # seeded 2, not drawn from
    assert random.getstate() == python_state_after_seed(2)
    assert not torch.equal(torch_after, torch_state_after_seed(2))  # seeded 2, then advanced by the flips/crops
    set_seed(7)
    extract_features(model, data.subset(torch.arange(20, 25)), restore_rng=False, **kw)
    assert torch.equal(torch.get_rng_state(), torch_after)  # by exactly the last batch's draws


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory, one_torch_thread):
    logdir = tmp_path_factory.mktemp("select") / "run"
    summary = train_program.main(TINY_TRAIN_DIGITS + CSI + ["--logdir", str(logdir), "--epochs", "3",
                                                            "--ood_samples", "2"])
    return logdir, summary


@pytest.mark.slow
def test_best_checkpoint_is_the_highest_test_auroc(selected_run):
    logdir, summary = selected_run
    sel = json.loads((logdir / "selection.json").read_text())
    evals = sel["evaluations"]
    assert [e["epoch"] for e in evals] == [1, 2, 3]  # --save_step 1: after every epoch
    values = [e["auroc_CSI_one_class_mean"] for e in evals]
    assert any(e["auroc_CSI_one_class_mean"] != e["auroc_CSI_pooled"] for e in evals)
    best_epoch = 1 + int(np.argmax(values))  # the first of equal values, as a strict ">" keeps it
    best = sel["best_CSI.model"]
    assert best["epoch"] == best_epoch and best["value"] == max(values)
    assert best["metric"] == "auroc_CSI_one_class_mean" and "test" in best["rule"]
    assert best["protocol"]["samples"] == 2 and best["protocol"]["resize_fix"] is False
    assert sel["last.model"]["epoch"] == 3
    assert summary["best"]["best_CSI.model"] == {"epoch": best_epoch, "metric": best["metric"], "value": max(values)}
    assert sorted(p.name for p in logdir.glob("best_*.model")) == ["best_CSI.model"]

    ck_best, ck_last = load(logdir / "best_CSI.model"), load(logdir / "last.model")
    assert ck_best["epoch"] == best_epoch and ck_best["selection"]["file"] == "best_CSI.model"
    assert ck_best["selection"]["value"] == max(values)
    assert ck_last["epoch"] == 3 and ck_last["selection"]["file"] == "last.model"
    assert ck_last["evaluations"] == evals
    log = (logdir / "log.txt").read_text()
    assert f"best_CSI.model <- epoch {best_epoch}" in log
    scalars = (logdir / "scalars.csv").read_text()
    assert scalars.count("eval/auroc_CSI_one_class_mean,") == 3


@pytest.mark.slow
def test_saved_checkpoints_hold_the_models_that_earned_the_values(selected_run):
    """Scoring best_CSI.model and last.model again with the same evaluation gives exactly the
    AUROCs recorded when they were selected, and eval.py reads best_CSI.model."""
    from datasets import get_dataset, one_class_split
    from models.resnet import build_model

    logdir, _ = selected_run
    sel = json.loads((logdir / "selection.json").read_text())
    P = parse_args("train", TINY_TRAIN_DIGITS + CSI + ["--ood_samples", "2"])
    train_set, test_set, info = get_dataset("digits", "../data")
    normal, test = one_class_split(train_set, test_set, info, 0)
    ev = train_program.make_evaluate(P, normal, test, torch.device("cpu"))
    checks = (("best_CSI.model", sel["best_CSI.model"]["metrics"]), ("last.model", sel["evaluations"][-1]))
    for name, recorded in checks:
        model = build_model("resnet18", n_classes=10, simclr_dim=16, n_shifts=4, width=8)
        model.load_state_dict(load(logdir / name)["model"])
        again = ev(model)
        assert again["auroc_CSI_one_class_mean"] == recorded["auroc_CSI_one_class_mean"], name
        assert again["auroc_CSI_pooled"] == recorded["auroc_CSI_pooled"], name

    out = logdir / "best_results.json"
    res = eval_program.main(["--dataset", "digits", "--load_path", str(logdir / "best_CSI.model"),
                             "--save_results", str(out), "--ood_batch_size", "600"])
    assert set(res["auroc"]) == {f"one_class_{j}" for j in range(1, 10)} | {"one_class_mean", "pooled"}
    assert json.loads(out.read_text())["auroc"] == res["auroc"]


class ScriptedEvaluation:
    """Stands in for SelectionEvaluation: returns the given test AUROCs in turn and keeps a copy
    of the weights it was shown."""

    metric, filename, rule = "auroc_CSI_one_class_mean", "best_CSI.model", "highest test AUROC (scripted)"

    def __init__(self, values):
        self.values, self.seen = list(values), []

    def protocol(self):
        return {"scripted": True}

    def describe(self):
        return "scripted"

    def __call__(self, net, restore_rng=True, sharded=False):
        self.seen.append({k: v.clone() for k, v in net.state_dict().items()})
        v = self.values[len(self.seen) - 1]
        return {"auroc_CSI_one_class_mean": v, "auroc_CSI_pooled": 1 - v}


@pytest.mark.slow
@pytest.mark.parametrize("values, best_epoch", [([0.6, 0.9, 0.7, 0.8], 2), ([0.6, 0.9, 0.9, 0.5], 2),
                                                ([0.5, 0.6, 0.7, 0.8], 4)])
def test_best_checkpoint_holds_the_weights_of_the_first_highest(values, best_epoch, tmp_path, monkeypatch,
                                                                 one_torch_thread):
    """Selection by the one_class mean (not pooled), strictly higher, with that epoch's weights."""
    scripted = ScriptedEvaluation(values)
    monkeypatch.setattr(train_program, "make_evaluate", lambda *args, **kwargs: scripted)
    logdir = tmp_path / "run"
    train_program.main(TINY_TRAIN + CSI + ["--logdir", str(logdir), "--epochs", "4"])
    assert len(scripted.seen) == 4
    best = load(logdir / "best_CSI.model")
    assert best["epoch"] == best_epoch and best["selection"]["value"] == values[best_epoch - 1]
    for key, v in best["model"].items():
        assert torch.equal(v, scripted.seen[best_epoch - 1][key]), key
    last = load(logdir / "last.model")
    assert last["epoch"] == 4 and all(torch.equal(v, scripted.seen[3][k]) for k, v in last["model"].items())
    sel = json.loads((logdir / "selection.json").read_text())
    assert sel["best_CSI.model"]["epoch"] == best_epoch and sel["last.model"]["epoch"] == 4


def record_draws(monkeypatch):
    """Per training step: its epoch, batch, torch/numpy/Python generator states at its start,
    and the dissolving timesteps it drew."""
    from models.dissolve import Dissolver
    from training.trainer import Trainer

    steps = []
    step, draw = Trainer.train_step, Dissolver.draw_timesteps

    def recording_step(self, x, y):
        steps.append({"epoch": self.epoch + 1, "x": x.clone(), "torch": torch.get_rng_state(),
                      "numpy": np.random.get_state()[1].copy(), "python": random.getstate(), "t": []})
        return step(self, x, y)

    def recording_draw(self, k, epoch=0):
        ts = draw(self, k, epoch)
        steps[-1]["t"].append(list(ts))
        return ts

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    monkeypatch.setattr(Dissolver, "draw_timesteps", recording_draw)
    return steps


def same_draws(a, b):
    return (torch.equal(a["x"], b["x"]) and torch.equal(a["torch"], b["torch"])
            and np.array_equal(a["numpy"], b["numpy"]) and a["python"] == b["python"] and a["t"] == b["t"])


@pytest.mark.slow
@pytest.mark.parametrize("replay", [True, False])
def test_replay_repeats_the_draws_after_each_evaluation(replay, tiny_dissolver, tmp_path, monkeypatch,
                                                        one_torch_thread):
    steps = record_draws(monkeypatch)
    train_program.main(TINY_TRAIN + ["--mode", "simclr_DIA", "--shift_trans_type", "diffusion_rotation",
                                     "--diffusion_model_path", str(tiny_dissolver), "--logdir", str(tmp_path / "run"),
                                     "--epochs", "4", "--ood_samples", "2", "--eval_max_train", "16",
                                     "--eval_max_test", "32"] + (["--paper_rng_replay"] if replay else []))
    by_epoch = {e: [s for s in steps if s["epoch"] == e] for e in (1, 2, 3, 4)}
    assert [len(v) for v in by_epoch.values()] == [2, 2, 2, 2]
    assert all(len(s["t"]) == 1 and len(s["t"][0]) == 4 for s in steps)  # K timesteps per step
    assert not same_draws(by_epoch[1][0], by_epoch[2][0])
    if replay:
        # every epoch after an evaluation (after every epoch here) starts from the same state:
        # same shuffle, same flips/crops (torch), same timesteps (numpy), step for step
        for e in (3, 4):
            for a, b in zip(by_epoch[2], by_epoch[e]):
                assert same_draws(a, b), e
        start = by_epoch[2][0]  # as the evaluation left it: seeded with its last sample's seed (1)
        assert np.array_equal(start["numpy"], numpy_keys_after_seed(1))
        assert start["python"] == python_state_after_seed(1)
    else:
        for e in (3, 4):
            assert not torch.equal(by_epoch[2][0]["x"], by_epoch[e][0]["x"])  # another shuffle
            assert by_epoch[2][0]["t"] != by_epoch[e][0]["t"]
            assert not torch.equal(by_epoch[2][0]["torch"], by_epoch[e][0]["torch"])


@pytest.mark.slow
def test_resume_is_exact_with_and_without_replay(tmp_path, one_torch_thread):
    common = CSI + ["--epochs", "3", "--ood_samples", "1", "--eval_max_train", "16", "--eval_max_test", "32"]
    final = {}
    for replay in ([], ["--paper_rng_replay"]):
        straight, halves = tmp_path / f"straight{len(replay)}", tmp_path / f"halves{len(replay)}"
        train_program.main(TINY_TRAIN + common + replay + ["--logdir", str(straight)])
        train_program.main(TINY_TRAIN + common + replay + ["--logdir", str(halves), "--max_steps", "4"])
        assert load(halves / "last.model")["epoch"] == 2  # interrupted after epoch 2's evaluation
        train_program.main(TINY_TRAIN + common + replay + ["--resume_path", str(halves)])
        for name in ("last.model", "best_CSI.model"):
            a, b = load(straight / name), load(halves / name)
            assert a["epoch"] == b["epoch"]
            for key in a["model"]:
                torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=f"{name} {key}")
            assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
            assert torch.equal(a["rng"]["numpy"]["keys"], b["rng"]["numpy"]["keys"])
        sel_a = json.loads((straight / "selection.json").read_text())
        sel_b = json.loads((halves / "selection.json").read_text())
        assert sel_a["evaluations"] == sel_b["evaluations"] and len(sel_a["evaluations"]) == 3
        final[bool(replay)] = load(straight / "last.model")["model"]
    # the flag changes the training draws, hence the weights
    assert any(not torch.equal(final[True][k], final[False][k])
               for k in final[True] if final[True][k].is_floating_point())
