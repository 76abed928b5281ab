"""Fault injection: nothing lost, nothing silently wrong.

train.py, the DDPM training and reproduce.py are killed (SIGKILL, SIGTERM) at chosen points and
run again; the rerun must end with the very same weights (``torch.equal`` on every tensor),
the same scalars and, for reproduce.py, the same results.csv as an uninterrupted run. The
points are reached exactly through ``utils.fault_point`` (``DIA_FAULT=<point>[#n][=kill|stop]``
in a subprocess's environment). Then: one process per run folder (locks), resume refusing what
would change or overwrite a run, no checkpoint holding NaN or infinity, data-shaping flags
reaching eval.py, and no leftovers.
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train as train_program
from cli.args import RESUME_MAY_CHANGE, parse_args
from helpers import CSI, ROOT, TINY_DDPM, TINY_TRAIN, expect_error, load, make_folder_dataset, run_reproduce
from common.run_folder import LOCK_NAME, ProcessLock

SELECT = ["--ood_samples", "1", "--eval_max_train", "16", "--eval_max_test", "32"]
RUN = TINY_TRAIN + CSI + SELECT + ["--epochs", "2"]  # 2 epochs of 2 steps, evaluated and saved after each
DDPM = ["--mode", "train", "--dataset", "synth_lesion", *TINY_DDPM, "--train_steps", "4", "--save_every", "1"]
PIPE = ["--dataset", "digits", "--one_class_idx", "0", "--seeds", "0", "--shift_trans_type", "rotation",
        "--resnet_width", "8", "--batch_size", "8", "--epochs", "2", "--max_batches_per_epoch", "1", "--warmup", "1",
        "--log_every", "1", "--ood_samples", "1", "--no_selection", "--device", "cpu"]
TIMING = ("train_seconds", "eval_seconds", "reused")  # results.csv columns that differ between any two runs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- helpers


def child_env(fault=None):
    """One torch thread everywhere (the same arithmetic as this process's), and the fault."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DIA_FAULT", None)
    if fault:
        env["DIA_FAULT"] = fault
    return env


def run_py(args, fault=None, timeout=180):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=child_env(fault), capture_output=True,
                          text=True, timeout=timeout)


def start_py(args, fault=None):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=child_env(fault),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def proc_state(pid):
    """The state letter of /proc/<pid>/stat (R, S, T, Z, ...), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def wait_until(predicate, timeout=120.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_stopped(pid, proc=None):
    """Wait until ``pid`` stopped itself (DIA_FAULT ...=stop); fails if ``proc`` ends first."""
    def stopped():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before the fault point: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        return proc_state(pid) in ("T", "t")
    wait_until(stopped, what=f"process {pid} to stop")


def wait_stopped_child(parent):
    """The child of ``parent`` (a Popen) that stopped itself at its fault point."""
    def stopped_child():
        if parent.poll() is not None:
            raise AssertionError(f"reproduce.py ended ({parent.returncode}) first: {parent.stderr.read()}")
        return next((c for c in children(parent.pid) if proc_state(c) in ("T", "t")), None)
    return wait_until(stopped_child, what="the stopped child of reproduce.py")


def gone(pid):
    return proc_state(pid) in (None, "Z", "X")


def assert_equal_tensors(a, b, where=""):
    """Every tensor equal (torch.equal), every other leaf equal, in two nested states."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_equal_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def scalars(logdir):
    """scalars.csv without its wall-clock column and timing rows."""
    with open(os.path.join(logdir, "scalars.csv"), newline="") as fh:
        return [r[:3] for r in csv.reader(fh) if r[1] != "epoch/seconds_per_step"]


def tb_scalars(logdir):
    """Every scalar of the folder's TensorBoard event files (all of them, as TensorBoard reads the
    folder), sorted, without the timing tag."""
    from common.tb_events import scalars as event_scalars

    out = []
    for name in sorted(os.listdir(logdir)):
        if name.startswith("events.out.tfevents."):
            out += [r for r in event_scalars(os.path.join(logdir, name)) if r[0] != "epoch/seconds_per_step"]
    return sorted(out)


