"""The evaluation train.py runs during training, and the checkpoint it selects.

It is the evaluation of the paper's ``train.py`` (docs/method.md §4, "Which checkpoint"):
CSI score with the rotation shift, ``--ood_samples`` samples (10), crop scale drawn from
``[--eval_resize_factor, 1]`` (0.54, not fixed unless ``--eval_resize_fix``), the normal
training images as CSI axes and the **test** set, every ``--error_step`` epochs (default:
every ``--save_step`` epochs, as the paper). The checkpoint with the highest test AUROC
(CSI, mean over the ``one_class_*`` AUROCs) is kept as ``best_CSI.model``: a selection on
the test set, reported beside ``last.model``, never instead of it.

In CSI's unlabeled multi-class setting (``ood_sets`` given) the whole training set gives the
axes, the in-distribution test set is normal and each out-of-distribution set is scored
against it, as the paper's train.py does there; the selecting AUROC is their mean
(``auroc_<score>_ood_mean``), and ``auroc_<score>_pooled`` is the test set against all of
them together.
"""
import numpy as np
import torch

from common.errors import SettingError
from datasets.ood import with_interp
from evals.ood_pre import auroc, auroc_report, csi_scores, extract_features, ood_report

SELECTION_RULE = "highest test AUROC during training (the paper's selection: chosen on the test set)"


class SelectionEvaluation:
    """Scores the test set with the model being trained; ``metric`` decides ``filename``.

    ``max_train`` / ``max_test`` cap the two sets by a fixed random subset (seeded by
    ``seed``); ``None`` uses them whole, as the paper does. A model without the 4-way shift
    head (``--mode simclr``) is selected on the ``simclr`` score instead of ``CSI``.
    """

    rule = SELECTION_RULE

    def __init__(self, normal_train, test_set, normal_class, device, n_shifts=4, samples=10,
                 resize_factor=0.54, resize_fix=False, max_train=None, max_test=None, batch_size=100,
                 amp=False, seed=0, ood_sets=None, interp_batch=100):
        g = torch.Generator().manual_seed(seed)
        self.train_set = _subset(normal_train, max_train, g)
        self.test_set = _subset(test_set, max_test, g)
        self.labels = self.test_set.labels.numpy()
        if ood_sets is None and normal_class is not None:
            check_both_sides(self.labels, normal_class, len(test_set), max_test)
        self.normal_class, self.device = normal_class, device
        self.scores = ("CSI", "simclr") if n_shifts == 4 else ("simclr",)
        self.score = self.scores[0]
        self.ood_sets = None
        if ood_sets is not None:  # multi-class: interp made from the whole test set, each set capped like it

            self.ood_sets = {name: _subset(d, max_test, g)
                             for name, d in with_interp(ood_sets, test_set, interp_batch).items()}
        kind = "one_class_mean" if self.ood_sets is None else "ood_mean"
        self.metric = f"auroc_{self.score}_{kind}"
        self.filename = f"best_{self.score}.model"
        self.samples, self.resize_factor, self.resize_fix = samples, resize_factor, resize_fix
        self.batch_size, self.amp = batch_size, amp

    def protocol(self):
        """What the evaluation computes, for the logs and for selection.json."""
        doc = {"score": self.score, "shift": "rotation", "samples": self.samples,
               "resize_factor": self.resize_factor, "resize_fix": self.resize_fix,
               "n_train": len(self.train_set), "n_test": len(self.test_set), "split": "test",
               "metric": self.metric}
        if self.ood_sets is not None:
            doc.update(setting="multi_class", n_ood={name: len(d) for name, d in self.ood_sets.items()})
        return doc

    def describe(self):
        crop = (f"crop scale {self.resize_factor:g} fixed" if self.resize_fix
                else f"crop scale in [{self.resize_factor:g}, 1]")
        sets = ("" if self.ood_sets is None else
                " against " + ", ".join(f"{name} ({len(d)})" for name, d in self.ood_sets.items()))
        return (f"{self.score} score, {self.samples} sample(s), {crop}, {len(self.train_set)} normal training / "
                f"{len(self.test_set)} test images{sets}; {self.filename} keeps the highest test {self.metric}")

    def __call__(self, net, restore_rng=True, sharded=False):
        """AUROCs of ``net`` on the test set: ``auroc_<score>_one_class_mean``, ``..._pooled``
        and ``..._one_class_<j>``. ``restore_rng=False`` leaves the random generators as the
        paper's evaluation leaves them (see ``extract_features``). ``sharded=True`` (every rank
        of a torchrun job calls it): each rank extracts its share of the batches, every rank
        gets the features of one process and returns the same AUROCs."""
        kw = dict(base_shift="rotation", n_samples=self.samples, device=self.device, batch_size=self.batch_size,
                  resize_factor=self.resize_factor, resize_fix=self.resize_fix, amp=self.amp,
                  restore_rng=restore_rng, sharded=sharded)
        f_tr = extract_features(net, self.train_set, **kw)
        f_te = extract_features(net, self.test_set, **kw)  # last: its draws are the ones left over
        metrics = {}
        if self.ood_sets is not None:  # CSI's order: training, test, then each set
            f_ood = {name: extract_features(net, d, **kw) for name, d in self.ood_sets.items()}
            for score in self.scores:
                s_id = csi_scores(f_tr, f_te, 4, score).numpy()
                s_ood = {name: csi_scores(f_tr, f, 4, score).numpy() for name, f in f_ood.items()}
                for key, v in ood_report(s_id, s_ood).items():
                    metrics[f"auroc_{score}_{key}"] = v
                metrics[f"auroc_{score}_pooled"] = auroc(s_id, np.concatenate(list(s_ood.values())))
            return metrics
        for score in self.scores:
            rep = auroc_report(csi_scores(f_tr, f_te, 4, score).numpy(), self.labels, self.normal_class)
            for key, v in rep.items():
                metrics[f"auroc_{score}_{key}"] = v
        return metrics


def check_both_sides(labels, normal_class, n_test, max_test):
    """The (capped) test set holds normal and anomalous images, or its AUROC is undefined: a
    :class:`SettingError` naming ``max_test`` when the cap is why."""
    n_normal = int((labels == normal_class).sum())
    if n_normal and n_normal < len(labels):
        return
    missing = "normal" if not n_normal else "anomalous"
    if max_test is not None and n_test > max_test:
        raise SettingError(f"{{max_test}} {max_test} leaves the evaluation during training {len(labels)} test "
                           f"image(s) and none of them {missing}: its AUROC is undefined and no checkpoint could be "
                           f"selected on it; raise {{max_test}} (or leave it out)", "max_test")
    raise SettingError(f"the test set holds no {missing} images: the AUROC of the evaluation during training is "
                       f"undefined and no checkpoint could be selected on it; add {missing} test images")


def _subset(dataset, cap, generator):
    if cap is None or len(dataset) <= cap:
        return dataset
    return dataset.subset(torch.randperm(len(dataset), generator=generator)[:cap].sort().values)
