"""train.py and eval.py end to end on the built-in dataset, resuming, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as eval_program
import train as train_program

from helpers import ROOT, TINY_TRAIN, expect_error


def run_train(logdir, *extra):
    return train_program.main(TINY_TRAIN + ["--logdir", str(logdir), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("run") / "csi"
    summary = run_train(logdir, "--mode", "simclr_CSI", "--shift_trans_type", "rotation", "--epochs", "2",
                        "--error_step", "2", "--eval_max_train", "64", "--eval_max_test", "64", "--ood_samples", "2")
    return logdir, summary


@pytest.mark.slow
def test_checkpoint_holds_everything(trained):
    logdir, summary = trained
    assert summary["epoch"] == 2 and summary["step"] == 4
    ckpt = torch.load(logdir / "last.model", weights_only=False)
    assert ckpt["kind"] == "dia_model"
    for key in ("model", "optim", "linear_optim", "epoch", "step", "rng", "meta"):
        assert key in ckpt
    assert ckpt["epoch"] == 2 and ckpt["meta"]["n_shifts"] == 4 and ckpt["meta"]["arch"] == "resnet18"
    assert (logdir / "log.txt").read_text().count("[epoch") >= 2
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(logdir))
    assert "train/loss" in (logdir / "scalars.csv").read_text()
    # the evaluation during training (at epoch 2 only: --error_step 2) kept the paper's best_CSI.model
    assert sorted(f for f in os.listdir(logdir) if f.endswith(".model")) == ["best_CSI.model", "last.model"]
    selection = json.loads((logdir / "selection.json").read_text())
    assert [e["epoch"] for e in selection["evaluations"]] == [2] and selection["best_CSI.model"]["epoch"] == 2
    assert not [f for f in os.listdir(logdir) if f.startswith(".tmp-")]


@pytest.mark.slow
def test_eval_writes_json_and_scores(trained, tmp_path):
    logdir, _ = trained
    out = tmp_path / "res.json"
    scores = tmp_path / "scores.csv"
    res = eval_program.main(["--mode", "ood_pre", "--dataset", "synth_lesion", "--model", "resnet18",
                             "--ood_score", "CSI", "simclr", "--shift_trans_type", "rotation", "--ood_samples", "2",
                             "--resize_factor", "0.54", "--resize_fix", "--one_class_idx", "0",
                             "--load_path", str(logdir / "last.model"), "--save_results", str(out),
                             "--save_scores_csv", str(scores), "--ood_batch_size", "500"])
    data = json.loads(out.read_text())
    assert set(data["auroc"]) == {"one_class_1", "one_class_mean", "pooled"}
    for v in data["auroc"].values():
        assert 0.0 <= v <= 1.0
    assert data["n_normal"] == 500 and data["n_anomalous"] == 500
    assert data["auroc"] == res["auroc_by_score"]["CSI"]
    lines = scores.read_text().splitlines()
    assert lines[0] == "index,name,label,normal,score_CSI,score_simclr"
    assert len(lines) == 1001
    # the JSON's AUROC is the AUROC of the CSV's scores
    from evals.ood_pre import auroc_report
    import numpy as np

    rows = [ln.split(",") for ln in lines[1:]]
    rep = auroc_report(np.array([float(r[4]) for r in rows]), np.array([int(r[2]) for r in rows]), 0)
    assert rep["pooled"] == pytest.approx(data["auroc"]["pooled"], abs=1e-5)


@pytest.mark.slow
def test_eval_ood_mode_scores(trained, tmp_path):
    logdir, _ = trained
    out = tmp_path / "ood.json"
    eval_program.main(["--mode", "ood", "--ood_score", "baseline", "clean_norm", "similar",
                       "--load_path", str(logdir / "last.model"), "--save_results", str(out),
                       "--ood_batch_size", "500"])
    data = json.loads(out.read_text())
    assert set(data["auroc_by_score"]) == {"baseline", "clean_norm", "similar"}
    for rep in data["auroc_by_score"].values():
        assert 0.0 <= rep["pooled"] <= 1.0


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    common = ["--mode", "simclr_CSI", "--shift_trans_type", "rotation", "--epochs", "2", "--no_eval"]
    straight = tmp_path / "straight"
    run_train(straight, *common)
    halves = tmp_path / "halves"
    run_train(halves, *common, "--max_steps", "2")  # stops after epoch 1
    first = torch.load(halves / "last.model", weights_only=False)
    assert first["epoch"] == 1 and first["step"] == 2
    summary = train_program.main(TINY_TRAIN + ["--resume_path", str(halves), *common])
    assert summary["epoch"] == 2 and summary["step"] == 4
    assert not list(straight.glob("best_*.model"))  # --no_eval: no evaluation, no selection
    assert json.loads((straight / "selection.json").read_text())["evaluations"] == []
    a = torch.load(straight / "last.model", weights_only=False)["model"]
    b = torch.load(halves / "last.model", weights_only=False)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_existing_run_is_not_overwritten(trained, capsys):
    logdir, _ = trained
    before = (logdir / "last.model").stat().st_mtime_ns
    expect_error(train_program.main, TINY_TRAIN + ["--logdir", str(logdir), "--mode", "simclr_CSI",
                                                   "--shift_trans_type", "rotation"], capsys, "--resume_path")
    assert (logdir / "last.model").stat().st_mtime_ns == before


@pytest.mark.parametrize("argv,fragment", [
    (["--dataset", "kvasir", "--data_root", "/nonexistent/data", "--mode", "simclr_CSI",
      "--shift_trans_type", "rotation"], "/nonexistent/data"),
    (["--one_class_idx", "7", "--mode", "simclr_CSI", "--shift_trans_type", "rotation"], "one_class_idx"),
    (["--mode", "simclr_DIA", "--shift_trans_type", "rotation"], "dissolving shift"),
    (["--mode", "simclr_CSI", "--shift_trans_type", "diffusion_rotation"], "simclr_DIA"),
    (["--mode", "simclr_DIA", "--shift_trans_type", "diffusion_rotation"], "--diffusion_model_path"),
    (["--mode", "simclr_DIA", "--shift_trans_type", "diffusion_rotation",
      "--diffusion_model_path", "/nonexistent/ddpm.pt"], "/nonexistent/ddpm.pt"),
    (["--mode", "simclr_CSI", "--shift_trans_type", "rotation", "--contamination_ratio", "1.5"],
     "--contamination_ratio"),
    (["--mode", "ood_pre"], "eval.py"),
])
def test_train_bad_input(tmp_path, capsys, argv, fragment):
    logdir = tmp_path / "run"
    expect_error(train_program.main, TINY_TRAIN + ["--logdir", str(logdir)] + argv, capsys, fragment)
    assert not logdir.exists()  # nothing half-written


@pytest.mark.slow
def test_eval_bad_input(trained, tmp_path, capsys):
    logdir, _ = trained
    expect_error(eval_program.main, ["--load_path", str(tmp_path / "missing.model")], capsys, "missing.model")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a checkpoint at all")
    expect_error(eval_program.main, ["--load_path", str(corrupt)], capsys, "cannot read")
    other = tmp_path / "other.pt"
    torch.save({"kind": "dia_dissolver", "config": {}}, other)
    expect_error(eval_program.main, ["--load_path", str(other)], capsys, "not a model checkpoint")
    expect_error(eval_program.main, ["--load_path", str(logdir / "last.model"), "--model", "resnet34"],
                 capsys, "resnet18")
    expect_error(eval_program.main, ["--load_path", str(logdir / "last.model"), "--one_class_idx", "5"],
                 capsys, "one_class_idx")
    expect_error(eval_program.main, ["--load_path", str(logdir / "last.model"), "--mode", "ood_pre",
                                     "--ood_score", "baseline"], capsys, "--mode ood")
    expect_error(eval_program.main, ["--mode", "simclr_CSI", "--load_path", "x"], capsys, "train.py")


@pytest.mark.slow
def test_cli_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", "--load_path", str(tmp_path / "nope.model")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120).stdout
    for flag in ("--diffusion_model_path", "--shift_trans_type", "--resume_path", "--one_class_idx"):
        assert flag in help_text


@pytest.mark.slow
def test_score_folder_flags_against_training_threshold(trained, tmp_path):
    import csv

    import numpy as np
    from PIL import Image

    from datasets import get_dataset

    logdir, _ = trained
    _, test_set, _ = get_dataset("synth_lesion", "../data")
    folder = tmp_path / "new_images"
    (folder / "sub").mkdir(parents=True)
    x, _ = test_set.get_batch(torch.arange(6))
    for i in range(6):
        arr = (x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / ("sub" if i % 2 else "") / f"img_{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "scored.csv"
    res = eval_program.main(["--load_path", str(logdir / "last.model"), "--score_folder", str(folder),
                             "--save_scores_csv", str(out), "--threshold_quantile", "0.5", "--ood_samples", "1"])
    rows = list(csv.DictReader(out.open()))
    assert [r["name"] for r in rows] == sorted(r["name"] for r in rows) and len(rows) == 6
    assert {r["name"] for r in rows} == {f"img_{i}.png" for i in (0, 2, 4)} | {f"sub/img_{i}.png" for i in (1, 3, 5)}
    thr = float(rows[0]["threshold"])
    assert res["threshold"] == pytest.approx(thr, abs=1e-5)
    for r in rows:
        assert int(r["anomalous"]) == int(float(r["score_CSI"]) < thr)


def test_leave_one_out_training_scores_match_loop():
    from evals.ood_pre import csi_scores, csi_train_scores_loo

    g = torch.Generator().manual_seed(0)
    tr = {"simclr": torch.randn(5, 8, 6, generator=g), "shift": torch.randn(5, 8, 4, generator=g) + 2}
    loo = csi_train_scores_loo(tr, 4, "CSI")
    for i in range(5):
        others = {k: torch.cat([v[:i], v[i + 1:]]) for k, v in tr.items()}
        one = {k: v[i:i + 1] for k, v in tr.items()}
        # the same weights (from all M images) but the maximum over the other images' axes
        full = csi_scores(tr, one, 4).item()
        assert loo[i].item() <= full + 1e-6
        sim_only_loo = csi_train_scores_loo(tr, 4, "simclr")[i].item()
        assert sim_only_loo == pytest.approx(csi_scores(others, one, 4, "simclr").item(), rel=1e-5)