def leftovers(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith(".tmp-") or f == LOCK_NAME or f.endswith(".lock"))


def assert_same_run(reference, logdir):
    """``logdir`` ended as the uninterrupted ``reference``: checkpoints, selection, scalars."""
    for name in ("last.model", "best_CSI.model"):
        a, b = load(os.path.join(reference, name)), load(os.path.join(logdir, name))
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]), name
        for key in ("model", "optim", "linear_optim", "rng", "best", "evaluations", "selection"):
            assert_equal_tensors(a[key], b[key], f"{name}:{key}")
    sel_a = json.loads(open(os.path.join(reference, "selection.json")).read())
    sel_b = json.loads(open(os.path.join(logdir, "selection.json")).read())
    assert sel_a["evaluations"] == sel_b["evaluations"] and sel_a["best_CSI.model"] == sel_b["best_CSI.model"]
    assert scalars(reference) == scalars(logdir)  # every step once: the interrupted attempt's rows went
    assert tb_scalars(reference) == tb_scalars(logdir)  # in TensorBoard's files too
    with open(os.path.join(logdir, "log.txt")) as fh:
        log = fh.read()
    for epoch in (1, 2):  # and its log lines past the checkpoint
        assert log.count(f"] [epoch {epoch}] loss ") == 1 and log.count(f"] [epoch {epoch}] eval ") == 1, log
    assert leftovers(logdir) == []
    config = json.loads(open(os.path.join(logdir, "config.json")).read())
    assert config["run_id"] == load(os.path.join(logdir, "last.model"))["meta"]["run_id"]


def snapshot(folder):
    """Every file of a folder with its bytes: to show nothing was touched."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must end as."""
    logdir = str(tmp_path_factory.mktemp("reference") / "run")
    train_program.main(RUN + ["--logdir", logdir])
    return logdir


@pytest.fixture(scope="module")
def halted(tmp_path_factory):
    """The same run stopped after epoch 1 (--max_steps 2): a run to resume (tests copy it)."""
    logdir = str(tmp_path_factory.mktemp("halted") / "run")
    train_program.main(RUN + ["--logdir", logdir, "--max_steps", "2"])
    return logdir


# --------------------------------------------------------------------------- train.py killed


