"""Progress and estimates of the long loops (common/progress.py, study/watch.py): the measured seconds per
step after the first step, the time to the end, the flags that shorten a run, the progress file, and how
reproduce.py's steps show it (study/steps.py)."""
import io
import json
import os
import re
import sys

import pytest

from common.progress import LoopProgress, format_duration, progress_text, read_progress
from helpers import ROOT, TINY_DDPM, TINY_TRAIN_DIGITS
from study.steps import Steps
from study.watch import ProgressWatch


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def loop(tmp_path, total=100, done=0, **kw):
    clock, lines = Clock(), []
    progress = LoopProgress(total, done, what="training", shorten="--epochs (now 10)",
                            path=str(tmp_path / "progress.json"), report=lines.append, clock=clock, **kw)
    return progress, clock, lines


# --------------------------------------------------------------------------- the writer


def test_the_pace_leaves_out_the_first_step_and_the_line_names_the_flags(tmp_path):
    progress, clock, lines = loop(tmp_path)
    clock.t = 30.0
    progress.step(1)  # the first step: 30 s of warm-up, not measured
    for done in range(2, 6):
        clock.t += 2.0
        progress.step(done)
    assert lines == [] and not (tmp_path / "progress.json").exists()  # 4 steps after the first: not yet
    clock.t += 2.0
    progress.step(6)  # the 5th step after the first: 2 s each
    assert len(lines) == 1
    assert lines[0].startswith("training: 2 s per step (measured over 5 steps after the first); 94 of 100 steps to "
                               "go: about 3 min 08 s to the end (around "), lines[0]
    assert lines[0].endswith("); shorter: --epochs (now 10)")
    doc = read_progress(str(tmp_path / "progress.json"))
    assert {k: doc[k] for k in ("what", "unit", "done", "total", "s_per_step", "eta_s", "state")} == {
        "what": "training", "unit": "step", "done": 6, "total": 100, "s_per_step": 2.0, "eta_s": 188.0,
        "state": "running"}
    # the file is rewritten every 5 s from then on, not at every step
    clock.t += 2.0
    progress.step(7, epoch=1, epochs=10)
    assert read_progress(str(tmp_path / "progress.json"))["done"] == 6
    clock.t += 3.0
    progress.step(8, epoch=1, epochs=10)
    doc = read_progress(str(tmp_path / "progress.json"))
    assert (doc["done"], doc["epoch"], doc["epochs"], doc["s_per_step"]) == (8, 1, 10, 15.0 / 7)
    progress.close()
    doc = read_progress(str(tmp_path / "progress.json"))
    assert doc["state"] == "finished" and doc["done"] == 8
    assert len(lines) == 1  # the estimate is said once
    assert [f for f in os.listdir(tmp_path) if f != "progress.json"] == []  # written atomically: no temporary left


def test_slow_steps_are_estimated_after_ten_seconds_and_pauses_do_not_count(tmp_path):
    progress, clock, lines = loop(tmp_path, total=50, done=20)  # a resumed run: 20 steps behind it
    progress.outside_steps(None, "3 evaluation(s) during training")
    progress.step(21)
    with progress.paused():  # an evaluation between steps
        clock.t += 100.0
    clock.t += 12.0
    progress.step(22)
    assert len(lines) == 1, lines
    assert ("training: 12 s per step (measured over 1 steps after the first); 28 of 50 steps to go: about 5 min 36 s "
            "to the end, plus 3 evaluation(s) during training (not timed yet)") in lines[0]
    progress.outside_steps(60.0, "2 evaluation(s) during training")  # timed now: in the estimate
    assert progress.eta_s == 28 * 12.0 + 60.0
    progress.close(finished=False)
    assert read_progress(str(tmp_path / "progress.json"))["state"] == "stopped"


