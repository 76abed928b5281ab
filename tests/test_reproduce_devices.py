"""reproduce.py --devices (the runs of a study concurrently, one at a time per listed device) and
--nproc_per_run (each run's training under torchrun), on synth_lesion (digits for the comparison) with the study's
tiniest budget (helpers.TINY_STUDY); the steps run with one torch thread each."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from helpers import ROOT, TINY_STUDY, md_tables, read_csv, run_dir, run_reproduce
from study.steps import Interrupted, Steps

BASE = [a for a in TINY_STUDY if a not in ("--device", "cpu")] + ["--shift_trans_type", "rotation",
                                                                  "--seeds", "0", "1", "--no_selection"]
TIMING_FIELDS = ("train_seconds", "eval_seconds")
# the two studies compared: on digits, whose class 0 (125 training images) evaluates in a fraction of
# synth_lesion's time
PAIR = [a if a != "synth_lesion" else "digits" for a in BASE]


def digits_dir(out, seed):
    return os.path.join(out, "digits", "class_0", "rotation_32px", f"seed_{seed}")


@pytest.fixture(autouse=True)
def one_thread_steps(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # train.py and eval.py: two at once on two cores


@pytest.fixture(scope="module")
def sequential_and_concurrent(tmp_path_factory):
    base = tmp_path_factory.mktemp("devices")
    outs = {"sequential": str(base / "sequential"), "concurrent": str(base / "concurrent")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        results = {
            "sequential": run_reproduce(PAIR + ["--device", "cpu", "--out", outs["sequential"]]),
            "concurrent": run_reproduce(PAIR + ["--devices", "cpu", "cpu", "--out", outs["concurrent"]]),
        }
    return outs, results


def train_interval(out, seed):
    """When a run's training started (run.json is written just before train.py starts) and ended
    (train_done.json, written when it ended)."""
    d = digits_dir(out, seed)
    return os.stat(os.path.join(d, "run.json")).st_mtime, os.stat(os.path.join(d, "train_done.json")).st_mtime


def without_timings(table):
    """A results.md table with its train s / eval s columns blanked."""
    header = table[0]
    cols = [i for i, h in enumerate(header) if h in ("train s", "eval s")]
    return [[("" if i in cols and n else c) for i, c in enumerate(row)] for n, row in enumerate(table)]


@pytest.mark.slow
def test_devices_write_what_a_sequential_run_writes(sequential_and_concurrent):
    outs, results = sequential_and_concurrent
    for name, (rc, stdout, stderr, _) in results.items():
        assert rc == 0, (name, stdout + stderr)
    seq, conc = (read_csv(os.path.join(outs[k], "results.csv")) for k in ("sequential", "concurrent"))
    assert [(r["seed"], r["status"]) for r in conc] == [("0", "ok"), ("1", "ok")]  # plan order
    for r in seq + conc:
        for field in TIMING_FIELDS:
            r.pop(field)
    assert conc == seq  # AUROCs included: seeded CPU runs are deterministic
    assert conc[0]["auroc_pooled"] != conc[1]["auroc_pooled"]  # the two seeds are two runs
    seq_md, conc_md = (md_tables(os.path.join(outs[k], "results.md")) for k in ("sequential", "concurrent"))
    assert [without_timings(t) for t in conc_md] == [without_timings(t) for t in seq_md]
    for seed in (0, 1):
        with open(os.path.join(digits_dir(outs["concurrent"], seed), "run.json")) as fh:
            commands = json.load(fh)
        for cmd in (commands["train_command"], commands["eval_command"]):
            assert cmd[cmd.index("--device") + 1] == "cpu"
        assert os.path.getsize(os.path.join(digits_dir(outs["concurrent"], seed), "roc.png")) > 0
    assert os.path.getsize(os.path.join(outs["concurrent"], "digits_class0_roc.png")) > 0
    # concurrency: the two trainings overlapped (and did not in the sequential run)
    (s0, e0), (s1, e1) = (train_interval(outs["concurrent"], seed) for seed in (0, 1))
    assert s0 < e1 and s1 < e0, ((s0, e0), (s1, e1))
    (s0, e0), (s1, e1) = (train_interval(outs["sequential"], seed) for seed in (0, 1))
    assert e0 <= s1
    stdout = results["concurrent"][1]
    assert stdout.count(": started on cpu") == 2
    assert "[2/2] digits class 0 (0) rotation 32px seed 1 (cpu): trained" in stdout


@pytest.mark.slow
def test_nproc_per_run_trains_under_torchrun(tmp_path):
    out = str(tmp_path / "out")
    rc, stdout, stderr, _ = run_reproduce(TINY_STUDY + ["--shift_trans_type", "rotation", "--no_selection",
                                                       "--nproc_per_run", "2", "--out", out])
    assert rc == 0, stdout + stderr
    d = run_dir(out, "rotation")
    with open(os.path.join(d, "config.json")) as fh:
        assert json.load(fh)["world_size"] == 2
    with open(os.path.join(d, "run.json")) as fh:
        record = json.load(fh)
    cmd = record["train_command"]
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert "torch.distributed.run" not in record["eval_command"]  # evaluation: one process
    assert record["config"]["train"]["nproc_per_run"] == 2
    row = read_csv(os.path.join(out, "results.csv"))[0]
    assert row["status"] == "ok" and 0 < float(row["auroc_pooled"]) < 1


def children(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_sigterm_stops_every_running_step(tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "reproduce.py"), *BASE, "--epochs", "50",
                             "--max_steps", "1000", "--devices", "cpu", "cpu", "--out", out],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while True:
            trainings = [c for c in children(proc.pid) if any(x.endswith("train.py") for x in c.cmdline())]
            if len(trainings) == 2 and all(os.path.exists(os.path.join(run_dir(out, "rotation", s), "train.log"))
                                           for s in (0, 1)):
                break
            assert proc.poll() is None and time.time() - t0 < 60, "two trainings did not start"
            time.sleep(0.1)
        time.sleep(2)  # both inside train.py
        steps = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted by SIGTERM while training synth_lesion"), err
    assert "(those 2 steps were stopped)" in lines[0] and "finished runs are kept" in lines[0]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in steps)
    for seed in (0, 1):  # stopped, not failed: the next command resumes them
        assert not os.path.exists(os.path.join(run_dir(out, "rotation", seed), "failed.json"))
        # and counts the seconds of this attempt in the run's train_seconds
        with open(os.path.join(run_dir(out, "rotation", seed), "train_attempts.json")) as fh:
            assert 2.0 <= json.load(fh)["seconds"] <= time.time() - t0


@pytest.mark.parametrize("args, message", [
    (["--nproc_per_run", "0"], "--nproc_per_run must be at least 1, got 0"),
    (["--devices", "cpu", "--device", "cpu"], "give --devices cpu or --device cpu, not both"),
    (["--devices", "cpu", "bogus"], "--devices bogus is not a device"),
    (["--devices", "cuda:0", "cuda:1", "cuda:2", "--nproc_per_run", "2"], "--devices lists 3 GPUs but --nproc_per_run 2"),
    (["--devices", "cuda:0", "cuda:0", "--nproc_per_run", "2"], "cuda:0 cuda:0 names a GPU twice"),
    (["--devices", "cuda", "cuda", "--nproc_per_run", "2"], "name each GPU as cuda:K"),
])
def test_bad_device_flags_exit_2_with_one_line(args, message, tmp_path, capsys):
    import reproduce

    with pytest.raises(SystemExit) as exc:
        reproduce.main(BASE + args + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_device_slots_group_gpus_by_nproc_per_run():
    from reproduce import device_slots

    assert device_slots(["cpu", "cuda:1"]) == [("cpu", "cpu", None), ("cuda:1", "cuda:1", None)]
    assert device_slots(["cuda:3", "cuda:2", "cpu"], 2) == [("cpu", "cpu", None), ("cuda:3,2", "cuda", "3,2")]
    assert device_slots([f"cuda:{i}" for i in range(4)], 2) == [("cuda:0,1", "cuda", "0,1"), ("cuda:2,3", "cuda", "2,3")]
    assert device_slots([f"cuda:{i}" for i in range(4)], 4) == [("cuda:0,1,2,3", "cuda", "0,1,2,3")]


def test_a_gpu_groups_steps_see_only_its_gpus(tmp_path):
    """The slot's CUDA_VISIBLE_DEVICES reaches the step's process and its log's command line."""
    import types

    from reproduce import Steps, step_env

    log = tmp_path / "step.log"
    cmd = [sys.executable, "-c", "import os; print('visible=' + os.environ['CUDA_VISIBLE_DEVICES'])"]
    ok, _, reason = Steps().run(cmd, str(log), what="probe", env=step_env(types.SimpleNamespace(gpus="2,3")))
    assert ok, reason
    text = log.read_text().splitlines()
    assert text[0].startswith("$ CUDA_VISIBLE_DEVICES=2,3 ") and "visible=2,3" in text
    assert step_env(types.SimpleNamespace(gpus=None)) is None and step_env(types.SimpleNamespace()) is None


