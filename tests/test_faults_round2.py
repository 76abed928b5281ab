"""Nothing lost, nothing silently wrong, round two (issue 24, items 2, 4 and 5; item 1 and 3:
tests/test_fingerprint.py).

Each test injects its fault on real files (a tmpfs of a few MB or ``DIA_FAULT=...=enospc`` for a
full disk, a file name that is not UTF-8, a symbolic link to nothing, a cut record, a checkpoint
older than its folder's, a study rerun with other settings) and checks what survives, what the
user reads (one line) and the exit status.
"""
import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import eval as eval_program
import train as train_program
from helpers import (CSI, ROOT, TINY_STUDY, TINY_TRAIN, expect_error, load, make_folder_dataset, run_reproduce,
                     write_image)
from training.records import read_selection
from utils import atomic_write_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FOLDER = ["--dataset", "imagefolder", "--img_size", "32", "--normal_class", "good", "--resnet_width", "8",
          "--batch_size", "4", "--max_batches_per_epoch", "1", "--simclr_dim", "16", "--warmup", "1",
          "--save_step", "1", "--log_every", "1", "--mode", "simclr_CSI", "--shift_trans_type", "rotation",
          "--ood_samples", "1", "--scoring_samples", "0", "--device", "cpu"]
NO_EVAL = TINY_TRAIN + CSI + ["--no_eval", "--scoring_samples", "0", "--device", "cpu"]


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def snapshot(folder):
    """{relative path: sha256} of every file below ``folder``."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = digest(p)
    return out


def run_train(args, fault=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DIA_FAULT", None)
    if fault:
        env["DIA_FAULT"] = fault
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line(proc):
    """The process ended with status 2 and one ``error:`` line, no traceback; returns the line."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    return errors[0]


@pytest.fixture
def data(tmp_path):
    root = str(tmp_path / "data")
    make_folder_dataset(root, ["bad", "good"], per_class=4)
    return root


# --------------------------------------------------------------------------- item 5: every write fails early, in one line


@contextlib.contextmanager
def small_disk(path, size):
    """A tmpfs of ``size`` at ``path`` (root only; skipped where it cannot be mounted)."""
    os.makedirs(path)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def check_full_disk_outcome(proc, logdir):
    line = one_line(proc)
    assert re.fullmatch(rf"error: cannot write {re.escape(logdir)}/[\w.]+ \(No space left on device\); .*", line), line
    kept = load(os.path.join(logdir, "last.model"))
    assert kept["epoch"] == 1 and kept["step"] == 2  # the checkpoint written before the disk filled up
    assert not [n for n in os.listdir(logdir) if n.startswith(".tmp-")]


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
    """A real full disk (a tmpfs the first last.model fits in, not a second copy of it beside it)."""
    with small_disk(str(tmp_path / "disk"), "2600k") as disk:
        logdir = os.path.join(disk, "run")
        proc = run_train(NO_EVAL + ["--epochs", "3", "--logdir", logdir])
        check_full_disk_outcome(proc, logdir)


@pytest.mark.slow
def test_full_disk_by_the_fault_hook_is_one_line(tmp_path):
    logdir = str(tmp_path / "run")
    proc = run_train(NO_EVAL + ["--epochs", "3", "--logdir", logdir], fault="write:last.model#2=enospc")
    check_full_disk_outcome(proc, logdir)
    assert one_line(proc).startswith(f"error: cannot write {logdir}/last.model (No space left on device); what "
                                     f"was there before is unchanged")


def test_a_file_name_that_is_not_utf8_is_refused_before_any_work(data, tmp_path, capsys):
    bad = os.path.join(os.fsencode(data), b"test", b"bad", b"caf\xe9.png")
    shutil.copy(os.path.join(data, "test", "bad", "img_0.png"), bad)
    logdir = str(tmp_path / "run")
    assert train_program.main(FOLDER + ["--data_root", data, "--epochs", "1", "--logdir", logdir]) is not None
    capsys.readouterr()
    csv_path, results = str(tmp_path / "scores.csv"), str(tmp_path / "results.json")
    argv = ["--load_path", os.path.join(logdir, "last.model"), "--data_root", data, "--ood_samples", "1",
            "--device", "cpu", "--save_results", results]
    expect_error(eval_program.main, argv + ["--save_scores_csv", csv_path], capsys,
                 r"the file name test/bad/caf\xe9.png is not valid UTF-8", "rename it")
    assert not os.path.exists(csv_path) and not os.path.exists(results)
    assert eval_program.main(argv)["n_anomalous"] == 5  # without the CSV, the name is never written


