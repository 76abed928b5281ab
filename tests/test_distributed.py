"""train.py under torchrun (two CPU processes, gloo, 127.0.0.1): identical weights, the
global-batch loss of one process, rank 0 alone writes, and the launch flags."""
import csv
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import train as train_program
from cli.args import parse_args
from helpers import ROOT
RUN = ["--dataset", "synth_lesion", "--resnet_width", "8", "--batch_size", "4", "--epochs", "1", "--max_steps", "2",
       "--no_eval", "--mode", "simclr_CSI", "--shift_trans_type", "rotation", "--device", "cpu", "--simclr_dim", "16",
       "--log_every", "1", "--scoring_samples", "0"]

# the run, with each rank's parameters written by the test (outside the run folder) after fit
WRAPPER = textwrap.dedent("""
    import sys, torch
    import train
    from common import distributed
    from training import trainer

    out = sys.argv[1]
    fit = trainer.Trainer.fit

    def fit_and_dump(self, *args, **kwargs):
        result = fit(self, *args, **kwargs)
        torch.save({k: v.detach().clone() for k, v in self.model.named_parameters()},
                   f"{out}/params_rank{distributed.rank()}.pt")
        return result

    trainer.Trainer.fit = fit_and_dump
    sys.exit(0 if train.main(sys.argv[2:]) is not None else 1)
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    script, dumps, logdir = base / "run.py", base / "dumps", base / "run"
    script.write_text(WRAPPER)
    dumps.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(dumps), *RUN, "--logdir", str(logdir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return logdir, dumps, proc


@pytest.mark.slow
def test_two_processes_hold_identical_weights(two_process_run):
    _, dumps, _ = two_process_run
    p0, p1 = (torch.load(dumps / f"params_rank{r}.pt") for r in (0, 1))
    assert sorted(p0) == sorted(p1) and len(p0) > 20
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    # and they trained: the checkpoint written by rank 0 is these weights, not the initial ones
    ckpt = torch.load(two_process_run[0] / "last.model", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["meta"]["world_size"] == 2
    for name, value in p0.items():
        assert torch.equal(ckpt["model"][name], value), name


@pytest.mark.slow
def test_rank0_alone_writes(two_process_run):
    logdir, _, proc = two_process_run
    names = sorted(os.listdir(logdir))
    events = [n for n in names if n.startswith("events.out.tfevents")]
    assert len(events) == 1, names  # one TensorBoard writer: rank 0's
    assert [n for n in names if n not in events] == ["config.json", "last.model", "log.txt", "scalars.csv",
                                                      "selection.json"], names
    config = json.loads((logdir / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 4
    log = (logdir / "log.txt").read_text()
    assert log.count("run folder") == 1 and "2 processes (torchrun), global batch 2 x --batch_size 4" in log
    assert log.count("[epoch 1]") == 1
    rows = (logdir / "scalars.csv").read_text().splitlines()
    assert sum(r.startswith("1,train/loss,") for r in rows) == 1  # step 1's loss once, not once per rank
    assert proc.stdout.count('"logdir"') == 1  # one summary line
    assert proc.stderr.count("warning: CSI uses --batch_size 32") == 1  # warned once, not once per rank


@pytest.mark.slow
def test_resume_with_another_process_count_is_one_line(two_process_run, capsys):
    logdir, _, _ = two_process_run
    with pytest.raises(SystemExit) as exc:
        train_program.main(RUN + ["--epochs", "2", "--max_steps", "4", "--resume_path", str(logdir)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "trained by 2 process(es)" in err[-1]
    assert "torchrun --nproc_per_node=2 train.py" in err[-1]


def torchrun(script_and_args, tmp_path, nproc=2, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *map(str, script_and_args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_resumed_distributed_run_repeats_an_uninterrupted_one(tmp_path):
    """Two processes for 2 epochs straight, and the same run stopped after epoch 1 and resumed
    by two processes: the same weights, bit for bit."""
    # 2 steps an epoch: the epoch stops after batch 1 (the paper's rule)
    two_epochs = [a for a in RUN if a not in ("--max_steps", "2")] + ["--max_batches_per_epoch", "1"]
    one_epoch = [*two_epochs, "--epochs", "1"]
    two_epochs = [*two_epochs, "--epochs", "2"]
    torchrun(["train.py", *two_epochs, "--logdir", tmp_path / "straight"], tmp_path)
    torchrun(["train.py", *one_epoch, "--logdir", tmp_path / "parts"], tmp_path)
    first = torch.load(tmp_path / "parts" / "last.model", weights_only=False)
    assert (first["epoch"], first["step"]) == (1, 2)
    torchrun(["train.py", *two_epochs, "--resume_path", tmp_path / "parts"], tmp_path)
    a = torch.load(tmp_path / "straight" / "last.model", weights_only=False)
    b = torch.load(tmp_path / "parts" / "last.model", weights_only=False)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 4)
    assert a["meta"]["world_size"] == b["meta"]["world_size"] == 2
    moved = False
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
        moved |= value.is_floating_point() and not torch.equal(value, first["model"][name])
    assert moved  # the second epoch trained


@pytest.mark.slow
def test_eval_shards_features_over_ranks_and_scores_as_one_process(two_process_run, tmp_path):
    """eval.py under torchrun: each rank extracts its share of the batches; the scores, AUROCs
    and files are those of one process, written once."""
    logdir = two_process_run[0]
    args = ["eval.py", "--mode", "ood_pre", "--dataset", "synth_lesion", "--model", "resnet18", "--resnet_width", "8",
            "--ood_score", "CSI", "--shift_trans_type", "rotation", "--ood_samples", "2", "--resize_factor", "0.54",
            "--resize_fix", "--one_class_idx", "0", "--load_path", logdir / "last.model", "--device", "cpu",
            "--ood_batch_size", "250", "--amp", "off"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *map(str, args), "--save_results", tmp_path / "one.json",
                          "--save_scores_csv", tmp_path / "one.csv"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*args, "--save_results", tmp_path / "two.json", "--save_scores_csv", tmp_path / "two.csv"],
                   tmp_path)
    rows = [list(csv.DictReader(open(tmp_path / f"{n}.csv"))) for n in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 1000
    for r1, r2 in zip(*rows):
        assert r1["name"] == r2["name"] and abs(float(r1["score_CSI"]) - float(r2["score_CSI"])) <= 2e-6
    res = [json.load(open(tmp_path / f"{n}.json")) for n in ("one", "two")]
    assert res[0]["auroc"]["pooled"] == pytest.approx(res[1]["auroc"]["pooled"], abs=1e-6)
    # the AUROC line is printed once (rank 1 is quiet on stdout)
    assert two.stdout.count("[pooled CSI") == 1 and one.stdout.count("[pooled CSI") == 1


@pytest.mark.slow
def test_selection_evaluation_is_sharded_and_scores_as_one_process(tmp_path):
    """train.py's evaluation during training under torchrun: each rank extracts its share of the
    batches, and selection.json records the AUROCs one process computes on the same model."""
    from datasets.registry import get_dataset
    from datasets.split import one_class_split
    from models.resnet import build_model

    run = [a for a in RUN if a != "--no_eval"] + ["--ood_samples", "1", "--eval_max_train", "50",
                                                   "--eval_max_test", "90", "--test_batch_size", "16",
                                                   "--amp", "off"]
    torchrun(["train.py", *run, "--logdir", tmp_path / "run"], tmp_path)
    recorded = json.loads((tmp_path / "run" / "selection.json").read_text())["evaluations"]
    assert len(recorded) == 1 and recorded[0]["epoch"] == 1
    ckpt = torch.load(tmp_path / "run" / "last.model", weights_only=False)
    P = parse_args("train", run)
    train_set, test_set, info = get_dataset(P.dataset, P.data_root, image_size=P.img_size, seed=P.seed)
    normal_train, test_set = one_class_split(train_set, test_set, info, P.one_class_idx, seed=P.seed)
    model = build_model("resnet18", info.n_classes, n_shifts=4, width=8, simclr_dim=16)
    model.load_state_dict(ckpt["model"])
    metrics = train_program.make_evaluate(P, normal_train, test_set, torch.device("cpu"))(model)
    assert metrics["auroc_CSI_pooled"] != 0.5
    for key, value in metrics.items():
        assert recorded[0][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_ddpm_trains_under_torchrun_and_resumes_exactly(tmp_path):
    """The dissolver's training with two processes: rank 0 writes a checkpoint recording the
    world size; 4 steps straight equal 2 steps resumed to 4; one process cannot resume it."""
    ddpm = ["diffusion_models/train_eval_ddpm.py", "--mode", "train", "--dataset", "synth_lesion", "--unet_dim", "8",
            "--batch_size", "4", "--grad_accum", "2", "--save_every", "2", "--no_progress", "--device", "cpu"]
    straight, parts = tmp_path / "straight.pt", tmp_path / "parts.pt"
    proc = torchrun([*ddpm, "--train_steps", "4", "--save_path", straight], tmp_path)
    assert "2 x 8 images (2 processes x 4)" in proc.stdout and proc.stdout.count("saved ") == 2  # rank 0 only
    torchrun([*ddpm, "--train_steps", "2", "--save_path", parts], tmp_path)
    first = torch.load(parts, weights_only=False)
    torchrun([*ddpm, "--train_steps", "4", "--save_path", parts, "--resume"], tmp_path)
    a, b = torch.load(straight, weights_only=False), torch.load(parts, weights_only=False)
    assert a["meta"]["world_size"] == b["meta"]["world_size"] == 2 and a["meta"]["steps"] == b["meta"]["steps"] == 4
    assert a["meta"]["images_seen"] == 4 * 2 * 8
    for key in ("model_state", "ema_state"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert any(not torch.equal(v, first["model_state"][k]) for k, v in b["model_state"].items()
               if v.is_floating_point())
    one = subprocess.run([sys.executable, *map(str, ddpm), "--train_steps", "6", "--save_path", parts, "--resume"],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and one.stderr.strip().splitlines()[-1].startswith("error: --resume:")
    assert "trained by 2 process(es)" in one.stderr and "torchrun --nproc_per_node=2" in one.stderr


# ----- the loss of the global batch, two gloo processes against one ------------------------
B, K, D_IN, D = 3, 2, 6, 5  # images per rank, shifts, input and embedding sizes


def views_of(x, chunks):
    """A fixed view layout as the trainer's: chunk-major, shift-major, images inside."""
    return torch.cat([torch.tanh(x * (1 + 0.3 * c) + 0.2 * k) for c in range(chunks) for k in range(K)])


def make_problem(chunks):
    g = torch.Generator().manual_seed(7 + chunks)
    x = torch.randn(2 * B, D_IN, generator=g)  # the global batch: rank 0's 3 images, then rank 1's
    net = torch.nn.Linear(D_IN, D)
    with torch.no_grad():
        net.weight.copy_(torch.randn(D, D_IN, generator=g))
        net.bias.copy_(torch.randn(D, generator=g))
    return x, net


# the loss's temperature, weight and mode of the dissolved negatives (the paper's)
TEMPERATURE, SIM_LAMBDA, LOSS_MODE = 0.5, 1.0, "shifted_removed"


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from common import distributed
    from training.trainer import contrastive_loss

    with distributed.joined("cpu") as device:
        results = {}
        for chunks in (2, 3):
            x, net = make_problem(chunks)
            ddp = distributed.wrap_model(net, device)
            opt = torch.optim.SGD(net.parameters(), lr=0.5)
            z = F.normalize(ddp(views_of(distributed.shard(x), chunks)), dim=1)
            loss = contrastive_loss(z, chunks, K, B, TEMPERATURE, SIM_LAMBDA, LOSS_MODE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            results[chunks] = {"loss": loss.item(), "weight": net.weight.detach().clone(),
                               "bias": net.bias.detach().clone(),
                               "logged": distributed.mean_all(torch.tensor([float(rank)])).item()}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_gathered_loss_is_one_process_loss_of_the_global_batch(tmp_path):
    from training.contrastive_loss import NT_xent, NT_xent_neg

    torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for chunks in (2, 3):
        x, net = make_problem(chunks)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        z = F.normalize(net(views_of(x, chunks)), dim=1)  # one process, global batch of 6
        sim = z @ z.t()
        loss = NT_xent(sim, 0.5, chunk=2) if chunks == 2 else NT_xent_neg(sim, 0.5, chunk=3)
        opt.zero_grad()
        loss.backward()
        before = net.weight.detach().clone()
        opt.step()
        assert (net.weight - before).abs().max() > 1e-3  # the step moved the weights
        for r in ranks:
            got = r[chunks]
            assert abs(got["loss"] - loss.item()) < 1e-5, (chunks, got["loss"], loss.item())
            assert torch.allclose(got["weight"], net.weight.detach(), atol=1e-5, rtol=0)
            assert torch.allclose(got["bias"], net.bias.detach(), atol=1e-5, rtol=0)
            assert got["logged"] == pytest.approx(0.5)  # mean of ranks 0 and 1
    # a local-only loss (no gathering) would differ: the test can tell
    z = F.normalize(make_problem(2)[1](views_of(make_problem(2)[0][:B], 2)), dim=1)
    assert abs(NT_xent(z @ z.t(), 0.5, chunk=2).item() - ranks[0][2]["loss"]) > 1e-3


# ----- launch flags --------------------------------------------------------------------------
def test_local_rank_flags_parse():
    for flag in ("--local-rank", "--local_rank"):
        P = parse_args("train", RUN + [flag, "1"])
        assert P.local_rank == 1


def test_multi_gpu_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_program.main(RUN + ["--logdir", str(tmp_path / "run"), "--multi_gpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1].startswith("error: --multi_gpu"), err  # (besides the batch-size warning)
    assert "torchrun --nproc_per_node=N train.py" in err[-1]
    assert not (tmp_path / "run").exists()
