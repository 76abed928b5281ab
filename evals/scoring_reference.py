"""A model's scoring reference: what scoring new images needs from the normal training images.

The CSI score of an image (docs/method.md §4) is measured against the normal training images:
per shift k their unit axes ``axis_k`` (the normalised mean over the samples of each image's
``simclr`` features) and the weights ``w_sim_k`` and ``w_shi_k``. A threshold for new images is
a quantile of the training images' own scores, each taken against the *other* training
images' axes (leave-one-out: its own axis would match it perfectly). The reference holds both,
so ``eval.py --score_folder`` scores new images without the training data.

The file ``<model stem>.scoring.pt`` lies next to its model (``last.model`` ->
``last.scoring.pt``); train.py writes it for ``last.model`` at the end of training, eval.py
computes (and keeps) one for any other model while the training data are there. It holds
plain tensors, numbers and strings (read with ``weights_only=True``) and never NaN or infinity:

==================  ================================================================
``kind``            ``"dia_scoring_reference"``; ``format_version`` 1
``model_file``      the model's file name; ``model_digest``: SHA-256 of its weights
                    (a reference of other weights is never used), ``run_id``,
                    ``epoch``, ``step``
``dataset``         the run's dataset, ``one_class_idx``, ``normal_class``,
                    ``image_size`` ([h, w, c])
``protocol``        how the features were taken: ``shift`` (rotation), ``samples``,
                    ``resize_factor``, ``resize_fix``, ``batch_size``, ``amp``
``n_train``         the number M of normal training images
``scores``          the scores it serves (``["CSI", "simclr"]``; ``["simclr"]`` for a
                    model without the 4-way shift head); ``score``: the first
``statistics``      ``axis`` (K x M x d), ``w_sim`` (K), ``w_shi`` (K; absent without
                    the shift head)
``train_scores``    per score, the M leave-one-out scores (empty when M < 2)
``threshold``       per score, the ``threshold_quantile`` quantile of those (0.05)
==================  ================================================================
"""
import hashlib
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from common.checkpoint_io import read_checkpoint
from common.errors import UserError
from evals.ood_pre import csi_scores_from_statistics, csi_statistics, csi_train_scores_loo, extract_features
from utils import atomic_torch_save

KIND = "dia_scoring_reference"
FORMAT_VERSION = 1
SUFFIX = ".scoring.pt"
# eval.py --threshold_quantile's meaning: images scoring below this quantile of the normal
# training images' leave-one-out scores are flagged
DEFAULT_QUANTILE = 0.05
# a quantile of fewer normal training images than this is rough (a warning); below MIN_TRAIN
# there is no leave-one-out score at all (an error)
FEW_TRAIN = 20
MIN_TRAIN = 2
N_SHIFTS = 4  # CSI scores with the rotation shift's 4 views, whatever the model was trained with


@dataclass(frozen=True)
class ScoringProtocol:
    """How the features are taken (``evals.ood_pre.extract_features``); by default the paper's
    eval.py command: rotation, 10 samples, crop scale fixed at 0.54."""
    samples: int = 10
    resize_factor: float = 0.54
    resize_fix: bool = True
    batch_size: int = 100
    amp: object = False  # what utils.autocast_for takes: the precision the features are computed in

    def as_dict(self):
        return {"shift": "rotation", **asdict(self)}

    def same_features(self, other):
        """Whether features taken with ``other`` are comparable (the batch size and precision
        only change the last bits)."""
        return (self.samples, self.resize_factor, self.resize_fix) == (other.samples, other.resize_factor,
                                                                        other.resize_fix)

    @classmethod
    def from_dict(cls, doc):
        return cls(samples=int(doc["samples"]), resize_factor=float(doc["resize_factor"]),
                   resize_fix=bool(doc["resize_fix"]), batch_size=int(doc.get("batch_size", 100)),
                   amp=doc.get("amp", False))


def reference_path(model_path):
    """Where the scoring reference of ``model_path`` lies: ``<folder>/<stem>.scoring.pt``."""
    folder, name = os.path.split(os.path.abspath(os.fspath(model_path)))
    return os.path.join(folder, os.path.splitext(name)[0] + SUFFIX)


