"""The GPU paths of every program run on fake CUDA tensors, on a machine without a GPU.

    python tests/fake_cuda.py [--json REPORT]

PyTorch's ``FakeTensorMode`` (``torch._subclasses.fake_tensor``) gives tensors a device and a
shape but no data; on the default (CUDA) wheel of torch it places them on ``cuda:0`` without a
GPU, and it raises where a real GPU would fail on tensors of two devices in one operation. This
script patches torch globally for that (so tests/test_fake_cuda.py runs it in a subprocess):

* ``torch.autocast('cuda')`` and ``GradScaler('cuda')`` run although no CUDA driver answers
  (``amp_definitely_not_available`` says False);
* a backward pass gives every leaf of the graph a gradient of ones of its own device and dtype
  (the autograd engine wants a real CUDA context): what the optimisers then do runs on fake
  tensors, devices checked;
* pinning memory, the CUDA generators' state and ``Module.to``'s swap of fake parameters (held
  by weak references of the fake mode itself) answer as on a GPU machine.

Then it runs one training step of every mode and shift family (DIA at 32 and 224 px, CSI, the
blurs with and without the resize, K = 1, fp16 with loss scaling, fp32), CSI's feature
extraction and scores, ``--mode ood``'s scores, a dissolver optimiser step (and a resume's
loading), the dissolving measures, and the data path (uint8 batches, pinned, converted on the
device). Every value read back to the host from a fake CUDA tensor (``.item()``, ``.tolist()``,
``bool()``, ``float()``, a copy to the CPU) is a host synchronisation: it is recorded with the
line of this repository that asked for it, and answered with a stand-in value. The report
lists, for each check, whether it ran and the host syncs it made; the exit status is 1 when a
check failed (device mixing or any other error).
"""
import argparse
import collections
import contextlib
import json
import os
import sys
import tempfile
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

CUDA = torch.device("cuda", 0)
HERE = os.path.abspath(__file__)
ATEN = torch.ops.aten
# operations that read a tensor's values on the host
SCALAR_READS = {ATEN._local_scalar_dense.default}
COPIES = {ATEN._to_copy.default, ATEN.copy_.default}


# --------------------------------------------------------------------------- torch, patched for fake CUDA


def _swap_tensors_without_weakref_check(t1, t2):
    """torch.utils.swap_tensors less its refusal of tensors with weak references: the fake mode's
    own memo holds one to every fake tensor, so ``Module.to('cuda')`` could not move a module built
    under it."""
    for a, b in (("__class__", "__class__"), ("__dict__", "__dict__")):
        tmp = getattr(t1, a)
        setattr(t1, a, getattr(t2, b))
        setattr(t2, b, tmp)
    torch._C._swap_tensor_impl(t1, t2)


