"""The life of a run folder, shared by train.py and the dissolver's training: one process at a
time holds it (an advisory lock that dies with its process), and a resumed run first cuts the
interrupted attempt's records back to its checkpoint."""
import contextlib
import csv
import io
import os

from common.errors import UserError
from common.tb_events import prune_events
from utils import atomic_write_text

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

LOCK_NAME = ".lock"


class ProcessLock:
    """An advisory lock (``fcntl.flock``) on ``path``, held while this process runs: the
    kernel releases it when the process ends, however it ends, so a killed process never
    leaves a folder locked. The file holds the holder's PID, for the message another process
    gets; it is removed on :meth:`release`.

    ``what`` names the locked thing in that message ("run folder logs/x"), ``advice`` says what
    to do instead. ``remove_folder``: a folder this process created for the lock, removed on
    release when nothing else was written into it (a refused command leaves nothing behind).
    """

    def __init__(self, path, what, advice="", remove_folder=None):
        self.path, self.what, self.advice, self.remove_folder = os.fspath(path), what, advice, remove_folder
        self.fd = None

    def acquire(self):
        if fcntl is None:  # no flock on this platform: no lock (Linux and macOS have it)
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self._cleanup_folder()
                raise UserError(f"cannot lock {self.what}: cannot create {self.path} ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(fd)
                os.close(fd)
                tail = f"; {self.advice}" if self.advice else ""
                raise UserError(f"{self.what} is in use by another process (PID {holder or 'unknown'}, lock file "
                                f"{self.path}){tail}") from None
            # the holder before us may have removed the file between our open and our lock
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still holding it: see acquire's inode check
            os.close(self.fd)
            self.fd = None
        self._cleanup_folder()

    def _cleanup_folder(self):
        if self.remove_folder:
            with contextlib.suppress(OSError):
                os.rmdir(self.remove_folder)  # only when empty
            self.remove_folder = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode(errors="replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None


def lock_folder(folder, what, advice=""):
    """Create ``folder`` if needed and lock it (``<folder>/.lock``); returns the held
    :class:`ProcessLock`. A folder created here is removed again on release when empty."""
    folder = os.fspath(folder)
    created = None
    if not os.path.isdir(folder):
        missing = os.path.abspath(folder)
        os.makedirs(folder, exist_ok=True)
        created = missing
    return ProcessLock(os.path.join(folder, LOCK_NAME), what, advice, remove_folder=created).acquire()


class Rewound:
    """What :func:`rewind_records` removed: rows of ``scalars.csv``, TensorBoard scalars and bytes
    of ``log.txt`` written after the checkpoint a run resumes from."""

    def __init__(self, rows=0, events=0, log_bytes=0):
        self.rows, self.events, self.log_bytes = rows, events, log_bytes

    def __bool__(self):
        return bool(self.rows or self.events or self.log_bytes)


def rewind_records(logdir, keep_row, log_bytes=None):
    """Cut the records of ``logdir`` back to a checkpoint: ``log.txt`` to ``log_bytes`` (its length
    when the checkpoint was written; None keeps it), and the ``scalars.csv`` rows and TensorBoard
    scalars that ``keep_row(tag, step) -> bool`` rejects (a row cut short by a kill is dropped
    too). Rewritten files are replaced atomically. Returns a :class:`Rewound`."""
    done = Rewound()
    text_path = os.path.join(logdir, "log.txt")
    if log_bytes is not None and os.path.isfile(text_path) and os.path.getsize(text_path) > log_bytes:
        done.log_bytes = os.path.getsize(text_path) - log_bytes
        os.truncate(text_path, log_bytes)
    done.events = prune_events(logdir, keep_row)
    csv_path = os.path.join(logdir, "scalars.csv")
    if os.path.exists(csv_path):
        done.rows = _drop_rows(csv_path, keep_row)
    return done


def _drop_rows(path, keep_row):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return 0
    head, body = rows[0], rows[1:]
    kept = []
    for row in body:
        try:
            keep = keep_row(row[1], int(row[0]))
        except (IndexError, ValueError):  # a line cut short by a kill: never complete, dropped
            keep = False
        if keep:
            kept.append(row)
    if len(kept) != len(body):
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(head)
        writer.writerows(kept)
        atomic_write_text(buf.getvalue(), path)
    return len(body) - len(kept)
