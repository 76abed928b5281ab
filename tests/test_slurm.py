"""reproduce.py --launcher slurm against a real SLURM: a one-node cluster started on this machine
(tests/slurm_cluster.py: munged, MariaDB, slurmdbd, slurmctld, slurmd; the packages are installed by
scripts/install_slurm.sh when missing and this is root), the jobs submitted through submitit.

Most tests share one scenario (the ``scenario`` fixture). A tiny study (digits class 0: a dissolver,
rotation and diffusion_rotation, seeds 0 and 1, two epochs of two steps) runs locally, the reference,
and through --launcher slurm, where each run's first training stops itself at its third step
(``DIA_FAULT=step#3=stop``: during its second epoch, after its first checkpoint) and is then

- requeued with ``scontrol requeue`` (rotation, seed 0),
- preempted: SLURM's warning signal to the job (``scancel --batch --signal=USR2``), upon which
  submitit checkpoints the job and requeues it (rotation, seed 1),
- cancelled with ``scancel`` (diffusion_rotation, seed 0),
- let go on (diffusion_rotation, seed 1).

Once the driver has reported the cancelled run failed it is killed (SIGKILL), and the same command runs
again. The jobs run with one torch thread (OMP_NUM_THREADS=1, passed on by sbatch).

The fast tests at the end check the flags without a cluster.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import psutil
import pytest
import torch

from helpers import ROOT, md_tables, read_csv
from slurm_cluster import PARTITION, OneNodeCluster, missing_programs

STUDY = ["--dataset", "digits", "--one_class_idx", "0", "--seeds", "0", "1",
         "--shift_trans_type", "rotation", "diffusion_rotation", "--resnet_width", "8", "--batch_size", "8",
         "--epochs", "2", "--max_batches_per_epoch", "1", "--log_every", "1", "--ood_samples", "1", "--no_selection",
         "--ddpm_unet_dim", "8", "--ddpm_train_steps", "2", "--ddpm_batch_size", "8",
         "--ddpm_grad_accum", "1", "--dissolver_quality_images", "16"]
SLURM = ["--launcher", "slurm", "--device", "cpu", "--slurm_poll", "0.5", "--slurm_time", "30",
         "--slurm_partition", PARTITION, "--slurm_cpus_per_task", "1", "--slurm_mem_gb", "0.5",
         "--slurm_extra=--comment=dia-test", "--slurm_setup=echo setup line ran"]
LABEL = "digits class 0 (0)"  # how the progress lines name the runs' dataset and class
PAT = re.escape(LABEL)
RUNS = [("rotation", 0), ("rotation", 1), ("diffusion_rotation", 0), ("diffusion_rotation", 1)]
TIMING_FIELDS = ("train_seconds", "eval_seconds")
WAIT_S = 600


def run_dir(out, transformation, seed):
    return os.path.join(out, "digits", "class_0", f"{transformation}_32px", f"seed_{seed}")


def reproduce_cmd(*args):
    return [sys.executable, os.path.join(ROOT, "reproduce.py"), *args]


def study_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    if "DIA_FAULT" not in extra:
        env.pop("DIA_FAULT", None)
    return env


def slurm(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True, timeout=60).stdout


def ledger(out):
    with open(os.path.join(out, "slurm_jobs.json")) as fh:
        return json.load(fh)["tasks"]


def job_of(out, folder):
    """The id of the last job the ledger records for a run folder (None before its submission)."""
    try:
        attempts = ledger(out).get(os.path.relpath(folder, out)) or []
    except (OSError, ValueError):
        return None
    return attempts[-1]["job"] if attempts else None


def stopped_training(folder):
    """The PID of a train.py working in ``folder`` that stopped itself (DIA_FAULT ...=stop), or None."""
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if (any(c.endswith("train.py") for c in cmd) and folder in cmd
                and proc.info["status"] == psutil.STATUS_STOPPED):
            return proc.pid
    return None


def read_text(path):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def wait_for(what, ok, proc=None, log=None, timeout=WAIT_S):
    t0 = time.time()
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended ({proc.returncode}) while waiting for {what}:\n{read_text(log)}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s\n{read_text(log) if log else ''}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node SLURM cluster for this module (SLURM_CONF and PATH set for it)."""
    if missing_programs() and os.geteuid() == 0:
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "install_slurm.sh")], timeout=600, check=False)
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM is not installed here ({' '.join(missing)}): run scripts/install_slurm.sh as root")
    c = OneNodeCluster(tmp_path_factory.mktemp("slurm_cluster"))
    try:
        c.start()
        with pytest.MonkeyPatch.context() as mp:
            for k, v in c.env.items():
                mp.setenv(k, v)
            c.started_at = time.time()
            yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def scenario(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm_study")
    local_out, out = str(base / "local"), str(base / "slurm")
    t0 = time.time()
    # the reference: the same study on this machine (two runs at a time; the same numbers as one after another)
    with open(base / "local.log", "w") as log:
        local = subprocess.Popen(reproduce_cmd(*STUDY, "--devices", "cpu", "cpu", "--out", local_out), cwd=ROOT,
                                 env=study_env(), stdout=log, stderr=subprocess.STDOUT)
    first_log = str(base / "driver1.log")
    with open(first_log, "w") as log:
        first = subprocess.Popen(reproduce_cmd(*STUDY, *SLURM, "--out", out), cwd=ROOT,
                                 env=study_env(DIA_FAULT="step#3=stop"), stdout=log, stderr=subprocess.STDOUT)
    acted = {}
    try:
        actions = {("rotation", 0): lambda job, pid: slurm("scontrol", "requeue", job),
                   ("rotation", 1): lambda job, pid: slurm("scancel", "--batch", "--signal=USR2", job),
                   ("diffusion_rotation", 0): lambda job, pid: slurm("scancel", job),
                   ("diffusion_rotation", 1): lambda job, pid: os.kill(pid, signal.SIGCONT)}

        def act():
            for key, action in actions.items():
                folder = run_dir(out, *key)
                pid = None if key in acted else stopped_training(folder)
                if pid is not None:
                    acted[key] = job_of(out, folder)
                    action(acted[key], pid)
            return len(acted) == len(actions)

        wait_for("every training stopping at its third step", act, first, first_log)
        cancelled = acted[("diffusion_rotation", 0)]
        wait_for("the driver reporting the cancelled run", lambda: re.search(
            rf"seed 0 \(job {cancelled}\): FAILED .*\nstudy: ", read_text(first_log)), first, first_log)
        live_at_kill = [att["job"] for atts in ledger(out).values() for att in atts if att["end"] is None]
        table_at_kill = read_csv(os.path.join(out, "results.csv"))
        first.kill()
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    second = subprocess.run(reproduce_cmd(*STUDY, *SLURM, "--out", out), cwd=ROOT, env=study_env(),
                            capture_output=True, text=True, timeout=WAIT_S)
    local.wait(timeout=WAIT_S)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0 - 60))
    on_cluster = [line.split("|", 1) for line in slurm("sacct", "-X", "-n", "-P", "-S", since, "-o",
                                                        "JobID,JobName").split()]
    return {"on_cluster": on_cluster, "out": out, "local_out": local_out, "local_rc": local.returncode, "local_log": read_text(base / "local.log"),
            "first_log": read_text(first_log), "second": second, "acted": acted, "live_at_kill": live_at_kill,
            "table_at_kill": table_at_kill, "seconds": time.time() - t0}


