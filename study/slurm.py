"""``reproduce.py --launcher slurm``: a study's dissolvers and runs as SLURM jobs, submitted through submitit.

Every dissolver the study needs is a job, and every run is a job; a run that dissolves is submitted
once its dissolver's job has finished (the driver waits for it, so no run sits in the queue behind a
dissolver that failed). A job does on its node what a local study does for that dissolver or run
(:meth:`study.dissolvers.Dissolvers.get`, :func:`study.runs.execute`: the same subprocesses, writing
the same files into the same folders), so the tables are those of a local study.

The driver (reproduce.py, :func:`run_on_slurm`) records every job in ``<out>/slurm_jobs.json``
(:class:`Ledger`) before and after ``sbatch``, watches the jobs' states (``squeue``, then ``sacct``
for jobs that left the queue), prints them as they change with the study's ETA, collects each finished
run into the tables, and returns when every run has finished or failed. Running the command again
collects the jobs that ended meanwhile, waits for those still queued or running, resubmits the failed
ones (their reason stays in the table until they succeed) and never submits a run that has a job
queued or running, or has finished.

A job ends in one of three ways. It finishes (its run's evaluation completed:
:func:`study.rerun.is_finished`). Its dissolver or run fails (the job exits with the failure's reason, as
a local study reports it). Or SLURM ends it: ``scancel`` (the run is failed with that reason), a time
limit or a preemption: submitit's signal (``#SBATCH --signal=B:USR2@90``, 90 s before the limit) lets the
job requeue itself (``scontrol requeue``, at most
``--slurm_max_timeouts`` times for time limits), and a requeued job (by submitit, by ``scontrol
requeue`` or by a preemption with ``PreemptMode=REQUEUE``) starts again and continues from the last
checkpoint its training wrote (``train.py --resume_path``, the dissolver's ``--resume``), exactly as an
interrupted local study continues. Jobs run their steps without ``srun`` (submitit's ``use_srun=False``)
and Python replaces the batch shell (``exec``), so that the batch shell's signal reaches it; a run of
``--nproc_per_run N`` over ``--slurm_nodes M > 1`` starts one torchrun agent per node with ``srun``,
meeting at the job's first node on the port submitit's ``TorchDistributedEnvironment`` draws from the
job id.
"""
import copy
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

import submitit
from submitit.core.utils import JobPaths, pickle_load
from submitit.helpers import Checkpointable, TorchDistributedEnvironment

from common.errors import UserError
from common.progress import format_duration, progress_text, read_progress
from study.dissolvers import Dissolvers, progress_path, read_quality
from study.plan import class_text
from study.rerun import is_finished
from study.runs import execute, fail, needs_dissolver, read_json
from study.schedule import report_run
from study.steps import ROOT, Interrupted, Steps, _on_signal
from study.tables import write_tables
from study.text import rel
from utils import atomic_write_json, warn

LEDGER_NAME = "slurm_jobs.json"
SIGNAL_DELAY_S = 90  # the job's warning before its time limit (submitit's default), at most a tenth of the limit
# SLURM states of a job that has ended (``squeue``'s and ``sacct``'s words); any other state is a
# job still queued, running or being requeued
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "SPECIAL_EXIT", "REVOKED", "GONE"}
SAYS = {  # how the tables word the end of a job that SLURM ended
    "CANCELLED": "cancelled (scancel)", "TIMEOUT": "reached its time limit (--slurm_time) and was not requeued",
    "NODE_FAIL": "its node failed", "OUT_OF_MEMORY": "ran out of memory (--slurm_mem_gb)",
    "BOOT_FAIL": "its node failed to boot", "DEADLINE": "missed its deadline", "PREEMPTED": "preempted, not requeued",
    "REVOKED": "revoked", "SPECIAL_EXIT": "held after a failure (SPECIAL_EXIT)",
}
# #SBATCH options that reproduce.py's own flags set (or submitit needs): --slurm_extra must not set them
OWNED_OPTIONS = {"job-name": "", "time": "--slurm_time", "t": "--slurm_time", "partition": "--slurm_partition",
                 "p": "--slurm_partition", "account": "--slurm_account", "A": "--slurm_account",
                 "qos": "--slurm_qos", "q": "--slurm_qos", "nodes": "--slurm_nodes", "N": "--slurm_nodes",
                 "cpus-per-task": "--slurm_cpus_per_task", "c": "--slurm_cpus_per_task", "mem": "--slurm_mem_gb",
                 "gpus-per-node": "--nproc_per_run", "ntasks-per-node": "", "ntasks": "", "n": "", "signal": "",
                 "output": "--slurm_folder", "o": "--slurm_folder", "error": "--slurm_folder", "e": "--slurm_folder",
                 "open-mode": "", "array": "", "J": ""}


