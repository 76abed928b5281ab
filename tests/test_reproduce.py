"""The reproduction pipeline (reproduce.py) and its figures (evals/plots.py), end to end on
synth_lesion with the tiniest budget: one pipeline run (rotation + diffusion_rotation) is
shared by the tests; the failure test works on a copy of it."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from helpers import ROOT, TINY_STUDY, md_tables, read_csv, run_dir, run_reproduce

TRANSFORMATIONS = ["rotation", "diffusion_rotation"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reproduce") / "out")
    argv = TINY_STUDY + ["--shift_trans_type", *TRANSFORMATIONS, "--out", out]
    rc, stdout, stderr, seconds = run_reproduce(argv)
    return {"out": out, "argv": argv, "rc": rc, "stdout": stdout, "stderr": stderr, "seconds": seconds}


@pytest.mark.slow
def test_pipeline_end_to_end(pipeline):
    out = pipeline["out"]
    assert pipeline["rc"] == 0, pipeline["stdout"] + pipeline["stderr"]
    rows = read_csv(os.path.join(out, "results.csv"))
    assert [(r["transformation"], r["status"]) for r in rows] == [("rotation", "ok"), ("diffusion_rotation", "ok")]
    dissolvers = [f for f in os.listdir(os.path.join(out, "dissolvers")) if f.endswith(".pt")]
    assert len(dissolvers) == 1  # one per dataset, class and resolution
    ckpt = os.path.join(out, "dissolvers", dissolvers[0])
    with open(ckpt[:-len(".pt")] + "_dissolving.json") as fh:  # measured on --dissolver_quality_images
        assert json.load(fh)["n_images"] == 16
    for t in TRANSFORMATIONS:
        d = run_dir(out, t)
        for name in ("results.json", "scores.csv", "last.model", "best_CSI.model", "selection.json", "scalars.csv",
                     "train.log", "eval.log"):
            assert os.path.getsize(os.path.join(d, name)) > 0, (t, name)
        with open(os.path.join(d, "run.json")) as fh:
            cmd = json.load(fh)["train_command"]
        # the paper's selection: evaluation after every epoch, on the full sets
        assert "--no_eval" not in cmd and "--eval_max_test" not in cmd
        assert cmd[cmd.index("--save_step") + 1] == "1" and cmd[cmd.index("--ood_samples") + 1] == "1"
        if t == "rotation":
            assert cmd[cmd.index("--mode") + 1] == "simclr_CSI"
            assert "--diffusion_model_path" not in cmd
        else:
            assert cmd[cmd.index("--mode") + 1] == "simclr_DIA"
            assert cmd[cmd.index("--diffusion_model_path") + 1] == ckpt
        with open(os.path.join(d, "scores.csv"), newline="") as fh:
            scores = list(csv.DictReader(fh))
        assert len(scores) == 1000 and {s["normal"] for s in scores} == {"0", "1"}
    # progress lines, then the table
    assert re.search(r"\[1/2\] synth_lesion class 0 \(normal\) rotation 32px seed 0: trained \d+ s, "
                     r"evaluated \d+ s; AUROC 0\.\d{3} \(last\), 0\.\d{3} \(best on test, epoch 1\)", pipeline["stdout"])
    assert pipeline["stdout"].count("| Dataset | rotation | diffusion_rotation |") == 2  # last, best on test
    assert "best_CSI.model, best on test (paper's selection):" in pipeline["stdout"]


@pytest.mark.slow
def test_csv_and_tables_agree_with_results_json(pipeline):
    out = pipeline["out"]
    rows = read_csv(os.path.join(out, "results.csv"))
    summary, best_summary, per_run = md_tables(os.path.join(out, "results.md"))[:3]
    assert summary[0] == best_summary[0] == ["Dataset", "rotation", "diffusion_rotation"]
    assert per_run[0][:9] == ["dataset", "class", "transformation", "res", "seed", "AUROC pooled (last)",
                              "AUROC class mean (last)", "AUROC pooled (best on test)", "best epoch / last"]
    text = open(os.path.join(out, "results.md")).read()
    assert "### last.model: the model at the end of training (the honest figure)" in text
    assert "### best_CSI.model: best on test (paper's selection)" in text
    records = [f for f in sorted(os.listdir(os.path.join(out, "dissolvers")))  # not its progress or grid files
               if f.endswith(".json") and not f.endswith((".progress.json", "_dissolving.json"))]
    with open(os.path.join(out, "dissolvers", records[0])) as fh:
        dissolver = json.load(fh)
    assert dissolver["gmacs"] > 0
    for row, md_row in zip(rows, per_run[1:]):
        with open(os.path.join(out, row["run_dir"], "results.json")) as fh:
            res = json.load(fh)
        pooled = res["auroc"]["pooled"]
        assert float(row["auroc_pooled"]) == pytest.approx(pooled, abs=1e-12)
        assert float(row["auroc_one_class_mean"]) == pytest.approx(res["auroc"]["one_class_mean"], abs=1e-12)
        assert md_row[:5] == [row["dataset"], row["one_class_idx"], row["transformation"], row["resolution"],
                              row["seed"]]
        assert md_row[5] == f"{pooled:.3f}"
        assert float(row["train_seconds"]) > 0 and md_row[9] == f"{float(row['train_seconds']):.1f}"
        if row["transformation"] == "diffusion_rotation":
            assert float(row["dissolver_gmacs"]) == pytest.approx(dissolver["gmacs"])
            assert md_row[11] == f"{dissolver['gmacs']:.3f}"
        else:
            assert row["dissolver_gmacs"] == "" and md_row[11] == ""
        col = summary[0].index(row["transformation"])
        assert summary[1][0] == "synth_lesion"
        assert summary[1][col] == f"{pooled:.3f} ± 0.000 (1)"
        # one epoch: the selected checkpoint is last.model's epoch, the same weights, reported as such
        with open(os.path.join(out, row["run_dir"], "selection.json")) as fh:
            selection = json.load(fh)
        best = res["best"]
        assert best["same_as_last"] is True and best["epoch"] == best["last_epoch"] == 1
        assert (row["best_epoch"], row["last_epoch"]) == ("1", "1") and md_row[8] == "1 / 1"
        assert float(row["auroc_pooled_best"]) == pytest.approx(pooled, abs=1e-12)
        assert float(row["best_selection_auroc"]) == pytest.approx(selection["best_CSI.model"]["value"], abs=1e-9)
        assert md_row[7] == f"{pooled:.3f}" and best_summary[1][col] == f"{pooled:.3f} ± 0.000 (1)"
        assert not os.path.exists(os.path.join(out, row["run_dir"], "results_best.json"))  # not evaluated twice


@pytest.mark.slow
def test_dissolver_removal_ratio_is_reported_beside_the_table(pipeline):
    """The dissolver's lesion removal ratio (from its dissolving-quality JSON) is printed after
    the tables, written to results.md and to results.csv for the runs that use it."""
    out = pipeline["out"]
    folder = os.path.join(out, "dissolvers")
    quality_file = [f for f in os.listdir(folder) if f.endswith("_dissolving.json")]
    assert len(quality_file) == 1
    with open(os.path.join(folder, quality_file[0])) as fh:
        rows = json.load(fh)["timesteps"]
    in_range = [r["removal_ratio"] for r in rows if 30 <= r["t"] <= 100]
    assert [r["t"] for r in rows] == [10, 30, 50, 70, 100, 150] and len(in_range) == 4
    expected = sum(in_range) / len(in_range)
    for row in read_csv(os.path.join(out, "results.csv")):
        if row["transformation"] == "diffusion_rotation":
            assert float(row["dissolver_removal_ratio"]) == pytest.approx(expected, abs=1e-4)
        else:
            assert row["dissolver_removal_ratio"] == ""
    text = open(os.path.join(out, "results.md")).read()
    assert "## Dissolvers: what they dissolve" in text
    table = [t for t in md_tables(os.path.join(out, "results.md")) if t[0][0] == "dissolver"][0]
    assert table[0][2:] == [f"t={t}" for t in (10, 30, 50, 70, 100, 150)] + ["mean, t in 30..100"]
    # synthetic lesions: the lesion measures as well as the frequency ones, each explained below the table
    measures = ["lesion removal ratio", "tissue change", "high-frequency energy removed", "low-frequency change"]
    assert [r[1] for r in table[1:]] == measures
    by_t = {r["t"]: r for r in rows}
    assert table[1][4] == f"{by_t[50]['removal_ratio']:.2f}" and table[2][4] == f"{by_t[50]['tissue_change']:.3f}"
    assert table[1][-1] == f"{expected:.2f}"
    for name in measures:
        assert f"\n- {name}: " in text
    assert "dissolvers, what they do to images per timestep" in pipeline["stdout"]
    assert f"lesion removal ratio {expected:.2f}" in pipeline["stdout"]


@pytest.mark.slow
def test_figures_are_png(pipeline):
    out = pipeline["out"]
    paths = [os.path.join(out, "synth_lesion_class0_roc.png")]
    for t in TRANSFORMATIONS:
        paths += [os.path.join(run_dir(out, t), n) for n in ("roc.png", "score_hist.png", "loss_curves.png",
                                                              "selection.png")]
    paths.append(os.path.join(run_dir(out, "diffusion_rotation"), "dissolving.png"))
    assert not os.path.exists(os.path.join(run_dir(out, "rotation"), "dissolving.png"))
    for p in paths:
        assert os.path.getsize(p) > 0, p
        with Image.open(p) as im:
            assert im.format == "PNG", p
            assert im.size[0] > 100 and im.size[1] > 100, (p, im.size)
            im.verify()


@pytest.mark.slow
def test_rerun_skips_finished_runs(pipeline):
    out = pipeline["out"]
    watched = [os.path.join(out, "dissolvers", f) for f in os.listdir(os.path.join(out, "dissolvers"))]
    for t in TRANSFORMATIONS:
        watched += [os.path.join(run_dir(out, t), n) for n in
                    ("last.model", "results.json", "scores.csv", "scalars.csv", "roc.png", "train.log")]
    before = {p: os.stat(p).st_mtime_ns for p in watched}
    rc, stdout, stderr, seconds = run_reproduce(pipeline["argv"])
    assert rc == 0, stdout + stderr
    assert {p: os.stat(p).st_mtime_ns for p in watched} == before
    assert stdout.count("finished before, skipped") == 2
    assert "(2 finished already, 0 to do)" in stdout
    assert seconds < max(60.0, pipeline["seconds"] / 2)
    rows = read_csv(os.path.join(out, "results.csv"))
    assert [r["reused"] for r in rows] == ["1", "1"] and all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_finished_run_with_other_budget_is_refused(pipeline, capsys):
    import reproduce

    argv = [a if a != "2" or i == 0 or pipeline["argv"][i - 1] != "--max_steps" else "3"
            for i, a in enumerate(pipeline["argv"])]
    assert argv != pipeline["argv"]
    with pytest.raises(SystemExit) as exc:
        reproduce.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "other settings" in err[0] and "max_steps" in err[0]


@pytest.mark.slow
def test_folder_recording_amp_as_a_boolean_is_read_as_on_or_off(pipeline, tmp_path, capsys):
    """A run.json recording --amp as true/false is read as 'on'/'off': with --amp on, true is
    finished (skipped, not redone) and false has other settings (refused)."""
    import reproduce

    out = str(tmp_path / "out")
    shutil.copytree(pipeline["out"], out)
    argv = list(pipeline["argv"]) + ["--amp", "on"]
    argv[argv.index("--out") + 1] = out
    paths = [os.path.join(run_dir(out, t), "run.json") for t in TRANSFORMATIONS]
    docs = []
    for path in paths:
        with open(path) as fh:
            docs.append(json.load(fh))
    assert {(d["config"]["train"]["amp"], d["config"]["eval"]["amp"]) for d in docs} == {("auto", "auto")}
    for legacy, accepted in ((True, True), (False, False)):
        for path, doc in zip(paths, docs):
            doc["config"]["train"]["amp"] = doc["config"]["eval"]["amp"] = legacy
            with open(path, "w") as fh:
                json.dump(doc, fh)
        if accepted:
            rc, stdout, stderr, _ = run_reproduce(argv)
            assert rc == 0, stdout + stderr
            assert stdout.count("finished before, skipped") == 2
            continue
        with pytest.raises(SystemExit) as exc:
            reproduce.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other settings" in err[0] and "'amp': 'off'" in err[0]


@pytest.mark.slow
def test_failing_run_is_reported_and_others_finish(pipeline, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(pipeline["out"], out)
    # a corrupt dissolver: the diffusion run fails; the rotation run is evaluated again and finishes
    ckpt = [os.path.join(out, "dissolvers", f) for f in os.listdir(os.path.join(out, "dissolvers"))
            if f.endswith(".pt")][0]
    with open(ckpt, "wb") as fh:
        fh.write(b"this is not a checkpoint")
    shutil.rmtree(run_dir(out, "diffusion_rotation"))
    for name in ("results.json", "scores.csv", "roc.png"):
        os.remove(os.path.join(run_dir(out, "rotation"), name))
    argv = [a for a in pipeline["argv"]]
    argv[argv.index("--out") + 1] = out
    i = argv.index("--shift_trans_type")
    argv[i + 1:i + 3] = ["diffusion_rotation", "rotation"]  # the failing run comes first
    rc, stdout, stderr, _ = run_reproduce(argv)
    assert rc == 1, stdout + stderr
    assert re.search(r"diffusion_rotation 32px seed 0: FAILED \(train: .*not a torch checkpoint", stdout)
    rows = {r["transformation"]: r for r in read_csv(os.path.join(out, "results.csv"))}
    assert rows["diffusion_rotation"]["status"] == "failed"
    assert "not a torch checkpoint" in rows["diffusion_rotation"]["error"]
    assert rows["diffusion_rotation"]["auroc_pooled"] == ""
    assert rows["rotation"]["status"] == "ok" and rows["rotation"]["reused"] == "0"
    with open(os.path.join(run_dir(out, "rotation"), "results.json")) as fh:
        pooled = json.load(fh)["auroc"]["pooled"]
    assert float(rows["rotation"]["auroc_pooled"]) == pytest.approx(pooled)
    assert os.path.exists(os.path.join(run_dir(out, "rotation"), "roc.png"))
    summary, _, per_run = md_tables(os.path.join(out, "results.md"))[:3]
    assert summary[0] == ["Dataset", "diffusion_rotation", "rotation"]
    assert summary[1][1].startswith("failed: train:") and "not a torch checkpoint" in summary[1][1]
    assert summary[1][2] == f"{pooled:.3f} ± 0.000 (1)"
    assert per_run[1][2] == "diffusion_rotation" and per_run[1][-1].startswith("failed: train:")
    with open(os.path.join(run_dir(out, "diffusion_rotation"), "failed.json")) as fh:
        assert json.load(fh)["stage"] == "train"
    with open(os.path.join(run_dir(out, "diffusion_rotation"), "train.log")) as fh:
        assert "not a torch checkpoint" in fh.read()
    assert not os.path.exists(os.path.join(run_dir(out, "diffusion_rotation"), "results.json"))


@pytest.mark.slow
def test_best_checkpoint_other_than_last_is_evaluated_and_reported(pipeline, tmp_path):
    """When train.py's selection kept an earlier epoch, best_CSI.model is scored by eval.py as
    last.model is, and both columns are reported. (Here the earlier checkpoint is made up: fresh
    weights recorded as epoch 0, so that its AUROC surely differs from last.model's.)"""
    import torch

    from models.resnet import build_model

    out = str(tmp_path / "out")
    shutil.copytree(pipeline["out"], out)
    d = run_dir(out, "rotation")
    ckpt = torch.load(os.path.join(d, "best_CSI.model"), weights_only=False)
    torch.manual_seed(1)
    ckpt["model"] = build_model("resnet18", n_classes=2, simclr_dim=128, n_shifts=4, width=8).state_dict()
    ckpt["epoch"] = 0
    torch.save(ckpt, os.path.join(d, "best_CSI.model"))
    with open(os.path.join(d, "selection.json")) as fh:
        selection = json.load(fh)
    selection["best_CSI.model"]["epoch"] = 0
    with open(os.path.join(d, "selection.json"), "w") as fh:
        json.dump(selection, fh)
    for name in ("results.json", "scores.csv", "roc.png"):
        os.remove(os.path.join(d, name))
    argv = list(pipeline["argv"])
    argv[argv.index("--out") + 1] = out
    i = argv.index("--shift_trans_type")
    argv[i + 1:i + 3] = ["rotation"]
    rc, stdout, stderr, _ = run_reproduce(argv)
    assert rc == 0, stdout + stderr
    with open(os.path.join(d, "results.json")) as fh:
        res = json.load(fh)
    with open(os.path.join(d, "results_best.json")) as fh:
        best = json.load(fh)["auroc"]
    with open(os.path.join(d, "run.json")) as fh:
        commands = json.load(fh)
    cmd, last_cmd = commands["eval_best_command"], commands["eval_command"]
    files = {"--load_path": "best_CSI.model", "--save_results": "results_best.json",
             "--save_scores_csv": "scores_best.csv"}
    for flag, name in files.items():
        assert cmd[cmd.index(flag) + 1] == os.path.join(d, name)
    # the same evaluation as last.model's, apart from the files
    assert [c for i, c in enumerate(cmd) if cmd[i - 1] not in files] == \
        [c for i, c in enumerate(last_cmd) if last_cmd[i - 1] not in files]
    assert os.path.getsize(os.path.join(d, "scores_best.csv")) > 0
    assert res["best"]["same_as_last"] is False and res["best"]["auroc"] == best
    assert best["pooled"] != pytest.approx(res["auroc"]["pooled"], abs=1e-9)
    row = read_csv(os.path.join(out, "results.csv"))[0]
    assert float(row["auroc_pooled"]) == pytest.approx(res["auroc"]["pooled"], abs=1e-12)
    assert float(row["auroc_pooled_best"]) == pytest.approx(best["pooled"], abs=1e-12)
    assert float(row["auroc_one_class_mean_best"]) == pytest.approx(best["one_class_mean"], abs=1e-12)
    assert (row["best_epoch"], row["last_epoch"]) == ("0", "1")
    summary, best_summary, per_run = md_tables(os.path.join(out, "results.md"))[:3]
    assert summary[1][1] == f"{res['auroc']['pooled']:.3f} ± 0.000 (1)"
    assert best_summary[1][1] == f"{best['pooled']:.3f} ± 0.000 (1)"
    assert per_run[1][5] == f"{res['auroc']['pooled']:.3f}" and per_run[1][7] == f"{best['pooled']:.3f}"
    assert per_run[1][8] == "0 / 1"
    assert f"(last), {best['pooled']:.3f} (best on test, epoch 0)" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--dataset", "synth_lesion", "--shift_trans_type", "rotation", "rotate"], "unknown transformation 'rotate'"),
    (["--preset", "quick", "--epochs", "0"], "--epochs must be at least 1"),
])
def test_bad_flags_exit_2_with_one_line(args, message, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), *args, "--out", str(out)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert proc.stdout == ""
    assert not out.exists()  # checked before anything is written


