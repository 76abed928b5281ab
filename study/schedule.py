"""Running the plan's runs, one after another or concurrently over devices, with progress lines and the tables."""
import copy
import os
import queue
import shlex
import signal
import threading
import time

from common.errors import UserError
from study.dissolvers import Dissolvers, dissolver_table
from study.figures import draw_comparisons
from study.rerun import is_finished
from study.runs import BEST_FILE, BEST_LABEL, execute, fail, needs_dissolver
from study.steps import Interrupted
from study.tables import headline_auroc, multi_class_table, summary_table, write_tables
from study.text import rel


def visible_gpus(indices, visible=None):
    """The ``CUDA_VISIBLE_DEVICES`` entries naming the GPUs this process calls ``cuda:K`` for each
    K of ``indices``: under a ``visible`` list of this process's own (its ``CUDA_VISIBLE_DEVICES``:
    indices, UUIDs or MIG names) the K-th entry of it, else K itself. Pure; raises
    :class:`UserError` for an index the list does not reach."""
    if visible is None:
        return [str(k) for k in indices]
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    for k in indices:
        if k >= len(entries):
            raise UserError(f"--devices cuda:{k}: this process sees {len(entries)} GPU(s) (CUDA_VISIBLE_DEVICES="
                            f"{visible}), cuda:0..cuda:{len(entries) - 1}; name GPUs by their index among those")
    return [entries[k] for k in indices]


def device_slots(devices, nproc=1, visible=None):
    """Where ``--devices`` runs the runs: a list of ``(label, device, gpus)``, one per run at a time.

    ``nproc`` 1: each entry is a slot (``gpus`` None; a step inherits this process's view of the
    GPUs, so ``cuda:K`` means to it what it means here). ``nproc`` N > 1 (``--nproc_per_run``): a
    ``cpu`` entry is still a slot (its run's N processes share the CPU), while the CUDA entries,
    each ``cuda:K``, are taken N at a time in the order given: a group's run sees only its GPUs
    (``CUDA_VISIBLE_DEVICES`` = ``gpus``, their entries in ``visible``, this process's own
    ``CUDA_VISIBLE_DEVICES``, when it has one: :func:`visible_gpus`) and gets ``--device cuda``,
    so its rank r uses the group's r-th GPU. Raises :class:`UserError` when the CUDA entries
    cannot be grouped so (no index, a count not a multiple of N, a GPU twice in one group, an
    index beyond ``visible``).
    """
    if nproc <= 1:
        return [(dev, dev, None) for dev in devices]
    slots, cuda = [], []
    for dev in devices:
        kind, _, index = str(dev).strip().lower().partition(":")
        if kind != "cuda":
            slots.append((dev, dev, None))
            continue
        if not index.isdigit():
            raise UserError(f"--devices {dev} with --nproc_per_run {nproc}: name each GPU as cuda:K, {nproc} entries "
                            f"per run (e.g. --devices " + " ".join(f"cuda:{i}" for i in range(nproc)) + ")")
        cuda.append(int(index))
    if len(cuda) % nproc:
        raise UserError(f"--devices lists {len(cuda)} GPUs but --nproc_per_run {nproc} takes them {nproc} at a time "
                        f"(one run per {nproc} GPUs): list a multiple of {nproc} cuda:K entries")
    for i in range(0, len(cuda), nproc):
        group = cuda[i:i + nproc]
        if len(set(group)) < nproc:
            raise UserError(f"--devices group {' '.join(f'cuda:{g}' for g in group)} names a GPU twice: under "
                            f"torchrun each of a run's {nproc} processes needs a GPU of its own (NCCL)")
        slots.append((f"cuda:{','.join(map(str, group))}", "cuda", ",".join(visible_gpus(group, visible))))
    return slots


def report_run(a, run, t0):
    """The end of a run's progress line (after its ``[i/n] label:``) and its notes."""
    if run.status == "ok":
        auroc = headline_auroc(run)
        if run.reused:
            what = "finished before, skipped"
        else:
            trained = "trained" if run.train_seconds is None else f"trained {run.train_seconds:.0f} s"
            what = f"{trained}, evaluated {run.eval_seconds:.0f} s"
        best = headline_auroc(run, "best")
        best = f", {best:.3f} (best on test, epoch {run.best['epoch']})" if best is not None else ""
        kind = "AUROC mean over the out-of-distribution sets" if run.multi else "AUROC"
        print(f" {what}; {kind} {auroc:.3f} (last){best} ({time.time() - t0:.0f} s)", flush=True)
        for note in run.notes:
            print(f"    note: {note}", flush=True)
    else:
        print(f" FAILED ({run.error}); log {rel(run.log, a.out)} ({time.time() - t0:.0f} s)", flush=True)


