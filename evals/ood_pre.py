"""CSI scoring (docs/method.md §4): features of shifted, augmented samples and the CSI score.

The one-class report is ``auroc_report`` (per other class, their mean, pooled); the unlabeled
multi-class one is ``ood_report`` (per out-of-distribution set and their mean), as CSI's
``evals/ood_pre.py`` computes them, with the weights and axes from the normal training images
(in the multi-class setting: the whole training set).
"""
import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from common import distributed
from common.device import dataset_images
from models.transform_layers import CHUNK_PIXELS, HorizontalFlipRandom, get_shift, simclr_augmentation
from utils import autocast_for, batch_indices, set_seed


@torch.no_grad()
def extract_features(model, dataset, base_shift, n_samples, device, batch_size=100,
                     resize_factor=0.54, resize_fix=True, amp=False, progress=None, restore_rng=True,
                     sharded=False, chunk_pixels=CHUNK_PIXELS):
    """Features of every image of ``dataset`` for every shift k and sample s.

    For sample s the random seed is set to s (per batch, as CSI does), each shift k gets its
    own random flip, then the SimCLR augmentation. Returns ``{"simclr": (N, K*S, d),
    "shift": (N, K*S, K)}`` on the CPU, shift-major (index ``k*S + s``).

    ``restore_rng=True`` seeds torch only and gives the caller its random state back.
    ``restore_rng=False`` is what the paper's code does: every seeding reaches Python's,
    numpy's, torch's and CUDA's generators and nothing is restored, so they are left seeded
    with ``n_samples - 1`` and advanced by the last batch's draws. The features are the same.

    ``amp``: the precision of the forward passes (``'bf16'``, ``'fp16'``, ``'fp32'``; ``True``/``False``:
    bf16/fp32). ``sharded=True`` (every rank of a torchrun job calls it): rank r computes batches r, r + W,
    ... and every rank gets all features back. Each batch reseeds as above, so the features
    are those of one process, whatever the number of ranks.
    """
    shift = get_shift(base_shift)
    K = shift.max_range
    hflip = HorizontalFlipRandom(0.5)
    aug = simclr_augmentation(resize_factor, resize_fix, chunk_pixels)  # (chunks: the same bits, faster)
    was_training = model.training
    model.eval()
    n = len(dataset)
    out = {}
    devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    keep = torch.random.fork_rng(devices=devices) if restore_rng else contextlib.nullcontext()
    reseed = torch.manual_seed if restore_rng else set_seed
    batches = list(batch_indices(n, batch_size))
    mine = distributed.my_part(range(len(batches))) if sharded else range(len(batches))
    with keep:
        for bi in mine:
            x = dataset_images(dataset, batches[bi], device)
            b = x.shape[0]
            per_sample = {"simclr": [], "shift": []}
            for s in range(n_samples):
                reseed(s)
                views = torch.cat([shift(hflip(x), k) for k in range(K)])
                views = aug(views)
                with autocast_for(device, amp):
                    _, aux = model(views, simclr=True, shift=True)
                for key in per_sample:
                    per_sample[key].append(aux[key].float().view(K, b, -1))
            for key, chunks in per_sample.items():
                f = torch.stack(chunks, dim=1)  # K x S x B x d
                out.setdefault(bi, {})[key] = f.permute(2, 0, 1, 3).reshape(b, K * n_samples, -1).cpu()
            if progress is not None:
                progress.update(b)
    model.train(was_training)
    if sharded:
        for part in distributed.all_gather_objects(out):
            out.update(part)
    if not out:
        return {}
    return {key: torch.cat([out[bi][key] for bi in range(len(batches))]) for key in out[0]}