@pytest.mark.parametrize("args, message", [
    (["--dataset", "no_such_set"], "unknown dataset 'no_such_set'"),
    pytest.param(["--dataset", "synth_lesion", "--one_class_idx", "5"],
                 "--one_class_idx 5 is out of range for synth_lesion", marks=pytest.mark.slow),  # generates the data
    (["--dataset", "kvasir", "--data_root", "{tmp}"], "{tmp}"),  # the dataset's folder is missing
    (["--dataset", "synth_lesion", "--diff_resolution", "36"], "--diff_resolution 36"),
])
def test_bad_data_flags_are_user_errors(args, message, tmp_path, capsys):
    import reproduce

    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exc:
        reproduce.main(args + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message.replace("{tmp}", str(tmp_path)) in err[0], err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_plots_on_small_files(tmp_path):
    from evals import plots

    scores = tmp_path / "scores.csv"
    scores.write_text("index,name,label,normal,score_CSI\n0,a,0,1,0.9\n1,b,1,0,0.1\n2,c,0,1,0.8\n3,d,2,0,0.85\n")
    assert plots.plot_roc(str(scores), str(tmp_path / "roc.png")) == pytest.approx(0.75)
    plots.plot_score_hist(str(scores), str(tmp_path / "hist.png"))
    scalars = tmp_path / "scalars.csv"
    scalars.write_text("step,tag,value,time\n1,epoch/loss,5.0,0\n2,epoch/loss,4.0,0\n")
    plots.plot_loss_curves(str(scalars), str(tmp_path / "loss.png"))  # only per-epoch means: still drawn
    for name in ("roc.png", "hist.png", "loss.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert sorted(os.listdir(tmp_path)) == ["hist.png", "loss.png", "roc.png", "scalars.csv", "scores.csv"]
    with pytest.raises(ValueError, match="not a scores CSV"):
        plots.plot_roc(str(scalars), str(tmp_path / "bad.png"))
    assert not (tmp_path / "bad.png").exists()