def run_concurrently(a, runs, command, steps):
    """``--devices``: every dissolver the runs need is trained first (one after another, on the
    first device), then one thread per listed device takes the runs in plan order, one at a time,
    its steps getting ``--device <its device>``. This thread prints the progress and rewrites the
    tables (rows in plan order) as runs finish; an interruption stops every running step of
    ``steps`` (:class:`study.steps.Steps`), which runs them all."""
    on_first = copy.copy(a)
    on_first.device = a.devices[0]
    dissolvers = Dissolvers(on_first, steps)
    steps.doing("preparing the dissolvers")
    for run in runs:
        if needs_dissolver(run):
            dissolvers.get(run.dissolver)
    slots = device_slots(a.devices, getattr(a, "nproc_per_run", 1), os.environ.get("CUDA_VISIBLE_DEVICES"))
    print(f"running the runs {len(slots)} at a time: on {', '.join(label for label, _, _ in slots)}", flush=True)
    shown = []  # what the tables show: the finished runs, and pending copies of the others
    for run in runs:
        pending = copy.copy(run)
        pending.notes = []
        shown.append(pending)
    todo, events = queue.Queue(), queue.Queue()
    for i in range(len(runs)):
        todo.put(i)

    def work(label, device, gpus):
        on_device = copy.copy(a)
        on_device.device, on_device.gpus = device, gpus
        while steps.stopping is None:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            events.put(("start", i, label))
            try:
                execute(on_device, runs[i], dissolvers, steps)
            except Interrupted:
                return  # stopped: left for the next command to resume
            except Exception as exc:  # noqa: BLE001 - one run's trouble must not stop the others
                fail(runs[i], "reproduce", f"{type(exc).__name__}: {exc}", log=runs[i].path("train.log"))
            events.put(("done", i, label))

    threads = [threading.Thread(target=work, args=slot, name=f"runs on {slot[0]}", daemon=True) for slot in slots]
    started = {}
    steps.doing("starting the runs")
    try:
        for t in threads:
            t.start()
        n_done = 0
        while n_done < len(runs):
            try:
                kind, i, device = events.get(timeout=1.0)
            except queue.Empty:
                if events.empty() and not any(t.is_alive() for t in threads):
                    raise RuntimeError("the threads running the runs ended early") from None
                continue
            run, head = runs[i], f"[{i + 1}/{len(runs)}] {runs[i].label}"
            if kind == "start":
                started[i] = time.time()
                print(f"{head}: started on {device}", flush=True)
                continue
            n_done += 1
            print(f"{head} ({device}):", end="", flush=True)
            report_run(a, run, started[i])
            shown[i] = run
            write_tables(a, shown, command)
    except BaseException as exc:
        sig = exc.args[0] if isinstance(exc, Interrupted) and exc.args else (
            signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 0)
        steps.doing("running the runs")  # what the message says when no step was running
        steps.stop_all(sig)  # no step starts from now on
        for t in threads:
            t.join()
        raise
    for t in threads:
        t.join()


def run_all(a, runs, argv, steps, runner=None):
    """Run the plan's runs, their steps by ``steps`` (:class:`study.steps.Steps`), then draw the
    comparisons and print the tables; returns the exit status (1 when a run failed). ``runner(a, runs,
    command, steps)``, when given, runs them instead (``--launcher slurm``: study.slurm.run_on_slurm)."""
    command = "python reproduce.py " + " ".join(shlex.quote(x) for x in argv)
    n_todo = sum(not is_finished(r) for r in runs)
    print(f"{len(runs)} run(s) in {a.out} ({len(runs) - n_todo} finished already, {n_todo} to do)", flush=True)

    t_all = time.time()
    if runner is not None:
        runner(a, runs, command, steps)
    elif a.devices:
        run_concurrently(a, runs, command, steps)
    else:
        dissolvers = Dissolvers(a, steps)
        for i, run in enumerate(runs, 1):
            if needs_dissolver(run):
                dissolvers.get(run.dissolver)  # its own progress line, before the run's
            t0 = time.time()
            steps.doing(f"working on {run.label}")
            execute(a, run, dissolvers, steps)  # each step says what it runs and where its log is
            print(f"[{i}/{len(runs)}] {run.label}:", end="", flush=True)
            report_run(a, run, t0)
            write_tables(a, runs, command)
    steps.doing("drawing the comparison figures")
    draw_comparisons(a, runs)
    write_tables(a, runs, command)

    n_failed = sum(r.status == "failed" for r in runs)
    print()
    for table, multi in ((summary_table, False), (multi_class_table, True)):
        if not any(r.multi == multi for r in runs):
            continue
        print(("multi-class, " if multi else "") + "last.model (the honest figure):")
        print(table(runs))
        if a.selection:
            print(f"\n{BEST_FILE}, {BEST_LABEL}:")
            print(table(runs, "best"))
        print()
    dissolvers = dissolver_table(runs)
    if dissolvers:
        print("dissolvers, what they do to images per timestep (results.md explains each measure):")
        print(dissolvers)
        print()
    print(f"{len(runs) - n_failed} of {len(runs)} run(s) finished, {n_failed} failed; {time.time() - t_all:.0f} s. "
          f"Tables: {os.path.join(a.out, 'results.md')}, {os.path.join(a.out, 'results.csv')}", flush=True)
    return 1 if n_failed else 0
