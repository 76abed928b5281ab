"""The life of a run folder, shared by train.py and the dissolver's training.

* One process at a time holds a folder: an advisory lock (:class:`ProcessLock`) that dies with
  its process, taken before anything is written; what a killed atomic write left there is
  removed under it (``utils.remove_stale_temps``).
* A run has an identity: ``config.json`` (its settings and a run id) is written once, when the
  run is created, and never rewritten.
* A resume continues one run exactly: its settings may not change except those the program
  names (:func:`changed_settings`); it continues in its own folder, or as a new run in an empty
  one (:meth:`RunFolder.place_resumed`), never in another run's folder.
* A resumed run first cuts the interrupted attempt's records back to its checkpoint
  (:func:`rewind_records`), so every step is recorded once.
"""
import contextlib
import csv
import io
import json
import os
import shutil
import uuid

from common import distributed
from common.errors import UserError
from common.paths import check_output_file, check_run_folder, same_path
from common.tb_events import prune_events
from utils import atomic_write, atomic_write_json, atomic_write_text, cut_partial_line, remove_stale_temps

CONFIG_NAME = "config.json"

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
    scalars that ``keep_row(tag, step) -> bool`` rejects (a row cut short by a kill or a full disk,
    the last line without its newline, is dropped too: it may parse, with a cut number). Rewritten
    files are replaced atomically. Returns a :class:`Rewound`."""
    done = Rewound()
    text_path = os.path.join(logdir, "log.txt")
    if log_bytes is not None and os.path.isfile(text_path) and os.path.getsize(text_path) > log_bytes:
        done.log_bytes = os.path.getsize(text_path) - log_bytes
        os.truncate(text_path, log_bytes)
    done.events = prune_events(logdir, keep_row)
    csv_path = os.path.join(logdir, "scalars.csv")
    if os.path.exists(csv_path):
        done.rows = (1 if cut_partial_line(csv_path) else 0) + _drop_rows(csv_path, keep_row)
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


# --------------------------------------------------------------------------- settings


def show_flag(key, value):
    """A recorded setting as the flag that gives it (``--amp``: auto, on or off; a recorded
    ``True``/``False`` is on/off)."""
    if key == "amp":
        return f"--amp {({True: 'on', False: 'off'}.get(value, value))}"
    if isinstance(value, bool) or value is None:
        return f"--{key}" if value else f"no --{key}"
    if isinstance(value, (list, tuple)):
        return f"--{key} {' '.join(map(str, value))}"
    return f"--{key} {value}"


def plain_settings(namespace):
    """The flags of a parsed namespace that a JSON file records (numbers, text, lists, None)."""
    return {k: v for k, v in vars(namespace).items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def changed_settings(saved, now, ignore=()):
    """``(saved flag, given flag)`` pairs of the settings in which ``now`` (a dict) differs from
    ``saved`` (a recorded dict); keys in ``ignore`` and keys ``now`` lacks are left out. Two paths
    to one dissolver file are the same setting."""
    diffs = []
    for key, old in saved.items():
        if key in ignore or key not in now:
            continue
        new = now[key]
        if key == "diffusion_model_path" and old and new and same_path(old, new):
            continue
        if isinstance(old, tuple):
            old = list(old)
        if old != new:
            diffs.append((show_flag(key, old), show_flag(key, new)))
    return diffs


def read_run_config(folder):
    """``config.json`` of a run folder: a dict, {} when unreadable, None when there is none."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def check_world_size(what, saved, world, how):
    """A resumed run keeps its number of processes (its global batch): ``what`` names the run,
    ``how`` says how to start it with ``saved`` processes."""
    if int(saved) != int(world):
        raise UserError(f"{what} was trained by {saved} process(es), this is {world}; resume it with {how}")


def lock_file(path, flag, advice=""):
    """Lock a single file a program writes (``.<name>.lock`` beside it, created with its folder if
    needed) and remove the temporary files a killed write of it left; returns the held lock."""
    folder, name = os.path.split(os.path.abspath(path))
    created = None if os.path.isdir(folder) else folder
    check_output_file(path, flag)  # a real write probe: as root, os.access says yes on read-only mounts
    os.makedirs(folder, exist_ok=True)
    lock = ProcessLock(os.path.join(folder, f".{name}.lock"), f"{flag} {path}", advice,
                       remove_folder=created).acquire()
    remove_stale_temps(folder, name)
    return lock


def resolve_resume(path, last_name="last.model", flag="--resume_path"):
    """A run folder or a checkpoint file -> ``(checkpoint path, run folder)``."""
    if os.path.isdir(path):
        ckpt = os.path.join(path, last_name)
        if not os.path.isfile(ckpt):
            raise UserError(f"{flag} {path} is a folder without {last_name}; point it at a run folder "
                            f"written by train.py or at a .model checkpoint")
        return ckpt, path
    if not os.path.lexists(path):
        raise UserError(f"{flag} {path} does not exist")
    return path, os.path.dirname(os.path.abspath(path))


# --------------------------------------------------------------------------- the folder


