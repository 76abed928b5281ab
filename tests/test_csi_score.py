"""csi_scores and the AUROC report against loops written from docs/method.md §4."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from evals.ood_pre import auroc_report, csi_scores


def loop_csi(train, test, K, ood_score="CSI"):
    fs, gs = train["simclr"].double(), train["shift"].double()
    M, KS, d = fs.shape
    S = KS // K
    axes, w_sim, w_shi = [], [], []
    for k in range(K):
        means = [fs[m, k * S:(k + 1) * S].mean(0) for m in range(M)]
        axes.append([v / v.norm() for v in means])
        w_sim.append(1.0 / (sum(v.norm() for v in means) / M))
        w_shi.append(1.0 / (sum(gs[m, k * S:(k + 1) * S, k].mean() for m in range(M)) / M))
    out = []
    for n in range(test["simclr"].shape[0]):
        total = 0.0
        for k in range(K):
            f = test["simclr"][n, k * S:(k + 1) * S].double().mean(0)
            best = max(float(f @ a) for a in axes[k])
            if ood_score == "simclr":
                total += best
            else:
                total += w_sim[k] * best + w_shi[k] * test["shift"][n, k * S:(k + 1) * S, k].double().mean()
        out.append(float(total) / K)
    return np.array(out)


def feats(n, K, S, d, seed):
    g = torch.Generator().manual_seed(seed)
    return {"simclr": torch.randn(n, K * S, d, generator=g),
            "shift": torch.randn(n, K * S, K, generator=g) + 3.0}


@pytest.mark.parametrize("score", ["CSI", "simclr"])
@pytest.mark.parametrize("K,S", [(4, 1), (4, 3), (2, 5)])
def test_csi_scores_match_loop(score, K, S):
    tr, te = feats(7, K, S, 6, 0), feats(5, K, S, 6, 1)
    got = csi_scores(tr, te, K, score).numpy()
    np.testing.assert_allclose(got, loop_csi(tr, te, K, score), rtol=1e-5, atol=1e-6)


def test_csi_scores_are_pure_and_shift_major():
    tr, te = feats(6, 4, 2, 3, 2), feats(4, 4, 2, 3, 3)
    before = {k: v.clone() for k, v in tr.items()}
    a = csi_scores(tr, te, 4)
    b = csi_scores(tr, te, 4)
    assert torch.equal(a, b)
    assert all(torch.equal(before[k], tr[k]) for k in tr)
    # swapping the two samples of one shift leaves the score unchanged (it averages over s);
    # swapping shifts changes it (the layout is shift-major)
    te2 = {k: v.clone() for k, v in te.items()}
    te2["simclr"][:, [0, 1]] = te["simclr"][:, [1, 0]]
    te2["shift"][:, [0, 1]] = te["shift"][:, [1, 0]]
    assert torch.allclose(csi_scores(tr, te2, 4), a)
    te3 = {k: v.clone() for k, v in te.items()}
    te3["simclr"][:, [0, 2]] = te["simclr"][:, [2, 0]]
    assert not torch.allclose(csi_scores(tr, te3, 4), a)


def test_training_image_scores_its_own_axis():
    # a test image equal to a training image has similarity term w_sim_k*||f|| for each k
    tr = feats(5, 4, 1, 4, 4)
    te = {k: v[:1].clone() for k, v in tr.items()}
    s = csi_scores(tr, te, 4, "simclr").item()
    norms = tr["simclr"][0].norm(dim=1)  # K x 1 samples
    assert s == pytest.approx(norms.mean().item(), rel=1e-5)


def test_auroc_report():
    scores = np.array([0.9, 0.8, 0.7, 0.75, 0.1, 0.85, 0.2])
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    rep = auroc_report(scores, labels, normal_class=0)
    normal = scores[labels == 0]
    y = lambda a: np.r_[np.ones(len(normal)), np.zeros(len(a))]
    assert rep["one_class_1"] == pytest.approx(roc_auc_score(y(scores[labels == 1]), np.r_[normal, scores[labels == 1]]))
    # by hand: class 1 = {0.75, 0.1}: normals beat 0.1 always, beat 0.75 twice of three -> 5/6
    assert rep["one_class_1"] == pytest.approx(5 / 6)
    # class 2 = {0.85, 0.2}: 0.9 beats both, 0.8 and 0.7 beat only 0.2 -> 4/6
    assert rep["one_class_2"] == pytest.approx(4 / 6)
    assert rep["one_class_mean"] == pytest.approx((5 / 6 + 4 / 6) / 2)
    assert rep["pooled"] == pytest.approx(9 / 12)
