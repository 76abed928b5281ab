"""The records of a run folder that name its checkpoints: ``selection.json`` and the
``best_*.model`` files, kept in agreement.

train.py writes a ``best_*.model`` file when an evaluation during training beats every earlier
one, then ``selection.json`` (which rule produced which file, and every evaluation), then, at
the epoch's end, ``last.model`` (whose ``best`` records the selection too). A kill between
these writes leaves files that disagree; so does a resume from a checkpoint older than a best
file. Each checkpoint file records what it is (its ``selection``: epoch, step, rule, metric,
value), so the files are the truth about what they hold:

* :func:`reconcile_best`: a resumed run takes each best file's own record when it differs from
  what its checkpoint recorded (the model selected is kept, and named);
* :func:`read_selection`: a reader checks ``selection.json`` against the files, and a damaged
  one, or one that names another model than a file holds, is rebuilt from the checkpoints;
* :func:`check_not_rewinding`: a resume from a checkpoint older than the folder's
  ``last.model`` is refused, so no later record is ever cut away.
"""
import json
import os

from common.checkpoint_io import read_checkpoint
from common.errors import UserError
from common.paths import same_path
from utils import atomic_write_json

LAST_RULE = "the model at the end of training (saved every --save_step epochs and at the last epoch)"
SELECTION_NAME = "selection.json"
BEST_KEYS = ("epoch", "step", "rule", "metric", "value", "protocol", "metrics")


def selection_doc(last_saved, best, paper_rng_replay, evaluations):
    """``selection.json``'s content: ``last.model``'s epoch and step (``last_saved``, None
    before the first), each ``best_*.model``'s record (``best``: name -> record), how the
    randomness ran, and every evaluation."""
    doc = {"last.model": dict(last_saved, rule=LAST_RULE) if last_saved else None}
    doc.update({name: dict(record) for name, record in best.items()})
    doc["randomness"] = ("paper_rng_replay: each evaluation leaves the generators seeded, later epochs replay"
                         if paper_rng_replay else "each epoch seeded with (seed, epoch)")
    doc["evaluations"] = list(evaluations)
    return doc


def best_files(folder):
    """The ``best_*.model`` files of a run folder, sorted."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("best_") and n.endswith(".model"))


def _point(record):
    record = record or {}
    return record.get("epoch"), record.get("step")


def _file_record(path):
    """A best file's own record of what it holds (what selected it, at the epoch and step of the
    checkpoint itself), and its checkpoint."""
    ckpt = read_checkpoint(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint written by train.py")
    record = {k: v for k, v in (ckpt.get("selection") or {}).items() if k in BEST_KEYS}
    record.update(epoch=ckpt.get("epoch"), step=ckpt.get("step"))
    return record, ckpt


def reconcile_best(folder, best, run_id):
    """``best`` (a resumed checkpoint's record: name -> record) in agreement with the best files
    of ``folder``, the run's own folder: a file holding another epoch than recorded (written
    after the checkpoint by the interrupted attempt) is kept and its own record taken. Returns
    ``(best, notes)``, a note per change for the log. A recorded file that is missing, or a best
    file of another run, is refused in one line."""
    best = {name: dict(record) for name, record in (best or {}).items()}
    notes = []
    on_disk = best_files(folder)
    for name in best:
        if name not in on_disk:
            raise UserError(f"{os.path.join(folder, name)}, which the checkpoint records as the model of epoch "
                            f"{best[name].get('epoch')}, is missing; restore it, or train a new run")
    for name in on_disk:
        path = os.path.join(folder, name)
        record, ckpt = _file_record(path)
        if name in best and _point(record) == _point(best[name]):
            continue
        owner = (ckpt.get("meta") or {}).get("run_id")
        if run_id and owner and owner != run_id:
            raise UserError(f"{path} belongs to another run ({owner}) than the one resumed ({run_id}); move it "
                            f"away, or continue the run in an empty --logdir")
        was = (f"the checkpoint recorded epoch {best[name].get('epoch')}" if name in best
               else "the checkpoint recorded none")
        notes.append(f"{name} holds the model of epoch {record.get('epoch')} (step {record.get('step')}, "
                     f"{record.get('metric')} {record.get('value')}), selected by the interrupted attempt "
                     f"({was}): kept, and selection.json names it")
        best[name] = record
    return best, notes


def check_not_rewinding(folder, resume_file, resume_ckpt):
    """Refuse to resume ``folder``'s run from a checkpoint older than its ``last.model``: the
    folder's later checkpoints and records would be overwritten or cut away."""
    last = os.path.join(folder, "last.model")
    if not os.path.isfile(last) or same_path(last, resume_file):
        return
    ckpt = read_checkpoint(last, "checkpoint")
    if not isinstance(ckpt, dict):
        return
    ours = (resume_ckpt.get("meta") or {}).get("run_id")
    theirs = (ckpt.get("meta") or {}).get("run_id")
    if ours and theirs and ours != theirs:
        return  # another run: the folder's placement refuses it
    at = (int(resume_ckpt.get("epoch", 0)), int(resume_ckpt.get("step", 0)))
    later = (int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0)))
    if later > at:
        raise UserError(f"--resume_path {resume_file} holds epoch {at[0]} (step {at[1]}) of the run in {folder}, "
                        f"whose last.model is at epoch {later[0]} (step {later[1]}): resuming from it there would "
                        f"overwrite the later checkpoints and records; continue from {last} (--resume_path "
                        f"{folder}), or continue {resume_file} as a new run with an empty --logdir")