def test_a_logdir_that_links_to_nothing_is_named_so(tmp_path, capsys):
    link = str(tmp_path / "run")
    os.symlink(str(tmp_path / "gone"), link)
    expect_error(train_program.main, NO_EVAL + ["--epochs", "1", "--logdir", link], capsys,
                 f"{link} is a symbolic link to {tmp_path / 'gone'}, which does not exist")
    assert os.path.islink(link) and not os.path.exists(tmp_path / "gone")


def test_a_cut_scalars_row_is_repaired_never_extended(tmp_path, capsys):
    logdir = str(tmp_path / "run")
    assert train_program.main(NO_EVAL + ["--epochs", "1", "--logdir", logdir]) is not None
    path = os.path.join(logdir, "scalars.csv")
    size = os.path.getsize(path)
    os.truncate(path, size - 7)  # a kill (or a full disk) in the middle of the last row
    assert train_program.main(NO_EVAL + ["--epochs", "2", "--logdir", logdir, "--resume_path", logdir]) is not None
    with open(path) as fh:
        text = fh.read()
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == ["step", "tag", "value", "time"]
    for row in rows[1:]:  # no row glued onto a cut one, no cut number kept
        assert len(row) == 4 and re.fullmatch(r"\d+\.\d{3}", row[3]) and float(row[2]) == float(row[2]), row
    keys = [(r[1], int(r[0])) for r in rows[1:]]
    assert len(keys) == len(set(keys))
    assert {s for t, s in keys if t == "train/loss"} == {1, 2, 3, 4}


