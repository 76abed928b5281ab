"""Pick the compute device once per process."""
import torch


def pick_device(requested=None):
    """Return ``torch.device``: ``requested`` if given ('cpu', 'cuda', 'cuda:1'), else CUDA when present."""
    from common.errors import UserError

    if requested:
        text = str(requested).strip().lower()
        kind, _, index = text.partition(":")
        if kind not in ("cpu", "cuda") or (index and (not index.isdigit() or kind == "cpu")):
            raise UserError(f"--device {requested} is not a device this program runs on: use cpu, cuda or cuda:N "
                            f"(N = a GPU index)")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"--device {requested} asked for CUDA but no CUDA device is visible; use --device cpu")
            n = torch.cuda.device_count()
            if index and int(index) >= n:
                raise UserError(f"--device {requested}: only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})")
        return torch.device(text)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parallel(model, device, multi_gpu):
    """``model`` itself, or wrapped to split batches over every visible GPU."""
    from common.errors import UserError

    if not multi_gpu:
        return model
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if n < 2:
        raise UserError(f"--multi_gpu needs at least 2 visible CUDA devices, found {n}; drop the flag")
    return torch.nn.DataParallel(model)