class RunFolder:
    """One run's folder while a program works in it (``with RunFolder(...) as run:``).

    On entry the folder is checked, created if needed and locked (the main process alone under
    torchrun), and the temporary files a killed write of this program left (``writes(name)``
    says which files are this program's) are removed. Then exactly one of
    :meth:`place_fresh` and :meth:`place_resumed` says where the run stands
    (:attr:`placement`: ``"create"``, ``"restart"``, ``"same"`` or ``"new"``), and
    :meth:`record` writes ``config.json`` when the run is created."""

    def __init__(self, path, writes, flag="--logdir", advice=""):
        self.path, self.writes, self.flag, self.advice = path, writes, flag, advice
        self.lock, self.stale = None, ()
        self.placement, self.run_id, self.config = None, None, None

    def __enter__(self):
        check_run_folder(self.path, self.flag)
        # one process per run folder: the lock dies with the process (a folder made for it goes if refused)
        self.lock = distributed.main_writes(lock_folder, self.path, f"run folder {self.path}", self.advice)
        try:
            self.stale = distributed.main_writes(remove_stale_temps, self.path, self.writes) or ()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def holds_checkpoint(self, last_name="last.model"):
        return os.path.exists(os.path.join(self.path, last_name))

    def place_fresh(self, settings, ignore=()):
        """A new run: refuse a folder holding another run. A folder whose ``config.json`` records
        this very run, interrupted before its first checkpoint, is a restart (same settings)."""
        if self.holds_checkpoint():
            raise UserError(f"{self.path} already holds a training run; continue it with --resume_path {self.path}, "
                            f"or start a new one with --suffix NAME or --logdir DIR")
        config = read_run_config(self.path)
        if config is None:
            self.placement, self.run_id = "create", uuid.uuid4().hex
            return self
        diffs = changed_settings(config, settings, ignore)
        if diffs or not config:
            what = (f"was started with {', '.join(old for old, _ in diffs)} (now {', '.join(new for _, new in diffs)})"
                    if diffs else "has an unreadable config.json")
            raise UserError(f"{self.path} holds another run that saved no checkpoint yet: it {what}; start this run "
                            f"in another --logdir (or with --suffix NAME), or repeat that run's flags to restart it")
        self.placement, self.run_id, self.config = "restart", config.get("run_id"), config
        return self

    def place_resumed(self, run_id, resume_file, src_dir):
        """A resumed run goes on in its own folder (``"same"``) or as a new run in an empty folder
        (``"new"``); another run's folder is refused."""
        config = read_run_config(self.path)
        holds_run = config is not None or self.holds_checkpoint()
        if not holds_run:
            same = same_path(self.path, src_dir)
        else:
            folder_id = (config or {}).get("run_id")
            same = folder_id == run_id if (folder_id and run_id) else same_path(self.path, src_dir)
            if not same:
                raise UserError(f"--logdir {self.path} holds another training run (run {folder_id or 'without id'}); "
                                f"{resume_file} belongs to run {run_id or 'without id'} of {src_dir}: continue it "
                                f"there (leave out --logdir), or give an empty --logdir to continue it as a new run")
        self.placement = "same" if same else "new"
        self.run_id = run_id if same else uuid.uuid4().hex
        self.config = config
        return self

    def record(self, settings, world_size, resumed_from=None):
        """Write ``config.json`` for a created run (or a resumed one continued as a new run, with
        ``resumed_from``); a run's own folder that lost it gets it back. Never rewritten."""
        if self.placement == "restart" or (self.placement == "same" and self.config is not None):
            return
        doc = dict(settings, run_id=self.run_id, world_size=world_size)
        if self.placement == "new" and resumed_from is not None:
            doc["resumed_from"] = resumed_from
        atomic_write_json(doc, os.path.join(self.path, CONFIG_NAME))

    def rewind(self, keep_row, log_bytes=None):
        """Cut the records back to the checkpoint a resumed or restarted run goes on from
        (:func:`rewind_records`); a :class:`Rewound` (empty for a created run)."""
        if self.placement == "create":
            return Rewound()
        return distributed.main_writes(rewind_records, self.path, keep_row,
                                       log_bytes if self.placement == "same" else None) or Rewound()

    def copy_from(self, src_dir, files):
        """A run continued as a new run takes the files its checkpoint refers to, so its records
        stay whole: ``{name: (what, is_the_recorded_one)}``, ``what`` describing the recorded file
        ("of epoch 3") and ``is_the_recorded_one(path) -> bool``."""
        for name, (what, recorded) in files.items():
            src = os.path.join(src_dir, name)
            if not (os.path.isfile(src) and recorded(src)):
                raise UserError(f"cannot continue the run of {src_dir} as a new run in {self.path}: its {name} {what} "
                                f"is no longer in {src_dir}; continue it in {src_dir} itself")

            def copy(fh, src=src):
                with open(src, "rb") as s:
                    shutil.copyfileobj(s, fh)

            atomic_write(os.path.join(self.path, name), copy)
