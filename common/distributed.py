"""Every distributed concern of train.py, in one place (``torchrun``; DDP with NCCL on GPUs, gloo on CPU).

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is the identity:
one process, rank 0, the main process, no collectives. Under ``torchrun --nproc_per_node=N``
:func:`init` joins the process group; then

* :func:`is_main` says whether this process writes the run folder (rank 0 alone does:
  ``utils.atomic_write``, ``utils.Logger`` and the run-folder lock ask it);
* :func:`gather_cat` concatenates a tensor over the ranks with PyTorch's gradient-carrying
  ``torch.distributed.nn.functional.all_gather``, so a loss built from it is the loss of the
  global batch and its gradient reaches every rank's own embeddings;
* :func:`mean_all` averages logged values over the ranks; :func:`barrier` waits for all;
* :func:`my_part` and :func:`all_gather_objects` share evaluation work out and gather it back
  (eval.py's feature extraction).

``--batch_size`` is per process (per GPU, as CSI's): a step sees ``world_size * --batch_size``
images, rank ``r`` taking the ``r``-th contiguous block of ``--batch_size`` images of each
global batch (so the global batch is exactly one process's ``--batch_size world*B`` batch).
"""
import contextlib
import os
import socket
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather
from torch.nn.parallel import DistributedDataParallel as DDP

from common.device import pick_device, set_process_device
from utils import warn

_STATE = {"rank": 0, "world": 1, "local_rank": 0, "on": False}


