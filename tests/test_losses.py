"""The contrastive losses against a plain loop implementation and hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from training.contrastive_loss import NT_xent, NT_xent_neg


def loop_loss(sim, temperature, chunk, masked_pairs, eps=1e-8):
    """Straight from the definition: l(i,j) = -log(w_ij / (sum_j' w_ij' + eps) + eps)."""
    n = len(sim)
    m = n // chunk
    w = [[0.0 if (i == j or (i, j) in masked_pairs) else math.exp(sim[i][j] / temperature) for j in range(n)]
         for i in range(n)]

    def l(i, j):
        return -math.log(w[i][j] / (sum(w[i]) + eps) + eps)

    return sum(l(i, m + i) + l(m + i, i) for i in range(m)) / (chunk * m)


def random_sim(n, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return z @ z.t()


def removed_pairs(m):
    pairs = set()
    for i in range(m):
        for a in (i, m + i):
            pairs.add((a, 2 * m + i))
            pairs.add((2 * m + i, a))
    return pairs


@pytest.mark.parametrize("m", [1, 3, 8])
def test_nt_xent_matches_loop(m):
    sim = random_sim(2 * m, seed=m)
    got = NT_xent(sim, temperature=0.5, chunk=2).item()
    assert got == pytest.approx(loop_loss(sim.tolist(), 0.5, 2, set()), rel=1e-10)


def test_nt_xent_by_hand_two_views():
    # two views with cosine 0.6: w = exp(1.2) on the off-diagonal only, so each row's
    # probability of its positive is 1 and the loss is -log(1/(1+1e-8) + 1e-8) ~ 0
    sim = torch.tensor([[1.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    assert NT_xent(sim).item() == pytest.approx(-math.log(1 / (1 + 1e-8 / math.exp(1.2)) + 1e-8), abs=1e-12)
    # three-way by hand: views a, a', b with sim(a,a')=s, others t; chunk=2 needs an even count,
    # so check a 4x4 case with two pairs computed by hand
    s, t, T = 0.8, 0.1, 0.5
    sim = torch.tensor([[1, t, s, t], [t, 1, t, s], [s, t, 1, t], [t, s, t, 1]], dtype=torch.float64)
    p = math.exp(s / T) / (math.exp(s / T) + 2 * math.exp(t / T))
    assert NT_xent(sim, temperature=T).item() == pytest.approx(-math.log(p), rel=1e-7)


@pytest.mark.parametrize("mode", ["shifted_removed", "naive"])
@pytest.mark.parametrize("m", [1, 4, 6])
def test_nt_xent_neg_matches_loop(mode, m):
    sim = random_sim(3 * m, seed=10 + m)
    pairs = removed_pairs(m) if mode == "shifted_removed" else set()
    got = NT_xent_neg(sim, temperature=0.5, chunk=3, mode=mode).item()
    assert got == pytest.approx(loop_loss(sim.tolist(), 0.5, 3, pairs), rel=1e-10)


def test_masked_pairs_change_the_loss():
    # a view set where each dissolved view is very close to its own source: masking those
    # pairs removes large negatives, so shifted_removed must be clearly lower than naive
    m = 4
    g = torch.Generator().manual_seed(3)
    base = torch.randn(m, 8, generator=g, dtype=torch.float64)
    v1 = base + 0.1 * torch.randn(m, 8, generator=g, dtype=torch.float64)
    v2 = base + 0.1 * torch.randn(m, 8, generator=g, dtype=torch.float64)
    v3 = base + 0.05 * torch.randn(m, 8, generator=g, dtype=torch.float64)
    z = F.normalize(torch.cat([v1, v2, v3]), dim=1)
    sim = z @ z.t()
    removed = NT_xent_neg(sim, mode="shifted_removed").item()
    naive = NT_xent_neg(sim, mode="naive").item()
    assert naive - removed > 0.1
    # and the dissolved chunk adds negatives: without it (NT_xent on the first 2M rows,
    # rescaled to the same denominator) the loss is lower still
    plain = NT_xent(sim[: 2 * m, : 2 * m]).item() * 2 / 3
    assert plain < removed


def test_gradients_flow_only_through_similarities():
    sim = random_sim(6, seed=1).requires_grad_(True)
    NT_xent_neg(sim).backward()
    assert torch.isfinite(sim.grad).all()
    assert sim.grad.diagonal().abs().max().item() == 0.0
