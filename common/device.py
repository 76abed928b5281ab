"""Pick the compute device once per process."""
import torch


def pick_device(requested=None):
    """Return ``torch.device``: ``requested`` if given ('cpu', 'cuda', 'cuda:1'), else CUDA when present."""
    from common.errors import UserError

    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested} asked for CUDA but no CUDA device is visible; use --device cpu")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
