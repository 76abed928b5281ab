"""One run: its train.py and eval.py commands, and training, evaluating and drawing it (or reusing it)."""
import json
import os
import threading
import time

from common.errors import UserError
from study.dissolvers import read_quality, removal_ratio
from study.figures import draw_run_figures
from study.plan import recorded_config
from study.rerun import change_kind, config_diffs, is_finished, training_state
from study.steps import Interrupted, class_flags, py, step_env
from training.records import read_selection
from utils import atomic_write_json

FIGURES = ("roc.png", "score_hist.png", "loss_curves.png", "selection.png")
BEST_FILE = "best_CSI.model"  # train.py's selection: the highest test AUROC during training
BEST_LABEL = "best on test (paper's selection)"
BEST_EVAL_FILES = ("results_best.json", "scores_best.csv", "eval_best.log")


def train_command(a, run, dissolver_ckpt):
    mode = "simclr_DIA" if run.dissolve_type else "simclr_CSI"
    cmd = py("train.py", "--dataset", run.dataset, "--data_root", a.data_root,
             *class_flags(run.cls, multi_class_flags(a)),
             "--model", run.model, "--mode", mode, "--shift_trans_type", run.transformation, "--seed", run.seed,
             "--logdir", run.dir, "--save_step", a.save_step, "--progress_file", run.path("progress.json"))
    if a.selection:
        cmd += ["--ood_samples", str(a.selection_samples)]
        if a.selection_max_images:
            cmd += ["--eval_max_train", str(a.selection_max_images), "--eval_max_test", str(a.selection_max_images)]
    else:
        cmd.append("--no_eval")
    cmd += ["--scoring_samples", str(a.ood_samples)]  # last.scoring.pt with the study's eval protocol
    for flag in ("epochs", "batch_size", "max_batches_per_epoch", "max_steps", "warmup", "resnet_width",
                 "log_every"):
        v = getattr(a, flag)
        if v is not None:
            cmd += [f"--{flag}", str(v)]
    if run.dissolve_type:
        cmd += ["--diff_resolution", str(run.resolution)]
        if a.resize_to_constant:
            cmd.append("--resize_to_constant")
    if dissolver_ckpt:
        cmd += ["--diffusion_model_path", dissolver_ckpt]
    if run.img_size is not None:
        cmd += ["--img_size", str(run.img_size)]
    cmd += ["--amp", a.amp]
    if a.device:
        cmd += ["--device", a.device]
    cmd += list(a.train_args)
    n = getattr(a, "nproc_per_run", 1)
    if n > 1:  # DDP under torchrun (rank 0 writes the run folder); cmd[0] is this python
        # (a SLURM job over several nodes gives its own torchrun flags and an srun before python: study.slurm)
        cmd[1:1] = getattr(a, "torchrun", None) or ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                    str(n)]
    return list(getattr(a, "launch_prefix", None) or []) + cmd


def eval_command(a, run, model="last.model", results="results.json", scores="scores.csv"):
    cmd = py("eval.py", "--mode", "ood_pre", "--dataset", run.dataset, "--data_root", a.data_root,
             "--model", run.model, "--ood_score", "CSI", "--shift_trans_type", "rotation",
             "--ood_samples", a.ood_samples, "--resize_factor", 0.54, "--resize_fix",
             *class_flags(run.cls, multi_class_flags(a)), "--seed", run.seed, "--load_path", run.path(model),
             "--save_results", run.path(results), "--save_scores_csv", run.path(scores))
    if a.resnet_width is not None:
        cmd += ["--resnet_width", str(a.resnet_width)]
    if run.img_size is not None:  # the data as train.py read it
        cmd += ["--img_size", str(run.img_size)]
    if a.aptos_all_grades:
        cmd.append("--aptos_all_grades")
    cmd += ["--amp", a.amp]
    if a.device:
        cmd += ["--device", a.device]
    return cmd


def multi_class_flags(a):
    """train.py's and eval.py's flags for the multi-class setting."""
    return ["--one_class_idx", "None"] + (["--ood_dataset", *a.ood_dataset] if a.ood_dataset else [])


def needs_dissolver(run):
    """Whether the run still needs its dissolver (to train, or to draw its grid)."""
    return run.dissolver is not None and not (is_finished(run) and os.path.exists(run.path("dissolving.png")))