@pytest.mark.slow
@pytest.mark.parametrize("fault, saved_epoch", [
    ("step#1", None),                # during training, before any checkpoint: the same command restarts it
    ("step#3", 1),                   # during training, epoch 2
    ("eval#2", 1),                   # during the evaluation of epoch 2
    ("write:last.model#2", 1),       # during the write of epoch 2's last.model (temporary file complete)
])
def test_killed_training_reruns_to_the_same_run(reference, tmp_path, fault, saved_epoch):
    logdir = str(tmp_path / "run")
    proc = run_py(["train.py", *RUN, "--logdir", logdir], fault=fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    last = os.path.join(logdir, "last.model")
    if saved_epoch is None:
        assert not os.path.exists(last)
    else:
        assert load(last)["epoch"] == saved_epoch
    temps = [f for f in os.listdir(logdir) if f.startswith(".tmp-")]
    if fault.startswith("write:"):
        assert len(temps) == 1 and temps[0].startswith(".tmp-last.model."), temps  # what a kill leaves
    run_id = json.loads(open(os.path.join(logdir, "config.json")).read())["run_id"]
    rerun = ["--resume_path", logdir] if os.path.exists(last) else ["--logdir", logdir]
    train_program.main(RUN + rerun)
    assert_same_run(reference, logdir)
    assert json.loads(open(os.path.join(logdir, "config.json")).read())["run_id"] == run_id


@pytest.mark.slow
def test_sigterm_during_a_checkpoint_write_cleans_up(tmp_path):
    """SIGTERM unwinds train.py: its temporary file and lock go, one line says how to go on."""
    logdir = str(tmp_path / "run")
    proc = start_py(["train.py", *RUN, "--logdir", logdir, "--no_eval"], fault="write:last.model#1=stop")
    wait_stopped(proc.pid, proc)
    assert [f for f in os.listdir(logdir) if f.startswith(".tmp-last.model.")]
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted by SIGTERM: training in " + logdir) and "run the same command" in line, err
    assert leftovers(logdir) == [] and not os.path.exists(os.path.join(logdir, "last.model")), os.listdir(logdir)


# --------------------------------------------------------------------------- the DDPM killed


@pytest.mark.slow
def test_killed_ddpm_resumes_to_the_same_weights(tmp_path):
    from diffusion_models import train_eval_ddpm

    ref, path = str(tmp_path / "ref" / "d.pt"), str(tmp_path / "run" / "d.pt")
    train_eval_ddpm.main(DDPM + ["--save_path", ref])
    proc = run_py(["diffusion_models/train_eval_ddpm.py", *DDPM, "--save_path", path], fault="write:d.pt#3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(path, weights_only=False)["train_state"]["step"] == 2
    assert [f for f in os.listdir(tmp_path / "run") if f.startswith(".tmp-d.pt.")]
    train_eval_ddpm.main(DDPM + ["--save_path", path, "--resume"])
    a, b = load(ref), load(path)
    for key in ("model_state", "ema_state", "config"):
        assert_equal_tensors(a[key], b[key], key)
    for key in ("optimizer", "step", "epoch", "pos", "ema_step", "rng"):
        assert_equal_tensors(a["train_state"][key], b["train_state"][key], key)
    assert os.listdir(tmp_path / "run") == ["d.pt"]  # no temporary file, no lock file


def test_ddpm_save_path_is_locked(tmp_path, capsys):
    from diffusion_models import train_eval_ddpm

    path = tmp_path / "d.pt"
    with ProcessLock(tmp_path / ".d.pt.lock", "held by the test"):
        expect_error(train_eval_ddpm.main, DDPM + ["--save_path", str(path)], capsys,
                     f"--save_path {path} is in use by another process (PID {os.getpid()}", alone=True)
    assert not path.exists()


# --------------------------------------------------------------------------- reproduce.py killed


def results_rows(out):
    with open(os.path.join(out, "results.csv"), newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def pipe_dir(out):
    """The run folder of PIPE's study (digits: a small class, evaluated in a moment)."""
    return os.path.join(out, "digits", "class_0", "rotation_32px", "seed_0")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipeline") / "out")
    rc, stdout, stderr, _ = run_reproduce(PIPE + ["--out", out], one_thread=True)
    assert rc == 0, stdout + stderr
    return out


@pytest.mark.slow
def test_interrupted_pipeline_resumes_to_the_same_results(pipeline, tmp_path):
    out = str(tmp_path / "out")
    argv = ["reproduce.py", *PIPE, "--out", out]
    run = pipe_dir(out)
    # 1. SIGTERM while train.py is in epoch 2: the step is stopped, one line says how to resume
    proc = start_py(argv, fault="step#3=stop")
    child = wait_stopped_child(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted by SIGTERM while training digits class 0 (0) rotation 32px seed 0"), line
    assert "run the same command again to resume" in line
    wait_until(lambda: gone(child), 10, "train.py to end")
    assert load(os.path.join(run, "last.model"))["epoch"] == 1 and leftovers(run) == []
    # 2. the rerun resumes; SIGKILL to reproduce.py while the resumed train.py is stopped in its first step:
    #    train.py dies with it, instead of writing on alone
    proc = start_py(argv, fault="step#1=stop")
    child = wait_stopped_child(proc)
    proc.kill()
    proc.communicate(timeout=60)
    wait_until(lambda: gone(child), 10, "the orphaned train.py to die with reproduce.py")
    # 3. the rerun after that finishes with what an uninterrupted pipeline wrote, and removes what killed
    #    writes of the pipeline's own files would have left
    for leftover in (os.path.join(out, ".tmp-results.csv.abcd1234"), os.path.join(run, ".tmp-scores.csv.x1y2z3w4")):
        with open(leftover, "wb") as fh:
            fh.write(b"half")
    rc, stdout, stderr, _ = run_reproduce(PIPE + ["--out", out], one_thread=True)
    assert rc == 0, stdout + stderr
    assert results_rows(out) == results_rows(pipeline)
    for name in ("last.model",):
        a, b = load(os.path.join(pipe_dir(pipeline), name)), load(os.path.join(run, name))
        for key in ("model", "optim", "linear_optim", "epoch", "step"):
            assert_equal_tensors(a[key], b[key], f"{name}:{key}")
    assert scalars(pipe_dir(pipeline)) == scalars(run)
    with open(os.path.join(run, "train.log")) as fh:
        log = fh.read()
    attempts = [ln for ln in log.splitlines() if ln.startswith("$ ")]
    assert len(attempts) == 3 and ["--resume_path" in ln for ln in attempts] == [False, True, True]  # logs kept
    assert leftovers(out) == [] and leftovers(run) == []


def test_pipeline_out_is_locked(tmp_path, capsys):
    import reproduce

    out = tmp_path / "out"
    out.mkdir()
    with ProcessLock(out / LOCK_NAME, "held by the test"):
        expect_error(reproduce.main, PIPE + ["--out", str(out)], capsys,
                     f"--out {out} is in use by another process (PID {os.getpid()}", alone=True)
    assert os.listdir(out) == []


# --------------------------------------------------------------------------- 2. two processes, one folder


@pytest.mark.slow
def test_second_training_on_a_busy_folder_is_refused(tmp_path, capsys):
    logdir = str(tmp_path / "run")
    first = start_py(["train.py", *RUN, "--logdir", logdir, "--no_eval"], fault="step#1=stop")
    wait_stopped(first.pid, first)
    config = open(os.path.join(logdir, "config.json")).read()
    expect_error(train_program.main, RUN + ["--logdir", logdir, "--seed", "1"], capsys,
                 f"run folder {logdir} is in use by another process (PID {first.pid}", alone=True)
    expect_error(train_program.main, RUN + ["--logdir", logdir], capsys, f"(PID {first.pid}", alone=True)
    first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert open(os.path.join(logdir, "config.json")).read() == config  # the first run's, untouched
    ckpt = load(os.path.join(logdir, "last.model"))
    assert ckpt["meta"]["args"]["seed"] == 0 and ckpt["epoch"] == 2
    assert json.loads(config)["run_id"] == ckpt["meta"]["run_id"] and leftovers(logdir) == []


@pytest.mark.slow
def test_default_run_folder_names_the_seed(tmp_path, monkeypatch):
    P0, P1 = (parse_args("train", CSI + ["--seed", s]) for s in ("0", "1"))
    assert train_program.default_logdir(P0) == os.path.join("logs", "synth_lesion_resnet18_simclr_CSI_rotation_"
                                                                    "one_class_0_seed0")
    assert train_program.default_logdir(P1).endswith("_one_class_0_seed1")
    monkeypatch.chdir(tmp_path)
    runs = [train_program.main(TINY_TRAIN + CSI + ["--epochs", "1", "--no_eval", "--seed", s]) for s in ("0", "1")]
    assert runs[0]["logdir"] != runs[1]["logdir"]
    for summary, seed in zip(runs, (0, 1)):  # two seeds, two models kept
        assert load(tmp_path / summary["logdir"] / "last.model")["meta"]["args"]["seed"] == seed


# --------------------------------------------------------------------------- 1. resume into another run's folder


@pytest.mark.slow
def test_resume_into_another_runs_folder_is_refused(reference, halted, tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(halted, a)
    shutil.copytree(reference, b)
    before_a, before_b = snapshot(a), snapshot(b)
    expect_error(train_program.main, RUN + ["--resume_path", a, "--logdir", b], capsys,
                 f"--logdir {b} holds another training run", "leave out --logdir", alone=True)
    expect_error(train_program.main, RUN + ["--resume_path", os.path.join(a, "best_CSI.model"), "--logdir", b],
                 capsys, "holds another training run", alone=True)
    assert snapshot(b) == before_b and snapshot(a) == before_a
    # an empty folder: the run continues there as a new run, exactly, and its source stays as it was
    c = str(tmp_path / "c")
    train_program.main(RUN + ["--resume_path", a, "--logdir", c])
    assert snapshot(a) == before_a
    for name in ("last.model", "best_CSI.model"):
        assert_equal_tensors(load(os.path.join(reference, name))["model"], load(os.path.join(c, name))["model"])
    config_a = json.loads(before_a["config.json"])
    config_c = json.loads(open(os.path.join(c, "config.json")).read())
    assert config_c["run_id"] != config_a["run_id"] and config_c["resumed_from"]["run_id"] == config_a["run_id"]
    assert load(os.path.join(c, "last.model"))["meta"]["run_id"] == config_c["run_id"]


# --------------------------------------------------------------------------- 4. resume keeps the run's settings


@pytest.mark.slow
def test_resume_refuses_changed_settings_and_keeps_config(halted, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(halted, run)
    before = snapshot(run)
    line = expect_error(train_program.main, RUN + ["--resume_path", run, "--seed", "1", "--batch_size", "16",
                                                   "--lr_init", "0.2", "--optimizer", "sgd", "--amp", "on"],
                        capsys, alone=True)
    for saved in ("--seed 0", "--batch_size 8", "--lr_init 0.1", "--optimizer lars"):
        assert saved in line, line
    now = line[line.index("(now "):line.index(")", line.index("(now "))]
    for given in ("--seed 1", "--batch_size 16", "--lr_init 0.2", "--optimizer sgd"):
        assert given in now, line
    assert "--amp" not in line.split("only ")[0]  # the precision may change on resume (another device)
    assert "only " + ", ".join("--" + f for f in RESUME_MAY_CHANGE) + " may change" in line
    expect_error(train_program.main, [a if a != "rotation" else "cutperm" for a in RUN] + ["--resume_path", run],
                 capsys, "--shift_trans_type rotation (now --shift_trans_type cutperm)", alone=True)
    expect_error(train_program.main, RUN + ["--resume_path", run, "--load_path", os.path.join(run, "last.model")],
                 capsys, "drop --load_path", alone=True)
    assert snapshot(run) == before
    # what may change does; config.json, the run's record, is never rewritten
    train_program.main(RUN + ["--resume_path", run, "--epochs", "3", "--log_every", "2", "--device", "cpu",
                              "--max_steps", "4"])
    assert load(os.path.join(run, "last.model"))["meta"]["args"]["epochs"] == 3
    assert open(os.path.join(run, "config.json"), "rb").read() == before["config.json"]
    # a run interrupted before its first checkpoint: restarted only with its own settings
    os.remove(os.path.join(run, "last.model"))
    expect_error(train_program.main, RUN + ["--logdir", run, "--seed", "1"], capsys,
                 "holds another run that saved no checkpoint", "--seed 0 (now --seed 1)", alone=True)


# --------------------------------------------------------------------------- 5. no checkpoint holds NaN or infinity


@pytest.mark.slow
def test_diverged_weights_are_never_saved(tmp_path, capsys, monkeypatch):
    from training.trainer import Trainer

    # in fp32 a running variance overflows first
    diverge = TINY_TRAIN + CSI + ["--epochs", "2", "--no_eval", "--lr_init", "1e6", "--amp", "off"]
    logdir = tmp_path / "run"
    line = expect_error(train_program.main, diverge + ["--logdir", str(logdir)], capsys,
                        "running_var holds infinity after epoch 2", "--lr_init 1e+06 is very high", alone=True)
    assert "temperature" not in line
    ckpt = load(logdir / "last.model")  # epoch 1's stays, finite
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                      if v.is_floating_point())
    # the guard of the write itself looks at every tensor, BatchNorm buffers included
    monkeypatch.setattr(Trainer, "check_finite", lambda self, before: None)
    other = tmp_path / "other"
    expect_error(train_program.main, diverge + ["--logdir", str(other)], capsys,
                 "not writing last.model: model.backbone.", "running_var holds infinity", "--lr_init", alone=True)
    assert load(other / "last.model")["epoch"] == 1 and leftovers(other) == []


@pytest.mark.slow
def test_loss_guard_names_the_likely_cause(tmp_path, capsys):
    line = expect_error(train_program.main, TINY_TRAIN + CSI + ["--epochs", "1", "--no_eval", "--temperature",
                                                                "1e-39", "--logdir", str(tmp_path / "run")], capsys,
                        "the loss became nan at step 1", "--temperature 1e-39 is very low", alone=True)
    assert "--lr_init" not in line
    expect_error(train_program.main, TINY_TRAIN + CSI + ["--temperature", "0", "--logdir", str(tmp_path / "zero")],
                 capsys, "--temperature must be above 0", alone=True)
    assert not (tmp_path / "zero").exists()


# --------------------------------------------------------------------------- 11. data-shaping flags reach eval.py


@pytest.mark.slow
def test_pipeline_image_size_reaches_eval_and_folder_name(tmp_path):
    make_folder_dataset(tmp_path / "data", ["a", "b"], per_class=8)
    out = str(tmp_path / "out")
    argv = ["--dataset", "imagefolder", "--data_root", str(tmp_path / "data"), "--img_size", "32",
            "--normal_class", "a", "--out", out] + PIPE[PIPE.index("--shift_trans_type"):]
    i = argv.index("--epochs")
    argv[i + 1] = "1"
    rc, stdout, stderr, _ = run_reproduce(argv, one_thread=True)
    assert rc == 0, stdout + stderr
    run = os.path.join(out, "imagefolder", "class_0", "rotation_32px", "seed_0")  # the size trained at
    with open(os.path.join(run, "run.json")) as fh:
        commands = json.load(fh)
    cmd = commands["eval_command"]
    assert cmd[cmd.index("--img_size") + 1] == "32" and commands["config"]["model"] == "resnet18"
    row = results_rows(out)[0]
    assert row["status"] == "ok" and row["resolution"] == "32"
    import reproduce

    a = reproduce.check_args(reproduce.resolve_args(PIPE + ["--train_args=--aptos_all_grades"]))
    assert "--aptos_all_grades" in reproduce.eval_command(a, reproduce.make_plan(a)[0])


# --------------------------------------------------------------------------- 12. leftovers; checkpoints read as one line


def test_unreadable_resume_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_bytes(os.urandom(3000))
    line = expect_error(train_program.main, RUN + ["--resume_path", str(bad), "--logdir", str(tmp_path / "run")],
                        capsys, "cannot read model checkpoint", str(bad), alone=True)
    assert "weights_only" not in line and not (tmp_path / "run").exists()


def test_stale_temp_files_of_our_pattern_only_are_removed(tmp_path):
    from utils import atomic_write, remove_stale_temps

    kept = [".tmp-last.model.short", "keep.txt", ".tmp-notes", "last.model", ".tmp-scores.csv.0123abcd"]
    for n in kept + [".tmp-last.model.ab_c12x9", ".tmp-best_CSI.model.0123abcd"]:
        (tmp_path / n).write_bytes(b"x")
    # train.py's own files only: another program's write in progress there (eval.py's scores) stays
    assert remove_stale_temps(str(tmp_path), train_program.writes_it) == [".tmp-best_CSI.model.0123abcd",
                                                                         ".tmp-last.model.ab_c12x9"]
    assert sorted(os.listdir(tmp_path)) == sorted(kept)

    def interrupted(fh):
        fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "last.model", interrupted)
    assert (tmp_path / "last.model").read_bytes() == b"x" and not [f for f in os.listdir(tmp_path)
                                                                   if f.startswith(".tmp-last.model.") and
                                                                   f != ".tmp-last.model.short"]
