"""A study's steps as subprocesses (:class:`Steps`, one per reproduce.py command): their logs, their environment,
and their end when reproduce.py ends or is signalled."""
import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from study.watch import ProgressWatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_line(log_path, rc, start=0):
    """The line that says why a step failed: the ``error: ...`` line, else the log's last line;
    only what the step wrote is read (from byte ``start`` on)."""
    try:
        with open(log_path, errors="replace") as fh:
            fh.seek(start)
            lines = [ln.strip() for ln in fh.read().replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        lines = []
    for ln in reversed(lines[-30:]):
        if ln.startswith("error:"):
            return ln[len("error:"):].strip()
    if rc is not None and rc < 0:
        return f"killed by signal {-rc}" + (" (out of memory?)" if -rc == 9 else "")
    return lines[-1] if lines else f"exit status {rc} without output"


class Interrupted(Exception):
    """SIGTERM or SIGINT reached reproduce.py: the running step is stopped and the command ends."""


def _on_signal(signum, frame):
    raise Interrupted(signum)


def _load_libc():
    """This process's C library (for prctl), on Linux; else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def stop_child(proc, grace=10.0):
    """SIGTERM (train.py then removes its temporary files and lock), SIGKILL after ``grace`` s."""
    stop_children([proc], grace)


def stop_children(procs, grace=10.0):
    """:func:`stop_child` for several steps at once: SIGTERM to all, then SIGKILL to those still
    running ``grace`` s later."""
    procs = [p for p in procs if p.poll() is None]
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
            proc.send_signal(signal.SIGCONT)  # a stopped step (Ctrl-Z, a debugger) gets it too
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def step_env(a):
    """What a step's environment adds for the device slot ``a`` runs on (a GPU group's
    ``CUDA_VISIBLE_DEVICES``), or None."""
    gpus = getattr(a, "gpus", None)
    return {"CUDA_VISIBLE_DEVICES": gpus} if gpus else None


class Steps:
    """The steps of one study (one reproduce.py command): runs each as a subprocess, knows which
    run now (from any thread) and what the study does, and stops them all on an interruption.

    ``what`` and ``stopped`` say, for the interruption message, what the study was doing and how
    many steps the interruption stopped; once :meth:`stop_all` was called (``stopping`` holds the
    signal number) no step starts, and a step it stopped is not reported as a failure
    (``--devices``' threads).

    Each step says when it starts what it runs and which log to follow; a step that writes a
    progress file (:meth:`run`'s ``progress``) has its progress shown while it runs
    (:class:`study.watch.ProgressWatch`, read every ``poll_s`` seconds; plain lines at most every
    ``report_every`` seconds when stdout is no terminal)."""

    def __init__(self, poll_s=1.0, report_every=30.0):
        self.poll_s, self.report_every = poll_s, report_every
        self._lock = threading.Lock()  # one fork at a time; guards _procs and _stopping
        self._procs = {}  # every running step (a Popen) -> what it does
        self._what = None
        self._stopped = 0
        self._stopping = None
        self._libc = _load_libc()  # prctl, for the steps to die with this process (Linux)
        self._parent = os.getpid()  # the process the next step must die with

    @property
    def what(self):
        """What the study does now (the main thread's running step, or what :meth:`doing` said), or None."""
        return self._what

    @property
    def stopped(self):
        """How many running steps an interruption stopped (0: none was running)."""
        return self._stopped

    @property
    def stopping(self):
        """The signal number of the interruption that stopped the steps, or None while none did."""
        return self._stopping

    def doing(self, what):
        """Say what the study does now, for the interruption message."""
        self._what = what

    def stop_all(self, signum):
        """An interruption (signal ``signum``; 0 for another exception) ends the study: no step
        starts from now on, and every running step is stopped (:func:`stop_children`). ``what``
        becomes the stopped steps' names when some were running; returns how many were."""
        with self._lock:
            self._stopping = signum
            running = dict(self._procs)
        if running:
            self._what = " and ".join(running.values())
            stop_children(list(running))
            self._stopped = len(running)
        return len(running)

    def _die_with_parent(self):
        """Runs in the child between fork and exec (Linux): the kernel sends it SIGKILL when
        reproduce.py ends in any way, even by SIGKILL, so no step goes on writing alone."""
        self._libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != self._parent:  # the parent was already gone before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    def run(self, cmd, log_path, what=None, append=False, env=None, progress=None):
        """Run ``cmd`` (a list, ``python`` first) from the repository root, stdout and stderr into
        ``log_path``, which is appended to and never emptied (a step refused at once, e.g. by the
        lock of another process that runs it, leaves that process's log whole; ``append=False``
        starts a fresh attempt's part with a separator line), ``env`` added to this process's environment (and
        written in the log); returns ``(ok, seconds, reason)``. One line says what runs and the log
        to follow; ``progress``: the JSON file the step writes its progress to, shown while it
        runs. The step dies with this process; a signal to this process stops it first. Raises
        :class:`Interrupted` instead of starting a step, or of reporting one stopped, once
        :meth:`stop_all` was called."""
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        extra = dict(env or {})
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.time()
        what = what or os.path.basename(cmd[1])
        main_thread = threading.current_thread() is threading.main_thread()
        watch = None
        if progress is not None:  # a tqdm bar only for the one step the main thread runs
            watch = ProgressWatch(what, progress, since=t0, bar=None if main_thread else False, every=self.report_every)
        print(f"{what}: follow {shown_path(log_path)}", flush=True)
        with open(log_path, "a") as log:
            start = log.tell()
            if start and not append:
                log.write("\n---- a new attempt ----\n")
            log.write("$ " + "".join(f"{k}={shlex.quote(v)} " for k, v in extra.items())
                      + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            with self._lock:  # one fork at a time; none once an interruption stops the steps
                if self._stopping is not None:
                    raise Interrupted(self._stopping)
                self._parent = os.getpid()
                # (PR_SET_PDEATHSIG follows the thread that forks: run's thread waits for its step)
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, preexec_fn=self._die_with_parent if self._libc is not None else None)
                self._procs[proc] = what
            before = self._what
            if main_thread:
                self._what = what
            try:
                rc = self._wait(proc, watch)
            except BaseException:
                stop_child(proc)
                self._stopped = 1
                raise
            finally:
                if watch is not None:
                    watch.close()
                with self._lock:
                    self._procs.pop(proc, None)
            if main_thread:
                self._what = before
        if self._stopping is not None:  # stopped by the interruption (another thread's): not a failure
            raise Interrupted(self._stopping)
        seconds = time.time() - t0
        return rc == 0, seconds, ("" if rc == 0 else last_line(log_path, rc, start))


    def _wait(self, proc, watch):
        """``proc``'s exit status, showing its progress every ``poll_s`` seconds meanwhile (``watch``)."""
        while True:
            try:
                rc = proc.wait(timeout=None if watch is None else self.poll_s)
                break
            except subprocess.TimeoutExpired:
                watch.poll()
        if watch is not None:
            watch.finish()
        return rc


def shown_path(path):
    """``path`` as a person types it from here: relative to the working folder when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def class_flags(cls, multi=()):
    """The class flags of a step: ``--one_class_idx C``, or for the multi-class setting ``multi``."""
    if cls is None:
        return [multi] if isinstance(multi, str) else list(multi)
    return ["--one_class_idx", cls]


def py(script, *args):
    return [sys.executable, os.path.join(ROOT, script)] + [str(x) for x in args]