def read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def execute(a, run, dissolvers, steps):
    """Train, evaluate and draw one run (or reuse it when finished), its steps by ``steps`` (a
    :class:`study.steps.Steps`); fills ``run``'s fields."""
    finished = is_finished(run)  # evaluated with these settings, nothing failed since
    results = read_json(run.path("results.json")) if finished else None
    dissolver = None
    if run.dissolver is not None:  # a finished run only reads the dissolver's record
        dissolver = dissolvers.get(run.dissolver) if needs_dissolver(run) else (read_json(run.dissolver["done"]) or {})
        run.gmacs = dissolver.get("gmacs")
        run.removal = removal_ratio({"quality": read_quality(run.dissolver)})
    if finished:
        run.reused = True
    else:
        os.makedirs(run.dir, exist_ok=True)
        # what an evaluation derives is made again (logs are appended to, never removed)
        for name in ("failed.json", "dissolving.png") + FIGURES + BEST_EVAL_FILES[:2]:
            if os.path.exists(run.path(name)):
                os.remove(run.path(name))
        if dissolver is not None and not dissolver["ok"]:
            return fail(run, "dissolver", dissolver["reason"], log=dissolver["log"])
        ckpt = run.dissolver["ckpt"] if run.dissolver else None
        train_cmd, eval_cmd = train_command(a, run, ckpt), eval_command(a, run)
        old = recorded_config(run)
        # make_plan let through only changes a new evaluation or a resume gives (study.rerun)
        kind = change_kind(config_diffs(old, run.config)) if old is not None else None
        atomic_write_json({"config": run.config, "train_command": train_cmd, "eval_command": eval_cmd,
                           "eval_best_command": eval_command(a, run, BEST_FILE, *BEST_EVAL_FILES[:2]),
                           "data_fingerprint": getattr(run, "data_fingerprint", None)},
                          run.path("run.json"))
        done = read_json(run.path("train_done.json"))
        if done is None or not os.path.exists(run.path("last.model")) or kind in ("resume", "train"):
            try:
                state = training_state(a, run)
            except UserError as exc:
                return fail(run, "train", f"{exc}; the run's files are kept")
            if state == "beyond":
                return fail(run, "train", f"last.model has trained past this budget (--epochs {a.epochs}, "
                                          f"--max_steps {a.max_steps}); it is kept: pass the budget it was trained "
                                          f"with, or use another --out")
            if state == "finished":  # train.py ended, the record of it did not get written
                seconds = None
            else:
                cmd = train_cmd + (["--resume_path", run.dir] if state == "resume" else [])
                # the seconds of earlier, interrupted attempts this one continues
                earlier = float((read_json(run.path("train_attempts.json")) or {}).get("seconds") or 0.0)
                t0 = time.time()
                try:
                    ok, seconds, reason = steps.run(cmd, run.path("train.log"), what=f"training {run.label}",
                                                    append=state == "resume", env=step_env(a),
                                                    progress=run.path("progress.json"))
                except Interrupted:
                    atomic_write_json({"seconds": round(earlier + time.time() - t0, 2)},
                                      run.path("train_attempts.json"))
                    raise
                if not ok:
                    return fail(run, "train", reason, seconds=seconds)
                seconds += earlier
            atomic_write_json({"seconds": None if seconds is None else round(seconds, 2),
                               "resumed": state is not None}, run.path("train_done.json"))
        best, reason = evaluate_best(a, run, steps)  # before last.model's: results.json marks a finished run
        if reason:
            return fail(run, "eval", reason, log=run.path("eval_best.log"))
        ok, seconds, reason = steps.run(eval_cmd, run.path("eval.log"), what=f"evaluating {run.label}",
                                        env=step_env(a))
        if not ok:
            return fail(run, "eval", reason)
        results = read_json(run.path("results.json"))
        if results is None:
            return fail(run, "eval", "eval.py finished without writing results.json")
        results["eval_seconds"] = round(seconds, 2)
        if best is not None:
            if best["same_as_last"]:
                best["auroc"] = results["auroc"]
            results["best"] = best
        atomic_write_json(results, run.path("results.json"))
    run.results = results
    run.best = results.get("best")
    run.status = "ok"
    run.train_seconds = (read_json(run.path("train_done.json")) or {}).get("seconds")
    run.eval_seconds = results.get("eval_seconds")
    with _PLOT_LOCK:  # matplotlib, one figure at a time (--devices runs several runs in threads)
        draw_run_figures(run, dissolver)
    return run


_PLOT_LOCK = threading.Lock()


def evaluate_best(a, run, steps):
    """Evaluate ``best_CSI.model`` as ``last.model`` is evaluated (a step of ``steps``); returns
    ``(best, error)``.

    ``best`` (None when train.py kept no such file: ``--no_selection``, or no evaluation epoch
    was reached) holds the epoch, what selected it (train.py's test AUROC and its protocol) and
    eval.py's AUROCs; a best epoch equal to last.model's is the same weights, not evaluated twice.
    """
    if not a.selection:
        return None, ""
    try:  # checked against the checkpoint files; rebuilt from them when damaged or disagreeing
        selection, note = read_selection(run.dir)
    except UserError as exc:
        return None, f"selection.json: {exc}"
    if note:
        run.notes.append(note)
    selection = selection or {}
    info = selection.get(BEST_FILE)
    if info is None or not os.path.exists(run.path(BEST_FILE)):
        return None, ""
    last_epoch = (selection.get("last.model") or {}).get("epoch")
    best = {"file": BEST_FILE, "label": BEST_LABEL, "rule": info["rule"], "epoch": info["epoch"],
            "last_epoch": last_epoch, "selected_on": {"metric": info["metric"], "value": info["value"],
                                                      "protocol": info["protocol"]},
            "same_as_last": info["epoch"] == last_epoch}
    if best["same_as_last"]:
        return best, ""
    ok, seconds, reason = steps.run(eval_command(a, run, BEST_FILE, *BEST_EVAL_FILES[:2]), run.path("eval_best.log"),
                                    what=f"evaluating {BEST_FILE} of {run.label}", env=step_env(a))
    res = read_json(run.path("results_best.json")) if ok else None
    if res is None:
        return None, f"{BEST_FILE}: " + (reason or "eval.py finished without writing results_best.json")
    best.update(auroc=res["auroc"], eval_seconds=round(seconds, 2))
    return best, ""


def fail(run, stage, reason, seconds=None, log=None):
    reason = reason.replace(run.out + os.sep, "")  # paths inside the run folder, relative to it
    run.status, run.error = "failed", f"{stage}: {reason}"
    run.log = log or run.path(f"{stage}.log")
    run.train_seconds = round(seconds, 2) if seconds is not None and stage == "train" else None
    os.makedirs(run.dir, exist_ok=True)
    atomic_write_json({"stage": stage, "reason": reason, "log": run.log}, run.path("failed.json"))
    return run