def without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS + ("reused",)} for r in rows]


@pytest.mark.slow
def test_slurm_study_ends_with_the_local_results(scenario):
    """The tables are those of the local study (timings aside; ``reused`` says what an earlier command
    had already reported)."""
    assert scenario["local_rc"] == 0, scenario["local_log"]
    second = scenario["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    local = read_csv(os.path.join(scenario["local_out"], "results.csv"))
    remote = read_csv(os.path.join(scenario["out"], "results.csv"))
    assert [(r["transformation"], r["seed"], r["status"]) for r in remote] == [(t, str(s), "ok") for t, s in RUNS]
    assert without_timings(remote) == without_timings(local)
    assert len({r["auroc_pooled"] for r in remote}) == 4  # four different runs
    local_md, remote_md = (md_tables(os.path.join(o, "results.md")) for o in (scenario["local_out"], scenario["out"]))
    assert remote_md[0] == local_md[0]  # the paper's table: mean ± std over the seeds
    assert remote_md[0][0] == ["Dataset", "rotation", "diffusion_rotation"]
    print("\n--launcher local:\n" + "\n".join(" | ".join(row) for row in local_md[0]))
    print("--launcher slurm:\n" + "\n".join(" | ".join(row) for row in remote_md[0]))
    print(f"scenario: {scenario['seconds']:.0f} s")


@pytest.mark.slow
def test_requeued_preempted_and_cancelled_runs_resume_to_the_local_weights(scenario):
    out, local_out = scenario["out"], scenario["local_out"]
    for transformation, seed in RUNS:
        mine = torch.load(os.path.join(run_dir(out, transformation, seed), "last.model"), weights_only=False)
        ref = torch.load(os.path.join(run_dir(local_out, transformation, seed), "last.model"), weights_only=False)
        assert (mine["epoch"], mine["step"]) == (ref["epoch"], ref["step"]) == (2, 4)
        assert mine["model"].keys() == ref["model"].keys()
        for name, tensor in ref["model"].items():
            assert torch.equal(mine["model"][name], tensor), (transformation, seed, name)
    tasks = ledger(out)
    for (transformation, seed), interrupted in zip(RUNS, (True, True, True, False)):
        log = read_text(os.path.join(run_dir(out, transformation, seed), "train.log"))
        assert ("interrupted by SIGTERM" in log) == interrupted, log
        assert ("resuming after epoch 1 (step 2)" in log) == interrupted, log
    acted = scenario["acted"]
    # requeued and preempted: the same job, run twice; cancelled: a second job
    for key in (("rotation", 0), ("rotation", 1)):
        attempts = tasks[os.path.relpath(run_dir(out, *key), out)]
        assert [a["job"] for a in attempts] == [acted[key]]
        runs = slurm("sacct", "-D", "-X", "-n", "-P", "-j", acted[key], "-o", "State").split()
        assert runs == ["REQUEUED", "COMPLETED"], runs
    attempts = tasks[os.path.relpath(run_dir(out, "diffusion_rotation", 0), out)]
    assert attempts[0]["job"] == acted[("diffusion_rotation", 0)] and attempts[0]["end"]["state"] == "CANCELLED"
    assert len(attempts) == 2 and attempts[1]["end"]["state"] == "COMPLETED"
    # the preemption went through submitit's checkpoint and requeue
    preempted = read_text(os.path.join(out, "slurm", f"{acted[('rotation', 1)]}_0_log.err"))
    assert "Caught signal SIGUSR2" in preempted and "this job is preempted" in preempted, preempted


@pytest.mark.slow
def test_cancelled_run_fails_with_its_reason_until_it_succeeds(scenario):
    cancelled = scenario["acted"][("diffusion_rotation", 0)]
    reason = f"slurm: job {cancelled} cancelled (scancel)"
    assert (f"[3/4] {LABEL} diffusion_rotation 32px seed 0 (job {cancelled}): FAILED ({reason}); log "
            f"slurm/{cancelled}_0_log.err") in scenario["first_log"]
    row = [r for r in scenario["table_at_kill"] if (r["transformation"], r["seed"]) == ("diffusion_rotation", "0")]
    assert row and row[0]["status"] == "failed" and row[0]["error"] == reason, scenario["table_at_kill"]
    second = scenario["second"].stdout
    assert re.search(rf"seed 0: submitted as job (\d+) again, after: {re.escape(reason)}\n", second), second
    rows = read_csv(os.path.join(scenario["out"], "results.csv"))
    assert [r["status"] for r in rows] == ["ok"] * 4 and not any(r["error"] for r in rows)
    failed = os.path.join(run_dir(scenario["out"], "diffusion_rotation", 0), "failed.json")
    assert not os.path.exists(failed)  # the successful job started afresh from the checkpoint


@pytest.mark.slow
def test_rerun_after_the_driver_was_killed_submits_nothing_twice(scenario):
    out = scenario["out"]
    tasks = ledger(out)
    jobs = [att["job"] for atts in tasks.values() for att in atts]
    # a dissolver, four runs, and the cancelled run once more
    assert len(jobs) == len(set(jobs)) == 6 and len(tasks) == 5
    assert all(att["end"] is not None and att["collected"] for atts in tasks.values() for att in atts)
    # every job SLURM ran during the scenario is one of those
    assert sorted(i for i, _ in scenario["on_cluster"]) == sorted(jobs), (scenario["on_cluster"], tasks)
    assert sorted(n for _, n in scenario["on_cluster"]) == sorted(att["name"] for atts in tasks.values() for att in atts)
    live = scenario["live_at_kill"]
    assert live, "no job was queued or running when the driver was killed"
    second = scenario["second"].stdout
    for job in live:  # followed, or collected when it had ended meanwhile: not submitted again
        assert re.search(rf"(: job {job} \w+ \(submitted by an earlier command\)|\(job {job}\): trained)", second), second
    assert second.count("submitted as job") == 1, second  # the cancelled run, nothing else


@pytest.mark.slow
def test_progress_lines_and_eta(scenario):
    first, second = scenario["first_log"], scenario["second"].stdout
    assert re.search(r"dissolver digits class 0 32px \(\S+\): job \d+ finished: trained in \d+ s", first), first
    assert re.search(rf"\[1/4\] {PAT} rotation 32px seed 0: job \d+ running on \S+: epoch \d/2, step \d of 4", first)
    assert re.search(r"\[1/4\] [^\n]*: job \d+ requeued \(preempted, at its time limit, or by scontrol requeue\)", first)
    assert re.search(r"\[3/4\] [^\n]*: waiting for the dissolver digits class 0 32px", first)
    assert re.search(r"study: 0 of 4 run\(s\) finished, 0 failed, \d running, \d queued, 2 waiting for a dissolver; "
                     r"ETA (once a run has finished|[\w ]+ \(a run's training takes about [\w ]+\))\n", first), first
    assert re.search(rf"\[\d/4\] {PAT} \S+ 32px seed \d \(job \d+\): trained \d+ s, evaluated \d+ s; AUROC "
                     r"0\.\d{3} \(last\)", first + second)
    assert re.search(r"; ETA \d+ (s|min \d\d s) \(a run takes about \d+ (s|min \d\d s)\)", first + second), first + second
    assert "study: 4 of 4 run(s) finished, 0 failed, 0 running, 0 queued\n" in second
    assert "4 of 4 run(s) finished, 0 failed" in second


@pytest.mark.slow
def test_sbatch_lines_follow_the_flags_and_squeue_agrees_with_sacct(scenario):
    out = scenario["out"]
    job = scenario["acted"][("rotation", 0)]
    script = read_text(os.path.join(out, "slurm", f"{job}_submission.sh"))
    for line in (f"#SBATCH --partition={PARTITION}", "#SBATCH --time=30", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --mem=512M", "#SBATCH --nodes=1", "#SBATCH --comment=dia-test",
                 "#SBATCH --signal=B:USR2@90", "echo setup line ran"):
        assert line in script.splitlines(), script
    assert "gpus" not in script  # --device cpu
    assert "setup line ran" in read_text(os.path.join(out, "slurm", f"{job}_0_log.out"))
    from study.slurm import sacct_states, squeue_states

    jobs = [att["job"] for atts in ledger(out).values() for att in atts]
    queue, accounting = squeue_states(jobs), sacct_states(jobs)
    assert queue  # the jobs that ended less than MinJobAge ago
    assert {j: s["state"] for j, s in queue.items()} == {j: accounting[j]["state"] for j in queue}
    assert sorted(s["state"] for s in accounting.values()) == ["CANCELLED"] + ["COMPLETED"] * 5


@pytest.mark.slow
def test_ctrl_c_cancels_nothing_unless_cancel_on_exit_on_a_cluster_without_accounting(scenario, tmp_path):
    """On a cluster without accounting (no sacct; slurmctld forgets an ended job after 5 s), two rotation
    runs whose trainings stop themselves at their third step:

    - Ctrl-C of the driver leaves the jobs running (and a local study on that --out is refused);
    - seed 0's training goes on and its job ends while no driver watches, and is forgotten by SLURM:
      the next driver judges it by its files (finished);
    - Ctrl-C of that driver with --cancel_on_exit cancels seed 1's job, which it did not submit again;
    - the next driver resubmits seed 1, which continues from its checkpoint: both runs end with the
      weights of the local study."""
    import reproduce

    cluster = OneNodeCluster(tmp_path / "cluster", accounting=False, min_job_age=5).start()
    try:
        out = str(tmp_path / "out")
        args = [a for a in STUDY if a != "diffusion_rotation"] + SLURM + ["--out", out]
        folders = [run_dir(out, "rotation", seed) for seed in (0, 1)]
        env = study_env(DIA_FAULT="step#3=stop", **cluster.env)

        def interrupted_driver(name, *extra, before=None):
            log_path = str(tmp_path / f"{name}.log")
            with open(log_path, "w") as log:
                proc = subprocess.Popen(reproduce_cmd(*args, *extra), cwd=ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT)
            try:
                if before is not None:
                    before(proc, log_path)
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
            text = read_text(log_path)
            assert proc.returncode == 128 + signal.SIGINT, text
            return text

        def both_stopped(proc, log_path):
            wait_for("both trainings stopping", lambda: all(stopped_training(f) for f in folders), proc, log_path)
            wait_for("the driver seeing them run", lambda: read_text(log_path).count(" running on ") >= 2, proc,
                     log_path)

        with pytest.MonkeyPatch.context() as mp:
            for k, v in cluster.env.items():
                mp.setenv(k, v)
            text = interrupted_driver("first", before=both_stopped)
            jobs = [job_of(out, f) for f in folders]
            assert f"(jobs {' '.join(jobs)} go on: --cancel_on_exit would cancel them)" in text, text
            assert slurm("squeue", "-h", "-j", ",".join(jobs), "-o", "%T").split() == ["RUNNING", "RUNNING"]
            with pytest.raises(SystemExit) as exc:  # a local study there would train the same runs
                reproduce.main(args[:args.index("--launcher")] + ["--device", "cpu", "--out", out])
            assert exc.value.code == 2

            os.kill(stopped_training(folders[0]), signal.SIGCONT)
            wait_for("seed 0's job ending and being forgotten", lambda: subprocess.run(
                ["squeue", "-h", "--states=all", "-j", jobs[0], "-o", "%T"], capture_output=True, text=True,
                timeout=60).stdout.strip() == "")

            def sees_them(proc, log_path):
                wait_for("the driver collecting seed 0", lambda: "seed 0 (job" in read_text(log_path), proc, log_path)
                wait_for("the driver following seed 1", lambda: f"job {jobs[1]} running (submitted by an earlier "
                                                                f"command)" in read_text(log_path), proc, log_path)

            text = interrupted_driver("second", "--cancel_on_exit", before=sees_them)
            assert "sacct cannot answer on this cluster" in text, text
            assert f"(cancelled jobs {jobs[1]}: --cancel_on_exit)" in text, text
            assert "submitted as job" not in text, text
            wait_for("seed 1's training ending", lambda: stopped_training(folders[1]) is None, timeout=60)
            third = subprocess.run(reproduce_cmd(*args), cwd=ROOT, env=study_env(**cluster.env), capture_output=True,
                                   text=True, timeout=WAIT_S)
    finally:
        cluster.stop()
    assert third.returncode == 0, third.stdout + third.stderr
    assert re.search(rf"seed 1: submitted as job \d+ again, after: slurm: job {jobs[1]} cancelled when "
                     rf"reproduce.py was interrupted \(--cancel_on_exit\)", third.stdout), third.stdout
    tasks = ledger(out)
    assert [len(tasks[os.path.relpath(f, out)]) for f in folders] == [1, 2]
    assert [r["status"] for r in read_csv(os.path.join(out, "results.csv"))] == ["ok", "ok"]
    for seed, folder in enumerate(folders):
        mine = torch.load(os.path.join(folder, "last.model"), weights_only=False)["model"]
        ref = torch.load(os.path.join(run_dir(scenario["local_out"], "rotation", seed), "last.model"),
                         weights_only=False)["model"]
        assert all(torch.equal(mine[k], v) for k, v in ref.items()), seed


# --------------------------------------------------------------------------- without a cluster


@pytest.mark.parametrize("args, message", [
    (["--slurm_partition", "gpu"], "--slurm_partition belongs to --launcher slurm"),
    (["--cancel_on_exit"], "--cancel_on_exit belongs to --launcher slurm"),
    (["--launcher", "slurm", "--slurm_time", "ten"], "--slurm_time not a time limit: 'ten'"),
    (["--launcher", "slurm", "--slurm_extra=-C a100"], "write the option in its long form"),
    (["--launcher", "slurm", "--slurm_extra=--partition=gpu"], "sets --partition itself; use --slurm_partition"),
    (["--launcher", "slurm", "--nproc_per_run", "3", "--slurm_nodes", "2"], "give a multiple of 2"),
    (["--launcher", "slurm", "--slurm_nodes", "2"], "--nproc_per_run 1 over --slurm_nodes 2"),
    (["--launcher", "slurm", "--devices", "cpu", "cpu"], "leave out --devices"),
    (["--launcher", "slurm", "--slurm_mem_gb", "0"], "--slurm_mem_gb must be positive"),
])
def test_bad_slurm_flags_exit_2_with_one_line(args, message, tmp_path, capsys):
    import reproduce

    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--dataset", "digits"] + args + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_time_limits_and_sbatch_lines_parse():
    from study.slurm import parse_sbatch_line, parse_time

    assert [parse_time(t) for t in ("90", "1:30:00", "2-00", "1-02:03", "30:01", "0:0:30")] == [90, 90, 2880, 1563,
                                                                                             31, 1]
    assert parse_sbatch_line("--constraint=a100") == ("constraint", "a100")
    assert parse_sbatch_line("#SBATCH --gres gpu:2") == ("gres", "gpu:2")
    assert parse_sbatch_line("--exclusive") == ("exclusive", True)
    for bad in ("0", "1:2:3:4", "x"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_sbatch_parameters_and_the_launch_over_nodes(tmp_path):
    """What each flag asks SLURM for, and train.py's launch over the nodes of a run's job."""
    import reproduce
    from study.plan import make_plan
    from study.runs import train_command
    from study.slurm import multi_node_flags, sbatch_parameters

    a = types.SimpleNamespace(slurm_nodes=2, nproc_per_run=8, device=None, slurm_time=60, slurm_partition="gpu",
                              slurm_account="lab", slurm_qos="high", slurm_cpus_per_task=6, slurm_mem_gb=1.5,
                              slurm_extra={"constraint": "a100"}, slurm_setup=["module load cuda"])
    run = sbatch_parameters(a, "run", "job")
    assert {k: run[k] for k in ("nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "mem", "time",
                                "partition", "account", "qos", "job_name", "use_srun")} == {
        "nodes": 2, "ntasks_per_node": 1, "gpus_per_node": 4, "cpus_per_task": 6, "mem": "1536M", "time": 60,
        "partition": "gpu", "account": "lab", "qos": "high", "job_name": "job", "use_srun": False}
    assert run["additional_parameters"] == {"constraint": "a100", "signal": "B:USR2@90"}
    assert run["setup"][1:] == ["module load cuda"] and run["setup"][0].startswith(f"export PYTHONPATH={ROOT}")
    dissolver = sbatch_parameters(a, "dissolver", "job")
    assert (dissolver["nodes"], dissolver["gpus_per_node"]) == (1, 1)
    a.device = "cpu"
    assert "gpus_per_node" not in sbatch_parameters(a, "run", "job")

    a = reproduce.check_args(reproduce.resolve_args(["--dataset", "digits", "--one_class_idx", "0", "--shift_trans_type",
                                                     "rotation", "--nproc_per_run", "8", "--out", str(tmp_path)]))
    a.slurm_nodes = 2
    run = make_plan(a)[0]
    cmd = train_command(multi_node_flags(a, "node1", 29500, "77"), run, None)
    assert cmd[:cmd.index(sys.executable)] == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1",
                                               "--kill-on-bad-exit=1", "--gpus-per-node", "4"]
    i = cmd.index(sys.executable)
    assert cmd[i + 1:i + 13] == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4",
                                 "--rdzv_backend", "c10d", "--rdzv_endpoint", "node1:29500", "--rdzv_id", "dia-77"]
    assert cmd[i + 13].endswith("train.py")
    a.slurm_nodes = 1  # one node: torchrun --standalone, as a local study
    single = train_command(a, run, None)
    assert single[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8"]
