"""Pick the compute device, and whether to compute in bf16, once per process."""
import functools

import torch

from common.errors import UserError

AMP_CHOICES = ("auto", "on", "off")


@functools.lru_cache(maxsize=None)
def cpu_has_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def bf16_supported(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def decide_amp(request, device):
    """``--amp``: ``'on'`` or ``'off'`` as asked; ``'auto'`` is on where ``device`` computes bf16 in
    hardware (CUDA with bf16, a CPU with AVX512-BF16 or AMX). ``True``/``False`` are on/off."""
    if isinstance(request, bool):
        return request
    if request not in AMP_CHOICES:
        raise UserError(f"--amp {request} is not one of {', '.join(AMP_CHOICES)}")
    if request != "auto":
        return request == "on"
    if not isinstance(device, torch.device):
        device = pick_device(device)
    return bf16_supported(device)


def pick_device(requested=None):
    """Return ``torch.device``: ``requested`` if given ('cpu', 'cuda', 'cuda:1'), else CUDA when present."""
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
    if not multi_gpu:
        return model
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if n < 2:
        raise UserError(f"--multi_gpu needs at least 2 visible CUDA devices, found {n}; drop the flag")
    return torch.nn.DataParallel(model)
