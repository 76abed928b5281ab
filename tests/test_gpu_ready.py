"""What the first GPU run depends on, checked on the CPU: the precision each device computes in
(and a resume that changes it), the GPUs a study's runs and torchrun's ranks take, no rank
without images, deterministic kernels on request, checkpoints read to the host first, and the
data path (uint8 batches converted on the device)."""
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

import reproduce
import train as train_program
from common import distributed
from common.device import (AMP_CHOICES, cpu_flags, dataset_batch, decide_precision, device_precision, images_to_device,
                           make_deterministic, native_bf16, precision_line)
from common.errors import UserError
from diffusion_models.ddpm import load_dissolver, read_dissolver_checkpoint
from diffusion_models.trainer import DissolverRecipe, DissolverTrainer, accumulate_and_step
from helpers import CSI, ROOT, TINY_TRAIN_NO_EVAL, tiny_ddpm_config
from study.schedule import device_slots, visible_gpus
from utils import autocast_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --------------------------------------------------------------------------- 1. precision

V100, T4, RTX2080, A100, RTX3090, H100 = (7, 0), (7, 5), (7, 5), (8, 0), (8, 6), (9, 0)
SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
COOPER_LAKE = {"avx512f", "avx512_bf16"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
SKYLAKE = {"avx2", "avx512f", "avx512bw"}
HASWELL = {"avx2", "fma"}

PRECISION_TABLE = [
    # (--amp, device, CUDA capability, CPU flags, fp16 wanted) -> precision
    ("auto", "cuda", H100, (), True, "bf16"),
    ("auto", "cuda", A100, (), True, "bf16"),
    ("auto", "cuda", RTX3090, (), True, "bf16"),
    ("auto", "cuda", V100, (), True, "fp16"),  # emulated bf16 (is_bf16_supported() says yes) is not used
    ("auto", "cuda", T4, (), True, "fp16"),
    ("auto", "cuda", RTX2080, (), True, "fp16"),
    ("auto", "cuda", V100, (), False, "fp32"),  # the dissolver's training: no fp16
    ("on", "cuda", T4, (), True, "fp16"),
    ("on", "cuda", H100, (), False, "bf16"),
    ("off", "cuda", H100, (), True, "fp32"),
    ("auto", "cpu", None, SAPPHIRE_RAPIDS, True, "bf16"),
    ("auto", "cpu", None, COOPER_LAKE, True, "bf16"),
    ("auto", "cpu", None, ZEN4, False, "bf16"),
    ("auto", "cpu", None, SKYLAKE, True, "fp32"),
    ("auto", "cpu", None, HASWELL, True, "fp32"),
    ("on", "cpu", None, HASWELL, True, "bf16"),  # asked for: emulated, slower
    ("off", "cpu", None, SAPPHIRE_RAPIDS, True, "fp32"),
    (True, "cpu", None, HASWELL, True, "bf16"),
    (False, "cuda", H100, (), True, "fp32"),
]


@pytest.mark.parametrize("request_, kind, capability, flags, fp16, expected", PRECISION_TABLE)
def test_precision_follows_what_the_device_computes_natively(request_, kind, capability, flags, fp16, expected):
    assert decide_precision(request_, kind, capability, flags, fp16=fp16) == expected


def test_precision_refusals_and_the_line_that_says_which():
    with pytest.raises(UserError, match=r"--amp on: this GPU \(CUDA capability 7.0\) has no native bf16.*--amp off"):
        decide_precision("on", "cuda", V100, fp16=False)
    with pytest.raises(UserError, match="--amp sometimes is not one of auto, on, off"):
        decide_precision("sometimes", "cpu")
    assert native_bf16("cuda", A100) and not native_bf16("cuda", T4) and not native_bf16("cuda", None)
    assert native_bf16("cpu", flags=ZEN4) and not native_bf16("cpu", flags=SKYLAKE)
    line = precision_line("auto", "fp16", "cuda", T4)
    assert line == ("precision: fp16 autocast with dynamic loss scaling (torch.amp.GradScaler; fp32 weights) "
                    "(--amp auto: CUDA capability 7.5 has no native bf16)")
    assert precision_line("auto", "bf16", "cuda", H100).endswith("(--amp auto: bf16 is native on CUDA capability 9.0)")
    assert "and this training runs no fp16" in precision_line("auto", "fp32", "cuda", V100, fp16=False)
    assert precision_line("off", "fp32", "cpu", flags=HASWELL) == "precision: fp32 (--amp off)"
    # this machine: what its own flags say
    here = "bf16" if BF16_HERE else "fp32"
    assert device_precision("auto", torch.device("cpu")) == here and set(AMP_CHOICES) == {"auto", "on", "off"}


BF16_HERE = native_bf16("cpu", flags=cpu_flags())


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), (True, torch.bfloat16)])
def test_autocast_runs_the_decided_dtype(precision, dtype):
    with autocast_for(torch.device("cpu"), precision):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    with autocast_for(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        autocast_for(torch.device("cpu"), "fp8")


def tiny_trainer(precision, flags=()):
    from cli.args import parse_args
    from models.resnet import build_model
    from training.config import TrainConfig
    from training.trainer import Trainer

    P = parse_args("train", ["--dataset", "synth_lesion", "--resnet_width", "8", "--simclr_dim", "16",
                             "--batch_size", "4", *CSI, *flags])
    torch.manual_seed(0)
    model = build_model(P.model, n_classes=2, simclr_dim=P.simclr_dim, n_shifts=P.K_shift, width=P.resnet_width)
    return Trainer(TrainConfig.from_flags(vars(P)), model, torch.device("cpu"), precision=precision)


def test_fp16_scales_the_loss_and_its_scale_resumes():
    trainer = tiny_trainer("fp16")
    assert trainer.scaler is not None and tiny_trainer("bf16").scaler is None
    x, y = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    out = trainer.train_step(x, y)
    assert all(v == v for v in out.values())  # finite losses
    moved = [k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])]
    assert len(moved) > 20  # the scaled, then unscaled gradients stepped the network
    trainer.scaler.update(1024.0)  # a loss scale the run had reached
    trainer.step = 1
    state = trainer.state({"args": {}})
    assert state["grad_scaler"]["scale"] == 1024.0
    assert state["precision"] == [{"epoch": 0, "step": 0, "device": "cpu", "precision": "fp16"}]
    again = tiny_trainer("fp16")
    again.load_state(state)
    assert again.scaler.get_scale() == 1024.0 and again.precision_change() is None
    assert [s["precision"] for s in again.segments] == ["fp16", "fp16"]
    other = tiny_trainer("bf16")  # on a GPU with native bf16 now
    other.load_state(state)
    assert other.precision_change() == ("precision changes on resume: fp16 (on cpu) up to step 1, bf16 (on cpu) "
                                        "from here; each segment is exact, the whole run is not bit-identical to one "
                                        "trained in a single precision")
    # a checkpoint that records --amp as its args did: its precision from that
    old = dict(state, meta={"args": {"amp": True}})
    del old["precision"]
    other = tiny_trainer("fp32")
    other.load_state(old)
    assert other.segments[0] == {"epoch": 0, "step": 0, "device": None, "precision": "bf16"}
    assert other.precision_change().startswith("precision changes on resume: bf16 up to step 1, fp32 (on cpu)")