# --------------------------------------------------------------------------- flags


def parse_time(text):
    """``--slurm_time``: minutes (``90``) or SLURM's ``[D-]HH:MM[:SS]`` / ``MM:SS``, as whole minutes."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ValueError(f"not a time limit: {text!r} (minutes, or [D-]HH:MM[:SS])")
    days, a, b, c = m.groups()
    if days is None and b is None:
        minutes = int(a)
    elif days is None and c is None:  # MM:SS
        minutes = int(a) + int(b) / 60
    else:  # [D-]HH:MM[:SS], or D-HH
        minutes = int(days or 0) * 1440 + int(a) * 60 + int(b or 0) + int(c or 0) / 60
    if minutes <= 0:
        raise ValueError(f"a time limit must be positive, got {text!r}")
    return int(math.ceil(minutes))


def parse_sbatch_line(text):
    """``--slurm_extra``: one ``#SBATCH`` option in its long form (``--constraint=a100``, ``--exclusive``,
    ``--gres gpu:2``, with or without ``#SBATCH``) as ``(name, value)`` (value True for a switch)."""
    words = str(text).strip()
    if words.startswith("#SBATCH"):
        words = words[len("#SBATCH"):].strip()
    m = re.fullmatch(r"--([A-Za-z][A-Za-z0-9-]*)(?:[= ]\s*(.+))?", words)
    if not m:
        short = re.fullmatch(r"-([A-Za-z])\b.*", words)
        raise ValueError(f"{text!r}: write the option in its long form, e.g. --constraint=a100"
                         + (f" (not -{short.group(1)})" if short else ""))
    name, value = m.group(1), m.group(2)
    if name in OWNED_OPTIONS:
        flag = OWNED_OPTIONS[name]
        raise ValueError(f"{text!r}: reproduce.py sets --{name} itself" + (f"; use {flag}" if flag else ""))
    return name, (value.strip() if value is not None else True)


def uses_gpus(a):
    """Whether the jobs would ask for GPUs: unless every step runs on the CPU (``--device cpu``)."""
    return not str(a.device or "").strip().lower().startswith("cpu")


def sbatch_parameters(a, kind, name):
    """submitit's ``SlurmExecutor`` parameters of a job: ``kind`` "dissolver" (one node, one GPU) or
    "run" (``--slurm_nodes`` nodes, ``--nproc_per_run / --slurm_nodes`` GPUs on each), both with the
    ``--slurm_*`` flags; ``name`` is the job's name."""
    nodes = a.slurm_nodes if kind == "run" else 1
    delay = signal_delay(a.slurm_time)
    params = {"job_name": name, "time": a.slurm_time, "nodes": nodes, "ntasks_per_node": 1, "use_srun": False,
              "signal_delay_s": delay,
              "setup": [f"export PYTHONPATH={shlex.quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}", *a.slurm_setup],
              # the signal goes to the batch shell, which Python replaced (exec): see SlurmExecutor(python=...)
              "additional_parameters": dict(a.slurm_extra or {}, signal=f"B:{submitit.JobEnvironment.USR_SIG}@{delay}")}
    for key, value in (("partition", a.slurm_partition), ("account", a.slurm_account), ("qos", a.slurm_qos),
                       ("cpus_per_task", a.slurm_cpus_per_task)):
        if value:
            params[key] = value
    if a.slurm_mem_gb:
        mem = float(a.slurm_mem_gb)
        params["mem"] = f"{int(mem)}G" if mem == int(mem) else f"{int(math.ceil(mem * 1024))}M"
    if getattr(a, "slurm_gpus", uses_gpus(a)):
        params["gpus_per_node"] = a.nproc_per_run // nodes if kind == "run" else 1
    return params