def env_world_size():
    """The number of processes torchrun started (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank_cuda_index(requested_index, local_rank, n_visible):
    """The visible GPU a torchrun rank takes: ``--device cuda:K`` puts every rank on GPU K;
    ``--device cuda`` (or none) spreads the ranks, local rank r on GPU ``r mod n_visible``. Pure."""
    return int(requested_index) if requested_index is not None else local_rank % n_visible


def choose_backend(device_type, identities):
    """``'nccl'`` when every rank computes on a GPU of its own (``identities``: each rank's
    physical device, e.g. its UUID, in rank order), ``'gloo'`` otherwise (the CPU, or ranks
    sharing a GPU, which NCCL refuses). Pure."""
    if device_type == "cuda" and len(set(identities)) == len(identities):
        return "nccl"
    return "gloo"


def device_identity(device):
    """What names ``device``'s physical GPU across processes and ``CUDA_VISIBLE_DEVICES`` views:
    its UUID (else its machine and PCI address); the CPU is ``'cpu'``."""
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid:
        return str(uuid)
    pci = ":".join(str(getattr(props, k, "?")) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    return f"{socket.gethostname()}/{pci}"


def init(requested_device=None):
    """Join torchrun's process group when there is one; return this process's device, set as
    its current device.

    On CUDA each rank takes the GPU :func:`rank_cuda_index` gives (``--device cuda:K``: GPU K;
    else the GPU of its ``LOCAL_RANK`` among those it sees). The ranks then compare their GPUs'
    identities (:func:`device_identity`, through the rendezvous store): when every rank has a
    GPU of its own (however ``CUDA_VISIBLE_DEVICES`` shows it) they join over NCCL, bound to
    their GPU (``device_id``); ranks sharing GPUs join over gloo (NCCL refuses two ranks on one
    GPU): slower, meant for trying a multi-process run on one GPU (a warning says so). The CPU
    joins over gloo."""
    world = env_world_size()
    if world <= 1:
        return set_process_device(pick_device(requested_device))

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = set_process_device(torch.device("cuda", rank_cuda_index(device.index, local,
                                                                         torch.cuda.device_count())))
    store, rank, world = next(dist.rendezvous("env://"))
    backend, device_id = "gloo", None
    if device.type == "cuda":
        store.set(f"dia/device/{rank}", device_identity(device))
        identities = [store.get(f"dia/device/{r}").decode() for r in range(world)]
        backend = choose_backend("cuda", identities)
        if backend == "nccl":
            device_id = device
        elif local == 0:
            shared = world - len(set(identities))
            warn(f"torchrun's {world} processes share GPUs ({shared} process(es) on a GPU another one uses): "
                 f"they join over gloo (slower than NCCL); give each process a GPU of its own for speed")
    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                                device_id=device_id)
    _STATE.update(rank=rank, world=world, local_rank=local, on=True)
    return device


@contextlib.contextmanager
def joined(requested_device=None):
    """``with joined(P.device) as device:`` :func:`init` on entry, :func:`shutdown` on exit,
    told whether the body completed (an exception skips the final barrier)."""
    device = init(requested_device)
    try:
        yield device
    except BaseException:
        shutdown(completed=False)
        raise
    shutdown(completed=True)


# The final barrier's work, kept until the interpreter ends (see shutdown).
_FINAL_WORK = []


def shutdown(completed=True):
    """Leave the process group (a no-op without one).

    After a completed run every rank first waits at a barrier whose work object this module
    keeps. Why: DDP's reducer keeps the gloo process group alive past
    ``destroy_process_group`` (its worker threads too), and a collective launched during a
    backward pass carries a Python object in its thread-local state. When the last reference
    to such a work is dropped by a gloo worker thread while the interpreter is finalising, the
    thread cannot take the GIL and the process aborts ("terminate called without an active
    exception", SIGABRT) after all its work is done: one two-rank DDP run in ten to one in four
    on our 2-core CPU (scripts/ddp_exit_stress.py --plain_exit). The barrier holds every work still pending
    or in progress, so with it kept here the last reference is this module's, dropped by the
    main thread (gloo's works; NCCL's are only waited for). ``completed=False`` (a rank
    failed) skips the barrier: the other ranks may never reach it."""
    if _STATE["on"]:
        if dist.is_initialized():
            if completed and _STATE["world"] > 1:
                work = dist.barrier(async_op=True)
                work.wait()
                if dist.get_backend() == "gloo":  # (where the abort was seen; NCCL runs, untested here, only wait)
                    _FINAL_WORK.append(work)
            dist.destroy_process_group()
        _STATE.update(rank=0, world=1, local_rank=0, on=False)


def is_distributed():
    return _STATE["on"] and _STATE["world"] > 1


def rank():
    return _STATE["rank"]


def world_size():
    return _STATE["world"]


def is_main():
    """Whether this process writes files (rank 0, or the only process)."""
    return _STATE["rank"] == 0


def barrier():
    if is_distributed():
        dist.barrier()


def gather_cat(t, dim=0):
    """``t`` of every rank concatenated along ``dim`` in rank order, gradient-carrying (the
    backward sums the gradients of all ranks' copies and hands each rank its own slice). GPUs
    shared over gloo gather through host memory (gloo gathers CPU tensors only)."""
    if not is_distributed():
        return t

    hop = t.device.type == "cuda" and _backend() == "gloo"
    with warnings.catch_warnings():  # (deprecated in favour of a private module; still the autograd-aware one)
        warnings.simplefilter("ignore", FutureWarning)
        out = torch.cat(all_gather((t.cpu() if hop else t).contiguous()), dim=dim)
    return out.to(t.device) if hop else out


def mean_all(t):
    """``t`` averaged over the ranks (detached; for logged values)."""
    if not is_distributed():
        return t

    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world_size()


def main_writes(fn, *args, **kwargs):
    """Call ``fn`` (a writer) on the main process only; None elsewhere."""
    return fn(*args, **kwargs) if is_main() else None


def wrap_model(model, device, ignore=(), find_unused=False):
    """The model the training batches go through: ``model`` itself in one process, else
    ``DistributedDataParallel`` (the BatchNorms already made synchronous by
    :func:`sync_batchnorm`); parameters named in ``ignore`` are left out of DDP's averaging."""
    if not is_distributed():
        return model

    if ignore:
        DDP._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused)


def sync_batchnorm(model, device):
    """As CSI converts its model: BatchNorm statistics over the global batch. SyncBatchNorm
    runs on CUDA with NCCL only; on CPU, or GPUs shared over gloo, each process keeps its own
    batch statistics (DDP broadcasts rank 0's running statistics)."""
    if is_distributed() and device.type == "cuda" and _backend() == "nccl":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _backend():
    return dist.get_backend() if dist.is_initialized() else None


def buffers_from_main(module):
    """Give every rank the main process's buffers of ``module`` (BatchNorm running statistics).

    On CPU each rank's BatchNorm keeps statistics of its own part of the batch (DDP broadcasts
    rank 0's at the start of each forward pass, so they differ after the last one); an
    evaluation sharded across the ranks must use the statistics the checkpoint holds: rank 0's.
    Nothing to do in one process."""
    if not is_distributed():
        return

    with torch.no_grad():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def my_part(items):
    """This rank's share of a list: every ``world_size``-th item from its rank (all of it in
    one process)."""
    items = list(items)
    return items[rank()::world_size()] if is_distributed() else items


def all_gather_objects(obj):
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def quiet_unless_main():
    """Under torchrun, the other ranks print nothing on stdout (their errors still reach stderr)."""
    if is_distributed() and not is_main():
        sys.stdout = open(os.devnull, "w")


def pad_for_ranks(idx, n_ranks, fill):
    """``idx`` (a 1-D tensor of image indices, a global batch) padded, as ``DistributedSampler``
    pads, with the first items of ``fill`` (e.g. the pass's order), to a positive multiple of
    ``n_ranks``: every rank's block then holds the same number of images, and never none.
    Unchanged for one process or a batch the ranks divide. Pure."""
    pad = -len(idx) % n_ranks if len(idx) else n_ranks
    if n_ranks == 1 or not pad:
        return idx
    return torch.cat([idx, fill.repeat(-(-pad // len(fill)))[:pad]])


def rank_block(items, n_ranks, r):
    """Rank ``r``'s contiguous block of ``items``, whose length ``n_ranks`` divides (see
    :func:`pad_for_ranks`). Pure."""
    if len(items) % n_ranks:
        raise ValueError(f"{len(items)} items do not split into {n_ranks} equal blocks; pad them first")
    b = len(items) // n_ranks
    return items[r * b:(r + 1) * b]


def shard(items):
    """This rank's contiguous block of a global batch ``items`` that the ranks divide (padded
    by :func:`pad_for_ranks`); all of it in one process."""
    if not is_distributed():
        return items
    return rank_block(items, world_size(), rank())


def pad_global_batch(idx, fill):
    """:func:`pad_for_ranks` for this process group (``idx`` itself in one process)."""
    return pad_for_ranks(idx, world_size(), fill) if is_distributed() else idx
