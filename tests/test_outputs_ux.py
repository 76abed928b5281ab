"""What a researcher sees first and shows afterwards: errors in the right order (the dataset and its files
before the dissolver), a suggestion for a near-miss dataset name, the labelled dissolving grid, TensorBoard
reading the run's event files, and results.md's dissolver section only where a dissolver was used."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import TINY_STUDY, expect_error, md_tables, run_reproduce, tiny_ddpm_config, tiny_diffusion

NEAR_MISS = ("unknown dataset 'image_folder'; did you mean imagefolder?",)
MISSING = "/nonexistent-dia-data"


def programs():
    import eval as eval_program
    import eval_dissolver
    import reproduce
    import train as train_program
    from diffusion_models import train_eval_ddpm

    return {"train": train_program.main, "eval": eval_program.main, "reproduce": reproduce.main,
            "train_eval_ddpm": lambda argv: train_eval_ddpm.main(["--mode", "train", *argv]),
            "eval_dissolver": eval_dissolver.main}


def save_tiny_dissolver(path):
    from diffusion_models.ddpm import save_dissolver

    save_dissolver(str(path), tiny_diffusion(0), tiny_diffusion(1), tiny_ddpm_config(),
                   {"dataset": "synth_lesion", "one_class_idx": 0, "steps": 7})


# --------------------------------------------------------------------------- errors in the right order


@pytest.mark.parametrize("program", ["train", "eval", "reproduce", "train_eval_ddpm", "eval_dissolver"])
def test_a_near_miss_dataset_name_gets_a_suggestion_before_anything_else(program, capsys, tmp_path):
    # every other flag is wrong too (a missing model, dissolver and data): the name is the first error
    argv = ["--dataset", "image_folder", "--data_root", MISSING]
    argv += {"train": ["--shift_trans_type", "diffusion_rotation", "--logdir", str(tmp_path / "run")],
             "eval": ["--load_path", str(tmp_path / "none.model")],
             "reproduce": ["--out", str(tmp_path / "out"), "--diff_resolution", "12"],
             "train_eval_ddpm": ["--unet_dim", "3", "--save_path", str(tmp_path / "d.pt")],
             "eval_dissolver": ["--diffusion_model_path", str(tmp_path / "none.pt")]}[program]
    expect_error(programs()[program], argv, capsys, *NEAR_MISS)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("program", ["train", "reproduce", "train_eval_ddpm", "eval_dissolver"])
def test_a_wrong_data_path_comes_before_the_dissolvers_flags(program, capsys, tmp_path):
    """A missing folder of one's own images and a wrong dissolver setting at once: the data are named."""
    argv = ["--dataset", "imagefolder", "--data_root", MISSING]
    argv += {"train": ["--shift_trans_type", "diffusion_rotation", "--logdir", str(tmp_path / "run")],
             "reproduce": ["--out", str(tmp_path / "out"), "--shift_trans_type", "diffusion_rotation",
                           "--diff_resolution", "12", "--ddpm_unet_dim", "3"],
             "train_eval_ddpm": ["--unet_dim", "3", "--image_size", "12", "--train_steps", "0",
                                 "--save_path", str(tmp_path / "d.pt")],
             "eval_dissolver": ["--diffusion_model_path", str(tmp_path / "none.pt")]}[program]
    line = expect_error(programs()[program], argv, capsys, f"folder {MISSING} does not exist")
    for flag in ("diffusion_model_path", "unet_dim", "image_size", "diff_resolution", "train_steps"):
        assert flag not in line
    if program == "train":  # and a missing --diffusion_model_path file as well
        expect_error(programs()[program], argv + ["--diffusion_model_path", str(tmp_path / "none.pt")], capsys,
                     f"folder {MISSING} does not exist")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("program", ["reproduce", "train_eval_ddpm"])
def test_a_missing_data_file_comes_before_the_dissolvers_flags(program, capsys, tmp_path):
    """Files the loader reads (MedMNIST's .npz) are checked before a wrong dissolver setting is refused."""
    empty = tmp_path / "data"
    empty.mkdir()
    argv = ["--dataset", "pneumoniamnist", "--data_root", str(empty)]
    argv += {"reproduce": ["--out", str(tmp_path / "out"), "--shift_trans_type", "diffusion_rotation",
                           "--ddpm_unet_dim", "3"],
             "train_eval_ddpm": ["--unet_dim", "3", "--save_path", str(tmp_path / "d.pt")]}[program]
    line = expect_error(programs()[program], argv, capsys, f"{empty / 'pneumoniamnist.npz'} not found")
    assert "unet_dim" not in line
    assert os.listdir(tmp_path) == ["data"]