def signal_delay(minutes):
    """Seconds between SLURM's warning signal and a job's time limit: 90 s (submitit's default), at
    most a tenth of the limit, so that a short job still runs before it is told to requeue itself."""
    return int(min(SIGNAL_DELAY_S, max(5, minutes * 60 // 10)))


def partition_has_gpus(partition):
    """Whether a node of ``partition`` (None: every partition) has GPUs as SLURM knows them (``sinfo``'s
    generic resources); True when sinfo cannot answer (the jobs then ask for GPUs, as on most clusters)."""
    rc, out, _ = slurm_call(["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else []))
    if rc != 0:
        return True
    return any("gpu" in line.lower() for line in out.splitlines())


# --------------------------------------------------------------------------- SLURM's answers


def slurm_call(cmd, timeout=60):
    """``(returncode, stdout, stderr)`` of a SLURM command; returncode None when it could not run."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def squeue_states(ids):
    """``{job id: {"state", "reason", "node", "start"}}`` of the jobs slurmctld knows (queued, running,
    or ended less than ``MinJobAge`` ago; ``start``: when it started running, a time stamp, or None);
    None when squeue did not answer."""
    if not ids:
        return {}
    rc, out, err = slurm_call(["squeue", "-h", "--states=all", "-j", ",".join(ids), "-o", "%i|%T|%r|%N|%S"])
    if rc is None or (rc and "Invalid job id" not in err):
        return None
    found = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5 and parts[0] in ids:
            found[parts[0]] = {"state": parts[1], "reason": parts[2], "node": parts[3], "start": time_stamp(parts[4]),
                               "ended": parts[1] in ENDED}
    return found


def time_stamp(text):
    """SLURM's ``2024-05-01T12:00:00`` (the cluster's local time) as a time stamp; None for N/A."""
    try:
        return datetime.datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def sacct_states(ids):
    """``{job id: {"state", "reason", "node"}}`` from SLURM's accounting (the jobs' last
    records); None when ``sacct`` cannot answer (no accounting storage on this cluster)."""
    if not ids:
        return {}
    rc, out, err = slurm_call(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,State,Reason,NodeList"])
    if rc != 0:
        return None
    found = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or parts[0] not in ids:
            continue
        found[parts[0]] = {"state": parts[1].split(" by ")[0].strip(), "reason": parts[2], "node": parts[3]}
    return found


def job_states(ids, use_sacct=True):
    """``(states, sacct_answered)``: the state of each job of ``ids`` (``{"state", "reason", "node",
    "ended"}``), ``squeue``'s for the jobs slurmctld still holds, else ``sacct``'s (``use_sacct``): a job
    slurmctld no longer holds has ended, ``GONE`` when nobody recorded how. ``sacct_answered`` is False
    when sacct was asked and could not answer (a cluster without accounting storage). ``states`` is None
    when squeue could not be asked: then nothing is known, and nothing may be concluded."""
    ids = [str(i) for i in ids]
    states = squeue_states(ids)
    if states is None:
        return None, True
    rest = [i for i in ids if i not in states]
    answered = True
    if rest and use_sacct:
        ended = sacct_states(rest)
        answered = ended is not None
        states.update(ended or {})
    for i in rest:
        states.setdefault(i, {"state": "GONE", "reason": "", "node": "", "ended": True})
        states[i]["ended"] = True
        if states[i]["state"] not in ENDED and states[i]["state"] not in SAYS:  # accounting not up to date yet
            states[i]["state"] = "GONE"
    return states, answered


def find_job(name, since):
    """The id of the job named ``name`` submitted after ``since`` (a time stamp), or None: for a
    submission whose id the driver did not get to record (killed during ``sbatch``)."""
    rc, out, _ = slurm_call(["squeue", "-h", "--states=all", "--name", name, "-o", "%i"])
    ids = out.split() if rc == 0 else []
    if not ids:
        start = datetime.datetime.fromtimestamp(since - 3600).strftime("%Y-%m-%dT%H:%M:%S")
        rc, out, _ = slurm_call(["sacct", "-X", "-n", "-P", "--name", name, "-S", start, "-o", "JobID"])
        ids = out.split() if rc == 0 else []
    return ids[-1] if ids else None


def check_slurm_commands():
    """--launcher slurm: SLURM's commands must be at hand (one clear line otherwise)."""
    missing = [c for c in ("sbatch", "squeue", "scancel", "srun") if shutil.which(c) is None]
    if missing:
        raise UserError(f"--launcher slurm needs SLURM's commands, and {', '.join(missing)} is not on PATH: run "
                        f"reproduce.py on a machine of the cluster (a login node), or use --launcher local")


# --------------------------------------------------------------------------- the record of the jobs


class Ledger:
    """``<out>/slurm_jobs.json``: every job the study's drivers submitted, by task (a run's folder
    relative to ``--out``, or ``dissolvers/<name>``), oldest first. An attempt holds the job's name,
    its id (None between the record and ``sbatch``'s answer), when it was submitted, the run's
    settings, and once its end was seen: the end (``state``, ``reason``, ``log``) and whether a driver
    reported it (``collected``). Written atomically after every change."""

    def __init__(self, out):
        self.path = os.path.join(out, LEDGER_NAME)
        doc = {}
        if os.path.exists(self.path):
            doc = read_json(self.path)
            if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), dict):
                raise UserError(f"{self.path} is not the record of this study's SLURM jobs (unreadable JSON): repair "
                                f"it or move it away; without it, jobs still queued could be submitted twice")
        self.tasks = doc.get("tasks", {})

    def attempts(self, key):
        return self.tasks.get(key, [])

    def last(self, key):
        attempts = self.tasks.get(key) or []
        return attempts[-1] if attempts else None

    def add(self, key, attempt):
        self.tasks.setdefault(key, []).append(attempt)
        self.save()

    def save(self):
        atomic_write_json({"tasks": self.tasks}, self.path)

    def unended(self):
        """``(key, attempt)`` of every attempt whose end no driver has seen."""
        return [(k, att) for k, atts in self.tasks.items() for att in atts if att.get("end") is None]


def busy_folders(out):
    """The folders where SLURM jobs of the study in ``out`` may be working now (their attempts not seen
    ending and still known to SLURM as queued or running); none without a record of jobs, or without
    ``squeue`` at hand (no job of this machine's can then be running)."""
    path = os.path.join(out, LEDGER_NAME)
    if not os.path.exists(path) or shutil.which("squeue") is None:
        return {}
    doc = read_json(path)
    tasks = doc.get("tasks") if isinstance(doc, dict) else None
    if not isinstance(tasks, dict):
        return {}
    pending = {att["job"]: key for key, atts in tasks.items() for att in atts
               if att.get("end") is None and att.get("job")}
    states = squeue_states(list(pending)) or {}
    return {os.path.join(out, pending[i].rsplit("/", 1)[0] if pending[i].startswith("dissolvers/") else pending[i]): i
            for i, s in states.items() if s["state"] not in ENDED}


# --------------------------------------------------------------------------- the jobs


class JobFailed(Exception):
    """The job's dissolver or run failed; the message is the reason the tables show."""


class StudyJob(Checkpointable):
    """What a job runs on its node (submitit pickles it, with the study's flags ``a``): the dissolver
    ``item`` (``kind`` "dissolver", a :func:`study.plan.dissolver_spec`) or the run ``item`` (``kind``
    "run", a :class:`study.plan.Run`). submitit's checkpoint (its requeue on a time limit or a
    preemption) resubmits it as it is: the run folder holds what a requeued job continues from.

    SIGTERM (``scancel``, ``scontrol requeue``, a preemption, the time limit) stops the running step,
    as a local study's interruption does: nothing is recorded as failed, and the job exits."""

    def __init__(self, a, kind, item):
        self.a, self.kind, self.item = a, kind, item

    def __call__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)
        steps = Steps()
        if self.kind == "dissolver":
            state = Dissolvers(self.a, steps).get(self.item)
            if not state["ok"]:
                raise JobFailed(state["reason"])
            return "ok"
        run = execute(launch_flags(self.a), self.item, Dissolvers(self.a, steps), steps)
        if run.status != "ok":
            raise JobFailed(run.error)
        return "ok"


