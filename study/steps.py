"""One step of a run as a subprocess: its log, its environment, and its end when reproduce.py ends or is signalled."""
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_line(log_path, rc):
    """The line that says why a step failed: the ``error: ...`` line, else the log's last line."""
    try:
        with open(log_path, errors="replace") as fh:
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


# What runs now, for the interruption message: ``procs`` maps every running step (a Popen) to what
# it does; ``stopping`` (the signal number) is set when an interruption stops them all, so that no
# step starts after it and a stopped step is not reported as a failure (``--devices``' threads).
CURRENT = {"procs": {}, "what": None, "stopped": False, "stopping": None}
_CURRENT_LOCK = threading.Lock()


def _on_signal(signum, frame):
    raise Interrupted(signum)


def _die_with_parent():
    """Runs in the child between fork and exec (Linux): the kernel sends it SIGKILL when
    reproduce.py ends in any way, even by SIGKILL, so no step goes on writing alone."""
    if _LIBC is None:
        return
    _LIBC.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != _PARENT[0]:  # the parent was already gone before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
_PARENT = [os.getpid()]


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


def run_step(cmd, log_path, what=None, append=False, env=None):
    """Run ``cmd`` (a list, ``python`` first) from the repository root, stdout and stderr into
    ``log_path`` (appended to with ``append``), ``env`` added to this process's environment (and
    written in the log); returns ``(ok, seconds, reason)``. The step dies with this process; a
    signal to this process stops it first."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    extra = dict(env or {})
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    what = what or os.path.basename(cmd[1])
    main_thread = threading.current_thread() is threading.main_thread()
    with open(log_path, "a" if append else "w") as log:
        log.write("$ " + "".join(f"{k}={shlex.quote(v)} " for k, v in extra.items())
                  + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        with _CURRENT_LOCK:  # one fork at a time; none once an interruption stops the steps
            if CURRENT["stopping"] is not None:
                raise Interrupted(CURRENT["stopping"])
            _PARENT[0] = os.getpid()
            # (PR_SET_PDEATHSIG follows the thread that forks: run_step's thread waits for its step)
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, preexec_fn=_die_with_parent if _LIBC is not None else None)
            CURRENT["procs"][proc] = what
        before = CURRENT["what"]
        if main_thread:
            CURRENT["what"] = what
        try:
            rc = proc.wait()
        except BaseException:
            stop_child(proc)
            CURRENT["stopped"] = True
            raise
        finally:
            with _CURRENT_LOCK:
                CURRENT["procs"].pop(proc, None)
        if main_thread:
            CURRENT["what"] = before
    if CURRENT["stopping"] is not None:  # stopped by the interruption (another thread's): not a failure
        raise Interrupted(CURRENT["stopping"])
    seconds = time.time() - t0
    return rc == 0, seconds, ("" if rc == 0 else last_line(log_path, rc))


def class_flags(cls, multi=()):
    """The class flags of a step: ``--one_class_idx C``, or for the multi-class setting ``multi``."""
    if cls is None:
        return [multi] if isinstance(multi, str) else list(multi)
    return ["--one_class_idx", cls]


def py(script, *args):
    return [sys.executable, os.path.join(ROOT, script)] + [str(x) for x in args]