@pytest.mark.slow
def test_a_missing_dissolver_is_named_once_the_data_are_read_with_the_actual_dataset(capsys, tmp_path):
    import train as train_program

    logdir = tmp_path / "run"
    base = ["--dataset", "synth_lesion", "--data_root", str(tmp_path), "--one_class_idx", "0", "--logdir", str(logdir),
            "--shift_trans_type", "diffusion_rotation", "--diff_resolution", "32"]
    hint = (f"python diffusion_models/train_eval_ddpm.py --mode train --dataset synth_lesion --data_root {tmp_path} "
            f"--one_class_idx 0 --image_size 32")
    line = expect_error(train_program.main, base, capsys, "needs a dissolver trained on synth_lesion",
                        "pass --diffusion_model_path CKPT", f"train one with: {hint}")
    assert "<DATASET>" not in line
    missing = tmp_path / "none.pt"
    expect_error(train_program.main, base + ["--diffusion_model_path", str(missing)], capsys,
                 f"--diffusion_model_path {missing}: no such file; train a dissolver on synth_lesion with: {hint} "
                 f"--save_path {missing}")
    assert not logdir.exists()  # nothing written, no run folder left


def test_eval_dissolver_names_the_dataset_to_train_a_missing_dissolver_on(capsys, tmp_path):
    import eval_dissolver

    missing = tmp_path / "none.pt"
    expect_error(eval_dissolver.main, ["--dataset", "synth_lesion", "--diffusion_model_path", str(missing)], capsys,
                 f"--diffusion_model_path {missing}: no such file; train a dissolver on synth_lesion with: python "
                 f"diffusion_models/train_eval_ddpm.py --mode train --dataset synth_lesion")
    line = expect_error(eval_dissolver.main, ["--dataset", "synth_lesion"], capsys,
                        "needs --diffusion_model_path CKPT", "--dataset synth_lesion")
    assert "<DATASET>" not in line


# --------------------------------------------------------------------------- the dissolving grid


def test_the_dissolving_grid_labels_each_timestep_and_the_normal_and_anomalous_columns():
    from evals.plots import dissolving_grid_figure, dissolving_grid_labels

    rows = np.random.default_rng(0).random((3, 5, 8, 8, 3))  # inputs and 2 timesteps, 3 normal + 2 anomalous
    fig = dissolving_grid_figure(rows, [10, 50], 3, 2, title="grid")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["input", "t = 10", "t = 50"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["normal (3)", "anomalous (2)"]
    assert ax.xaxis.get_ticks_position() == "top"  # the column headers stand above the images
    # each header sits over the middle of its columns (tiles of 8 px, 2 px apart)
    assert list(ax.get_xticks()) == pytest.approx([2 + 1.5 * 10 - 1, 2 + 4 * 10 - 1])
    assert ax.get_title() == "grid"
    # a grid without anomalous test images has one header
    assert dissolving_grid_labels([10], 4, 0) == (["input", "t = 10"], [(0, 4, "normal (4)")])
    with pytest.raises(ValueError):
        dissolving_grid_figure(rows, [10], 3, 2)  # 3 rows for 1 timestep


@pytest.mark.slow
def test_eval_dissolver_writes_the_labelled_grid_and_records_its_columns(tmp_path, capsys):
    import eval_dissolver

    ckpt, png = tmp_path / "d.pt", tmp_path / "grid.png"
    save_tiny_dissolver(ckpt)
    eval_dissolver.main(["--dataset", "synth_lesion", "--diffusion_model_path", str(ckpt), "--timesteps_to_show",
                         "10", "50", "--n_show", "4", "--quality_images", "8", "--out", str(png)])
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 4 * 96 and im.size[1] > 3 * 96  # tiles of about 96 px, labels
    report = json.loads((tmp_path / "grid.json").read_text())
    assert report["grid"] == {"n_normal": 2, "n_anomalous": 2, "timesteps": [10, 50]}
    assert "row 0 = 2 normal + 2 anomalous synth_lesion test images" in capsys.readouterr().out


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_reads_the_runs_event_files_also_after_a_resume_pruned_them(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.tb_events import prune_events
    from utils import Logger

    logger = Logger(str(tmp_path))
    for step, loss in enumerate([3.0, 2.5, 2.25, 2.0], 1):
        logger.scalar("train/loss", loss, step)
    logger.scalar("epoch/loss", 2.4375, 1)
    logger.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "epoch/loss"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.5), (3, 2.25), (4, 2.0)]
    # a resume from step 2 drops the later steps from the event files; TensorBoard still reads them
    assert prune_events(str(tmp_path), lambda tag, step: step <= 2) == 2
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.5)]
    assert [(e.step, e.value) for e in acc.Scalars("epoch/loss")] == [(1, 2.4375)]


