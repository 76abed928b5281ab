"""The contrastive losses of CSI (``NT_xent``) and DIA (``NT_xent_neg``).

Both take a square matrix of cosine similarities between views stacked chunk by chunk:
rows ``[0, M)`` are the first views, ``[M, 2M)`` their positives, and for ``NT_xent_neg``
``[2M, 3M)`` the dissolved views, which serve only as extra negatives.
"""
import torch


def _neg_log_softmax(sim_matrix, temperature, mask_out, eps):
    """-log(w_ij / (sum_j' w_ij' + eps) + eps) with w = exp(sim / T) and masked entries zeroed."""
    w = torch.exp(sim_matrix / temperature).masked_fill(mask_out, 0.0)
    return -torch.log(w / (w.sum(dim=1, keepdim=True) + eps) + eps)


def _pair_loss(nll, m, n_rows):
    """Mean of -log p over the positive pairs (i, M+i) and (M+i, i), i < M, divided by n_rows."""
    idx = torch.arange(m, device=nll.device)
    return (nll[idx, idx + m].sum() + nll[idx + m, idx].sum()) / n_rows


def NT_xent(sim_matrix, temperature=0.5, chunk=2, eps=1e-8):
    """SimCLR's loss: view i of chunk 0 and view i of chunk 1 are positives."""
    n = sim_matrix.shape[0]
    m = n // chunk
    eye = torch.eye(n, dtype=torch.bool, device=sim_matrix.device)
    nll = _neg_log_softmax(sim_matrix, temperature, eye, eps)
    return _pair_loss(nll, m, 2 * m)


def shifted_removed_mask(m, device=None):
    """The 3M x 3M mask of NT_xent_neg's default mode: the diagonal, and each view of the
    first two chunks paired with its own dissolved counterpart in the third (both ways)."""
    n = 3 * m
    mask = torch.eye(n, dtype=torch.bool, device=device)
    i = torch.arange(m, device=device)
    for a in (i, i + m):
        mask[a, i + 2 * m] = True
        mask[i + 2 * m, a] = True
    return mask


def NT_xent_neg(sim_matrix, temperature=0.5, chunk=3, eps=1e-8, mode="shifted_removed"):
    """DIA's loss: positives as in NT_xent over the first two chunks; the third chunk (the
    dissolved views) adds negatives. ``mode='naive'`` masks only the diagonal."""
    n = sim_matrix.shape[0]
    m = n // chunk
    if mode == "shifted_removed":
        mask = shifted_removed_mask(m, sim_matrix.device)
    elif mode == "naive":
        mask = torch.eye(n, dtype=torch.bool, device=sim_matrix.device)
    else:
        raise ValueError(f"unknown NT_xent_neg mode {mode!r}; use 'shifted_removed' or 'naive'")
    nll = _neg_log_softmax(sim_matrix, temperature, mask, eps)
    return _pair_loss(nll, m, chunk * m)