def test_stop_all_stops_the_running_steps_and_starts_no_other(tmp_path):
    """An interruption (Steps.stop_all) stops a step another thread runs, which then raises
    Interrupted rather than report a failure; no step starts after it; ``what`` and ``stopped``
    say what was stopped, for reproduce.py's message."""
    steps = Steps()
    steps.doing("running the runs")
    log, raised = tmp_path / "sleep.log", []

    def work():
        try:
            steps.run([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], str(log),
                      what="sleeping")
        except Interrupted as exc:
            raised.append(exc.args)

    thread = threading.Thread(target=work)
    thread.start()
    t0 = time.time()
    while not (log.exists() and "up" in log.read_text().splitlines()):
        assert time.time() - t0 < 30, "the step did not start"
        time.sleep(0.05)
    assert steps.what == "running the runs"  # another thread's step leaves the main thread's words
    assert steps.stop_all(signal.SIGTERM) == 1
    thread.join(30)
    assert not thread.is_alive() and raised == [(signal.SIGTERM,)]
    assert (steps.stopping, steps.stopped, steps.what) == (signal.SIGTERM, 1, "sleeping")
    with pytest.raises(Interrupted):
        steps.run([sys.executable, "-c", "pass"], str(tmp_path / "after.log"))
    assert Steps().stopping is None and Steps().stopped == 0 and Steps().what is None  # one per study