@pytest.mark.slow
def test_a_resumed_run_may_change_its_precision_with_a_line(tmp_path):
    """A run started in fp32 (a CPU without bf16, or --amp off) and resumed in bf16 (a GPU with
    it; --amp on here): resumed, one line in its log, each segment in its checkpoints."""
    run = str(tmp_path / "run")
    base = TINY_TRAIN_NO_EVAL + CSI + ["--device", "cpu", "--logdir", run]
    train_program.main(base + ["--amp", "off"])
    first = torch.load(os.path.join(run, "last.model"), weights_only=False)
    assert first["precision"] == [{"epoch": 0, "step": 0, "device": "cpu", "precision": "fp32"}]
    train_program.main(base + ["--epochs", "2", "--amp", "on", "--resume_path", run])
    log = open(os.path.join(run, "log.txt")).read()
    assert "precision: fp32 (--amp off)" in log
    assert "precision: bf16 autocast (fp32 weights) (--amp on: bf16 " in log
    assert log.count("precision changes on resume: fp32 (on cpu) up to step 2, bf16 (on cpu) from here") == 1
    second = torch.load(os.path.join(run, "last.model"), weights_only=False)
    assert second["epoch"] == 2 and [(s["step"], s["precision"]) for s in second["precision"]] == [(0, "fp32"),
                                                                                                  (2, "bf16")]
    assert json.load(open(os.path.join(run, "config.json")))["amp"] == "off"  # the run's record stays


# --------------------------------------------------------------------------- 2. devices


