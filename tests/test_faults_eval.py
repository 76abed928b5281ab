"""Nothing lost, nothing silently wrong: eval.py and train.py refuse bad paths, flags and files
with one line (exit 2) before any work starts, and never overwrite an input."""
import os
import pickle
import subprocess
import sys
import tempfile

import pytest
import torch

import eval as eval_program
import train as train_program
from cli.args import parse_args
from common.checkpoint_io import read_checkpoint
from common.device import pick_device
from common.errors import UserError
from common.paths import check_distinct, check_output_file, check_run_folder, same_path
from helpers import CSI, ROOT, TINY_TRAIN, expect_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model1(tmp_path_factory):
    """A tiny model trained on class 1 (lesion) of synth_lesion: its checkpoint records that."""
    logdir = tmp_path_factory.mktemp("run") / "class1"
    train_program.main(TINY_TRAIN + CSI + ["--logdir", str(logdir), "--epochs", "1", "--no_eval",
                                           "--one_class_idx", "1"])
    return logdir / "last.model"


@pytest.fixture
def model_copy(model1, tmp_path):
    """A private copy of the model in an otherwise empty folder, to see what a command writes there."""
    path = tmp_path / "m" / "last.model"
    path.parent.mkdir()
    path.write_bytes(model1.read_bytes())
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Loading the data means the work began: a check that comes after it fails the test."""
    import datasets

    def started(*args, **kwargs):
        raise AssertionError("the data were loaded before the bad input was refused")

    monkeypatch.setattr(datasets, "get_dataset", started)


@pytest.fixture
def unwritable(tmp_path):
    """A folder nothing can be written into (read-only mode for a user; for root, sysfs)."""
    if os.geteuid() != 0:
        d = tmp_path / "readonly"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    for cand in ("/sys", "/proc"):
        try:
            os.rmdir(tempfile.mkdtemp(dir=cand))
        except OSError:
            break
    else:
        cand = None
    if cand is None:
        pytest.skip("no unwritable folder on this machine")
    yield cand


def listing(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, ds, fs in os.walk(folder) for f in fs + ds)


def eval_args(model, *extra):
    return ["--load_path", str(model), "--one_class_idx", "1", "--ood_batch_size", "500", *extra]


# (3) an output path that is an input -------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--save_scores_csv", "--save_results"])
@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_output_that_is_the_model_is_refused(model_copy, capsys, no_work, flag, spelling):
    folder = model_copy.parent
    out = {"same": str(model_copy), "dotdot": str(folder / ".." / folder.name / "last.model"),
           "symlink": str(folder / "link.csv"), "hardlink": str(folder / "hard.csv")}[spelling]
    if spelling == "symlink":
        os.symlink(model_copy, out)
    if spelling == "hardlink":
        os.link(model_copy, out)
    before, files = model_copy.read_bytes(), listing(folder)
    expect_error(eval_program.main, eval_args(model_copy, flag, out), capsys, flag, "--load_path")
    assert model_copy.read_bytes() == before and listing(folder) == files  # nothing written


def test_two_outputs_naming_one_file_are_refused(model_copy, capsys, no_work):
    folder = model_copy.parent
    expect_error(eval_program.main, eval_args(model_copy, "--save_results", str(folder / "out.txt"),
                                              "--save_scores_csv", f"{folder}/./out.txt"),
                 capsys, "--save_results", "--save_scores_csv")
    # --save_score writes scores_ood_pre.npz next to the model: another output cannot take that name
    expect_error(eval_program.main, eval_args(model_copy, "--save_score", "--save_results",
                                              str(folder / "scores_ood_pre.npz")), capsys, "--save_score")
    assert listing(folder) == ["last.model"]


def test_output_inside_score_folder_is_refused(model_copy, tmp_path, capsys, no_work):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"an input image")
    expect_error(eval_program.main, eval_args(model_copy, "--score_folder", str(images), "--save_scores_csv",
                                              str(images / "a.png")), capsys, "--score_folder")
    assert (images / "a.png").read_bytes() == b"an input image" and listing(images) == ["a.png"]


def test_same_path_compares_real_files(tmp_path):
    a = tmp_path / "a"
    a.write_text("x")
    os.link(a, tmp_path / "b")
    os.symlink(a, tmp_path / "c")
    assert same_path(a, tmp_path / "b") and same_path(a, tmp_path / "c") and same_path(a, tmp_path / "d" / ".." / "a")
    assert not same_path(a, tmp_path / "e")
    check_distinct([("--x", str(tmp_path / "e"))], inputs=[("--in", str(a))])  # distinct: no error
    with pytest.raises(UserError, match="--in"):
        check_distinct([("--x", str(tmp_path / "b"))], inputs=[("--in", str(a))])


# (6) a model evaluated on a class or dataset it was not trained on --------------------------------------

def test_other_normal_class_is_refused(model1, capsys, no_work):
    line = expect_error(eval_program.main, ["--load_path", str(model1), "--one_class_idx", "0"], capsys,
                        "--one_class_idx 1")
    assert "AUROC" not in line and "one_class_idx" in line


def test_other_dataset_is_refused(model1, capsys, no_work):
    expect_error(eval_program.main, ["--load_path", str(model1), "--one_class_idx", "1", "--dataset", "digits"],
                 capsys, "synth_lesion", "--dataset synth_lesion")


# (8) outputs that cannot be written are found before the work ------------------------------------------

@pytest.mark.parametrize("flag", ["--save_results", "--save_scores_csv"])
def test_unwritable_output_is_refused_before_work(model1, unwritable, capsys, no_work, flag):
    out = os.path.join(unwritable, "dia-new", "res.json")
    expect_error(eval_program.main, eval_args(model1, flag, out), capsys, flag, str(unwritable))
    assert not os.path.exists(os.path.dirname(out))


@pytest.mark.parametrize("flag", ["--save_results", "--save_scores_csv"])
def test_output_under_a_file_or_at_a_folder_is_refused(model_copy, tmp_path, capsys, no_work, flag):
    blocker = tmp_path / "plain.txt"
    blocker.write_text("a file, not a folder")
    expect_error(eval_program.main, eval_args(model_copy, flag, str(blocker / "sub" / "res.json")), capsys,
                 flag, "not a folder")
    expect_error(eval_program.main, eval_args(model_copy, flag, str(tmp_path)), capsys, flag, "names a folder")
    # a new folder would be fine, but another output is the model: refused, and the folder is not made
    other = "--save_scores_csv" if flag == "--save_results" else "--save_results"
    expect_error(eval_program.main, eval_args(model_copy, flag, str(tmp_path / "new" / "deep" / "o"),
                                              other, str(model_copy)), capsys, "--load_path")
    assert not (tmp_path / "new").exists() and blocker.read_text() == "a file, not a folder"


def test_save_score_location_is_checked(model_copy, capsys, no_work):
    (model_copy.parent / "scores_ood_pre.npz").mkdir()  # where --save_score writes is a folder
    expect_error(eval_program.main, eval_args(model_copy, "--save_score"), capsys, "--save_score", "names a folder")


@pytest.mark.slow
def test_unwritable_output_cli_one_line_exit_2(model1, unwritable):
    out = os.path.join(unwritable, "dia-new", "res.json")
    proc = subprocess.run([sys.executable, "eval.py", *eval_args(model1, "--save_results", out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""  # no AUROC printed: nothing was evaluated
    assert proc.stderr.startswith("error: --save_results") and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_path_helpers_create_nothing(tmp_path, unwritable):
    target = tmp_path / "a" / "b" / "res.json"
    assert check_output_file(str(target), "--out") == os.path.realpath(target)
    assert check_run_folder(str(tmp_path / "run" / "x")) == os.path.realpath(tmp_path / "run" / "x")
    assert listing(tmp_path) == []  # probes are removed, no folder is made
    for bad in ("", str(tmp_path) + "/"):
        with pytest.raises(UserError):
            check_output_file(bad, "--out")
    with pytest.raises(UserError, match="cannot"):
        check_output_file(os.path.join(unwritable, "x.json"), "--out")
    with pytest.raises(UserError, match="cannot"):
        check_run_folder(os.path.join(unwritable, "run"))
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file"):
        check_run_folder(str(tmp_path / "f"))


@pytest.mark.slow
def test_a_good_run_writes_exactly_its_outputs(model_copy, tmp_path):
    folder = model_copy.parent
    res = eval_program.main(eval_args(model_copy, "--save_results", str(tmp_path / "new" / "res.json"),
                                      "--save_scores_csv", str(folder / "scores.csv"), "--save_score"))
    assert 0.0 <= res["auroc"]["pooled"] <= 1.0
    assert listing(folder) == ["last.model", "scores.csv", "scores_ood_pre.npz"]  # no probe or temporary file left
    assert listing(tmp_path / "new") == ["res.json"]
    import numpy as np

    with np.load(folder / "scores_ood_pre.npz") as npz:
        assert npz["labels"].shape == (1000,) and npz["CSI"].shape == (1000,)


# (10) one line instead of a traceback ------------------------------------------------------------------

def test_cutperm_flag_parses(capsys):
    P = parse_args("eval", ["--load_path", "x.model", "--dataset", "synth_lesion", "--shift_trans_type", "cutperm"])
    assert P.ood_score == ["CSI"] and P.base_shift == "cutperm"  # (was a TypeError)
    P = parse_args("eval", ["--load_path", "x", "--dataset", "synth_lesion", "--mode", "ood"])
    assert P.ood_score == ["baseline"]
    expect_error(eval_program.main, ["--load_path", "x", "--shift_trans_type", "none"], capsys, "rotation")


@pytest.mark.parametrize("program,argv,fragment", [
    ("train", ["--lr_init", "-1"], "--lr_init"),
    ("train", ["--lr_init", "nan"], "--lr_init"),
    ("train", ["--lr_init", "inf"], "--lr_init"),
    ("train", ["--test_batch_size", "0"], "--test_batch_size"),
    ("train", ["--temperature", "0"], "--temperature"),
    ("train", ["--weight_decay", "-1"], "--weight_decay"),
    ("train", ["--sim_lambda", "nan"], "--sim_lambda"),
    ("train", ["--log_every", "0"], "--log_every"),
    ("train", ["--simclr_dim", "0"], "--simclr_dim"),
    ("train", ["--resnet_width", "-8"], "--resnet_width"),
    ("train", ["--num_workers", "-1"], "--num_workers"),
    ("train", ["--img_size", "0"], "--img_size"),
    ("train", ["--seed", "-1", "--contamination_ratio", "0.1"], "--seed"),
    ("train", ["--seed", str(2 ** 70)], "--seed"),
    ("train", ["--device", "tpu"], "cuda:N"),
    ("eval", ["--ood_batch_size", "0"], "--ood_batch_size"),
    ("eval", ["--test_batch_size", "0"], "--test_batch_size"),
    ("eval", ["--resize_factor", "nan"], "--resize_factor"),
    ("eval", ["--threshold_quantile", "nan"], "--threshold_quantile"),
    ("eval", ["--diffusion_offset", "nan"], "--diffusion_offset"),
    ("eval", ["--seed", str(2 ** 70)], "--seed"),
    ("eval", ["--device", "tpu"], "cuda:N"),
])
def test_bad_numbers_and_devices_are_one_line(model1, tmp_path, capsys, no_work, program, argv, fragment):
    if program == "train":
        logdir = tmp_path / "run"
        expect_error(train_program.main, TINY_TRAIN + CSI + ["--logdir", str(logdir), *argv], capsys, fragment)
        assert not logdir.exists()
    else:
        expect_error(eval_program.main, eval_args(model1, *argv), capsys, fragment)


def test_device_names():
    assert pick_device("cpu") == torch.device("cpu") and pick_device("CPU") == torch.device("cpu")
    for bad in ("tpu", "cpu:0", "cuda:x", "cuda:-1", "mps"):
        with pytest.raises(UserError, match="use cpu, cuda or cuda:N"):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cpu"):
            pick_device("cuda:0")
    else:
        with pytest.raises(UserError, match="visible"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_logdir_that_is_a_file_or_unwritable(tmp_path, unwritable, capsys, no_work):
    f = tmp_path / "taken"
    f.write_text("somebody's file")
    expect_error(train_program.main, TINY_TRAIN + CSI + ["--logdir", str(f)], capsys, "--logdir", "is a file")
    expect_error(train_program.main, TINY_TRAIN + CSI + ["--logdir", str(f / "run")], capsys, "--logdir",
                 "not a folder")
    run = os.path.join(unwritable, "dia-run")
    expect_error(train_program.main, TINY_TRAIN + CSI + ["--logdir", run], capsys, "--logdir", "cannot")
    assert f.read_text() == "somebody's file" and not os.path.exists(run)


def write_unreadable(kind, path):
    """Files that are not a model checkpoint, each failing to load in its own way."""
    good = torch.save
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "truncated":
        good({"kind": "dia_model", "model": {"w": torch.ones(1000)}}, path)
        path.write_bytes(path.read_bytes()[:1500])
    elif kind == "pickled_objects":
        good({"kind": "dia_model", "model": {}, "extra": UserError("a Python object")}, path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"kind": "dia_model"}, protocol=4))
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "npz":
        import numpy as np

        with open(path, "wb") as fh:
            np.savez(fh, a=np.ones(3))
    elif kind == "folder":
        path.mkdir()


UNREADABLE = ["empty", "random", "truncated", "pickled_objects", "plain_pickle", "text", "npz", "folder"]


@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_checkpoint_is_one_plain_line(tmp_path, capsys, no_work, kind):
    bad = tmp_path / "bad.model"
    write_unreadable(kind, bad)
    line = expect_error(eval_program.main, ["--load_path", str(bad)], capsys, "cannot read", str(bad))
    for advice in ("weights_only", "torch.load", "safe_globals", "file an issue"):
        assert advice not in line, line
    assert len(line) < 400, line
    with pytest.raises(UserError):  # the reader itself, as train.py will call it
        read_checkpoint(bad, "model checkpoint", "hint")


@pytest.mark.slow
def test_random_bytes_checkpoint_cli(tmp_path):
    bad = tmp_path / "random.model"
    write_unreadable("random", bad)
    proc = subprocess.run([sys.executable, "eval.py", "--load_path", str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: cannot read model checkpoint") and "weights_only" not in proc.stderr


def test_read_checkpoint_reads_a_good_file(model1):
    ckpt = read_checkpoint(model1, "model checkpoint")
    assert ckpt["kind"] == "dia_model" and ckpt["meta"]["one_class_idx"] == 1 and ckpt["meta"]["dataset"] == "synth_lesion"


@pytest.mark.parametrize("obj,fragment", [({"kind": "dia_dissolver", "config": {}}, "--diffusion_model_path"),
                                          ({"step": 1, "model": {}, "opt": {}, "ema": {}}, "--diffusion_model_path"),
                                          ([1, 2], "found a list"), ({"model": {}}, "without 'kind'")])
def test_foreign_checkpoint_says_what_it_is(tmp_path, capsys, no_work, obj, fragment):
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    expect_error(eval_program.main, ["--load_path", str(path)], capsys, "not a model checkpoint", fragment)


@pytest.mark.parametrize("flag", ["--resume_path", "--load_path"])
def test_train_unreadable_checkpoint_is_one_plain_line(tmp_path, capsys, flag):
    bad = tmp_path / "random.model"
    write_unreadable("random", bad)
    line = expect_error(train_program.main, TINY_TRAIN + CSI + ["--logdir", str(tmp_path / "run"), flag, str(bad)],
                        capsys, "cannot read")
    assert "weights_only" not in line