def _fake_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    """Every leaf reached from ``self``'s graph gets a gradient of ones (accumulated), of its own
    device and dtype, as the autograd engine would give it a gradient of its own device."""
    seen, stack = set(), [self.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:  # an AccumulateGrad node: a leaf that requires a gradient
            g = torch.ones_like(var)
            var.grad = g if var.grad is None else var.grad + g
            continue
        stack.extend(f for f, _ in fn.next_functions)


def _deepcopy(self, memo):
    """A fake tensor's deep copy: a clone on its device (torch's own copies its storage's bytes,
    which a fake tensor does not have); other tensors as torch copies them."""
    if not isinstance(self, FakeTensor):
        return _TENSOR_DEEPCOPY(self, memo)
    if id(self) not in memo:
        with torch.no_grad():
            new = self.detach().clone(memory_format=torch.preserve_format)
        if isinstance(self, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=self.requires_grad)
        else:
            new.requires_grad_(self.requires_grad)
        memo[id(self)] = new
    return memo[id(self)]


_TENSOR_DEEPCOPY = torch.Tensor.__deepcopy__


def _pin_memory(self, device=None):
    return self  # the fake copy to the device reads it as pinned memory would be read


def _on_host(fn):
    """``fn`` run without the fake mode: host work on real tensors (restoring the generators)."""
    def run(*args, **kwargs):
        with _disable_current_modes():
            return fn(*args, **kwargs)
    return run


def patch_torch():
    torch.utils.swap_tensors = _swap_tensors_without_weakref_check
    torch.cuda.amp.common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda including_emulation=True: True  # autocast asks (an A100 or H100)
    torch.Tensor.backward = _fake_backward
    torch.Tensor.pin_memory = _pin_memory
    torch.Tensor.__deepcopy__ = _deepcopy
    torch.cuda.get_rng_state = lambda device="cuda": torch.zeros(16, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda state, device="cuda": None
    torch.cuda.get_rng_state_all = lambda: [torch.zeros(16, dtype=torch.uint8)]
    torch.cuda.set_rng_state_all = lambda states: None
    load = torch.load

    def load_on_host(*args, **kwargs):  # reading a file is host work: no fake tensors from it
        with _disable_current_modes():
            return load(*args, **kwargs)

    torch.load = load_on_host
    import diffusion_models.trainer
    import training.trainer
    for module in (diffusion_models.trainer, training.trainer):  # the generators' state: host work
        module.set_rng_state = _on_host(module.set_rng_state)


# --------------------------------------------------------------------------- host syncs


def _is_cuda(t):
    return isinstance(t, torch.Tensor) and t.device.type == "cuda"


def _is_torch(frame):
    return "/site-packages/torch/" in frame.filename


def call_site():
    """Where a host sync was asked for: the innermost line of this repository (outside this
    script), and the line of another package below it (``via``), as ``path:line (function)``."""
    frames = [f for f in traceback.extract_stack()[:-3] if os.path.abspath(f.filename) != HERE]
    ours = [f for f in frames if f.filename.startswith(ROOT) and "site-packages" not in f.filename]
    below = frames[frames.index(ours[-1]) + 1:] if ours else frames
    packages = [f for f in below if not _is_torch(f) and "site-packages" in f.filename]
    parts = [f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno} ({ours[-1].name})"] if ours else []
    if packages:
        f = packages[-1]
        parts.append(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} ({f.name})")
    return " via ".join(parts) or "torch"


def squeezed(log):
    """The log with runs of one entry written once, with their count (``.tolist()`` of n values
    reads n values at one sync point)."""
    out = []
    for entry in log:
        if out and out[-1][0] == entry:
            out[-1][1] += 1
        else:
            out.append([entry, 1])
    return [e if n == 1 else f"{e} x{n}" for e, n in out]


class HostSyncs(TorchDispatchMode):
    """Answers every read of a fake tensor's values with a stand-in (True, 1 or 1.0), so that the
    work goes on (a fake tensor has no values; reads of CPU tensors are host work, not syncs), and,
    inside :meth:`recording`, records each read of a fake CUDA tensor and each copy of one to the
    CPU: the host syncs."""

    def __init__(self):
        super().__init__()
        self.log = None

    @contextlib.contextmanager
    def recording(self):
        self.log = []
        try:
            yield self.log
        finally:
            self.log = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is ATEN.nonzero.default:
            self._note(args[0], "nonzero (its output's size read on the host)")
            return _all_positions(args[0])
        if func is ATEN.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self._note(args[0], "boolean mask indexing (the output's size read on the host)")
            indices = []
            for i in args[1]:
                indices.extend(_all_positions(i).unbind(1) if i is not None and i.dtype == torch.bool else [i])
            return func(args[0], indices)
        if func in SCALAR_READS:
            if self.log is not None and _is_cuda(args[0]):
                self.log.append(f"{call_site()}: value read on the host (item/bool/float/tolist)")
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        if func in COPIES and self.log is not None:
            src = args[1] if func is ATEN.copy_.default else args[0]
            dst_device = args[0].device if func is ATEN.copy_.default else kwargs.get("device")
            if _is_cuda(src) and dst_device is not None and torch.device(dst_device).type == "cpu":
                self.log.append(f"{call_site()}: copy to the CPU")
        return func(*args, **kwargs)

    def _note(self, t, what):
        if self.log is not None and _is_cuda(t):
            self.log.append(f"{call_site()}: {what}")


def _all_positions(mask):
    """What ``nonzero`` gives for a mask that is true everywhere (the stand-in of a fake mask)."""
    flat = torch.arange(mask.numel(), device=mask.device)
    coords = []
    for size in reversed(mask.shape):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], dim=1) if coords else flat.view(-1, 0)


@contextlib.contextmanager
def fake_cuda():
    """Fake tensors, reads of their values answered (:class:`HostSyncs`, yielded)."""
    with FakeTensorMode(allow_non_fake_inputs=True), HostSyncs() as syncs:
        yield syncs


