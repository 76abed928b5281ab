"""Small utilities shared by the programs: seeding, batching, atomic files, logging."""
import contextlib
import csv
import errno
import io
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import torch
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar as scalar_summary



def is_main_process():
    """Whether this process writes files: the only process, or rank 0 of an initialised
    ``torch.distributed`` process group (torchrun)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def run_seed(seed, t, rank=0, stream=0):
    """The seed of the draws of epoch or step ``t`` of a training on process ``rank``: one rule for
    every training loop, so that a resumed run redraws exactly what an uninterrupted one draws and
    each process of a torchrun job draws its own. ``stream`` keeps independent kinds of draws of one
    loop apart (the dissolver's image order and its noise)."""
    return seed * 100_003 + t + 1_000_003 * (rank + 4_099 * stream)


def rng_state():
    """The Python, numpy, torch and CUDA generator states, as tensors, numbers and tuples only
    (so a checkpoint holding them loads with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def set_rng_state(state):
    """Restore what :func:`rng_state` saved (tensors may come back on any device)."""
    torch.set_rng_state(state["torch"].cpu())
    s = state["numpy"]
    np.random.set_state(("MT19937", s["keys"].cpu().numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def batch_indices(n, batch_size, perm=None, drop_last=False):
    """Yield LongTensors of indices, in order or following ``perm``."""
    order = perm if perm is not None else torch.arange(n)
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def autocast_for(device, precision):
    """Autocast of ``precision`` (``'bf16'``, ``'fp16'`` or ``'fp32'``, as
    ``common.device.decide_precision`` decides it; ``True``/``False``: bf16/fp32) on ``device``'s
    kind; a no-op for fp32."""
    if precision is True:
        precision = "bf16"
    if precision in (False, None, "fp32"):
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


TEMP_PREFIX = ".tmp-"
# what atomic_write's temporary files are called: .tmp-<name>.<8 characters of tempfile's alphabet>
_TEMP_RE = re.compile(r"\.tmp-(?P<name>.+)\.[a-z0-9_]{8}")


_UMASK = []
_UMASK_LOCK = threading.Lock()


def process_umask():
    """The process's umask, read once (reading it means setting it: never twice, never from two
    threads at a time, so no file is created while it is briefly 0)."""
    with _UMASK_LOCK:
        if not _UMASK:
            _UMASK.append(os.umask(0))
            os.umask(_UMASK[0])
        return _UMASK[0]


class WriteError(Exception):
    """A file could not be written (a full disk, an unwritable folder, text that is not UTF-8):
    its message is one line naming the file and the cause. Programs end on it as on a
    ``common.errors.UserError`` (one line, exit status 2)."""


class _WriteWatch:
    """A binary file that remembers the first ``OSError`` a write to it raised: torch.save reports
    a full disk as its own RuntimeError ("unexpected pos"), without the cause."""

    def __init__(self, fh):
        self._fh, self.error = fh, None

    def write(self, data):
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name):
        return getattr(self._fh, name)


def write_error(path, exc, appending=False):
    """The :class:`WriteError` of one line for a write of ``path`` that failed with ``exc``
    (``appending``: a record appended to, whose end a repair cuts off before it is extended)."""
    if isinstance(exc, UnicodeEncodeError):
        bad = exc.object[max(exc.start - 20, 0):exc.end + 20] if isinstance(exc.object, str) else exc.object
        return WriteError(f"cannot write {path}: it would hold {bad!r}, which is not valid UTF-8 text (a file name "
                         f"that is not UTF-8?); rename that file")
    text = str(exc).strip()
    why = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    hint = ("; free some space there (or write elsewhere)" if getattr(exc, "errno", None) == errno.ENOSPC
            else "")
    stays = ("the files written before it stay" if appending else "what was there before is unchanged")
    return WriteError(f"cannot write {path} ({why}); {stays}{hint}")


def atomic_write(path, writer):
    """Call ``writer(binary_file)`` on a temporary file next to ``path``, then rename it into
    place: readers see the old file or the complete new one, never a part. On any error
    (an exception, or a signal turned into one) the temporary file is removed and ``path`` is
    untouched; a failed write (a full disk, an unwritable folder, text that cannot be encoded)
    is a :class:`WriteError` of one line naming ``path`` and the cause. What a killed process
    leaves (``.tmp-<name>.*``) is removed by :func:`remove_stale_temps` when the next process
    takes the folder's lock. Under torchrun only the main process writes
    (:func:`is_main_process`); the others do nothing."""
    if not is_main_process():
        return
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX + os.path.basename(path) + ".")
    except OSError as exc:
        raise write_error(path, exc) from None
    watch = None
    try:
        with os.fdopen(fd, "wb") as fh:
            fd = None  # the file object owns it now
            watch = _WriteWatch(fh)
            writer(watch)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600 files; give the usual permissions
        fault_point("write:" + os.path.basename(path))
        os.replace(tmp, path)
    except BaseException as exc:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = (watch.error if watch is not None else None) or exc
        if isinstance(exc, Exception) and not isinstance(exc, WriteError) and (
                isinstance(cause, (OSError, UnicodeEncodeError)) or cause is not exc):
            raise write_error(path, cause) from None
        raise


def remove_stale_temps(folder, owned):
    """Remove the temporary files :func:`atomic_write` left in ``folder`` when its process was
    killed mid-write: only ``.tmp-<name>.XXXXXXXX`` files whose target ``<name>`` is ``owned``
    (a file name, or a predicate on it: the files of the program that holds the folder's
    :class:`common.run_folder.ProcessLock`, so another program's write in progress there is left alone).
    Returns their names."""
    is_owned = owned if callable(owned) else (lambda name: name == owned)
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in sorted(entries):
        m = _TEMP_RE.fullmatch(entry)
        if m is None or not is_owned(m.group("name")):
            continue
        full = os.path.join(folder, entry)
        if os.path.isfile(full) and not os.path.islink(full):
            with contextlib.suppress(OSError):
                os.unlink(full)
                removed.append(entry)
    return removed


def atomic_torch_save(obj, path):
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(text, path):
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # before any file is made
        raise write_error(path, exc) from None
    atomic_write(path, lambda fh: fh.write(data))


def finite_or_none(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON's null): an undefined
    number is written as undefined, never as a bare ``NaN`` that strict JSON readers refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(obj, path):
    """``obj`` as strict JSON (NaN and infinity as null), atomically."""
    atomic_write_text(json.dumps(finite_or_none(obj), indent=2, sort_keys=True, allow_nan=False) + "\n", path)


def atomic_write_csv(rows, fieldnames, path):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def cut_partial_line(path):
    """A text record the project appends to (``scalars.csv``) whose last line was cut short by a
    kill or a full disk ends without a newline: that line is removed, so the next row is never
    glued onto it. Returns the number of bytes removed (0: the file ends cleanly or is absent)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return 0
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    os.truncate(path, keep)
    return len(data) - keep


class Logger:
    """Text log (``log.txt``), TensorBoard scalars and a CSV of scalars (``scalars.csv``) in one
    run folder, appended to. Under torchrun only the main process (:func:`is_main_process`)
    writes or prints; on the others every call does nothing. (A resumed run first cuts the
    interrupted attempt's records back: ``common.run_folder.rewind_records``.)

    A record that ends in a line cut short (a kill, a full disk) is repaired before anything is
    appended: ``scalars.csv`` loses that partial row, ``log.txt`` gets the missing newline
    (:attr:`repaired` says what was done). A write that fails is a :class:`WriteError` of one
    line naming the file and the cause.
    """

    def __init__(self, logdir, tensorboard=True):
        self.logdir = logdir
        self.active = is_main_process()
        self.repaired = []
        if not self.active:
            return
        self._text_path = os.path.join(logdir, "log.txt")
        self._csv_path = os.path.join(logdir, "scalars.csv")
        self._writer = None
        try:
            os.makedirs(logdir, exist_ok=True)
            cut = cut_partial_line(self._csv_path)
            if cut:
                self.repaired.append(f"scalars.csv ended in a row cut short ({cut} bytes): removed")
            self._text = open(self._text_path, "a")
            if self._text.tell() and not _ends_with_newline(self._text_path):
                self._text.write("\n")
                self.repaired.append("log.txt ended in a line cut short: a newline was added")
            new = os.path.getsize(self._csv_path) == 0 if os.path.exists(self._csv_path) else True
            self._csv = open(self._csv_path, "a", newline="")
        except OSError as exc:
            raise write_error(getattr(exc, "filename", None) or logdir, exc, appending=True) from None
        if tensorboard:
            # TensorBoard's event file, written in this thread (tensorboardX's SummaryWriter writes
            # from a thread of its own, which dies on a full disk and then blocks the training). The
            # file is named by the second: a second writer in the same second (a quick resume) would
            # empty the first one's file without a suffix of its own.
            try:
                self._writer = EventsWriter(os.path.join(logdir, "events"), "." + uuid.uuid4().hex[:8])
            except OSError as exc:
                raise write_error(getattr(exc, "filename", None) or logdir, exc, appending=True) from None
        self._csv_writer = csv.writer(self._csv)
        if new:
            self._csv_writer.writerow(["step", "tag", "value", "time"])
            self._flush_file(self._csv, self._csv_path)
        for note in self.repaired:
            self.log(note, echo=False)

    @staticmethod
    def _flush_file(fh, path):
        try:
            fh.flush()
        except OSError as exc:
            raise write_error(path, exc, appending=True) from None

    def log_size(self):
        """Bytes of ``log.txt`` written so far (every line is flushed as written)."""
        if not self.active:
            return None
        self._flush_file(self._text, self._text_path)
        return os.fstat(self._text.fileno()).st_size

    def log(self, msg, echo=True):
        if not self.active:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        try:
            self._text.write(line + "\n")
        except OSError as exc:
            raise write_error(self._text_path, exc, appending=True) from None
        self._flush_file(self._text, self._text_path)
        if echo:
            print(msg, file=sys.stdout, flush=True)

    def scalar(self, tag, value, step):
        if not self.active:
            return
        value = float(value)
        if self._writer is not None and np.isfinite(value):  # (TensorBoard shows no NaN)
            try:
                self._writer.write_event(Event(wall_time=time.time(), step=int(step),
                                               summary=scalar_summary(tag, value)))
            except OSError as exc:
                raise write_error(self._writer._file_name, exc, appending=True) from None
        try:
            self._csv_writer.writerow([step, tag, f"{value:.6g}", f"{time.time():.3f}"])
        except OSError as exc:
            raise write_error(self._csv_path, exc, appending=True) from None

    def flush(self):
        if not self.active:
            return
        self._flush_file(self._csv, self._csv_path)
        if self._writer is not None:
            try:
                self._writer.flush()
            except OSError as exc:
                raise write_error(self._writer._file_name, exc, appending=True) from None

    def close(self):
        """Flush and close every file; a failure to write is a :class:`WriteError`, raised once
        every file is closed."""
        if not self.active or self._text.closed:
            return
        failed = None
        for fh, path in ((self._csv, self._csv_path), (self._text, self._text_path)):
            try:
                fh.close()
            except OSError as exc:
                failed = failed or write_error(path, exc, appending=True)
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as exc:
                failed = failed or write_error(self._writer._file_name, exc, appending=True)
        if failed is not None:
            raise failed


def _ends_with_newline(path):
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def warn(msg):
    """One ``warning:`` line on stderr; under torchrun from rank 0 only (every rank would say the
    same; ``RANK`` is read from the environment, so this holds before the process group exists)."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fault injection (tests)


FAULT_ENV = "DIA_FAULT"
_fault_hits = {}


def fault_point(name):
    """A place where the fault-injection tests interrupt a program. Does nothing unless the
    environment variable ``DIA_FAULT`` names it: ``"<point>[#n][=kill|stop|enospc]"``,
    comma-separated, kills this process with SIGKILL (default), stops it with SIGSTOP, or raises
    the ``OSError`` of a full disk (``enospc``) the n-th time (default the first) it reaches
    ``<point>``. Points: ``write:<file name>`` (atomic_write, the
    temporary file complete, before the rename), ``step`` (train.py, after an optimiser step),
    ``eval`` (train.py, as an evaluation during training starts)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _fault_hits[name] = hits = _fault_hits.get(name, 0) + 1
    for item in spec.split(","):
        item, _, action = item.strip().partition("=")
        point, _, nth = item.partition("#")
        if point == name and hits == int(nth or 1):
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
            # Continued: a signal sent while stopped may be taken by another thread (torch's, the
            # TensorBoard writer's), whose C handler only flags it for the main thread. Wait a
            # moment so that the flag is set before this thread goes on (e.g. renames a file).
            time.sleep(0.5)