def test_a_damaged_selection_json_is_rebuilt_from_the_checkpoints(data, tmp_path, capsys):
    logdir = str(tmp_path / "run")
    assert train_program.main(FOLDER + ["--data_root", data, "--epochs", "2", "--logdir", logdir]) is not None
    path = os.path.join(logdir, "selection.json")
    with open(path) as fh:
        good = json.load(fh)
    os.truncate(path, os.path.getsize(path) // 2)
    doc, note = read_selection(logdir)
    assert note.startswith(f"{path} was rebuilt from the checkpoints: it is damaged")
    assert doc == good  # the same record: last.model's evaluations and the best file's own record
    with open(path) as fh:
        assert json.load(fh) == good
    assert read_selection(logdir) == (good, None)


# --------------------------------------------------------------------------- item 4: undefined is not a number


def test_an_evaluation_during_training_without_both_classes_is_refused_before_anything_is_written(tmp_path, capsys):
    logdir = str(tmp_path / "run")
    expect_error(train_program.main, TINY_TRAIN + CSI + ["--epochs", "1", "--eval_max_test", "1", "--ood_samples",
                                                         "1", "--logdir", logdir, "--device", "cpu"], capsys,
                 "--eval_max_test 1 leaves the evaluation during training 1 test image(s)", "AUROC is undefined",
                 "raise --eval_max_test")
    assert not os.path.exists(logdir)


def test_eval_on_a_test_set_without_anomalies_is_one_line(data, tmp_path, capsys):
    logdir = str(tmp_path / "run")
    assert train_program.main(FOLDER + ["--data_root", data, "--epochs", "1", "--logdir", logdir]) is not None
    shutil.rmtree(os.path.join(data, "test", "bad"))  # a test set of normal images only
    results = str(tmp_path / "results.json")
    line = expect_error(eval_program.main, ["--load_path", os.path.join(logdir, "last.model"), "--data_root", data,
                                            "--ood_samples", "1", "--device", "cpu", "--save_results", results,
                                            "--accept_changed_data"], capsys)
    assert "anomal" in line
    assert not os.path.exists(results)


def test_json_written_is_strict(tmp_path):
    path = str(tmp_path / "r.json")
    atomic_write_json({"auroc": float("nan"), "values": [1.0, float("inf")]}, path)

    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    with open(path) as fh:
        assert json.load(fh, parse_constant=refuse) == {"auroc": None, "values": [1.0, None]}


# --------------------------------------------------------------------------- item 2: nothing a training wrote is lost


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_of_the_run_is_refused(tmp_path, capsys):
    logdir = str(tmp_path / "run")
    assert train_program.main(NO_EVAL + ["--epochs", "1", "--logdir", logdir]) is not None
    shutil.copy(os.path.join(logdir, "last.model"), os.path.join(logdir, "epoch1.model"))
    assert train_program.main(NO_EVAL + ["--epochs", "2", "--logdir", logdir, "--resume_path", logdir]) is not None
    before = snapshot(logdir)
    old = os.path.join(logdir, "epoch1.model")
    expect_error(train_program.main, NO_EVAL + ["--epochs", "3", "--resume_path", old], capsys,
                 f"--resume_path {old} holds epoch 1 (step 2) of the run in {logdir}, whose last.model is at epoch 2 "
                 f"(step 4)", "an empty --logdir")
    assert snapshot(logdir) == before  # no record rewound, no checkpoint overwritten
    new = str(tmp_path / "from_epoch1")
    assert train_program.main(NO_EVAL + ["--epochs", "2", "--resume_path", old, "--logdir", new]) is not None
    assert snapshot(logdir) == before and load(os.path.join(new, "last.model"))["epoch"] == 2


def test_best_file_and_selection_json_agree_after_a_kill_and_an_allowed_resume(data, tmp_path, capsys):
    """A kill between a better best_CSI.model and the last.model that records it leaves a best
    file newer than the checkpoint; made here from the run's own later checkpoint, with the
    record train.py writes into a best file. The reader and the resumed run (with an allowed
    change: --epochs) name the file's model."""
    run, later = str(tmp_path / "run"), str(tmp_path / "later")
    base = FOLDER + ["--data_root", data]
    assert train_program.main(base + ["--epochs", "1", "--logdir", run]) is not None
    shutil.copytree(run, later)
    assert train_program.main(base + ["--epochs", "2", "--resume_path", later]) is not None
    ckpt = load(os.path.join(later, "last.model"))
    with open(os.path.join(later, "selection.json")) as fh:
        evaluation = json.load(fh)["evaluations"][-1]
    recorded = load(os.path.join(run, "best_CSI.model"))["selection"]
    metrics = {k: v for k, v in evaluation.items() if k.startswith("auroc")}
    ckpt["selection"] = dict(recorded, epoch=ckpt["epoch"], step=ckpt["step"], value=metrics[recorded["metric"]],
                             metrics=metrics)
    torch.save(ckpt, os.path.join(run, "best_CSI.model"))  # what the kill left: a best file past last.model
    capsys.readouterr()

    doc, note = read_selection(run)
    assert "names epoch 1 for best_CSI.model, which holds epoch 2" in note and doc["best_CSI.model"]["epoch"] == 2

    assert train_program.main(base + ["--epochs", "3", "--resume_path", run]) is not None
    with open(os.path.join(run, "selection.json")) as fh:
        selection = json.load(fh)
    held = load(os.path.join(run, "best_CSI.model"))["selection"]
    assert (selection["best_CSI.model"]["epoch"], selection["best_CSI.model"]["step"]) == (held["epoch"],
                                                                                             held["step"])
    with open(os.path.join(run, "log.txt")) as fh:
        assert "best_CSI.model holds the model of epoch 2 (step 2" in fh.read()


# --------------------------------------------------------------------------- a study's rerun (items 1, 2 and 5)


def without(argv, *flags):
    """``argv`` without each of ``flags`` and its value."""
    out = list(argv)
    for flag in flags:
        i = out.index(flag)
        del out[i:i + 2]
    return out


# reproduce.py's tiniest study on a folder dataset of one's own (normal class "good", index 1)
STUDY = without(TINY_STUDY, "--dataset", "--one_class_idx") + [
    "--dataset", "imagefolder", "--img_size", "32", "--normal_class", "good", "--shift_trans_type", "rotation"]


def run_folder(out):
    return os.path.join(out, "imagefolder", "class_1", "rotation_32px", "seed_0")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    data, out = str(base / "data"), str(base / "out")
    make_folder_dataset(data, ["bad", "good"], per_class=8)
    argv = STUDY + ["--data_root", data, "--out", out]
    rc, stdout, stderr, _ = run_reproduce(argv, one_thread=True)
    assert rc == 0, stdout + stderr
    return {"data": data, "out": out, "argv": argv}


@pytest.fixture
def copy(study, tmp_path):
    """The study copied (data and --out), and its argv pointing at the copy."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    shutil.copytree(study["data"], data)
    shutil.copytree(study["out"], out)
    argv = list(study["argv"])
    argv[argv.index("--data_root") + 1], argv[argv.index("--out") + 1] = data, out
    return {"data": data, "out": out, "argv": argv, "run": run_folder(out)}


def with_flag(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


@pytest.mark.slow
def test_study_rerun_with_an_evaluation_change_evaluates_the_kept_model(copy):
    model = digest(os.path.join(copy["run"], "last.model"))
    rc, stdout, stderr, _ = run_reproduce(with_flag(copy["argv"], "--ood_samples", "2"), one_thread=True)
    assert rc == 0, stdout + stderr
    assert "finished before, skipped" not in stdout and "training imagefolder" not in stdout
    assert digest(os.path.join(copy["run"], "last.model")) == model
    with open(os.path.join(copy["run"], "results.json")) as fh:
        results = json.load(fh)
    assert results["ood_samples"] == 2 and "eval_seconds" in results


@pytest.mark.slow
def test_study_rerun_resumes_an_interrupted_training_with_a_raised_budget(copy):
    for name in ("results.json", "scores.csv"):  # killed while evaluating: the training had finished
        os.remove(os.path.join(copy["run"], name))
    before = load(os.path.join(copy["run"], "last.model"))
    argv = with_flag(with_flag(copy["argv"], "--epochs", "2"), "--max_steps", "4")
    rc, stdout, stderr, _ = run_reproduce(argv, one_thread=True)
    assert rc == 0, stdout + stderr
    after = load(os.path.join(copy["run"], "last.model"))
    assert before["epoch"] == 1 and after["epoch"] == 2 and after["step"] > before["step"]
    assert after["meta"]["run_id"] == before["meta"]["run_id"]  # the same run, continued
    with open(os.path.join(copy["run"], "train.log")) as fh:
        log = fh.read()
    assert "--resume_path" in log and f"resuming after epoch 1 (step {before['step']})" in log
    with open(os.path.join(copy["run"], "scalars.csv")) as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r["tag"] == "train/loss"]
    assert steps == list(range(1, after["step"] + 1))


@pytest.mark.slow
def test_study_rerun_with_a_training_change_is_refused_and_keeps_everything(copy, capsys):
    import reproduce

    before = snapshot(copy["out"])
    line = expect_error(reproduce.main, with_flag(copy["argv"], "--batch_size", "4"), capsys,
                        f"{copy['run']} holds a finished run made with other settings: --batch_size 8 (now 4)",
                        "pass the recorded values, or use another --out")
    assert "train:" in line
    for name in ("results.json", "scores.csv"):  # an unfinished training: refused as well
        os.remove(os.path.join(copy["run"], name))
    before = snapshot(copy["out"])
    expect_error(reproduce.main, with_flag(copy["argv"], "--batch_size", "4"), capsys,
                 "holds the training of a run made with other settings: --batch_size 8 (now 4)")
    assert snapshot(copy["out"]) == before


@pytest.mark.slow
def test_study_on_other_data_never_shares_a_cell(copy, tmp_path, capsys):
    import reproduce

    moved = str(tmp_path / "moved")
    shutil.copytree(copy["data"], moved)  # the same files, elsewhere: the same data
    rc, stdout, stderr, _ = run_reproduce(with_flag(copy["argv"], "--data_root", moved), one_thread=True)
    assert rc == 0 and "finished before, skipped" in stdout, stdout + stderr
    write_image(os.path.join(copy["data"], "train", "good", "added.png"), (9, 200, 9))
    before = snapshot(copy["out"])
    expect_error(reproduce.main, copy["argv"], capsys, copy["run"],
                 "--data_root (the data's files): train/good 9 images (was 8)", "use another --out")
    assert snapshot(copy["out"]) == before


@pytest.mark.slow
def test_study_counts_a_partly_written_evaluation_as_unfinished(copy):
    """eval.py wrote results.json, then the study's evaluation failed (or was killed) before it
    marked the run finished: the rerun evaluates it again instead of taking it as done."""
    path = os.path.join(copy["run"], "results.json")
    with open(path) as fh:
        results = json.load(fh)
    partial = {k: v for k, v in results.items() if k not in ("eval_seconds", "best")}
    with open(path, "w") as fh:
        json.dump(partial, fh)
    rc, stdout, stderr, _ = run_reproduce(copy["argv"], one_thread=True)
    assert rc == 0, stdout + stderr
    assert "finished before, skipped" not in stdout
    with open(path) as fh:
        again = json.load(fh)
    assert "eval_seconds" in again and ("best" in again) == ("best" in results)
    assert again["auroc"] == pytest.approx(results["auroc"])