# --------------------------------------------------------------------------- results.md


def quality_file(folder, name, rows):
    grid = os.path.join(folder, name + "_dissolving.png")
    with open(os.path.splitext(grid)[0] + ".json", "w") as fh:
        json.dump({"n_images": 8, "timesteps": rows}, fh)
    return {"name": name, "grid": grid}


class Used:
    """What the dissolver table reads of a run: the dissolver it used (None: none)."""

    def __init__(self, dissolver):
        self.dissolver = dissolver


def test_the_dissolver_table_shows_the_measures_of_its_data_each_explained(tmp_path):
    from study.dissolvers import dissolver_notes, dissolver_table

    own = quality_file(str(tmp_path), "imagefolder_class0_32px", [
        {"t": t, "hf_removed": 0.1 * i, "lf_change": 0.01 * i} for i, t in enumerate((10, 30, 100, 150))])
    table = dissolver_table([Used(own), Used(None)])
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in table.splitlines() if not ln.startswith("|---")]
    assert rows == [["dissolver", "measure", "t=10", "t=30", "t=100", "t=150", "mean, t in 30..100"],
                    ["imagefolder_class0_32px", "high-frequency energy removed", "0.00", "0.10", "0.20", "0.30",
                     "0.15"],
                    ["imagefolder_class0_32px", "low-frequency change", "0.000", "0.010", "0.020", "0.030", "0.015"]]
    notes = dissolver_notes([Used(own)])
    assert [n.split(":")[0] for n in notes] == ["- high-frequency energy removed", "- low-frequency change"]
    # lesions drawn on and off the same tissue: the lesion measures too, and only for that dissolver
    synth = quality_file(str(tmp_path), "synth_lesion_class0_32px", [
        {"t": 30, "hf_removed": 0.5, "lf_change": 0.02, "removal_ratio": 0.6, "tissue_change": 0.04}])
    table = dissolver_table([Used(own), Used(synth)])
    measures = [(ln.split("|")[1].strip(), ln.split("|")[2].strip()) for ln in table.splitlines()[2:]]
    assert measures == [("imagefolder_class0_32px", "high-frequency energy removed"),
                        ("imagefolder_class0_32px", "low-frequency change"),
                        ("synth_lesion_class0_32px", "lesion removal ratio"),
                        ("synth_lesion_class0_32px", "tissue change"),
                        ("synth_lesion_class0_32px", "high-frequency energy removed"),
                        ("synth_lesion_class0_32px", "low-frequency change")]
    assert len(dissolver_notes([Used(own), Used(synth)])) == 4
    assert dissolver_table([Used(None)]) is None and dissolver_notes([Used(None)]) == []


@pytest.mark.slow
def test_a_study_without_a_dissolver_never_mentions_one(tmp_path):
    out = str(tmp_path / "out")
    rc, stdout, stderr, _ = run_reproduce(TINY_STUDY + ["--shift_trans_type", "rotation", "--no_selection",
                                                        "--out", out], one_thread=True)
    assert rc == 0, stdout + stderr
    text = open(os.path.join(out, "results.md")).read()
    said = "\n".join(ln for ln in text.splitlines() if not ln.startswith("Command: "))  # (the test's own folder name)
    assert "dissolv" not in said.lower() and "GMACs" not in said, text
    assert not os.path.exists(os.path.join(out, "dissolvers"))
    runs = [t for t in md_tables(os.path.join(out, "results.md")) if t[0][0] == "dataset"][0]
    assert runs[0][-2:] == ["eval s", "status"]
    # each step says what it runs and which log to follow, and the training's progress is shown
    run = os.path.join(out, "synth_lesion", "class_0", "rotation_32px", "seed_0")
    for log in ("train.log", "eval.log"):
        assert f": follow {os.path.join(run, log)}" in stdout
    assert [ln for ln in stdout.splitlines() if ln.startswith("  training synth_lesion class 0")
            and " of 2, " in ln], stdout
    assert json.loads(open(os.path.join(run, "progress.json")).read())["state"] == "finished"