def test_a_loop_shorter_than_the_estimate_says_nothing_but_writes_its_end(tmp_path):
    progress, clock, lines = loop(tmp_path, total=3)
    for done in (1, 2, 3):
        clock.t += 1.0
        progress.step(done)
    progress.close()
    doc = read_progress(str(tmp_path / "progress.json"))
    assert lines == [] and doc["state"] == "finished" and doc["s_per_step"] == 1.0 and doc["eta_s"] == 0.0


def test_durations_and_progress_lines_read_as_people_read_them():
    assert [format_duration(s) for s in (0, 59.4, 61, 3 * 3600 + 20 * 60, 90 * 86400 + 4 * 3600, None)] == [
        "0 s", "59 s", "1 min 01 s", "3 h 20 min", "90 d 4 h", "unknown"]
    doc = {"what": "training", "unit": "step", "done": 540, "total": 2010, "s_per_step": 0.41, "eta_s": 600.0,
           "state": "running", "updated": 1000.0, "epoch": 3, "epochs": 10}
    assert progress_text(doc) == "epoch 3/10, step 540 of 2,010, 0.41 s/step, about 10 min 00 s left"
    assert progress_text(doc, now=1100.0) == "epoch 3/10, step 540 of 2,010, 0.41 s/step, about 8 min 20 s left"
    assert progress_text(dict(doc, state="finished", done=2010)) == (
        "epoch 3/10, step 2,010 of 2,010, 0.41 s/step, finished")


# --------------------------------------------------------------------------- the reader (reproduce.py's side)


def test_plain_lines_wait_for_the_pace_then_come_at_most_every_interval(tmp_path):
    progress, clock, _ = loop(tmp_path, total=20)
    out, view_clock = io.StringIO(), Clock()
    watch = ProgressWatch("training x", str(tmp_path / "progress.json"), since=0.0, out=out, every=30.0,
                          clock=view_clock)
    assert not watch.bar  # a StringIO is no terminal
    watch.poll()
    assert out.getvalue() == ""  # no file yet
    for done in range(1, 7):
        clock.t += 1.0
        progress.step(done)
    watch.poll()
    assert out.getvalue() == "  training x: step 6 of 20, 1 s/step, about 14 s left\n"
    clock.t += 5.0
    progress.step(7)  # written again: 5 s later
    view_clock.t = 10.0
    watch.poll()
    assert out.getvalue().count("\n") == 1  # within 30 s of the last line: nothing
    clock.t += 5.0
    progress.step(8)
    view_clock.t = 31.0
    watch.poll()
    assert out.getvalue().splitlines()[1].startswith("  training x: step 8 of 20, 2.14 s/step, about ")
    # a file older than the step (an earlier attempt's) is not shown
    stale = ProgressWatch("training x", str(tmp_path / "progress.json"), since=4e9, out=io.StringIO())
    stale.poll()
    assert stale.out.getvalue() == ""


@pytest.mark.slow
def test_the_dissolver_says_its_pace_and_reproduces_steps_show_it(tmp_path, capsys):
    """A real dissolver training through study.steps.Steps, as reproduce.py runs it: the line naming the log,
    the dissolver's own estimate line in that log (the flags that shorten it named), and at least one progress
    line from its progress file."""
    log, progress = str(tmp_path / "d.train.log"), str(tmp_path / "d.progress.json")
    cmd = [sys.executable, os.path.join(ROOT, "diffusion_models", "train_eval_ddpm.py"), "--mode", "train",
           "--dataset", "synth_lesion", "--train_steps", "7", "--save_path", str(tmp_path / "d.pt"),
           "--progress_file", progress, *TINY_DDPM]
    ok, _, reason = Steps(poll_s=0.2, report_every=1.0).run(cmd, log, what="training the dissolver d",
                                                             progress=progress)
    assert ok, reason
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"training the dissolver d: follow {log}"
    shown = [ln for ln in out[1:] if ln.startswith("  training the dissolver d: step ")]
    assert shown and re.fullmatch(r"  training the dissolver d: step \d of 7, [0-9.e-]+ s/step, "
                                  r"(about .* left|finished)", shown[-1]), out
    text = open(log).read()
    estimate = re.search(r"^dissolver training: ([0-9.e-]+) s per step "
                         r"\(measured over ([1-5]) steps after the first\); "
                         r"(\d) of 7 steps to go: about .* to the end \(around .*\); shorter: --train_steps \(now 7; "
                         r"the paper's 156,250\), --batch_size \(now 8\) x --grad_accum \(now 1\), a smaller UNet "
                         r"\(--unet_dim, now 8\) or --image_size \(now 32\)$", text, re.M)
    assert estimate, text
    assert int(estimate.group(2)) + 1 + int(estimate.group(3)) == 7  # the first step, the measured ones, the rest
    doc = read_progress(progress)
    assert (doc["done"], doc["total"], doc["state"], doc["what"]) == (7, 7, "finished", "dissolver training")
    assert doc["s_per_step"] > 0 and doc["eta_s"] == 0.0


