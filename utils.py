"""Small utilities shared by the programs: seeding, batching, atomic files, logging."""
import contextlib
import csv
import json
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


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


def autocast_for(device, enabled):
    """Mixed precision where asked: bf16 on CPU, fp16 on CUDA; a no-op otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def atomic_write(path, writer):
    """Call ``writer(binary_file)`` on a temporary file next to ``path``, then rename it into
    place: readers see the old file or the complete new one, never a part. On any error the
    temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(text, path):
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_write_csv(rows, fieldnames, path):
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


class Logger:
    """Text log (``log.txt``), TensorBoard scalars and a CSV of scalars in one run folder."""

    def __init__(self, logdir, tensorboard=True):
        self.logdir = logdir
        os.makedirs(logdir, exist_ok=True)
        self._text = open(os.path.join(logdir, "log.txt"), "a")
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir)
        self._csv_path = os.path.join(logdir, "scalars.csv")
        new = not os.path.exists(self._csv_path)
        self._csv = open(self._csv_path, "a", newline="")
        self._csv_writer = csv.writer(self._csv)
        if new:
            self._csv_writer.writerow(["step", "tag", "value", "time"])

    def log(self, msg, echo=True):
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        self._text.write(line + "\n")
        self._text.flush()
        if echo:
            print(msg, file=sys.stdout, flush=True)

    def scalar(self, tag, value, step):
        value = float(value)
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)
        self._csv_writer.writerow([step, tag, f"{value:.6g}", f"{time.time():.3f}"])

    def flush(self):
        self._csv.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        self.flush()
        self._text.close()
        self._csv.close()
        if self._writer is not None:
            self._writer.close()


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)