class HostToDevice(TorchDispatchMode):
    """Records the dtypes of host-to-device copies (the data path must send uint8 images)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is ATEN._to_copy.default and not _is_cuda(args[0]) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cuda":
            self.dtypes.append((str(args[0].dtype), tuple(args[0].shape)))
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- what runs


def images(n, size, seed=0):
    from datasets.base import ArrayStore, ImageDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(ArrayStore(x), torch.zeros(n, dtype=torch.long), [str(i) for i in range(n)])


def tiny_dissolver_file(folder):
    from diffusion_models.ddpm import build_diffusion, ddpm_config, save_dissolver

    torch.manual_seed(0)
    cfg = ddpm_config(image_size=32, unet_dim=8, dim_mults=(1, 2), sampling_timesteps=10)
    d = build_diffusion(cfg)
    path = os.path.join(folder, "dissolver.pt")
    save_dissolver(path, d, d, cfg, {"dataset": "synth_lesion", "one_class_idx": 0, "steps": 0})
    return path, cfg


# (name, train.py flags, image side, precision)
STEPS = [
    ("DIA 32 px (diffusion_rotation)", ["--mode", "simclr_DIA", "--shift_trans_type", "diffusion_rotation"], 32, "bf16"),
    ("DIA 224 px (resnet18_imagenet, diffusion_cutperm)", ["--mode", "simclr_DIA", "--shift_trans_type",
                                                           "diffusion_cutperm", "--model", "resnet18_imagenet"],
     224, "bf16"),
    ("CSI (simclr_CSI rotation)", ["--mode", "simclr_CSI", "--shift_trans_type", "rotation"], 32, "bf16"),
    ("CSI in fp16 with loss scaling (GPUs before capability 8.0)", ["--mode", "simclr_CSI", "--shift_trans_type",
                                                                    "rotation"], 32, "fp16"),
    ("CSI in fp32 (--amp off)", ["--mode", "simclr_CSI", "--shift_trans_type", "rotation"], 32, "fp32"),
    ("blur: Gaussian, resized to --diff_resolution and back", ["--mode", "simclr_DIA", "--shift_trans_type",
                                                               "blurgaussian_rotation", "--resize_to_constant"],
     64, "bf16"),
    ("blur: median, at the image's own size", ["--mode", "simclr_DIA", "--shift_trans_type", "blurmedian_cutperm"],
     32, "bf16"),
    ("K=1 (simclr, no shift)", ["--mode", "simclr", "--shift_trans_type", "none"], 32, "bf16"),
]
TINY = ["--dataset", "synth_lesion", "--simclr_dim", "16", "--batch_size", "2", "--device", "cpu"]


def train_step_check(name, flags, side, precision, dissolver_path, report):
    from cli.args import parse_args
    from common.device import dataset_batch
    from models.dissolve import DissolveSettings, make_dissolve_fn
    from models.resnet import build_model
    from training.config import TrainConfig
    from training.trainer import Trainer

    argv = TINY + flags + ([] if "--model" in flags else ["--resnet_width", "8"])
    if "diffusion" in " ".join(flags):
        argv += ["--diffusion_model_path", dissolver_path]
    P = parse_args("train", argv)
    data = images(4, side)
    native = "small32" if side == 32 else "large224"
    with fake_cuda() as syncs:
        model = build_model(P.model, n_classes=2, simclr_dim=P.simclr_dim, n_shifts=P.K_shift,
                            width=P.resnet_width).to(CUDA)
        dissolve = None
        if P.dissolve_type is not None:
            dissolve = make_dissolve_fn(P.shift_trans_type, DissolveSettings.from_flags(vars(P)), CUDA, native)
        trainer = Trainer(TrainConfig.from_flags(vars(P)), model, CUDA, dissolve=dissolve, precision=precision)
        with HostToDevice() as h2d, syncs.recording() as data_syncs:
            x, y = dataset_batch(data, torch.arange(2), CUDA)  # the training loop's data path
        assert x.device == CUDA and x.dtype == torch.float32, (x.device, x.dtype)
        with syncs.recording() as log:
            trainer.train_step(x, y)
        for p in model.parameters():
            assert p.device == CUDA and (p.grad is None or p.grad.device == CUDA), p.device
    report["checks"][f"training step: {name}"] = {"syncs": log, "data_syncs": data_syncs,
                                                   "host_to_device": h2d.dtypes}


def evaluation_checks(report):
    from evals.ood import simple_scores
    from evals.ood_pre import csi_scores, extract_features
    from models.resnet import build_model

    data = images(3, 32)
    with fake_cuda() as syncs:
        model = build_model("resnet18", n_classes=2, simclr_dim=16, n_shifts=4, width=8).to(CUDA)
        with syncs.recording() as log:
            f_train = extract_features(model, data, "rotation", 2, CUDA, batch_size=2, amp="bf16")
            f_test = extract_features(model, data, "rotation", 2, CUDA, batch_size=2, amp="bf16")
            scores = csi_scores(f_train, f_test, 4, "CSI")
        assert scores.shape == (3,), scores.shape
        report["checks"]["CSI feature extraction and scores"] = {"syncs": log}
        for score in ("baseline", "clean_norm", "similar"):
            with syncs.recording() as log:
                out = simple_scores(model, data, score, CUDA, batch_size=2, amp="bf16")
            assert out.shape == (3,), out.shape
            report["checks"][f"--mode ood score {score}"] = {"syncs": log}


def dissolver_checks(folder, dissolver_path, cfg, report):
    from diffusion_models.ddpm import read_dissolver_checkpoint
    from diffusion_models.trainer import DissolverRecipe, DissolverTrainer, accumulate_and_step, epoch_order
    from evals.dissolve_quality import frequency_report, lesion_report
    from models.dissolve import Dissolver
    from utils import autocast_for

    recipe = DissolverRecipe(batch_size=2, grad_accum=2, ema_every=1)
    pics = torch.rand(5, 3, 32, 32)
    # a checkpoint to resume from, written on the CPU
    cpu_trainer = DissolverTrainer(cfg, recipe, torch.device("cpu"), progress=False)
    accumulate_and_step(cpu_trainer.diffusion, cpu_trainer.optimizer, [pics[:2], pics[2:4]], 1.0)
    resume_path = os.path.join(folder, "resume.pt")
    cpu_trainer.save(resume_path, {"dataset": "synth_lesion", "one_class_idx": 0, "steps": 1})
    ckpt = read_dissolver_checkpoint(resume_path, "cpu")
    with fake_cuda() as syncs:
        trainer = DissolverTrainer(cfg, recipe, CUDA, progress=False, precision="bf16")
        trainer.load_state(ckpt)
        state = list(trainer.optimizer.state.values())
        assert state and all(s["step"].device.type == "cpu" for s in state), "Adam's step counters went to the GPU"
        assert all(s["exp_avg"].device == CUDA and s["exp_avg_sq"].device == CUDA for s in state)
        order = epoch_order(len(pics), recipe.seed, trainer.epoch)
        with syncs.recording() as log:
            micro = []
            for _ in range(recipe.grad_accum):
                xb, order = trainer._micro_batch(pics, order, 3)
                micro.append(xb)
            accumulate_and_step(trainer.diffusion, trainer.optimizer, micro, recipe.grad_clip,
                                autocast=lambda: autocast_for(CUDA, "bf16"))
            trainer.ema.update()
        for p in trainer.diffusion.parameters():
            assert p.device == CUDA
        report["checks"]["dissolver optimiser step (resumed from a checkpoint read to the CPU)"] = {"syncs": log}

        dissolver = Dissolver.from_checkpoint(dissolver_path, device=CUDA, native_kind="small32")
        clean = torch.rand(2, 3, 32, 32).to(CUDA)
        lesioned = torch.rand(2, 3, 32, 32).to(CUDA)
        with syncs.recording() as log, autocast_for(CUDA, "bf16"):
            frequency_report(clean, dissolver(clean, [20]))
            lesion_report(lambda z: dissolver(z, [20]), lesioned, clean)
        report["checks"]["dissolving measures (frequency and lesion reports)"] = {"syncs": log}


def control(report):
    """The harness itself: an operation on a fake CUDA tensor and a CPU tensor must raise, as on a GPU."""
    with fake_cuda():
        try:
            torch.ones(4, device=CUDA) + torch.ones(4)
        except Exception as exc:  # noqa: BLE001 - the error a GPU raises, in FakeTensorMode's words
            report["control"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            return
    raise AssertionError("an operation mixing cuda:0 and the CPU ran: the fake CUDA harness checks nothing")


def run_all():
    report = {"checks": collections.OrderedDict(), "failed": {}}
    with tempfile.TemporaryDirectory() as folder:
        dissolver_path, cfg = tiny_dissolver_file(folder)
        jobs = [(f"training step: {name}", train_step_check, (name, flags, side, precision, dissolver_path, report))
                for name, flags, side, precision in STEPS]
        jobs.insert(0, ("device mixing is caught", control, (report,)))
        jobs += [("evaluation", evaluation_checks, (report,)),
                 ("dissolver", dissolver_checks, (folder, dissolver_path, cfg, report))]
        for label, fn, args in jobs:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - each check's failure is reported, the others run
                tb = traceback.extract_tb(exc.__traceback__)
                ours = [f for f in tb if f.filename.startswith(ROOT) and "/.venv/" not in f.filename]
                at = f" at {os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno}" if ours else ""
                report["failed"][label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{at}"
    for check in report["checks"].values():
        for key in ("syncs", "data_syncs"):
            if key in check:
                check[key] = squeezed(check[key])
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the report here as JSON")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    patch_torch()
    report = run_all()
    for name, check in report["checks"].items():
        print(f"ok   {name}: {len(check['syncs'])} host sync point(s)")
        for s in check["syncs"]:
            print(f"       {s}")
        if "host_to_device" in check:
            print(f"       data path: host syncs {check['data_syncs'] or 'none'}; host-to-device copies "
                  + ", ".join(f"{dtype} {list(shape)}" for dtype, shape in check["host_to_device"]))
    for name, why in report["failed"].items():
        print(f"FAIL {name}: {why}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