@pytest.mark.slow
def test_train_py_estimates_its_end_with_its_evaluations(tmp_path, capsys):
    """train.py: after the first steps, one line with the pace, the steps left, the evaluations during training
    still to come and the flags that shorten the run; the progress file follows the run to its end."""
    import train as train_program

    logdir, progress = tmp_path / "run", tmp_path / "progress.json"
    # 2 epochs of 4 steps (batches 0..3), an evaluation after each epoch
    train_program.main(TINY_TRAIN_DIGITS + ["--one_class_idx", "0", "--epochs", "2", "--max_batches_per_epoch", "3",
                                            "--eval_max_train", "16", "--eval_max_test", "16", "--ood_samples", "1",
                                            *("--mode", "simclr_CSI", "--shift_trans_type", "rotation"),
                                            "--logdir", str(logdir), "--progress_file", str(progress)])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("training: ")]
    assert len(lines) == 1, out
    m = re.fullmatch(r"training: [0-9.e-]+ s per step \(measured over ([1-5]) steps after the first\); (\d) of 8 "
                     r"steps to go: about .* to the end(, plus 2 evaluation\(s\) during training \(not timed yet\)|"
                     r", 1 evaluation\(s\) during training included)? \(around .*\); shorter: --epochs \(now 2\), "
                     r"--max_batches_per_epoch \(now 3\), --max_steps, fewer evaluations during training "
                     r"\(--save_step / --error_step, now every 1 epoch\(s\); --ood_samples, now 1; --eval_max_test; or "
                     r"--no_eval\)", lines[0])
    assert m and m.group(3), lines[0]
    assert int(m.group(1)) + 1 + int(m.group(2)) == 8
    assert lines[0] in (logdir / "log.txt").read_text()  # the run's log keeps it
    doc = json.loads(progress.read_text())
    assert (doc["done"], doc["total"], doc["epoch"], doc["epochs"], doc["state"]) == (8, 8, 2, 2, "finished")
    config = json.loads((logdir / "config.json").read_text())
    assert config["progress_file"] == str(progress)
    # how the run shows its progress is no setting of it: a resume may change it
    train_program.main(TINY_TRAIN_DIGITS + ["--one_class_idx", "0", "--epochs", "3", "--max_batches_per_epoch", "3",
                                            "--eval_max_train", "16", "--eval_max_test", "16", "--ood_samples", "1",
                                            *("--mode", "simclr_CSI", "--shift_trans_type", "rotation"),
                                            "--resume_path", str(logdir), "--no_progress"])
    assert json.loads(progress.read_text())["done"] == 8  # no --progress_file this time: the old file stays


def test_the_log_to_follow_is_named_as_typed_from_the_working_folder(tmp_path):
    from study.steps import shown_path

    assert shown_path(os.path.join(os.getcwd(), "runs", "kvasir", "train.log")) == os.path.join("runs", "kvasir",
                                                                                               "train.log")
    assert shown_path(str(tmp_path / "train.log")) == str(tmp_path / "train.log")  # elsewhere: the whole path