def test_devices_map_through_the_parents_visible_gpus():
    assert visible_gpus([0, 1]) == ["0", "1"]
    assert visible_gpus([0, 1], "4,5,6,7") == ["4", "5"] and visible_gpus([3, 2], "4,5,6,7") == ["7", "6"]
    uuids = "GPU-aaaa, GPU-bbbb,GPU-cccc"
    assert visible_gpus([2, 0], uuids) == ["GPU-cccc", "GPU-aaaa"]
    with pytest.raises(UserError, match=r"--devices cuda:2: this process sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=6,7\)"):
        visible_gpus([2], "6,7")
    with pytest.raises(UserError, match=r"sees 0 GPU\(s\)"):
        visible_gpus([0], "")
    devices = [f"cuda:{i}" for i in range(4)]
    assert device_slots(devices, 2, "4,5,6,7") == [("cuda:0,1", "cuda", "4,5"), ("cuda:2,3", "cuda", "6,7")]
    assert device_slots(devices, 2) == [("cuda:0,1", "cuda", "0,1"), ("cuda:2,3", "cuda", "2,3")]
    # one process per run: the step keeps this process's view, --device cuda:K means the same GPU there
    assert device_slots(["cuda:1", "cpu"], 1, "4,5") == [("cuda:1", "cuda:1", None), ("cpu", "cpu", None)]


def test_reproduce_refuses_a_gpu_its_parent_does_not_show(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--dataset", "synth_lesion", "--seeds", "0", "--devices", "cuda:0", "cuda:1",
                        "--nproc_per_run", "2", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--devices cuda:1: this process sees 1 GPU(s) (CUDA_VISIBLE_DEVICES=3)" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, identities, backend", [
    ("cuda", ["GPU-a", "GPU-b"], "nccl"),  # each rank its own GPU, however CUDA_VISIBLE_DEVICES shows it
    ("cuda", ["GPU-a", "GPU-a"], "gloo"),  # two ranks on one GPU (each sees one GPU, the same one)
    ("cuda", ["GPU-a", "GPU-b", "GPU-a", "GPU-c"], "gloo"),
    ("cuda", ["GPU-a"], "nccl"),
    ("cpu", ["cpu", "cpu"], "gloo"),
])
def test_ranks_use_nccl_exactly_when_each_has_its_own_gpu(kind, identities, backend):
    assert distributed.choose_backend(kind, identities) == backend


