"""The compute device of a process, the precision it computes in, and how batches reach it.

Precision (``--amp``) is decided once per process, after its device is set, by the pure
:func:`decide_precision` from what the device computes natively: bf16 where it is native (CUDA
capability 8.0 or more; a CPU with AVX512-BF16 or AMX), else fp16 with loss scaling on an older
GPU (where fp16 is wanted; fp32 otherwise), else fp32. ``'bf16'``, ``'fp16'`` and ``'fp32'``
name the result everywhere (:func:`utils.autocast_for` runs it).
"""
import functools
import os

import torch

from common.errors import UserError

AMP_CHOICES = ("auto", "on", "off")
PRECISIONS = ("bf16", "fp16", "fp32")
# the /proc/cpuinfo flags of CPUs that compute bf16 in hardware
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# the CUDA capability from which bf16 runs on tensor cores (Ampere, A100): older GPUs emulate it
BF16_CUDA_CAPABILITY = (8, 0)
# cuBLAS's workspace setting that makes its GEMMs deterministic (CUDA's documentation, "Results reproducibility")
CUBLAS_WORKSPACE = ":4096:8"


@functools.lru_cache(maxsize=None)
def cpu_flags():
    """This machine's CPU feature flags, from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device_type, capability=None, flags=()):
    """Whether a device computes bf16 in hardware: a GPU of CUDA ``capability`` (major, minor) 8.0
    or more, a CPU whose ``flags`` hold AVX512-BF16 or AMX-BF16. Pure."""
    if device_type == "cuda":
        return capability is not None and tuple(capability) >= BF16_CUDA_CAPABILITY
    if device_type == "cpu":
        return bool(BF16_CPU_FLAGS & set(flags))
    return False


def decide_precision(request, device_type, capability=None, flags=(), fp16=True):
    """What ``--amp request`` computes in on a device: ``'bf16'``, ``'fp16'`` or ``'fp32'``. Pure.

    ``device_type`` ``'cuda'`` or ``'cpu'``; ``capability``: the GPU's CUDA capability
    ``(major, minor)``; ``flags``: the CPU's feature flags; ``fp16``: whether the caller trains
    in fp16 (with loss scaling) where bf16 is not native; the dissolver's training does not.

    ``off``: fp32. ``auto``: bf16 where native; on an older GPU fp16 (fp32 without ``fp16``);
    fp32 on a CPU without bf16. ``on``: as ``auto``, but bf16 on any CPU (emulated, slower), and
    a GPU without native bf16 that may not run fp16 is refused. ``True``/``False`` are on/off.
    """
    if isinstance(request, bool):
        request = "on" if request else "off"
    if request not in AMP_CHOICES:
        raise UserError(f"--amp {request} is not one of {', '.join(AMP_CHOICES)}")
    if request == "off":
        return "fp32"
    if native_bf16(device_type, capability, flags):
        return "bf16"
    if device_type == "cuda":
        if fp16:
            return "fp16"
        if request == "on":
            raise UserError(f"--amp on: this GPU (CUDA capability {_capability_text(capability)}) has no native "
                            f"bf16, and the dissolver trains in bf16 or fp32 only (fp16 would need loss scaling); "
                            f"pass --amp off (or --amp auto, which trains in fp32 here)")
        return "fp32"
    return "bf16" if request == "on" else "fp32"


def _capability_text(capability):
    return "unknown" if capability is None else ".".join(str(c) for c in capability)


def device_facts(device):
    """``(device_type, capability, cpu flags)`` of ``device`` (a set process device)."""
    if device.type == "cuda":
        return "cuda", tuple(torch.cuda.get_device_capability(device)), frozenset()
    return device.type, None, cpu_flags()


def device_precision(request, device, fp16=True):
    """:func:`decide_precision` for this process's ``device``; call it once its device is set."""
    device_type, capability, flags = device_facts(device)
    return decide_precision(request, device_type, capability, flags, fp16=fp16)


PRECISION_TEXT = {"bf16": "bf16 autocast (fp32 weights)",
                  "fp16": "fp16 autocast with dynamic loss scaling (torch.amp.GradScaler; fp32 weights)",
                  "fp32": "fp32"}


def precision_line(request, precision, device_type, capability=None, flags=(), fp16=True):
    """One line saying what a program computes in, and why (``--amp request`` on this device). Pure."""
    what = PRECISION_TEXT[precision]
    if device_type == "cuda":
        where = f"CUDA capability {_capability_text(capability)}"
    else:
        where = "this CPU" + ("" if native_bf16(device_type, capability, flags) else " (no AVX512-BF16/AMX)")
    if request in ("off", False):
        why = "--amp off"
    elif precision == "bf16":
        why = f"--amp {request}: " + ("bf16 is native on " if native_bf16(device_type, capability, flags)
                                      else "bf16 emulated on ") + where
    elif precision == "fp16":
        why = f"--amp {request}: {where} has no native bf16"
    else:
        why = f"--amp {request}: {where} has no native bf16" + ("" if fp16 else " and this training runs no fp16")
    return f"precision: {what} ({why})"


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


def set_process_device(device):
    """Make ``device`` this process's current device and return it with its index (``cuda`` alone
    is the current GPU), so that every later ``'cuda'`` and the precision decision mean it."""
    if device.type != "cuda":
        return device
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    torch.cuda.set_device(device)
    return device


def parallel(model, device, multi_gpu):
    """``model`` itself, or wrapped to split batches over every visible GPU."""
    if not multi_gpu:
        return model
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if n < 2:
        raise UserError(f"--multi_gpu needs at least 2 visible CUDA devices, found {n}; drop the flag")
    return torch.nn.DataParallel(model)


# --------------------------------------------------------------------------- exactness


def make_deterministic(on, environ=None):
    """``--deterministic``: cuDNN's deterministic convolutions (no autotuning), PyTorch's
    deterministic algorithms (an operation without one warns, naming itself) and the cuBLAS
    workspace they need (``CUBLAS_WORKSPACE_CONFIG``, unless set already). Call it before the
    first CUDA work of the process. Nothing happens when ``on`` is false."""
    if not on:
        return
    environ = os.environ if environ is None else environ
    environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------- batches


def images_to_device(raw, device):
    """A batch of images on ``device`` as float in [0, 1]: ``uint8`` images (on the CPU) cross as
    bytes (pinned, asynchronously, on CUDA) and are converted there; float images are moved."""
    if raw.dtype != torch.uint8:
        return raw.to(device, non_blocking=True)
    if device.type == "cuda" and not raw.is_pinned():
        raw = raw.pin_memory()
    return raw.to(device, non_blocking=True).float().div_(255.0)



def dataset_batch(dataset, idx, device):
    """The images (float in [0, 1]) and labels at positions ``idx`` of ``dataset``, on ``device``:
    the images cross as bytes where the dataset keeps them so (``get_uint8``,
    :func:`images_to_device`), else as its float batch (``get_batch``)."""
    get_uint8 = getattr(dataset, "get_uint8", None)
    if get_uint8 is None:
        x, y = dataset.get_batch(idx)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return images_to_device(get_uint8(idx), device), dataset.labels.index_select(0, idx).to(device, non_blocking=True)


def dataset_images(dataset, idx, device):
    """The images of :func:`dataset_batch` alone."""
    get_uint8 = getattr(dataset, "get_uint8", None)
    raw = get_uint8(idx) if get_uint8 is not None else dataset.get_batch(idx)[0]
    return images_to_device(raw, device)
