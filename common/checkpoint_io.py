"""Read checkpoints safely: every failure to read is one plain line.

``torch.load(weights_only=True)`` never runs code from a file, but its errors are long and
some advise retrying with ``weights_only=False`` (which would). :func:`read_checkpoint`
turns each failure (missing, a folder, unreadable, empty, truncated, not a torch file,
pickled Python objects) into a :class:`UserError` that says what the file is and what to
do, and never passes that advice on.
"""
import os
import re
import warnings
import zipfile

import torch

from common.errors import UserError

# the "kind" entry of a checkpoint written by train.py (training.trainer.Trainer.state)
MODEL_CHECKPOINT_KIND = "dia_model"

MODEL_HINT = "give a model checkpoint written by train.py (<logdir>/last.model)"


def _why_unreadable(path, exc):
    """What is wrong with ``path``, given the exception ``torch.load`` raised on it."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it holds pickled Python objects ({found.group(1)}), not only tensors and numbers, "
                f"and is not unpickled since that could run code")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return "it is truncated or corrupt (an incomplete torch file; copy or write it again)"
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "it is a zip archive (e.g. .npz), not a torch checkpoint"
        return "it is a corrupt torch file (copy or write it again)"
    if isinstance(exc, EOFError):
        return "it is truncated (the file ends early; copy or write it again)"
    if head[:1] == b"\x80":
        return "it is a plain Python pickle, not a torch checkpoint"
    return "it is not a torch checkpoint (unrecognised content)"


def read_checkpoint(path, what="checkpoint", hint="", map_location="cpu"):
    """``torch.load(path, weights_only=True)``, or a :class:`UserError` of one line.

    ``what`` names the file in messages ("model checkpoint"), ``hint`` says what to give instead."""
    path = os.fspath(path)
    tail = f"; {hint}" if hint else ""
    if not os.path.lexists(path):
        raise UserError(f"{what} {path} does not exist{tail}")
    if os.path.isdir(path):
        raise UserError(f"cannot read {what} {path}: it is a folder, not a file{tail}")
    if not os.path.exists(path):
        raise UserError(f"cannot read {what} {path}: it is a broken symbolic link{tail}")
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror or exc}){tail}") from None
    if size == 0:
        raise UserError(f"cannot read {what} {path}: it is empty (0 bytes), never written completely{tail}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on an unusual pickle protocol
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure to read becomes one line
        try:
            why = _why_unreadable(path, exc)
        except OSError as exc2:
            why = exc2.strerror or str(exc2)
        raise UserError(f"cannot read {what} {path}: {why}{tail}") from None


def read_model_checkpoint(path, map_location="cpu", flag="--load_path"):
    """A checkpoint written by train.py (kind ``dia_model``), or one line saying what it is instead."""
    path = os.fspath(path)
    hint = MODEL_HINT
    if os.path.isdir(path):
        inner = os.path.join(path, "last.model")
        hint = (f"pass {flag} {inner}" if os.path.isfile(inner) else MODEL_HINT)
    ckpt = read_checkpoint(path, "model checkpoint", hint, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != MODEL_CHECKPOINT_KIND:
        found = (repr(ckpt["kind"]) if isinstance(ckpt, dict) and "kind" in ckpt
                 else "a dict without 'kind'" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}")
        dissolver = isinstance(ckpt, dict) and (ckpt.get("kind") == "dia_dissolver" or ("ema" in ckpt and "step" in ckpt))
        raise UserError(f"{path} is not a model checkpoint written by train.py (found {found}); "
                        + ("a dissolver checkpoint goes to --diffusion_model_path" if dissolver else MODEL_HINT))
    if not isinstance(ckpt.get("model"), dict):
        raise UserError(f"model checkpoint {path} has no model weights; {MODEL_HINT}")
    return ckpt
