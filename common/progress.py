"""How far a long loop is and when it will end: the measured seconds per step, the time left, and
a small JSON file that another process (reproduce.py) reads to show it.

:class:`LoopProgress` watches a loop of a known number of steps (train.py's steps, the
dissolver's optimiser steps). The first step a process runs pays for warm-ups (memory, caches,
a compiled network), so the pace is measured from the end of that step on. Once enough steps
followed it (``estimate_steps``, or ``estimate_s`` seconds), one line says the pace, the time
to the end and which flags shorten the run. With a ``path`` the same figures are written there
as JSON (atomically: a reader sees a whole file) at that moment, every ``write_every_s`` seconds
after it and when the loop ends::

    {"what": "training", "unit": "step", "done": 120, "total": 2010, "s_per_step": 0.41,
     "eta_s": 775.0, "state": "running", "updated": 1700000000.0, "epoch": 1, "epochs": 10}

:func:`read_progress` and :func:`progress_text` are the reading side.
"""
import contextlib
import json
import math
import time

from common.errors import UserError
from utils import atomic_write_json, warn

STATES = ("running", "finished", "stopped")


def format_duration(seconds):
    """``seconds`` as a person reads a duration: ``45 s``, ``12 min 05 s``, ``3 h 20 min``, ``90 d 4 h``."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def eta_seconds(done, total, s_per_step, extra_s=0.0):
    """Seconds to the end of a loop of ``total`` steps with ``done`` behind it, at ``s_per_step``,
    plus ``extra_s`` of work outside the steps; None while the pace is unknown."""
    if s_per_step is None:
        return None
    return max(0, total - done) * s_per_step + (extra_s or 0.0)


class LoopProgress:
    """The pace of a loop of ``total`` steps, ``done`` of them already behind it (a resumed run).

    Call :meth:`step` after each step with the number of steps done so far; wrap work that is no
    step (an evaluation between epochs) in :meth:`paused`, so that it does not count in the pace;
    :meth:`outside_steps` adds the time such work still needs to the estimate. :meth:`close` ends
    it (the file's ``state`` becomes ``finished``, or ``stopped`` when the loop ended early).

    ``what`` names the loop in the line (``"training"``); ``shorten`` ends the line: which flags
    make the run shorter. ``report`` prints the line (``print``, or a logger's ``log``); ``path``
    (optional) is the JSON file. ``clock`` is a monotonic clock in seconds (``time.monotonic``).
    """

    def __init__(self, total, done=0, what="training", shorten="", path=None, report=print,
                 estimate_steps=5, estimate_s=10.0, write_every_s=5.0, clock=time.monotonic, unit="step"):
        self.total, self.done, self.what, self.unit = int(total), int(done), what, unit
        self.shorten, self.path, self.report, self.clock = shorten, path, report, clock
        self.estimate_steps, self.estimate_s, self.write_every_s = estimate_steps, estimate_s, write_every_s
        self.fields = {}
        self.announced = False
        self._start = None  # (clock, done) at the end of the first step this process ran
        self._paused = 0.0  # seconds spent in paused() since then
        self._last_write = None
        self._extra = (0.0, "")  # (seconds still needed outside the steps or None, what it is)
        self._write_failed = False

    # ----- what the loop tells it
    def step(self, done, **fields):
        """``done`` steps are behind the loop; ``fields`` (e.g. ``epoch=3, epochs=10``) go into the file."""
        now = self.clock()
        self.done = int(done)
        self.fields.update(fields)
        if self._start is None:
            self._start = (now, self.done)
            return
        if not self.announced and self._measured() >= 1 and (
                self._measured() >= self.estimate_steps or self._elapsed(now) >= self.estimate_s):
            self.announced = True
            self.report(self.estimate_line(now))
            self.write("running", now)
        elif self.announced and now - self._last_write >= self.write_every_s:
            self.write("running", now)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is left out of the pace (work between steps, e.g. an evaluation)."""
        t0 = self.clock()
        try:
            yield
        finally:
            if self._start is not None:
                self._paused += self.clock() - t0

    def outside_steps(self, seconds, what):
        """The work still to come outside the steps: ``seconds`` of it (None: not timed yet), and
        what it is (e.g. ``"9 evaluations during training"``; empty: none)."""
        self._extra = (seconds, what)

    def close(self, finished=True):
        """The loop ended (``finished``: it reached its end; else it stopped early). Writes the file."""
        if self._start is not None or self._last_write is not None:
            self.write("finished" if finished else "stopped", self.clock())

    # ----- what it says
    def _measured(self):
        return self.done - self._start[1]

    def _elapsed(self, now):
        return now - self._start[0] - self._paused

    @property
    def s_per_step(self):
        """Measured seconds per step (None until a step followed the first)."""
        if self._start is None or self._measured() < 1:
            return None
        return self._elapsed(self.clock()) / self._measured()

    @property
    def eta_s(self):
        """Seconds to the end (the steps left at the measured pace, and the timed work outside them)."""
        return eta_seconds(self.done, self.total, self.s_per_step, self._extra[0])

    def estimate_line(self, now=None):
        """The line :meth:`step` reports once: pace, time to the end, and the flags that shorten it."""
        now = self.clock() if now is None else now
        pace = self._elapsed(now) / self._measured()
        left = max(0, self.total - self.done)
        extra_s, extra_what = self._extra
        eta = eta_seconds(self.done, self.total, pace, extra_s)
        outside = ""
        if extra_what:
            outside = (f", {extra_what} included" if extra_s is not None
                       else f", plus {extra_what} (not timed yet)")
        finish = time.strftime("%a %H:%M", time.localtime(time.time() + eta))
        line = (f"{self.what}: {pace:.3g} s per {self.unit} (measured over {self._measured()} {self.unit}s after the "
                f"first); {left:,} of {self.total:,} {self.unit}s to go: about {format_duration(eta)} to the end"
                f"{outside} (around {finish})")
        return line + (f"; shorter: {self.shorten}" if self.shorten else "")

    def document(self, state, now=None):
        """What the JSON file holds."""
        s = self.s_per_step
        return {"what": self.what, "unit": self.unit, "done": self.done, "total": self.total,
                "s_per_step": s, "eta_s": eta_seconds(self.done, self.total, s, self._extra[0]),
                "state": state, "updated": time.time(), **self.fields}

    def write(self, state, now):
        """Write the file (when there is one). A failed write is one warning, and the loop goes on
        without the file: it only shows progress."""
        self._last_write = now
        if self.path is None or self._write_failed:
            return
        try:
            atomic_write_json(self.document(state, now), self.path)
        except UserError as exc:
            self._write_failed = True
            warn(f"progress is not written any more: {exc}")


# --------------------------------------------------------------------------- reading it


def read_progress(path, since=None):
    """The progress file at ``path`` as a dict, or None when it is missing, unreadable, or (with
    ``since``, a ``time.time()`` value) older than ``since``."""
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("done"), int) or not isinstance(doc.get("total"), int):
        return None
    if since is not None and not (isinstance(doc.get("updated"), (int, float)) and doc["updated"] >= since):
        return None
    return doc


def progress_text(doc, now=None):
    """One short line of a progress file: ``epoch 3/10, step 540 of 2,010, 0.41 s/step, about 10 min 02 s left``
    (with ``now``, a ``time.time()`` value, the time left counts down from when the file was written)."""
    unit = doc.get("unit") or "step"
    parts = []
    if doc.get("epoch") is not None and doc.get("epochs") is not None:
        parts.append(f"epoch {doc['epoch']}/{doc['epochs']}")
    parts.append(f"{unit} {doc['done']:,} of {doc['total']:,}")
    if doc.get("s_per_step") is not None:
        parts.append(f"{doc['s_per_step']:.3g} s/{unit}")
    if doc.get("state") == "running" and doc.get("eta_s") is not None:
        eta = doc["eta_s"]
        if now is not None and isinstance(doc.get("updated"), (int, float)):
            eta = max(0.0, eta - max(0.0, now - doc["updated"]))
        parts.append(f"about {format_duration(eta)} left")
    elif doc.get("state") in ("finished", "stopped"):
        parts.append(doc["state"])
    return ", ".join(parts)