def rebuild_selection(folder):
    """``selection.json`` of ``folder`` made again from its checkpoints: ``last.model`` (its
    epoch, its evaluations) and each best file's own record. A UserError when there is no
    readable ``last.model``."""
    last = os.path.join(folder, "last.model")
    if not os.path.isfile(last):
        raise UserError(f"{os.path.join(folder, SELECTION_NAME)} cannot be rebuilt: {folder} holds no last.model")
    ckpt = read_checkpoint(last, "checkpoint")
    args = ((ckpt.get("meta") or {}).get("args") or {}) if isinstance(ckpt, dict) else {}
    best = {name: _file_record(os.path.join(folder, name))[0] for name in best_files(folder)}
    return selection_doc({"epoch": ckpt.get("epoch"), "step": ckpt.get("step")}, best,
                         args.get("paper_rng_replay", False), ckpt.get("evaluations") or [])


def read_selection(folder):
    """``(selection.json's content, note)`` of a run folder, checked against its checkpoint
    files: a missing, damaged (a cut or unreadable file) or disagreeing one (naming another
    epoch than a best file holds, or a best file that is not there) is rebuilt from the
    checkpoints (:func:`rebuild_selection`) and written again; ``note`` says so (None when it
    was right). ``(None, None)`` for a folder without checkpoints."""
    path = os.path.join(folder, SELECTION_NAME)
    files = best_files(folder)
    if not os.path.exists(path) and not files:
        return None, None
    try:
        with open(path) as fh:
            doc = json.load(fh)
        why = None if isinstance(doc, dict) else "it holds no record"
    except FileNotFoundError:
        doc, why = None, "it is missing"
    except (OSError, ValueError) as exc:
        doc, why = None, f"it is damaged ({str(exc).splitlines()[0][:80]})"
    if doc is not None and why is None:
        named = sorted(k for k in doc if k.startswith("best_") and k.endswith(".model"))
        if named != files:
            why = f"it names {', '.join(named) or 'no best file'}, the folder holds {', '.join(files) or 'none'}"
        else:
            for name in files:
                record, _ = _file_record(os.path.join(folder, name))
                if _point(record) != _point(doc[name]):
                    why = (f"it names epoch {doc[name].get('epoch')} for {name}, which holds epoch "
                           f"{record.get('epoch')}")
                    break
    if why is None:
        return doc, None
    rebuilt = rebuild_selection(folder)
    atomic_write_json(rebuilt, path)
    return rebuilt, f"{path} was rebuilt from the checkpoints: {why}"