def launch_flags(a):
    """The study's flags for a run's job on its nodes: over several nodes (``--slurm_nodes``) with
    ``--nproc_per_run`` processes, train.py's torchrun starts through ``srun`` on every node of the job
    (:func:`multi_node_flags`); otherwise as in a local study."""
    if a.slurm_nodes <= 1 or a.nproc_per_run <= 1:
        return a
    env = TorchDistributedEnvironment()  # the job's first node, and a port drawn from the job id
    return multi_node_flags(a, env.master_addr, env.master_port, os.environ.get("SLURM_JOB_ID", "0"))


def multi_node_flags(a, addr, port, job_id):
    """``a`` with train.py's launch over the job's nodes: ``srun`` starts one torchrun agent per node
    (``--nproc_per_run / --slurm_nodes`` processes each), which meet at ``addr:port`` (c10d rendezvous
    named after the job)."""
    nodes = a.slurm_nodes
    per_node = a.nproc_per_run // nodes
    b = copy.copy(a)
    b.launch_prefix = ["srun", "--nodes", str(nodes), "--ntasks", str(nodes), "--ntasks-per-node", "1",
                       "--kill-on-bad-exit=1"]
    if a.slurm_cpus_per_task:
        b.launch_prefix += ["--cpus-per-task", str(a.slurm_cpus_per_task)]
    if getattr(a, "slurm_gpus", uses_gpus(a)):
        b.launch_prefix += ["--gpus-per-node", str(per_node)]
    b.torchrun = ["-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(per_node),
                  "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{addr}:{port}", "--rdzv_id", f"dia-{job_id}"]
    return b


# --------------------------------------------------------------------------- the driver


class Task:
    """A dissolver or a run as the driver follows it: its key in the ledger, its current attempt, what
    was last said of it, when its job was first seen running."""

    def __init__(self, key, kind, label, item):
        self.key, self.kind, self.label, self.item = key, kind, label, item
        self.phase = "todo"  # todo | live | done | failed
        self.attempt = None
        self.said = None
        self.running_since = None
        self.was_running = False  # seen running: queued again means requeued
        self.said_key = None  # what the last progress line said, in short
        self.ended_before = None  # the end of an attempt that ended before this command: shown until a success


