"""What a trained model's features separate: a linear probe and the lesions' share of the feature distance.

Two measures, on images the model never saw (``benchmarks/feature_probe.py`` draws them from the
generator of a built-in synthetic set, which can paint the same tissue with and without lesions):

* :func:`probe_auroc`: a logistic regression fitted on the features of normal and anomalous images,
  scored (AUROC) on other ones. Near 1: the features hold what tells the classes apart, whether or
  not CSI's score uses it; near 0.5: they do not.
* :func:`lesion_sensitivity`: how far the lesions move an image in feature space, against how far
  apart two different normal images are: the median distance between the normalised features of an
  image with lesions and of the same tissue without them, over the median distance between the
  features of two different lesion-free images. 0: the features do not see the lesions; 1: the
  lesions move an image as far as a change of tissue does.
"""
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler


@torch.no_grad()
def features(model, images, layer="penultimate", batch_size=250):
    """Features (float ``N x d``, CPU) of upright, unaugmented ``images`` (float ``N x 3 x H x W`` in [0, 1])."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size].to(device)
        _, aux = model(x, penultimate=layer == "penultimate", simclr=layer == "simclr")
        out.append(aux[layer].float().cpu())
    model.train(was_training)
    return torch.cat(out)


def probe_auroc(train_x, train_y, test_x, test_y, seed=0):
    """AUROC on (``test_x``, ``test_y``) of a logistic regression fitted on (``train_x``, ``train_y``).

    Labels are 0 (normal) and 1 (anomalous); the features are standardised with the training
    set's mean and spread.
    """
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(scaler.transform(train_x), np.asarray(train_y))
    return float(roc_auc_score(np.asarray(test_y), clf.decision_function(scaler.transform(test_x))))


def lesion_sensitivity(f_lesioned, f_clean, f_other):
    """Median ``|u(lesioned_i) - u(clean_i)|`` over median ``|u(clean_i) - u(other_i)|``, ``u`` the
    L2-normalised features: rows ``i`` of ``f_lesioned`` and ``f_clean`` are the same tissue with and
    without lesions, row ``i`` of ``f_other`` a different lesion-free image."""
    u = [F.normalize(torch.as_tensor(f, dtype=torch.float64), dim=1) for f in (f_lesioned, f_clean, f_other)]
    by_lesion = (u[0] - u[1]).norm(dim=1).median()
    by_tissue = (u[1] - u[2]).norm(dim=1).median()
    return float(by_lesion / by_tissue)
