"""The training loop of ``--mode simclr``, ``simclr_CSI`` and ``simclr_DIA`` (docs/method.md §3)."""
import contextlib
import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed
from common.checkpoint_io import MODEL_CHECKPOINT_KIND
from common.device import PRECISIONS, dataset_batch
from common.errors import UserError
from common.progress import LoopProgress
from models.strategies import DissolveStrategy
from models.transform_layers import HorizontalFlipRandom, get_shift, simclr_augmentation
from training import schedule
from training.config import TrainConfig
from training.contrastive_loss import NT_xent, NT_xent_neg
from training.optim import make_optimizer, set_lr
from training.records import LAST_RULE, selection_doc
from utils import (atomic_torch_save, atomic_write_json, autocast_for, fault_point, rng_state, run_seed,
                   set_rng_state, set_seed)

CHECKPOINT_KIND = MODEL_CHECKPOINT_KIND


def first_non_finite(state, name=""):
    """``(name, kind)`` of the first floating tensor in a nested state (model weights, BatchNorm
    buffers, optimiser moments, ...) that holds NaN or infinity, else None."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            finite = torch.isfinite(state)
            if not bool(finite.all()):
                return name, ("NaN" if bool(torch.isnan(state).any()) else "infinity")
        return None
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{name}.{key}" if name else str(key))
        if found:
            return found
    return None


def contrastive_loss(z, chunks, K, b, temperature, sim_lambda, loss_mode):
    """The contrastive loss of the global batch from this process's normalised embeddings ``z``
    (``chunks * K * b`` rows: chunk-major, shift-major within a chunk, ``b`` images per shift),
    weighted by ``sim_lambda``. With three chunks the dissolved views are negatives, as
    ``loss_mode`` says (``NT_xent_neg``).

    Under torchrun each (chunk, shift) block is gathered over the ranks, so the matrix is laid
    out as one process's on the global batch (rank 0's images, then rank 1's, ...): ``[V1_all;
    V2_all(; V3_all)]``, each shift-major, as NT_xent / NT_xent_neg expect."""
    d = z.shape[1]
    z = distributed.gather_cat(z.reshape(chunks * K, b, d), dim=1).reshape(-1, d)
    sim = z @ z.t()
    if chunks == 3:
        loss = NT_xent_neg(sim, temperature=temperature, chunk=3, mode=loss_mode)
    else:
        loss = NT_xent(sim, temperature=temperature, chunk=2)
    return loss * sim_lambda


def divergence_cause(config: TrainConfig, precision="fp32"):
    """The likely reason a run diverged, read from its settings and ``precision``: which flag to change."""
    causes = []
    if config.temperature < 0.05:
        causes.append(f"--temperature {config.temperature:g} is very low (the paper's 0.5): the similarities "
                      f"divided by it overflow; raise --temperature")
    if config.lr_init > 1.0:
        causes.append(f"--lr_init {config.lr_init:g} is very high (the paper's 0.1): lower --lr_init")
    if config.sim_lambda > 100:
        causes.append(f"--sim_lambda {config.sim_lambda:g} is very high (the paper's 1): lower it")
    if precision == "fp16":
        causes.append("mixed precision runs fp16 on this GPU (no native bf16), whose range is narrow: pass --amp off")
    if not causes:
        causes.append(f"--lr_init {config.lr_init:g} may be too high for --batch_size {config.batch_size} with "
                      f"--optimizer {config.optimizer}: lower --lr_init (or check the training images)")
    return "; ".join(causes)


def recorded_segments(ckpt):
    """The segments a checkpoint records (``Trainer.segment``); a checkpoint that records none
    gives one from its saved ``--amp`` (``True``: bf16 on the CPUs that wrote them)."""
    if isinstance(ckpt.get("precision"), list):
        return [dict(s) for s in ckpt["precision"]]
    amp = ((ckpt.get("meta") or {}).get("args") or {}).get("amp")
    precision = {True: "bf16", False: "fp32"}.get(amp, "fp32" if amp == "off" else "unrecorded")
    return [{"epoch": 0, "step": 0, "device": None, "precision": precision}]


class Trainer:
    """Holds the model, optimisers and view-making layers of one training run.

    ``config``: the run's settings (``training.config.TrainConfig``). ``dissolve`` is None for
    simclr/simclr_CSI; for simclr_DIA it is a dissolving strategy
    (``models.strategies.DissolveStrategy``, built by ``models.dissolve.make_dissolve_fn``).
    ``precision``: what the forward passes compute in on ``device`` (``'bf16'``, ``'fp16'``
    with ``torch.amp.GradScaler`` scaling the network's loss, or ``'fp32'``;
    ``common.device.device_precision`` decides it); checkpoints record it per segment of the run.
    """

    def __init__(self, config: TrainConfig, model, device, dissolve: Optional[DissolveStrategy] = None,
                 precision="fp32"):
        if dissolve is not None and not isinstance(dissolve, DissolveStrategy):
            raise TypeError(f"dissolve must be a models.strategies.DissolveStrategy (dissolve_chunks, applies_to, "
                            f"shift_inside, info), got {type(dissolve).__name__}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.config, self.model, self.device, self.dissolve = config, model, device, dissolve
        self.precision = precision
        # fp16's narrow range: the network's loss scaled, steps with non-finite gradients skipped
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.shift = get_shift(config.base_shift)
        self.K = self.shift.max_range
        # what the batches go through: DistributedDataParallel under torchrun; the linear head
        # learns from gathered detached features, identically on every rank, outside DDP
        linear = [f"linear.{name}" for name, _ in model.linear.named_parameters()]
        self.net = distributed.wrap_model(model, device, ignore=linear, find_unused=self.K == 1)
        self.hflip = HorizontalFlipRandom(0.5)
        self.aug = simclr_augmentation(config.resize_factor, config.resize_fix)
        head = set(id(p) for p in model.linear.parameters())
        body = [p for p in model.parameters() if id(p) not in head]
        self.optimizer = make_optimizer(body, config.optimizer, config.lr_init, config.weight_decay)
        self.linear_optim = torch.optim.Adam(model.linear.parameters(), lr=1e-3, betas=(0.9, 0.999),
                                             weight_decay=config.weight_decay)
        # The paper's main optimiser holds every parameter, the linear head's too, and under its
        # torch 1.11 zero_grad() zeroes gradients instead of dropping them: from the second step on
        # the head reaches that optimiser with a zero gradient, so it takes its weight decay and
        # momentum (LARS: factor 1 on a zero gradient) before its own Adam step. A second optimiser
        # of the same kind and rates does that here (every update is per parameter), so the body's
        # optimiser state keeps its layout.
        self.linear_decay = (make_optimizer(list(model.linear.parameters()), config.optimizer, config.lr_init,
                                            config.weight_decay) if config.linear_main_optim == "paper" else None)
        self.epoch = 0  # last completed epoch
        self.step = 0
        self.best = {}  # best_<score>.model -> what selected it (epoch, step, rule, metric, value, ...)
        self.evaluations = []  # the AUROCs of every evaluation during training
        self.last_saved = None  # epoch and step of the last.model written
        self._resumed_rng = None
        # the run's stretches between starts: where each began, on which device, in which precision
        self.segments = [self.segment()]
        self.logger = None  # set by fit: checkpoints record log.txt's length
        self.last_loss = None
        # benchmarks/bench.py times the parts of a step: timer(name) -> context manager
        self.timer = None

    # ----- one step -------------------------------------------------------------------
    def make_views(self, x):
        """The 2KB (simclr/CSI) or 3KB (DIA) views, shift-major within each chunk, and the
        number of chunks.

        Chunks: ``x1``, ``x2`` (two flips of ``x``) and, for DIA, ``x3`` (K fresh flips). The
        dissolve strategy changes the chunks named by its ``applies_to`` (0-based; the diffusion
        dissolver the third only); a strategy with ``shift_inside`` applies the shift itself (the
        paper's blurs shift before resizing back). Its sampler sees the 1-based running epoch, as
        the paper's train loop passes it.
        """
        K, shift, d = self.K, self.shift, self.dissolve
        x1, x2 = self.hflip(x.repeat(2, 1, 1, 1)).chunk(2)
        chunks = [[x1] * K, [x2] * K]
        if d is not None:
            chunks.append([self.hflip(x) for _ in range(K)])
        applies = d.applies_to if d is not None else ()
        epoch = self.epoch + 1  # self.epoch counts completed epochs
        views = []
        for i, cs in enumerate(chunks):
            if i not in applies:
                views.append(torch.cat([shift(c, k) for k, c in enumerate(cs)]))
                continue
            # the K chunks in one batched call, each with its own strength
            with self.timed("dissolve"), autocast_for(self.device, self.precision):  # --amp covers the UNet too
                if d.shift_inside:
                    out = d.dissolve_chunks(cs, epoch, shift=shift)
                else:
                    out = [shift(c.float(), k) for k, c in enumerate(d.dissolve_chunks(cs, epoch))]
            views.append(torch.cat([c.float() for c in out]))
        return torch.cat(views), len(chunks)

    def train_step(self, x, y):
        b = x.shape[0]
        views, chunks = self.make_views(x)
        with self.timed("augment"):
            views = self.aug(views)
        with self.timed("resnet"):
            loss, loss_sim, loss_shift, aux = self.resnet_step(views, chunks, b)
        with self.timed("linear"):
            loss_linear = self.linear_step(aux, y, b)
        values = torch.stack([loss, loss_sim, loss_shift, loss_linear]).detach()
        values = distributed.mean_all(values).tolist()  # averaged over the ranks; one device sync
        return dict(zip(("loss", "loss_sim", "loss_shift", "loss_linear"), values))

    def timed(self, name):
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

    def resnet_step(self, views, chunks, b):
        """Forward, losses, backward and the optimiser step of the network on the views."""
        cfg, K = self.config, self.K
        with autocast_for(self.device, self.precision):
            _, aux = self.net(views, penultimate=True, simclr=True, shift=True)
        z = F.normalize(aux["simclr"].float(), dim=1)
        loss_sim = contrastive_loss(z, chunks, K, b, cfg.temperature, cfg.sim_lambda, cfg.loss_mode)
        if K > 1:
            shift_labels = torch.arange(K, device=views.device).repeat_interleave(b).repeat(chunks)
            loss_shift = F.cross_entropy(aux["shift"].float(), shift_labels)
        else:
            loss_shift = torch.zeros((), device=views.device)
        loss = loss_sim + loss_shift
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # fp16: the scaled loss back, the step skipped (and the scale lowered) on non-finite gradients
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.linear_decay is not None and self.step > 0:  # the head has had a gradient since step 1
            self.linear_decay_step()
        return loss, loss_sim, loss_shift, aux

    @torch.no_grad()
    def linear_decay_step(self):
        """The main optimiser's step on the linear head with the zero gradient the paper's code
        leaves it (``--linear_main_optim paper``)."""
        for p in self.model.linear.parameters():
            p.grad = torch.zeros_like(p)
        self.linear_decay.step()

    def linear_step(self, aux, y, b):
        """The linear head learns the classes from the detached features of the unshifted views."""
        K = self.K
        h = aux["penultimate"].detach().float()
        h0 = torch.cat([h[:b], h[K * b:K * b + b]])
        h0, y0 = distributed.gather_cat(h0), distributed.gather_cat(y.repeat(2))  # the global batch on every rank
        loss_linear = F.cross_entropy(self.model.linear(h0), y0)
        self.linear_optim.zero_grad(set_to_none=True)
        loss_linear.backward()
        self.linear_optim.step()
        return loss_linear

    # ----- checkpoints ------------------------------------------------------------------
    def state(self, meta, selection=None):
        return {
            "kind": CHECKPOINT_KIND, "format_version": 1,
            "model": self.model.state_dict(),
            "optim": self.optimizer.state_dict(),
            "linear_optim": self.linear_optim.state_dict(),
            **({"linear_decay_optim": self.linear_decay.state_dict()} if self.linear_decay is not None else {}),
            "epoch": self.epoch, "step": self.step, "best": dict(self.best),
            "evaluations": list(self.evaluations),
            "selection": selection,  # which file this is and which rule chose it
            "rng": rng_state(),
            "precision": [dict(s) for s in self.segments],
            **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            "meta": meta,
            # log.txt's length when this was written: a run resumed from here cuts it back to that
            "log_bytes": self.logger.log_size() if self.logger is not None else None,
        }

    def save(self, path, meta, selection=None):
        """Write a checkpoint atomically; never one holding NaN or infinity (UserError instead,
        naming the first such tensor and the likely cause; the earlier file stays)."""
        if self.logger is not None:
            self.logger.flush()  # every scalar up to here is on disk before the checkpoint that covers it
        state = self.state(meta, selection)
        bad = first_non_finite(state)  # every floating tensor: weights, BatchNorm buffers, optimiser moments
        if bad:
            raise UserError(f"not writing {os.path.basename(path)}: {bad[0]} holds {bad[1]} after epoch {self.epoch} "
                            f"(step {self.step}{self._last_loss_text()}), the training diverged; likely cause: "
                            f"{divergence_cause(self.config, self.precision)}")
        atomic_torch_save(state, path)

    def _last_loss_text(self):
        return f", loss {self.last_loss:.3g}" if self.last_loss is not None else ""

    def check_finite(self, before):
        """Stop with one line when the model (weights or BatchNorm buffers) holds NaN or infinity."""
        bad = first_non_finite(self.model.state_dict(), "model")
        if bad:
            raise UserError(f"the training diverged: {bad[0]} holds {bad[1]} after epoch {self.epoch} (step "
                            f"{self.step}{self._last_loss_text()}); stopped before {before}, the files written "
                            f"earlier stay; likely cause: {divergence_cause(self.config, self.precision)}")

    def keeps_row(self, tag, x):
        """Whether a ``scalars.csv`` row (``train/*`` by step, the others by epoch) comes from no
        later than this trainer's point: a resumed run drops the interrupted attempt's rows."""
        return x <= (self.step if tag.startswith("train/") else self.epoch)

    def load_state(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optim"])
        self.linear_optim.load_state_dict(ckpt["linear_optim"])
        if self.linear_decay is not None and "linear_decay_optim" in ckpt:
            self.linear_decay.load_state_dict(ckpt["linear_decay_optim"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best = dict(ckpt.get("best", {}))
        self.evaluations = list(ckpt.get("evaluations", []))
        self.last_saved = {"epoch": self.epoch, "step": self.step}
        set_rng_state(ckpt["rng"])
        self._resumed_rng = ckpt["rng"]
        self.segments = recorded_segments(ckpt) + [self.segment()]
        if self.scaler is not None and "grad_scaler" in ckpt and self.segments[-2]["precision"] == "fp16":
            self.scaler.load_state_dict(ckpt["grad_scaler"])  # the loss scale the run had reached

    def segment(self):
        """Where the training stands, and on what it computes from here (a checkpoint's ``precision``
        lists one per start of the run)."""
        return {"epoch": self.epoch, "step": self.step, "device": str(self.device), "precision": self.precision}

    def precision_change(self):
        """One line when this segment computes in another precision than the one before it (a
        resumed run on another device, or another --amp), else None."""
        if len(self.segments) < 2 or self.segments[-2]["precision"] == self.precision:
            return None
        before = self.segments[-2]
        where = f" (on {before['device']})" if before.get("device") else ""
        return (f"precision changes on resume: {before['precision']}{where} up to step {self.step}, "
                f"{self.precision} (on {self.device}) from here; each segment is exact, the whole run is not "
                f"bit-identical to one trained in a single precision")

    # ----- the loop -----------------------------------------------------------------------
    def global_batch(self):
        """Images per step: ``--batch_size`` per process times the number of processes."""
        return self.config.batch_size * distributed.world_size()

    def epoch_plan(self, n):
        """How an epoch over ``n`` images runs (``training.schedule.epoch_plan``): the batches of a
        pass, the steps trained and the fraction's denominator."""
        cfg = self.config
        return schedule.epoch_plan(n, self.global_batch(), cfg.max_batches_per_epoch, cfg.epoch_steps, cfg.drop_last)

    def lr_of(self, plan, epoch, i):
        """The learning rate batch ``i`` of ``epoch`` trains with (``training.schedule.step_lr``)."""
        cfg = self.config
        return schedule.step_lr(plan, epoch, i, cfg.lr_init, cfg.warmup, cfg.epochs, cfg.lr_scheduler,
                                cfg.lr_step_timing)

    def set_lr(self, lr):
        set_lr(self.optimizer, lr)
        if self.linear_decay is not None:
            set_lr(self.linear_decay, lr)

    def fit(self, train_set, logger, meta, evaluate=None, bars=True, progress_file=None, shorten=""):
        """Train from ``self.epoch + 1`` to ``--epochs``; save ``last.model`` every ``--save_step``
        epochs and at the end.

        Steps: ``training.schedule`` (docs/method.md §3, "The sequence of steps"): each epoch takes
        ``plan.steps`` batches of its order of the images, and batch ``i`` of epoch ``e`` trains
        with the rate ``step_lr`` gives ``(e, i)``, whatever ran before it, so a resumed run gives
        every batch the images and rate of the uninterrupted run. A ``--max_steps`` stop inside an
        epoch ends that epoch there (logged, evaluated when due and saved as that epoch).

        Randomness: by default each epoch starts from the seed ``(seed, epoch)``, so a resumed
        run repeats an uninterrupted one and an evaluation changes no training draw. With
        ``--paper_rng_replay`` only the first epoch is seeded and the generators run on; each
        evaluation leaves them as the paper's does (seeded with its last sample's seed and
        advanced by its draws), so every epoch that follows an evaluation replays the same
        shuffle, flips, crops and timesteps. The checkpoint holds the generators' state, so a
        resumed run is exact in both cases.

        ``evaluate`` (``evals.selection.SelectionEvaluation`` or None) runs every
        ``--error_step`` epochs and at epoch ``--epochs`` (not at a ``--max_steps`` stop: which
        epochs are evaluated never depends on interruptions); the best result is kept as
        ``evaluate.filename`` and ``selection.json`` records which rule produced which file.

        Progress: a tqdm bar over the run's steps (``bars``; on the main process, on a terminal),
        and after the first steps one log line with the measured seconds per step, the time to the
        end and ``shorten`` (the flags that shorten the run); ``progress_file``: a JSON file
        with the same figures, rewritten every few seconds (``common.progress.LoopProgress``).
        """
        cfg, model = self.config, self.model
        replay = cfg.paper_rng_replay
        n = len(train_set)
        plan = self.epoch_plan(n)
        global_batch = self.global_batch()
        last_path = os.path.join(logger.logdir, "last.model")
        self.logger = logger
        first, end = schedule.batch_bounds(plan.pass_batches - 1, n, global_batch)
        logger.log(f"an epoch trains {plan.steps} step(s) of a pass of {plan.pass_batches} batch(es) of {global_batch} "
                   f"images (the last of {end - first}); learning rate {cfg.lr_step_timing} timing, fraction of "
                   f"batch i: epoch - 1 + i / {plan.denominator}")
        if evaluate is not None:
            logger.log(f"evaluation every {cfg.error_step} epoch(s) and at epoch {cfg.epochs}: {evaluate.describe()}")
        if replay:
            logger.log("--paper_rng_replay: no per-epoch seeding; each evaluation leaves the generators seeded as "
                       "the paper's does, so the epochs after it replay the same draws")
            if self._resumed_rng is not None:  # whatever ran since load_state must not shift the stream
                set_rng_state(self._resumed_rng)
        self._resumed_rng = None
        model.train()
        total, evaluations = self.steps_ahead(plan, evaluate is not None)
        progress = LoopProgress(total, self.step, what="training", shorten=shorten, path=progress_file,
                                report=logger.log)
        eval_seconds = []
        if evaluations:
            progress.outside_steps(None, f"{evaluations} evaluation(s) during training")
        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=True if not bars or not distributed.is_main() else None)  # None: on a terminal only
        try:
            self._fit_epochs(train_set, logger, meta, evaluate, plan, progress, bar, eval_seconds, evaluations)
        finally:
            bar.close()
            progress.close(finished=self.step >= total)
        return last_path

    def steps_ahead(self, plan, evaluating):
        """``(steps, evaluations)``: the step count the run ends at (``--epochs`` whole epochs of
        ``plan.steps``, or ``--max_steps`` when that comes first) and how many evaluations during
        training it still makes."""
        cfg = self.config
        total = self.step + max(0, cfg.epochs - self.epoch) * plan.steps
        last_epoch = cfg.epochs
        if cfg.max_steps is not None and cfg.max_steps < total:
            total = max(self.step, cfg.max_steps)
            last_epoch = min(cfg.epochs, self.epoch + math.ceil((total - self.step) / plan.steps))
        if not evaluating:
            return total, 0
        due = [e for e in range(self.epoch + 1, last_epoch + 1) if e % cfg.error_step == 0 or e == cfg.epochs]
        return total, len(due)

    def _fit_epochs(self, train_set, logger, meta, evaluate, plan, progress, bar, eval_seconds, evaluations):
        """The epochs of :meth:`fit`."""
        cfg, device, replay = self.config, self.device, self.config.paper_rng_replay
        n = len(train_set)
        global_batch, world, rank = self.global_batch(), distributed.world_size(), distributed.rank()
        last_path = os.path.join(logger.logdir, "last.model")
        stop = False
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            if not replay or epoch == 1:
                set_seed(run_seed(cfg.seed, epoch))
            perm = torch.randperm(n)  # identical on every rank
            if distributed.is_distributed():  # each rank its own flips, crops and dissolving draws
                set_seed(run_seed(cfg.seed, epoch, distributed.rank()))
            t0 = time.time()
            sums = {}
            bar.set_description(f"epoch {epoch}/{cfg.epochs}", refresh=False)
            done = 0
            for i in range(plan.steps):
                first, end = schedule.batch_bounds(i, n, global_batch)
                # this rank's contiguous block of the global batch (a smaller last batch padded first)
                idx = schedule.rank_share(perm[first:end], world, rank, perm)
                lr = self.lr_of(plan, epoch, i)  # of (epoch, i) alone: a resumed run gives it the same rate
                self.set_lr(lr)
                x, y = dataset_batch(train_set, idx, device)  # uint8 images cross as bytes, become floats there
                out = self.train_step(x, y)
                self.step += 1
                self.last_loss = out["loss"]
                done += 1
                for key, v in out.items():
                    sums[key] = sums.get(key, 0.0) + v
                if self.step % cfg.log_every == 0 or self.step == 1:
                    for key, v in out.items():
                        logger.scalar(f"train/{key}", v, self.step)
                    logger.scalar("train/lr", lr, self.step)
                bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{lr:.3g}", refresh=False)
                bar.update(1)
                progress.step(self.step, epoch=epoch, epochs=cfg.epochs)
                if not math.isfinite(out["loss"]):
                    raise UserError(f"the loss became {out['loss']} at step {self.step} (epoch {epoch}); nothing was "
                                    f"written after the last checkpoint; likely cause: "
                                    f"{divergence_cause(cfg, self.precision)}")
                fault_point("step")
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    stop = True
                    break
            self.epoch = epoch
            secs = time.time() - t0
            means = {k: v / max(done, 1) for k, v in sums.items()}
            for key, v in means.items():
                logger.scalar(f"epoch/{key}", v, epoch)
            logger.scalar("epoch/seconds_per_step", secs / max(done, 1), epoch)
            logger.log(f"[epoch {epoch}] " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                       + f" lr {lr:.4g} ({done} steps, {secs / max(done, 1):.3f} s/step)")
            final = epoch == cfg.epochs
            evaluating = evaluate is not None and (epoch % cfg.error_step == 0 or final)
            saving = epoch % cfg.save_step == 0 or final or stop
            if evaluating or saving:
                self.check_finite("evaluating and saving" if evaluating else "saving last.model")
            if evaluating:  # under torchrun every rank extracts its share; the main process alone writes
                t_eval = time.time()
                with progress.paused():
                    self.evaluate_and_select(evaluate, logger, meta, restore_rng=not replay)
                eval_seconds.append(time.time() - t_eval)
                left = max(0, evaluations - len(eval_seconds))
                progress.outside_steps(left * sum(eval_seconds) / len(eval_seconds),
                                       f"{left} evaluation(s) during training" if left else "")
            if saving:
                self.save(last_path, meta, selection={"file": "last.model", "rule": LAST_RULE})
                self.last_saved = {"epoch": self.epoch, "step": self.step}
                self.write_selection(logger.logdir)
            logger.flush()
            if stop:
                if evaluate is not None and not final and epoch % cfg.error_step:
                    logger.log(f"stopped by --max_steps {cfg.max_steps} after epoch {epoch}, which is not an "
                               f"evaluation epoch (every {cfg.error_step})")
                break

    def evaluate_and_select(self, evaluate, logger, meta, restore_rng=True):
        """One evaluation: log its AUROCs, keep the model as ``evaluate.filename`` when its
        ``evaluate.metric`` beats every earlier evaluation's (the paper's ``best_CSI.model``).

        Under torchrun every rank calls it: the features are extracted sharded across the ranks,
        every rank gets the same AUROCs and keeps the same record, and only the main process
        writes (the logger and the atomic writes do nothing elsewhere)."""
        t0 = time.time()
        fault_point("eval")
        distributed.buffers_from_main(self.model)  # the BatchNorm statistics last.model holds (CPU ranks differ)
        metrics = evaluate(self.model, restore_rng=restore_rng, sharded=distributed.is_distributed())
        epoch = self.epoch
        for key, v in metrics.items():
            logger.scalar(f"eval/{key}", v, epoch)
        self.evaluations.append({"epoch": epoch, "step": self.step, **metrics})
        value, name = metrics[evaluate.metric], evaluate.filename
        if not math.isfinite(value):  # never a checkpoint selected on an undefined number
            raise UserError(f"the evaluation after epoch {epoch} gave {evaluate.metric} = {value}: the AUROC is "
                            f"undefined (a test set without normal or without anomalous images, or scores that are "
                            f"not numbers); nothing was selected on it, the files written earlier stay")
        best = self.best.get(name)
        if best is None or value > best["value"]:
            best = {"epoch": epoch, "step": self.step, "rule": evaluate.rule, "metric": evaluate.metric,
                    "value": value, "protocol": evaluate.protocol(), "metrics": dict(metrics)}
            self.best[name] = best
            self.save(os.path.join(logger.logdir, name), meta, selection={"file": name, **best})
            what = f"{name} <- epoch {epoch}"
        else:
            what = f"{name} stays at epoch {best['epoch']} ({best['value']:.4f})"
        logger.scalar(f"eval/best_{evaluate.metric}", best["value"], epoch)
        shown = {k: v for k, v in metrics.items() if k.endswith(("_one_class_mean", "_pooled", "_ood_mean"))}
        logger.log(f"[epoch {epoch}] eval " + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
                   + f" ({time.time() - t0:.1f} s); {what}")
        self.write_selection(logger.logdir)

    def write_selection(self, logdir):
        """``selection.json``: which rule produced which checkpoint file, and every evaluation."""
        doc = selection_doc(self.last_saved, self.best, self.config.paper_rng_replay, self.evaluations)
        atomic_write_json(doc, os.path.join(logdir, "selection.json"))