class SlurmStudy:
    """One driver command: submits, watches and collects the study's jobs (see the module's text)."""

    def __init__(self, a, runs, command, steps):
        self.a, self.runs, self.command, self.steps = a, runs, command, steps
        self.ledger = Ledger(a.out)
        self.use_sacct = True
        self.shown = []  # what the tables show, in plan order
        for run in runs:
            pending = copy.copy(run)
            pending.notes = []
            self.shown.append(pending)
        self.run_tasks = [Task(rel(r.dir, a.out), "run", f"[{i}/{len(runs)}] {r.label}", r)
                          for i, r in enumerate(runs, 1)]
        specs = {r.dissolver["name"]: r.dissolver for r in runs if r.dissolver}
        self.dissolver_tasks = {name: Task(f"dissolvers/{name}", "dissolver",
                                           f"dissolver {s['dataset']} {class_text(s['cls'])} {s['resolution']}px "
                                           f"({name})", s) for name, s in specs.items()}
        self.finished_before = {t.key for t in self.run_tasks if is_finished(t.item)}
        self.durations = []  # wall seconds of the runs whose jobs finished under this command
        self.most_running = 0
        self.changed = False

    # ------------------------------------------------------------------ printing

    def say(self, task, text):
        if text != task.said:
            print(f"{task.label}: {text}", flush=True)
            task.said = text
            self.changed = True

    def eta_line(self):
        tasks = self.run_tasks
        done = sum(t.phase == "done" for t in tasks)
        failed = sum(t.phase == "failed" for t in tasks)
        running = [t for t in tasks if t.phase == "live" and t.running_since is not None]
        queued = sum(t.phase == "live" and t.running_since is None for t in tasks)
        waiting = sum(t.phase == "todo" for t in tasks)
        line = (f"study: {done} of {len(tasks)} run(s) finished, {failed} failed, {len(running)} running, "
                f"{queued} queued" + (f", {waiting} waiting for a dissolver" if waiting else ""))
        left = len(running) + queued + waiting
        if not left:
            return line
        now = time.time()
        if self.durations:
            mean, basis = sum(self.durations) / len(self.durations), "a run takes about"
        else:  # before a run finished: the running trainings' own estimates (their evaluations not counted)
            guesses = [now - t.running_since + doc["eta_s"] for t in running
                       for doc in [self.progress_doc(t)] if doc is not None and doc.get("eta_s") is not None]
            if not guesses:
                return line + "; ETA once a run has finished"
            mean, basis = sum(guesses) / len(guesses), "a run's training takes about"
        work = sum(max(mean - (now - t.running_since), 0.0) for t in running) + (queued + waiting) * mean
        seconds = work / max(1, self.most_running, len(running))
        return line + f"; ETA {format_duration(seconds)} ({basis} {format_duration(mean)})"

    # ------------------------------------------------------------------ SLURM

    def executor(self, kind, name):
        # Python replaces the batch shell (exec), so that #SBATCH --signal=B:... reaches submitit's handler
        ex = submitit.SlurmExecutor(folder=self.a.slurm_folder, max_num_timeout=self.a.slurm_max_timeouts,
                                    python="exec " + shlex.quote(sys.executable))
        ex.update_parameters(**sbatch_parameters(self.a, kind, name))
        return ex

    def submit(self, task):
        """Record the attempt, submit its job, record its id; signals wait until both are written."""
        item = task.item
        short = (f"dissolver_{item['name']}" if task.kind == "dissolver" else
                 f"{item.dataset}_{'multi' if item.multi else f'c{item.cls}'}_{item.transformation}_"
                 f"{item.resolution}px_s{item.seed}")
        name = f"dia_{short}_{uuid.uuid4().hex[:8]}"
        attempt = {"name": name, "job": None, "submitted": time.time(), "end": None, "collected": False,
                   "config": item.config if task.kind == "run" else None}
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self.ledger.add(task.key, attempt)
            try:
                job = self.executor(task.kind, name).submit(StudyJob(self.a, task.kind, item))
            except Exception as exc:  # noqa: BLE001 - sbatch's refusal, in its words
                self.ledger.attempts(task.key).remove(attempt)
                self.ledger.save()
                words = " ".join(str(exc).split())
                raise UserError(f"sbatch refused the job of {task.label}: {words[:400]}; check the --slurm_* flags "
                                f"against the cluster's partitions and limits") from None
            attempt["job"] = str(job.job_id)
            self.ledger.save()
            task.attempt, task.phase, task.running_since, task.was_running = attempt, "live", None, False
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        again = f" again, after: {task.ended_before['reason']}" if task.ended_before else ""
        self.say(task, f"submitted as job {attempt['job']}{again}")

    def states(self, attempts):
        """The states of ``attempts``' jobs (None when SLURM did not answer; asked again at the next poll)."""
        states, answered = job_states([att["job"] for att in attempts if att.get("job")], self.use_sacct)
        if states is None:
            warn("squeue did not answer; the jobs' states are asked again at the next poll")
        elif not answered:
            self.use_sacct = False
            warn("sacct cannot answer on this cluster (no accounting storage): a job that left the queue is judged "
                 "by the files it wrote")
        return states

    def recover(self):
        """Attempts recorded without a job id (a driver killed during sbatch): find them by name."""
        changed = False
        for key, att in self.ledger.unended():
            if att.get("job") is None:
                job = find_job(att["name"], att["submitted"])
                if job is None:
                    att["end"] = {"state": "NOT_SUBMITTED", "reason": "its submission did not reach SLURM",
                                  "log": None, "at": time.time()}
                else:
                    att["job"] = job
                changed = True
        if changed:
            self.ledger.save()

    # ------------------------------------------------------------------ ends of jobs

    def job_log(self, att):
        return str(JobPaths(self.a.slurm_folder, job_id=att["job"], task_id=0).stderr)

    def job_outcome(self, att):
        """The reason submitit's record of the job gives (the exception that ended it), or ""."""
        path = JobPaths(self.a.slurm_folder, job_id=att["job"], task_id=0).result_pickle
        try:
            outcome, payload = pickle_load(path)
        except Exception:  # noqa: BLE001 - no record, or an unreadable one
            return ""
        if outcome != "error":
            return ""
        lines = [ln.strip() for ln in str(payload).splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        return re.sub(r"^(study\.slurm\.)?JobFailed: ", "", last)

    def end_of(self, task, att, state):
        """The end of ``att``'s job in SLURM's ``state``: ``{"state", "reason", "log", "at", "recorded"}``;
        ``recorded``: the job itself wrote the run's ``failed.json`` with that reason."""
        kind = state["state"]
        failed, recorded = None, False
        if task.kind == "run" and os.path.exists(task.item.path("failed.json")):
            failed = read_json(task.item.path("failed.json"))
            recorded = failed is not None and os.path.getmtime(task.item.path("failed.json")) >= att["submitted"] - 5
        if kind in SAYS and kind != "SPECIAL_EXIT":
            reason, log, recorded = f"slurm: job {att['job']} {SAYS[kind]}", self.job_log(att), False
        elif recorded:
            reason, log = f"{failed['stage']}: {failed['reason']}", failed.get("log")
        else:
            outcome = self.job_outcome(att)
            if task.kind == "dissolver" and outcome:
                reason, log = outcome, task.item["log"]
            else:
                how = outcome or {"COMPLETED": "ended without its results", "FAILED": "failed",
                                  "GONE": "ended, and SLURM kept no record of how"}.get(kind, kind.lower())
                reason, log = f"slurm: job {att['job']} {how}", self.job_log(att)
        return {"state": kind, "reason": reason, "log": log, "at": time.time(), "recorded": recorded}

    # ------------------------------------------------------------------ the tasks

    def dissolver_done(self, task):
        spec = task.item
        return os.path.exists(spec["ckpt"]) and read_json(spec["done"]) is not None

    def collect(self, task):
        """A run whose results exist and whose job (if any) ended: into the tables."""
        run = task.item
        last = self.ledger.last(task.key)
        t_start = task.running_since or (last or {}).get("submitted") or time.time()
        execute(self.a, run, FinishedDissolvers(), self.steps)
        run.reused = task.key in self.finished_before and (last is None or last.get("collected", False))
        if last is not None and not last.get("collected"):
            last["collected"] = True
            self.ledger.save()
        task.phase, task.said = "done", "done"
        if run.reused:
            t_start = time.time()
        elif task.running_since is not None:
            self.durations.append(time.time() - task.running_since)
        elif run.train_seconds is not None and run.eval_seconds is not None:  # its job ran while no driver watched
            self.durations.append(run.train_seconds + run.eval_seconds)
        job = f" (job {last['job']})" if last is not None and last.get("job") and not run.reused else ""
        print(f"{task.label}{job}:", end="", flush=True)
        report_run(self.a, run, t_start)
        self.changed = True
        self.shown[self.run_tasks.index(task)] = run

    def fail_run(self, task, end):
        """The run failed under this command (``end``: its job's end, or its dissolver's): its row says why,
        and its ``failed.json`` (unless the job wrote it)."""
        run = task.item
        if end.get("recorded"):
            run.status, run.error, run.log, run.train_seconds = "failed", end["reason"], end["log"], None
        else:
            stage, _, why = end["reason"].partition(": ")
            fail(run, stage, why, log=end["log"])
        task.phase, task.said = "failed", "failed"
        att = task.attempt
        print(f"{task.label}" + (f" (job {att['job']})" if att and att.get("job") else "") + ":", end="", flush=True)
        report_run(self.a, run, task.running_since or time.time())
        self.changed = True
        self.shown[self.run_tasks.index(task)] = run

    def show_previous_failure(self, task):
        """A run that failed before this command: until it succeeds, the table says why (and which job
        runs it again)."""
        row = copy.copy(task.item)
        row.notes = []
        row.status, row.error, row.log = "failed", task.ended_before["reason"], task.ended_before.get("log")
        if task.phase == "live":
            row.error += f" (resubmitted as job {task.attempt['job']})"
        self.shown[self.run_tasks.index(task)] = row
        self.changed = True

    def progress_doc(self, task):
        """What the running step of ``task``'s current job last wrote of its progress, or None."""
        path = task.item.path("progress.json") if task.kind == "run" else progress_path(task.item)
        return read_progress(path, since=task.attempt["submitted"])

    def progress(self, task, state):
        """Say a live job's state when it changed: queued, running (with its training's progress, said
        again at each new epoch or tenth of the steps), requeued."""
        job, kind = task.attempt["job"], state["state"]
        key = kind
        if kind == "RUNNING":
            if task.running_since is None:  # since the job started (its latest start, after a requeue)
                task.running_since = min(state.get("start") or time.time(), time.time())
            task.was_running = True
            text = f"job {job} running on {state['node']}"
            doc = self.progress_doc(task)
            if doc is not None:
                key = (kind, doc.get("epoch"), doc["done"] * 10 // max(1, doc["total"]), doc.get("state"))
                text += ": " + progress_text(doc, now=time.time())
        elif kind in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED") and (
                task.was_running or kind != "PENDING"):
            key = "requeued"
            text = (f"job {job} requeued (preempted, at its time limit, or by scontrol requeue); it continues from "
                    f"its last checkpoint when it runs again")
        elif kind == "PENDING":
            key = (kind, state["reason"])
            text = f"job {job} queued ({state['reason']})"
        elif kind in ("COMPLETING", "CONFIGURING"):
            return
        else:
            text = f"job {job} {kind.lower()}"
        if key != task.said_key:
            task.said_key = key
            self.say(task, text)

    def start(self):
        """Where the study stands at the start of this command: the jobs earlier commands submitted,
        seen now (queued or running: followed; ended: their end recorded, a failure shown until the
        run succeeds)."""
        self.recover()
        unended = [att for _, att in self.ledger.unended()]
        states = self.states(unended)
        while states is None:
            time.sleep(self.a.slurm_poll)
            states = self.states(unended)
        for task in list(self.dissolver_tasks.values()) + self.run_tasks:
            att = self.ledger.last(task.key)
            if att is None:
                continue
            if att.get("end") is None:
                state = states.get(att["job"]) or {"state": "GONE", "reason": "", "node": "", "ended": True}
                if not state["ended"]:
                    if task.kind == "run" and att.get("config") != json.loads(json.dumps(task.item.config)):
                        raise UserError(f"job {att['job']} runs {task.item.label} with other settings than this "
                                        f"command's: wait for it to end (run the command it came from), or scancel it")
                    task.attempt, task.phase = att, "live"
                    if state["state"] == "RUNNING":
                        task.running_since = min(state.get("start") or time.time(), time.time())
                        task.was_running = True
                    self.say(task, f"job {att['job']} {state['state'].lower()} (submitted by an earlier command)")
                    continue
                att["end"] = self.end_of(task, att, state)
                self.ledger.save()
            task.attempt = att
            finished = (is_finished(task.item) if task.kind == "run"
                        else self.dissolver_done(task))
            if not finished and att["end"]["state"] != "NOT_SUBMITTED":
                task.ended_before = att["end"]
                if task.kind == "run":
                    self.show_previous_failure(task)

    def ended_job(self, task, states):
        """The state of a live task's job once it has ended; None while SLURM does not know it yet or
        it still runs (its progress shown)."""
        state = states.get(task.attempt["job"])
        if state is not None and not state["ended"]:
            self.progress(task, state)
            return None
        return state

    def follow_dissolvers(self, states):
        for task in self.dissolver_tasks.values():
            state = self.ended_job(task, states) if task.phase == "live" else None
            if state is None:
                continue
            task.attempt["end"] = self.end_of(task, task.attempt, state)
            task.attempt["collected"] = True
            self.ledger.save()
            if self.dissolver_done(task):
                task.phase = "done"
                info = read_json(task.item["done"]) or {}
                macs = f", {info['gmacs']:.3f} GMACs/image" if info.get("gmacs") is not None else ""
                self.say(task, f"job {task.attempt['job']} finished: trained in "
                               f"{float(info.get('train_seconds') or 0):.0f} s{macs}")
            else:
                task.phase = "failed"
                end = task.attempt["end"]
                self.say(task, f"job {task.attempt['job']} FAILED ({end['reason']}); log {rel(end['log'], self.a.out)}")
        for run in self.runs:  # every dissolver a run still to do needs: trained, or its job submitted
            if run.dissolver and not is_finished(run):
                task = self.dissolver_tasks[run.dissolver["name"]]
                if task.phase == "todo":
                    if self.dissolver_done(task):
                        task.phase = "done"
                    else:
                        self.submit(task)

    def follow_runs(self, states):
        for task in self.run_tasks:
            if task.phase in ("done", "failed"):
                continue
            run = task.item
            if task.phase == "live":
                state = self.ended_job(task, states)
                if state is None:
                    continue
                task.attempt["end"] = end = self.end_of(task, task.attempt, state)
                self.ledger.save()
                if not is_finished(run):
                    task.attempt["collected"] = True
                    self.ledger.save()
                    self.fail_run(task, end)
                    continue
            if is_finished(run):
                self.collect(task)
                continue
            if run.dissolver and needs_dissolver(run):
                dtask = self.dissolver_tasks[run.dissolver["name"]]
                if dtask.phase == "failed":
                    end = dtask.attempt["end"]
                    self.fail_run(task, {"reason": f"dissolver: {end['reason']}", "log": end["log"]})
                    continue
                if dtask.phase != "done":
                    self.say(task, f"waiting for the {dtask.label.split(' (')[0]}")
                    continue
            self.submit(task)
            if task.ended_before:
                self.show_previous_failure(task)

    def live(self):
        return [t for t in list(self.dissolver_tasks.values()) + self.run_tasks if t.phase == "live"]

    def run(self):
        a = self.a
        print(f"SLURM: the jobs' files go to {a.slurm_folder}, their ids to {self.ledger.path}; their states are "
              f"read every {a.slurm_poll:g} s", flush=True)
        self.steps.doing("watching the study's SLURM jobs")
        try:
            self.start()
            states = {}
            while True:
                self.follow_dissolvers(states)
                self.follow_runs(states)
                running = sum(t.phase == "live" and t.running_since is not None for t in self.run_tasks)
                self.most_running = max(self.most_running, running)
                if self.changed:
                    write_tables(a, self.shown, self.command)
                    print(self.eta_line(), flush=True)
                    self.changed = False
                if all(t.phase in ("done", "failed") for t in self.run_tasks):
                    return
                time.sleep(a.slurm_poll)
                states = self.states([t.attempt for t in self.live()]) or {}
        except (Interrupted, KeyboardInterrupt):
            live = [t for t in self.live() if t.attempt and t.attempt.get("job")]
            ids = [t.attempt["job"] for t in live]
            if a.cancel_on_exit and ids:
                slurm_call(["scancel", *ids])
                for t in live:
                    t.attempt["end"] = {"state": "CANCELLED", "at": time.time(), "log": self.job_log(t.attempt),
                                        "recorded": False,
                                        "reason": f"slurm: job {t.attempt['job']} cancelled when reproduce.py was "
                                                  f"interrupted (--cancel_on_exit)"}
                self.ledger.save()
                self.steps.doing(f"watching the study's SLURM jobs (cancelled jobs {' '.join(ids)}: --cancel_on_exit)")
            elif ids:
                self.steps.doing(f"watching the study's SLURM jobs (jobs {' '.join(ids)} go on: --cancel_on_exit "
                                 f"would cancel them)")
            write_tables(a, self.shown, self.command)
            raise


class FinishedDissolvers:
    """What :func:`study.runs.execute` asks of the dissolvers when the driver collects a finished run:
    their records (the driver never trains a dissolver)."""

    def get(self, spec):
        return dict(read_json(spec["done"]) or {}, ok=True, reason="", spec=spec, quality=read_quality(spec))


def run_on_slurm(a, runs, command, steps):
    """``reproduce.py --launcher slurm``'s part of :func:`study.schedule.run_all`: every run submitted
    (and its dissolver before it), watched and collected until each has finished or failed."""
    SlurmStudy(a, runs, command, steps).run()
