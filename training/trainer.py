"""The training loop of ``--mode simclr``, ``simclr_CSI`` and ``simclr_DIA`` (SPEC section 3)."""
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.transform_layers import HorizontalFlipRandom, get_shift, simclr_augmentation
from training.contrastive_loss import NT_xent, NT_xent_neg
from training.optim import lr_at, make_optimizer, set_lr
from utils import atomic_torch_save, autocast_for, batch_indices, rng_state, set_rng_state, set_seed

CHECKPOINT_KIND = "dia_model"


class Trainer:
    """Holds the model, optimisers and view-making layers of one training run.

    ``dissolve`` is None for simclr/simclr_CSI; for simclr_DIA it is a dissolve generator of
    ``models.dissolve`` (``dissolve_chunks(list of K chunks, epoch) -> list of K chunks``).
    """

    def __init__(self, P, model, device, dissolve=None):
        from common.device import parallel

        self.P, self.model, self.device, self.dissolve = P, model, device, dissolve
        self.net = parallel(model, device, getattr(P, "multi_gpu", False))  # what the batches go through
        self.shift = get_shift(P.base_shift)
        self.K = self.shift.max_range
        self.hflip = HorizontalFlipRandom(0.5)
        self.aug = simclr_augmentation(P.resize_factor, P.resize_fix)
        head = set(id(p) for p in model.linear.parameters())
        body = [p for p in model.parameters() if id(p) not in head]
        self.optimizer = make_optimizer(body, P)
        self.linear_optim = torch.optim.Adam(model.linear.parameters(), lr=1e-3, betas=(0.9, 0.999),
                                             weight_decay=P.weight_decay)
        self.epoch = 0  # last completed epoch
        self.step = 0
        self.best = {}

    # ----- one step -------------------------------------------------------------------
    def make_views(self, x):
        """The 2KB (simclr/CSI) or 3KB (DIA) views, shift-major within each chunk, and the
        number of chunks."""
        K, shift = self.K, self.shift
        x1, x2 = self.hflip(x.repeat(2, 1, 1, 1)).chunk(2)
        v1 = torch.cat([shift(x1, k) for k in range(K)])
        v2 = torch.cat([shift(x2, k) for k in range(K)])
        if self.dissolve is None:
            return torch.cat([v1, v2]), 2
        # K fresh flips, each dissolved with its own strength in one batched call; the
        # sampler sees the 0-based index of the running epoch
        with autocast_for(self.device, self.P.amp):  # --amp covers the dissolver's UNet too
            d = self.dissolve.dissolve_chunks([self.hflip(x) for _ in range(K)], self.epoch)
        d = [c.float() for c in d]
        v3 = torch.cat([shift(c, k) for k, c in enumerate(d)])
        return torch.cat([v1, v2, v3]), 3

    def train_step(self, x, y):
        P, model = self.P, self.model
        b, K = x.shape[0], self.K
        views, chunks = self.make_views(x)
        views = self.aug(views)
        with autocast_for(self.device, P.amp):
            _, aux = self.net(views, penultimate=True, simclr=True, shift=True)
        z = F.normalize(aux["simclr"].float(), dim=1)
        sim = z @ z.t()
        if chunks == 3:
            loss_sim = NT_xent_neg(sim, temperature=P.temperature, chunk=3, mode=P.loss_mode)
        else:
            loss_sim = NT_xent(sim, temperature=P.temperature, chunk=2)
        loss_sim = loss_sim * P.sim_lambda
        if K > 1:
            shift_labels = torch.arange(K, device=x.device).repeat_interleave(b).repeat(chunks)
            loss_shift = F.cross_entropy(aux["shift"].float(), shift_labels)
        else:
            loss_shift = torch.zeros((), device=x.device)
        loss = loss_sim + loss_shift
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        # the linear head learns the classes from the detached features of the unshifted views
        h = aux["penultimate"].detach().float()
        h0 = torch.cat([h[:b], h[K * b:K * b + b]])
        loss_linear = F.cross_entropy(model.linear(h0), y.repeat(2))
        self.linear_optim.zero_grad(set_to_none=True)
        loss_linear.backward()
        self.linear_optim.step()
        values = torch.stack([loss, loss_sim, loss_shift, loss_linear]).detach().tolist()  # one device sync
        return dict(zip(("loss", "loss_sim", "loss_shift", "loss_linear"), values))

    # ----- checkpoints ------------------------------------------------------------------
    def state(self, meta):
        return {
            "kind": CHECKPOINT_KIND, "format_version": 1,
            "model": self.model.state_dict(),
            "optim": self.optimizer.state_dict(),
            "linear_optim": self.linear_optim.state_dict(),
            "epoch": self.epoch, "step": self.step, "best": dict(self.best),
            "rng": rng_state(),
            "meta": meta,
        }

    def save(self, path, meta):
        atomic_torch_save(self.state(meta), path)

    def load_state(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optim"])
        self.linear_optim.load_state_dict(ckpt["linear_optim"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best = dict(ckpt.get("best", {}))
        set_rng_state(ckpt["rng"])

    # ----- the loop -----------------------------------------------------------------------
    def batches_per_epoch(self, n):
        P = self.P
        full = n // P.batch_size if n >= P.batch_size else 1
        return max(1, min(full, P.max_batches_per_epoch))

    def fit(self, train_set, logger, meta, evaluate=None):
        """Train from ``self.epoch + 1`` to ``--epochs``; save every ``--save_step`` epochs.

        Each epoch starts from the seed ``(seed, epoch)``, so a resumed run repeats exactly
        what an uninterrupted run does. ``evaluate(trainer)`` returns a dict of metrics.
        """
        P, model, device = self.P, self.model, self.device
        n = len(train_set)
        n_batches = self.batches_per_epoch(n)
        last_path = os.path.join(logger.logdir, "last.model")
        model.train()
        stop = False
        for epoch in range(self.epoch + 1, P.epochs + 1):
            set_seed(P.seed * 100_003 + epoch)
            perm = torch.randperm(n)
            t0 = time.time()
            sums = {}
            bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{P.epochs}", leave=False, disable=None)
            done = 0
            for i, idx in enumerate(batch_indices(n, P.batch_size, perm, drop_last=True)):
                if i >= n_batches:
                    break
                lr = lr_at(epoch - 1 + i / n_batches, P)
                set_lr(self.optimizer, lr)
                x, y = train_set.get_batch(idx)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = self.train_step(x, y)
                self.step += 1
                done += 1
                for key, v in out.items():
                    sums[key] = sums.get(key, 0.0) + v
                if self.step % P.log_every == 0 or self.step == 1:
                    for key, v in out.items():
                        logger.scalar(f"train/{key}", v, self.step)
                    logger.scalar("train/lr", lr, self.step)
                bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{lr:.3g}")
                bar.update(1)
                if not math.isfinite(out["loss"]):
                    bar.close()
                    raise FloatingPointError(f"loss became {out['loss']} at step {self.step}; lower --lr_init")
                if P.max_steps is not None and self.step >= P.max_steps:
                    stop = True
                    break
            bar.close()
            self.epoch = epoch
            secs = time.time() - t0
            means = {k: v / max(done, 1) for k, v in sums.items()}
            for key, v in means.items():
                logger.scalar(f"epoch/{key}", v, epoch)
            logger.scalar("epoch/seconds_per_step", secs / max(done, 1), epoch)
            logger.log(f"[epoch {epoch}] " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                       + f" lr {lr:.4g} ({done} steps, {secs / max(done, 1):.3f} s/step)")
            final = stop or epoch == P.epochs
            if evaluate is not None and (epoch % P.error_step == 0 or final):
                metrics = evaluate(self)
                for key, v in metrics.items():
                    logger.scalar(f"eval/{key}", v, epoch)
                    if v > self.best.get(key, -float("inf")):
                        self.best[key] = v
                        self.save(os.path.join(logger.logdir, f"best_{key}.model"), meta)
                logger.log(f"[epoch {epoch}] eval " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if epoch % P.save_step == 0 or final:
                self.save(last_path, meta)
            logger.flush()
            if stop:
                break
        return last_path
