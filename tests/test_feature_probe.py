"""The feature probe (evals/feature_probe.py, benchmarks/feature_probe.py): its measures against
values computed by hand, and the script end to end on a saved checkpoint."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from evals.feature_probe import features, lesion_sensitivity, probe_auroc
from helpers import ROOT
from models.resnet import build_model

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import feature_probe  # noqa: E402


def test_lesion_sensitivity_by_hand():
    clean = torch.tensor([[1.0, 0.0]] * 3)
    lesioned = torch.tensor([[2.0, 2.0]] * 3)  # normalised: (1, 1) / sqrt 2
    other = torch.tensor([[0.0, 5.0]] * 3)  # normalised: (0, 1), sqrt 2 from clean
    by_lesion = math.sqrt((1 - 1 / math.sqrt(2)) ** 2 + 0.5)
    assert lesion_sensitivity(lesioned, clean, other) == pytest.approx(by_lesion / math.sqrt(2), abs=1e-12)
    assert lesion_sensitivity(clean * 3, clean, other) == 0.0  # lesions the features do not see


def test_lesion_sensitivity_takes_medians():
    clean = torch.tensor([[1.0, 0.0]] * 3)
    other = torch.tensor([[0.0, 1.0]] * 3)
    lesioned = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # distances 0, sqrt 2, 2: median sqrt 2
    assert lesion_sensitivity(lesioned, clean, other) == pytest.approx(1.0, abs=1e-12)


def test_probe_auroc_separable_and_blind():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    separable = rng.normal(size=(400, 5))
    separable[:, 2] += 6.0 * y
    assert probe_auroc(separable[::2], y[::2], separable[1::2], y[1::2]) == 1.0
    blind = rng.normal(size=(400, 5))
    assert abs(probe_auroc(blind[::2], y[::2], blind[1::2], y[1::2]) - 0.5) < 0.12


def test_features_match_the_model_and_keep_its_mode():
    torch.manual_seed(0)
    model = build_model("resnet18", n_classes=2, simclr_dim=8, width=4)
    model.train()
    x = torch.rand(7, 3, 32, 32)
    f = features(model, x, "penultimate", batch_size=3)
    assert model.training  # given back in the mode it came
    model.eval()  # the features are those of the model in eval mode (BatchNorm's running statistics)
    with torch.no_grad():
        direct = model(x, penultimate=True)[1]["penultimate"]
    torch.testing.assert_close(f, direct, rtol=1e-5, atol=1e-6)
    features(model, x, "simclr")
    assert not model.training


@pytest.mark.slow
def test_script_end_to_end(tmp_path, capsys):
    torch.manual_seed(1)
    model = build_model("resnet18", n_classes=2, simclr_dim=8, width=4)
    ckpt = tmp_path / "last.model"
    torch.save({"kind": "dia_model", "model": model.state_dict(),
                "meta": {"arch": "resnet18", "resnet_width": 4}}, ckpt)
    out = tmp_path / "probe.json"
    feature_probe.main(["--dataset", "synth_streak", "--load_path", str(ckpt), "--random_init", "--n", "24",
                        "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == [str(ckpt), "random_init"]
    for r in rows:
        for layer in ("penultimate", "simclr"):
            assert 0.0 <= r[layer]["probe_auroc"] <= 1.0 and r[layer]["lesion_sensitivity"] > 0.0
    # the saved weights are the ones measured: the same figures from the model itself
    data = feature_probe.fresh_images("synth_streak", 24, 0)
    assert feature_probe.measure(model, data, 0) == {k: rows[0][k] for k in ("penultimate", "simclr")}
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        feature_probe.main(["--load_path", str(ckpt), "--out", str(out)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "exists" in captured.err and out.read_bytes() == before
    assert "probe AUROC" in captured.out


def test_script_refuses_a_checkpoint_it_cannot_rebuild_in_one_line(tmp_path, capsys):
    model = build_model("resnet18", n_classes=2, simclr_dim=8, width=4)
    state = model.state_dict()
    state["linear.weight"] = state["linear.weight"][:, :3]  # does not fit the network its meta describes
    ckpt = tmp_path / "last.model"
    torch.save({"kind": "dia_model", "model": state, "meta": {"arch": "resnet18", "resnet_width": 4}}, ckpt)
    out = tmp_path / "probe.json"
    with pytest.raises(SystemExit) as exit_info:
        feature_probe.main(["--load_path", str(ckpt), "--n", "8", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and str(ckpt) in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_fresh_images_pair_the_same_tissue():
    data = feature_probe.fresh_images("synth_streak", 8, 0)
    diff = (data["lesioned"] - data["clean"]).abs().amax(dim=1)  # 8 x 32 x 32
    changed = (diff > 0).float().mean(dim=(1, 2))
    assert bool((changed > 0).all()) and bool((changed < 0.15).all())  # a few percent of the pixels, never none
    assert not torch.equal(data["clean"], data["other"])
    assert sorted(set(data["fit"][1].tolist())) == [0, 1]