def test_each_rank_takes_its_gpu_or_the_one_asked_for():
    assert [distributed.rank_cuda_index(None, r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert [distributed.rank_cuda_index(None, r, 1) for r in range(2)] == [0, 0]  # a launcher's one GPU per rank
    assert [distributed.rank_cuda_index(3, r, 4) for r in range(2)] == [3, 3]  # --device cuda:3


def test_the_dissolvers_script_accepts_the_launchers_local_rank():
    from diffusion_models import train_eval_ddpm as script

    for argv in (["--local-rank=1"], ["--local_rank", "1"]):
        assert script.parse_args(["--mode", "train", "--dataset", "synth_lesion", *argv]).local_rank == 1
    assert script.parse_args(["--mode", "train", "--dataset", "synth_lesion"]).local_rank == 0


@pytest.mark.parametrize("n, world, blocks", [
    (1, 2, [[10], [11]]),  # fewer images than ranks: padded from the pass's first images, never empty
    (5, 2, [[10, 11, 12], [13, 14, 11]]),
    (4, 2, [[10, 11], [12, 13]]),
    (1, 3, [[10], [11], [12]]),
    (3, 1, [[10, 11, 12]]),
    (0, 2, [[11], [12]]),
])
def test_no_rank_gets_an_empty_block(n, world, blocks):
    order = torch.tensor([11, 12, 13, 14, 10])  # the pass's order
    idx = torch.arange(10, 10 + n)
    padded = distributed.pad_for_ranks(idx, world, order)
    got = [distributed.rank_block(padded, world, r).tolist() for r in range(world)]
    assert got == blocks
    with pytest.raises(ValueError, match="pad them first"):
        distributed.rank_block(torch.arange(3), 2, 0)


def _ddpm_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.joined("cpu") as device:
        recipe = DissolverRecipe(batch_size=2, grad_accum=1, ema_every=1)
        trainer = DissolverTrainer(tiny_ddpm_config(), recipe, device, progress=False)
        images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        # 5 images, micro-batches of 2 x 2: the pass's second micro-batch holds 1 image for 2 ranks
        trainer.fit(images, {"dataset": "synth_lesion", "one_class_idx": 0}, os.path.join(out, "d.pt"), 3, 3)
        torch.save({k: v.detach().clone() for k, v in trainer.diffusion.state_dict().items()},
                   os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_ranks_train_the_dissolver_through_a_micro_batch_of_one_image(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddpm_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ckpt = read_dissolver_checkpoint(tmp_path / "d.pt")
    assert ckpt["train_state"]["step"] == 3 and ckpt["train_state"]["epoch"] == 1  # through the short micro-batch
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, value in a.items():
        assert torch.isfinite(value.float()).all() and torch.equal(value, b[name]), name


# --------------------------------------------------------------------------- 3. exactness


@pytest.mark.slow
def test_deterministic_sets_cudnn_torch_and_cublas_in_a_fresh_process():
    code = ("import os, torch; from common.device import make_deterministic; make_deterministic(True); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),"
            " torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, os.environ['CUBLAS_WORKSPACE_CONFIG'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"} | {"PYTHONPATH": ROOT})
    assert out.stdout.split() == ["True", "True", "True", "False", ":4096:8"], out.stderr[-2000:]
    environ = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    before = torch.are_deterministic_algorithms_enabled()
    make_deterministic(False, environ)  # off: nothing changes
    assert torch.are_deterministic_algorithms_enabled() == before and environ == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}


def test_deterministic_is_a_flag_of_each_training_program_and_may_change_on_resume():
    from cli.args import RESUME_MAY_CHANGE, parse_args
    from diffusion_models import train_eval_ddpm as script

    assert parse_args("train", [*CSI, "--deterministic"]).deterministic and not parse_args("train", CSI).deterministic
    assert script.parse_args(["--mode", "train", "--dataset", "synth_lesion", "--deterministic"]).deterministic
    assert {"amp", "deterministic", "device"} <= set(RESUME_MAY_CHANGE)


# --------------------------------------------------------------------------- 4. loading and the data path


def test_the_dissolvers_files_are_read_to_the_host_and_only_the_used_weights_move(tmp_path, capsys):
    """``meta`` stands for a device other than the CPU: a file read straight onto it could not be
    checked for NaN, and Adam's step counters would leave the host."""
    from diffusion_models import train_eval_ddpm as script

    recipe = DissolverRecipe(batch_size=2, grad_accum=1)
    trainer = DissolverTrainer(tiny_ddpm_config(), recipe, torch.device("cpu"), progress=False)
    accumulate_and_step(trainer.diffusion, trainer.optimizer, [torch.rand(2, 3, 32, 32)], 1.0)
    path = tmp_path / "d.pt"
    trainer.save(path, {"dataset": "synth_lesion", "one_class_idx": 0, "steps": 1})
    meta = torch.device("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading into meta parameters copies nothing, and says so
        diffusion, info = load_dissolver(path, meta)
        assert all(p.device == meta for p in diffusion.parameters()) and info["weights"] == "online"
        args = script.parse_args(["--mode", "train", "--dataset", "synth_lesion", "--save_path", str(path),
                                  "--resume", "--unet_dim", "8", "--dim_mults", "1", "2", "--batch_size", "2",
                                  "--grad_accum", "1", "--sampling_timesteps", "10"])
        plan = script.Plan(32, tiny_ddpm_config(), recipe, 0, str(path), "fp32")
        ckpt = script.checkpoint_to_resume(args, plan, meta)
        tensors = [t for part in ("model_state", "ema_state") for t in ckpt[part].values()]
        assert tensors and all(t.device.type == "cpu" for t in tensors)
        resumed = DissolverTrainer(tiny_ddpm_config(), recipe, meta, progress=False)
        resumed.load_state(ckpt)
    state = list(resumed.optimizer.state.values())
    assert state and all(s["step"].device.type == "cpu" and s["exp_avg"].device == meta for s in state)


def test_uint8_batches_become_the_same_floats_on_the_device():
    from datasets.base import ArrayStore, ImageDataset

    raw = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = ImageDataset(ArrayStore(raw), torch.arange(6) % 2, [str(i) for i in range(6)])
    idx = torch.tensor([4, 1, 3])
    x, y = dataset_batch(data, idx, torch.device("cpu"))
    ref_x, ref_y = data.get_batch(idx)
    assert x.dtype == torch.float32 and torch.equal(x, ref_x) and torch.equal(y, ref_y)
    assert torch.equal(images_to_device(raw[:2], torch.device("cpu")), raw[:2].float() / 255)

    class FloatOnly:  # a dataset that keeps float images (e.g. the interpolated out-of-distribution set)
        def get_batch(self, idx):
            return ref_x[: len(idx)] * 0.5, ref_y[: len(idx)]

    x, y = dataset_batch(FloatOnly(), idx, torch.device("cpu"))
    assert torch.equal(x, ref_x * 0.5) and torch.equal(y, ref_y)


def test_num_workers_is_refused_in_one_line(capsys):
    from helpers import expect_error

    expect_error(train_program.main, ["--num_workers", "4", *CSI], capsys,
                 "--num_workers is not a flag of train.py", "drop the flag")
