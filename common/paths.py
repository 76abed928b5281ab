"""Checks on the paths a program will write, made before any work starts.

Every check raises :class:`common.errors.UserError` with one line (what is wrong, what to
do) and leaves nothing behind: writability is probed with a temporary file or folder that
is removed at once, and no folder the program would create is created here.

    check_output_file(path, flag)      # a file the program will write (atomically)
    check_run_folder(path, flag)       # a folder the program will create or write into
    check_distinct(outputs, inputs)    # no output is an input, no two outputs are one file
"""
import os
import tempfile

from common.errors import UserError


def _nearest_existing(folder):
    """``folder`` itself when it exists (or is a link), else its closest existing ancestor."""
    f = os.path.abspath(folder)
    while not os.path.lexists(f):
        parent = os.path.dirname(f)
        if parent == f:
            break
        f = parent
    return f


def _check_not_dangling(link, flag, path):
    """Refuse a symbolic link whose target does not exist (it is no file and no folder)."""
    if os.path.islink(link) and not os.path.exists(link):
        raise UserError(f"{flag} {path}: {link} is a symbolic link to {os.readlink(link)}, which does not exist; "
                        f"create its target or remove the link, or choose another {flag}")


def _probe_folder(folder, flag, path):
    """Raise unless ``folder`` (which may not exist yet) can be created and written into."""
    base = _nearest_existing(folder)
    _check_not_dangling(base, flag, path)
    if not os.path.isdir(base):
        raise UserError(f"{flag} {path}: {base} is a file, not a folder; choose another {flag}")
    try:
        if base == os.path.abspath(folder):  # the folder exists: can a file be written into it?
            fd, probe = tempfile.mkstemp(prefix=".dia-probe-", dir=base)
            os.close(fd)
            os.unlink(probe)
        else:  # it does not: can its first missing folder be made?
            os.rmdir(tempfile.mkdtemp(prefix=".dia-probe-", dir=base))
    except OSError as exc:
        what = "write into" if base == os.path.abspath(folder) else "create a folder in"
        raise UserError(f"{flag} {path}: cannot {what} {base} ({exc.strerror or exc}); "
                        f"choose a writable location for {flag}") from None


def check_output_file(path, flag):
    """``path`` is a file ``flag`` will write: not a folder, in a folder that exists or can be
    made, and writable. Returns its real path (symbolic links resolved)."""
    path = os.fspath(path)
    if not path.strip():
        raise UserError(f"{flag} needs a file path, got an empty string")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UserError(f"{flag} {path} names a folder; give a file path (e.g. {os.path.join(path, 'out')}...)")
    _check_not_dangling(path, flag, path)  # writing would replace the link, never reach its target
    _probe_folder(os.path.dirname(os.path.abspath(path)), flag, path)
    return os.path.realpath(path)


def check_run_folder(path, flag="--logdir"):
    """``path`` is a folder a program will create (if missing) and write its files into."""
    path = os.fspath(path)
    if not path.strip():
        raise UserError(f"{flag} needs a folder path, got an empty string")
    _check_not_dangling(path, flag, path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder; choose a folder path for {flag}")
    _probe_folder(path, flag, path)
    return os.path.realpath(path)


def same_path(a, b):
    """True when ``a`` and ``b`` name one file: equal real paths, or (both existing) the same
    inode, e.g. hard links or a case-insensitive file system."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path, folder):
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_distinct(outputs, inputs=(), input_folders=()):
    """Refuse an output that is an input file, lies inside an input folder, or is another output.

    ``outputs``, ``inputs`` and ``input_folders`` are ``(flag, path)`` pairs; empty paths are skipped."""
    outputs = [(f, os.fspath(p)) for f, p in outputs if p]
    for flag, out in outputs:
        for iflag, inp in inputs:
            if inp and same_path(out, inp):
                raise UserError(f"{flag} {out} is the input {iflag} {inp}; writing it would destroy the input: "
                                f"choose another path for {flag}")
        for iflag, folder in input_folders:
            if folder and _inside(out, folder):
                raise UserError(f"{flag} {out} lies inside {iflag} {folder}, which is read as input: "
                                f"write {flag} outside that folder")
    for i, (flag_a, a) in enumerate(outputs):
        for flag_b, b in outputs[i + 1:]:
            if same_path(a, b):
                raise UserError(f"{flag_a} and {flag_b} both name {a}; give each output its own path")