def model_digest(state_dict):
    """SHA-256 of a model's weights (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def scores_served(n_shift_outputs):
    """The scores a model serves: CSI and simclr with the 4-way shift head, else simclr."""
    return ("CSI", "simclr") if n_shift_outputs >= N_SHIFTS else ("simclr",)


def compute_reference(model, normal_train, device, protocol, identity, quantile=DEFAULT_QUANTILE,
                      sharded=False, progress=None):
    """The scoring reference of ``model`` from the normal training images ``normal_train``.

    ``identity``: what the file records about the model and its run (``model_file``,
    ``model_digest``, ``run_id``, ``epoch``, ``step``, ``dataset``, ``one_class_idx``,
    ``normal_class``, ``image_size``). ``sharded``: every rank of a torchrun job calls it and
    extracts its share of the batches (the features, and so the reference, are those of one
    process)."""
    feats = extract_features(model, normal_train, "rotation", protocol.samples, device,
                             batch_size=protocol.batch_size, resize_factor=protocol.resize_factor,
                             resize_fix=protocol.resize_fix, amp=protocol.amp, progress=progress, sharded=sharded)
    axis, w_sim, w_shi = csi_statistics(feats, N_SHIFTS)
    scores = scores_served(feats["shift"].shape[-1])
    n = len(normal_train)
    train_scores = ({s: csi_train_scores_loo(feats, N_SHIFTS, s).contiguous() for s in scores}
                    if n >= MIN_TRAIN else {})
    statistics = {"axis": axis.contiguous(), "w_sim": w_sim}
    if w_shi is not None:
        statistics["w_shi"] = w_shi
    return {
        "kind": KIND, "format_version": FORMAT_VERSION, **identity,
        "protocol": protocol.as_dict(), "n_train": n, "scores": list(scores), "score": scores[0],
        "statistics": statistics, "train_scores": train_scores, "threshold_quantile": float(quantile),
        "threshold": {s: float(np.quantile(v.numpy(), quantile)) for s, v in train_scores.items()},
    }


def first_non_finite(ref):
    """The name of the first entry of ``ref`` holding NaN or infinity, or None."""
    items = list(ref["statistics"].items()) + [(f"train_scores[{k}]", v) for k, v in ref["train_scores"].items()]
    for name, t in items:
        if not torch.isfinite(t).all():
            return name
    for name, v in ref["threshold"].items():
        if not math.isfinite(v):
            return f"threshold[{name}]"
    return None


def write_reference(ref, path):
    """Write ``ref`` atomically to ``path``; a reference holding NaN or infinity is refused."""
    bad = first_non_finite(ref)
    if bad:
        raise UserError(f"not writing the scoring reference {path}: its {bad} holds NaN or infinity (the features "
                        f"of {ref.get('model_file')} on the normal training images are not finite)")
    atomic_torch_save(ref, path)


def read_reference(path, digest):
    """``(reference, None)`` when ``path`` holds the scoring reference of the weights ``digest``;
    ``(None, why)`` when it is missing or of other weights. A file that is there but is no
    scoring reference is one line (UserError)."""
    if not os.path.lexists(path):
        return None, f"{path} does not exist"
    ref = read_checkpoint(path, "scoring reference", "remove it: eval.py computes it again from the training data")
    if not isinstance(ref, dict) or ref.get("kind") != KIND:
        raise UserError(f"{path} is not a scoring reference (eval.py keeps the features of a model's normal training "
                        f"images there); move it away: eval.py computes it again from the training data")
    if ref.get("model_digest") != digest:
        return None, f"{path} belongs to other weights (its model file was written again since)"
    return ref, None


def threshold_of(ref, score, quantile=None):
    """``(threshold, quantile, n)`` of ``score`` (lower scores are anomalous): the stored one, or
    ``quantile`` of the stored leave-one-out scores of the ``n`` normal training images. Fewer
    than :data:`MIN_TRAIN` of them is an error."""
    n = int(ref["n_train"])
    scores = ref["train_scores"].get(score)
    if n < MIN_TRAIN or scores is None:
        raise UserError(f"a threshold needs the leave-one-out scores of at least {MIN_TRAIN} normal training images; "
                        f"the model was trained on {n}: train it on more normal images")
    if quantile is None or float(quantile) == float(ref["threshold_quantile"]):
        return float(ref["threshold"][score]), float(ref["threshold_quantile"]), n
    return float(np.quantile(scores.numpy(), quantile)), float(quantile), n


def few_train_warning(n, quantile):
    """A warning when a threshold rests on fewer than :data:`FEW_TRAIN` normal images, else None."""
    if n >= FEW_TRAIN:
        return None
    return (f"the threshold is the {quantile:g} quantile of the scores of only {n} normal training images (fewer than "
            f"{FEW_TRAIN}): a rough estimate; a model trained on more normal images gives a steadier one")


def score_images(ref, feats, score):
    """The ``score`` of images whose features ``feats`` were taken with ``ref``'s protocol
    (higher = more normal): what ``evals.ood_pre.csi_scores`` gives against the training features."""
    st = ref["statistics"]
    return csi_scores_from_statistics((st["axis"], st["w_sim"], st.get("w_shi")), feats, N_SHIFTS, score)