def _split_shifts(feats, n_shifts):
    """(N, K*S, d) -> (N, K, S, d)."""
    n, ks, d = feats.shape
    return feats.view(n, n_shifts, ks // n_shifts, d)


def csi_statistics(train_feats, n_shifts):
    """From the normal training features: per shift k the unit axes (K, M, d) and the weights
    w_sim_k and w_shi_k of docs/method.md §4, step 2. A model without the K-way shift head
    (``--mode simclr``: one output) has no w_shi (``None``): it is scored with ``simclr``."""
    f = _split_shifts(train_feats["simclr"].float(), n_shifts).mean(dim=2)  # M x K x d
    axis = F.normalize(f, dim=2).transpose(0, 1)  # K x M x d
    w_sim = 1.0 / f.norm(dim=2).mean(dim=0)  # K
    if train_feats["shift"].shape[-1] < n_shifts:
        return axis, w_sim, None
    g = _split_shifts(train_feats["shift"].float(), n_shifts)  # M x K x S x K
    k = torch.arange(n_shifts)
    own = g[:, k, :, k]  # K x M x S: the logit of shift k on the views shifted by k
    w_shi = 1.0 / own.mean(dim=(1, 2))
    return axis, w_sim, w_shi


def _scores_against(stats, feats, n_shifts, ood_score, exclude_self=False):
    """Score ``feats`` against the statistics of the normal training set; with
    ``exclude_self`` feats are those training images and image i skips its own axis i."""
    axis, w_sim, w_shi = stats
    f = _split_shifts(feats["simclr"].float(), n_shifts).mean(dim=2)  # N x K x d
    sim = torch.einsum("nkd,kmd->nkm", f, axis)  # N x K x M
    if exclude_self:
        sim = sim.masked_fill(torch.eye(f.shape[0], dtype=torch.bool).unsqueeze(1), -float("inf"))
    sim = sim.max(dim=2).values  # N x K
    if ood_score == "simclr":
        return sim.mean(dim=1)
    g = _split_shifts(feats["shift"].float(), n_shifts)
    k = torch.arange(n_shifts)
    shi = g[:, k, :, k].mean(dim=2).transpose(0, 1)  # N x K
    return (sim * w_sim + shi * w_shi).mean(dim=1)


def _check_score(ood_score, stats=None):
    if ood_score not in ("CSI", "simclr"):
        raise ValueError(f"CSI scoring computes 'CSI' or 'simclr', not {ood_score!r}")
    if ood_score == "CSI" and stats is not None and stats[2] is None:
        raise ValueError("the CSI score needs the shift head's K outputs; this model has one: score it with 'simclr'")


def csi_scores(train_feats, test_feats, n_shifts, ood_score="CSI"):
    """The CSI score of each test image (higher = more normal), a pure function.

    ``score = (1/K) sum_k [w_sim_k * max_m <mean_s f[k,s], axis_k[m]> + w_shi_k * mean_s g[k,s][k]]``;
    ``ood_score="simclr"`` keeps only the similarity term, with weight 1.
    """
    return csi_scores_from_statistics(csi_statistics(train_feats, n_shifts), test_feats, n_shifts, ood_score)


def csi_scores_from_statistics(stats, test_feats, n_shifts, ood_score="CSI"):
    """:func:`csi_scores` with the normal training images' statistics (``csi_statistics``:
    axes, w_sim, w_shi) computed beforehand, as a scoring reference stores them
    (``evals.scoring_reference``): the same numbers as ``csi_scores`` on those images' features."""
    _check_score(ood_score, stats)
    return _scores_against(stats, test_feats, n_shifts, ood_score)


def csi_train_scores_loo(train_feats, n_shifts, ood_score="CSI"):
    """Scores of the normal training images themselves, each against the axes of the others
    (its own axis would match it perfectly): what a threshold for new images is set on."""
    stats = csi_statistics(train_feats, n_shifts)
    _check_score(ood_score, stats)
    return _scores_against(stats, train_feats, n_shifts, ood_score, exclude_self=True)


def auroc(scores_normal, scores_anomalous):
    """AUROC with the normal images as positives (higher score = more normal)."""
    from sklearn.metrics import roc_auc_score  # a second to import: a training without evaluation skips it

    s_n, s_a = np.asarray(scores_normal, float), np.asarray(scores_anomalous, float)
    labels = np.concatenate([np.ones(len(s_n)), np.zeros(len(s_a))])
    return float(roc_auc_score(labels, np.concatenate([s_n, s_a])))


def auroc_report(scores, labels, normal_class):
    """Per other class ("one_class_<j>"), their mean ("one_class_mean") and all others pooled."""
    scores = np.asarray(scores, float)
    labels = np.asarray(labels)
    normal = scores[labels == normal_class]
    report = {}
    for j in sorted(set(labels.tolist()) - {normal_class}):
        report[f"one_class_{j}"] = auroc(normal, scores[labels == j])
    per_class = list(report.values())
    report["one_class_mean"] = float(np.mean(per_class)) if per_class else float("nan")
    report["pooled"] = auroc(normal, scores[labels != normal_class]) if per_class else float("nan")
    return report


def ood_report(scores_normal, scores_by_set):
    """CSI's unlabeled multi-class AUROCs: per out-of-distribution set (``{name: AUROC}``, the
    in-distribution test images as positives, in the order given) and their mean, ``"ood_mean"``."""
    report = {name: auroc(scores_normal, s) for name, s in scores_by_set.items()}
    report["ood_mean"] = float(np.mean(list(report.values()))) if report else float("nan")
    return report
