"""The epoch loop (:class:`Loop`): training steps on cached rows, validation and model selection, early
stopping, the clock-driven schedule, checkpoints and resume.

Whoever builds a loop says everything it needs in the constructor, and changes what it does through
:class:`LoopHooks` (a loss of its own, a callback after every epoch) or :meth:`Loop.start_from` (initial
weights); nothing is set on a loop after it is built. :func:`medclf.training.run.train_one` and
:func:`medclf.compress.finetune.finetune` are its two users.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medclf import allocator, reporting
from medclf import threads as threads_mod
from medclf.budget import Budget, epoch_pace, replan_pace
from medclf.data.stream import StreamedRows
from medclf.distributed import DistContext
from medclf.errors import ConfigError
from medclf.planner import Plan
from medclf.schedule import Schedule
from medclf.training import checkpoint
from medclf.training.config import TrainConfig
from medclf.training.network import build_network, create_network, memory_format, plain_state, to_device
from medclf.training.optimisation import build_optimisation, finite_gradients
from medclf.training.progress import ProgressDisplay
from medclf.training.rows import LoopData, TrainingRows
from medclf.training.selection import AUC_TIE, Selection, epoch_scores, multilabel_epoch_scores

__all__ = ["EpochCallback", "Loop", "LoopData", "LoopHooks", "LossHook"]

# (history row, the model being selected, plan) -> fields to add to the row.
EpochCallback = Callable[[dict[str, Any], nn.Module, Plan], dict[str, Any] | None]
# (augmented batch, logits, cross-entropy) -> the loss to minimise.
LossHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LoopHooks:
    """Where a caller changes what the loop does."""

    # After every epoch, on rank 0, with the random streams forked: it never influences training
    # (benchmarks record test scores against wall time with it).
    on_epoch: EpochCallback | None = None
    # Replaces the weighted cross-entropy as the loss to minimise (knowledge distillation).
    loss: LossHook | None = None


class Loop:
    """The epochs of one run on ``data`` as ``plan`` says.

    ``ckpt_dir``: checkpoint every epoch there (None: no checkpoints, nothing to resume). ``budget``: the
    clock the epochs are timed on and its start (default: ``time.perf_counter`` from now).
    ``clock_driven``: the schedule follows the clock (:mod:`medclf.schedule`). ``follow_load``: give
    threads back to other processes and take them again between epochs (:mod:`medclf.threads`).
    """

    def __init__(
        self,
        plan: Plan,
        data: LoopData,
        cfg: TrainConfig,
        *,
        device: str = "cpu",
        progress: bool = False,
        ckpt_dir: Path | None = None,
        dist: DistContext | None = None,
        budget: Budget | None = None,
        clock_driven: bool = False,
        follow_load: bool = False,
        hooks: LoopHooks | None = None,
    ) -> None:
        self.plan, self.data, self.cfg, self.device = plan, data, cfg, device
        allocator.keep_freed_memory()  # each step reuses the last step's buffers (medclf.allocator)
        self.samples, self.prepared = data.samples, data.prepared
        # Multi-label findings: a sigmoid per finding and a binary loss per finding (models.tasks).
        self.multilabel = data.samples.task == "multilabel"
        self.progress, self.ckpt_dir, self.hooks = progress, ckpt_dir, hooks or LoopHooks()
        self.dist = dist or DistContext()
        self.clock = budget.clock if budget is not None else time.perf_counter
        self.fmt = memory_format(plan)
        self.model, self.frozen, self.train_model = build_network(
            plan,
            data.samples.classes,
            device=device,
            dist=self.dist,
            compile=cfg.compile,
        )
        steps_per_epoch = max(1, len(data.train_idx) // plan.batch_size)
        # Warm-up and cosine, the EMA's horizon and the patience (re-planned after epochs when clock-driven).
        self.schedule = Schedule(steps_per_epoch, plan.epochs, plan.patience, clock_driven=clock_driven)
        # The loss, AdamW, the learning-rate schedule, the EMA and the frozen layers' phases.
        self.objective = build_optimisation(
            self.model,
            self.frozen,
            plan,
            self.schedule,
            data.samples.labels[data.train_idx],
            len(data.samples.classes),
            multilabel_loss=cfg.multilabel_loss if self.multilabel else None,
            device=device,
        )
        self.optimizer, self.scheduler = self.objective.optimizer, self.objective.scheduler
        self.ema, self.freeze_schedule = self.objective.ema, self.objective.freeze_schedule
        self.class_weights = self.objective.class_weights
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.amp)
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        # fp16 has too few exponent bits for small gradients: scale the loss (bf16 needs no scaling).
        self.scaler = torch.amp.GradScaler(dev_type) if plan.amp == "fp16" else None
        self.pin = dev_type == "cuda"  # page-locked host batches: the copy to the GPU runs asynchronously
        self.epoch = 0
        self.rows = TrainingRows(data, plan, cfg, self.dist, self.pin)
        self.best = Selection()
        self.stop_reason, self.epochs_run = "completed", 0
        # Another process's load, measured over each epoch.
        self.load_monitor = threads_mod.LoadMonitor() if follow_load else None
        self.t_start = budget.start if budget is not None else self.clock()

    def start_from(self, state: dict[str, torch.Tensor]) -> None:
        """Start from the weights ``state`` (the network and its average), instead of the plan's."""
        self.model.load_state_dict(state)  # in place: the optimizer keeps its parameters
        if self.ema is not None:
            self.ema.module.load_state_dict(state)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The mixed-precision context of the plan (none when it trains in fp32)."""
        dev_type = "cuda" if self.device.startswith("cuda") else "cpu"
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev_type, dtype=self.amp_dtype)

    def train_epoch(self) -> float:
        """One epoch of training steps; the mean training loss."""
        # Frozen layers (and, while probing, the whole backbone) keep their batch-norm statistics too.
        self.freeze_schedule.train_mode()
        total: float | torch.Tensor  # a tensor once a step has run (summed on the device)
        count: float
        total, count, skipped = 0.0, 0, 0
        for x, y in self.rows.batches(self.epoch, self.gen):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.fmt is not None:
                x = x.contiguous(memory_format=self.fmt)
            with self.autocast():
                logits = self.train_model(x)
            loss = self.objective.loss(logits, y)
            if self.hooks.loss is not None:
                loss = self.hooks.loss(x, logits.float(), loss)
            if self._step(loss):  # a skipped step advances neither the schedule nor the average
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
            else:
                skipped += 1
            total += loss.detach().double() * len(y)  # no .item(): a GPU step need not wait for the host
            count += len(y)
        if skipped:
            reporting.current().warn(
                f"{skipped} training step(s) of epoch {self.epoch + 1} had non-finite gradients and were skipped"
            )
        total, count = self.dist.sum([float(total), count])
        return total / max(count, 1)

    def _step(self, loss: torch.Tensor) -> bool:
        """Back-propagate ``loss`` and take the optimizer step; False when the step was skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return True
        loss.backward()
        # One non-finite gradient would make every weight it reaches NaN for good (seen with PyTorch 2.13's
        # CPU bf16 3D convolution backward, now and then, on finite inputs): skip such a step, as GradScaler
        # does for fp16. Only on the CPU, whose steps are synchronous anyway: on a GPU the check would make
        # every step wait for the host.
        stepped = self.device.startswith("cuda") or finite_gradients(self.model)
        if stepped:
            self.optimizer.step()
        return stepped

    @torch.no_grad()
    def predict(
        self, x: torch.Tensor | StreamedRows, model: nn.Module, *, raw: bool = False, amp: bool = True
    ) -> np.ndarray:
        """Probabilities of ``model`` for ``x`` (``raw``: its logits; ``amp=False``: in fp32 even where the
        plan trains in mixed precision)."""
        model.eval()
        out = []
        step = self.rows.eval_batch or 256
        for start in range(0, len(x), step):
            xb = x[start : start + step].float()
            xb = (xb.pin_memory() if self.pin else xb).to(self.device, non_blocking=True)
            if self.fmt is not None:
                xb = xb.contiguous(memory_format=self.fmt)
            with self.autocast() if amp else contextlib.nullcontext():
                logits = model(xb).float()
            if not raw:
                logits = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)
            out.append(logits.cpu())
        return torch.cat(out).numpy().astype(np.float64)

    def predict_val(self, model: nn.Module) -> np.ndarray:
        """Validation probabilities; under DDP each rank predicts a strided shard and all gather them."""
        val_x = self.rows.val_x
        if not self.dist.enabled:
            return self.predict(val_x, model)
        n = len(val_x)
        mine = torch.arange(self.dist.rank, n, self.dist.world_size)
        k = len(self.samples.classes)
        local = self.predict(val_x[mine], model) if len(mine) else np.zeros((0, k))
        return self.dist.gather_strided(local, n)

    def val_logits(self) -> np.ndarray:
        """The selected model's logits on every validation row (rank 0 alone, after the epochs), in fp32 as the
        bundle runs: per-finding temperatures are fitted on logits, which a saturated float32 sigmoid no
        longer tells, and thresholds on what the bundle will answer."""
        model = to_device(self.best_model(), self.device, self.fmt)
        return self.predict(self.rows.val_x, model, raw=True, amp=False)

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def best_model(self) -> nn.Module:
        # Building a model draws initial weights: keep the training RNG stream untouched (exact resume).
        with torch.random.fork_rng(devices=[]):
            model = create_network(self.plan, len(self.samples.classes))
        assert self.best.state is not None
        model.load_state_dict(self.best.state)
        return model.eval()

    def run(
        self, state: dict[str, Any] | None, deadline: float | None
    ) -> tuple[list[dict[str, float]], int, np.ndarray]:
        """Train from the start, or on from a checkpoint's ``state``, until the planned epochs are done,
        validation stops improving or ``deadline`` (a reading of the clock) comes; return the history, the
        selected epoch and the selected model's validation probabilities."""
        history: list[dict[str, float]] = []
        self.stop_reason, self.epochs_run, start_epoch = "completed", 0, 0
        if state is not None:
            self._restore(state)
            history, start_epoch = state["history"], state["epoch"] + 1
            self.freeze_schedule.resume(history)
        epoch_times: list[float] = []
        with ProgressDisplay(self.plan.epochs, start_epoch, enabled=self.progress) as bar:
            for epoch in range(start_epoch, self.plan.epochs):
                history.append(self._epoch(epoch, epoch_times))
                self._replan(epoch + 1, epoch_times, deadline)
                if self.dist.is_main and self.ckpt_dir is not None:
                    self._checkpoint(epoch, history)
                horizon = self.schedule.horizon_epochs if self.schedule.clock_driven else self.plan.epochs
                remaining = (horizon - epoch - 1) * float(np.mean(epoch_times[-3:]))
                if deadline is not None:
                    remaining = min(remaining, max(deadline - self.clock(), 0.0))
                bar.update(history[-1], self.best.auc, remaining, total=horizon)
                if self._stops(epoch, epoch_times, deadline):
                    break
                # With measured threads: follow other processes' load between epochs (medclf.threads).
                if self.load_monitor is not None and (change := threads_mod.follow_load(self.load_monitor)):
                    reporting.current().print(change)
        self.epochs_run = len(history)
        if self.best.state is None:
            # Resumed after the last epoch had already run: rebuild the best model from its checkpoint.
            assert self.ckpt_dir is not None
            self.best.state = checkpoint.load_best(self.ckpt_dir, required=True)
            self.best.probs = self.predict_val(to_device(self.best_model(), self.device, self.fmt))
        assert self.best.probs is not None
        return history, self.best.epoch, self.best.probs

    def _epoch(self, epoch: int, epoch_times: list[float]) -> dict[str, float]:
        """Train and validate epoch ``epoch``, update the selection; the epoch's history row."""
        t0 = self.clock()
        self.epoch = epoch
        horizon = self.schedule.horizon_epochs if self.schedule.clock_driven else self.plan.epochs
        phase = self.freeze_schedule.phase(epoch, horizon)
        loss = self.train_epoch()
        probs = self.predict_val(self.eval_model())
        val_y = self.samples.labels[self.data.val_idx]
        if self.multilabel:  # selection on macro AUC over the findings
            val_auc, val_loss, val_acc = multilabel_epoch_scores(val_y, probs)
        else:
            val_auc, val_loss, val_acc = epoch_scores(val_y, probs, len(self.samples.classes))
        epoch_times.append(self.clock() - t0)
        if self.dist.agree(self.best.improved_by(val_auc, val_loss)):
            self.best.take(epoch + 1, val_auc, val_loss, plain_state(self.eval_model()), probs)
        row = {
            "epoch": epoch + 1,
            "loss": loss,
            "val_auc": val_auc,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": epoch_times[-1],
            "wall_s": self.clock() - self.t_start,
            "threads": torch.get_num_threads(),
        }
        if self.plan.linear_probe > 0:
            row["phase"] = phase
        if self.hooks.on_epoch is not None and self.dist.is_main:
            with torch.random.fork_rng(devices=[]):
                row.update(self.hooks.on_epoch(dict(row), self.eval_model(), self.plan) or {})
        return row

    def _stops(self, epoch: int, epoch_times: list[float], deadline: float | None) -> bool:
        """Whether the loop ends after epoch ``epoch`` (patience spent, or the clock); sets the reason."""
        patience = self.schedule.patience()
        if epoch + 1 - self.best.epoch >= patience:
            self.stop_reason = "early_stop"
            reporting.current().print(
                f"Early stop: validation AUC has not come within {AUC_TIE} of its best for {patience} epochs"
            )
            return True
        if self.schedule.clock_driven and deadline is not None:
            if epoch + 1 < self.schedule.horizon_epochs:
                return False
            if epoch + 1 < self.plan.epochs:
                self.stop_reason = "time_budget"
                annealed = self.schedule.completed(self.scheduler.last_epoch)
                reporting.current().print(
                    f"Time budget reached after {epoch + 1} of {self.plan.epochs} planned epochs: "
                    + (
                        "the schedule was fitted to end here"
                        if annealed
                        else "[yellow]stopping before the learning rate annealed[/]"
                    )
                )
            return True
        next_epoch = epoch_pace(float(np.mean(epoch_times[-3:])))
        if self.dist.agree(deadline is not None and self.clock() + next_epoch > deadline):
            if epoch + 1 < self.plan.epochs:
                self.stop_reason = "time_budget"
                reporting.current().print("Time budget reached: stopping with the best model so far")
            return True
        return False

    def _replan(self, epochs_done: int, epoch_times: list[float], deadline: float | None) -> None:
        """Clock-driven schedule: fit the horizon to the epochs that still fit (rank 0 decides for all)."""
        if not self.schedule.clock_driven or deadline is None:
            return
        pace = replan_pace(epoch_times)
        if self.dist.is_main:
            self.schedule.replan(self.scheduler.last_epoch, epochs_done, deadline - self.clock(), pace)
        self.schedule.load_state_dict(self.dist.broadcast_json(self.schedule.state_dict()))
        # LambdaLR computed the next step's learning rate under the old horizon.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.schedule.lr_factor(self.scheduler.last_epoch)

    def schedule_record(self) -> dict[str, Any]:
        """The schedule as it ran, for the bundle: planned vs run epochs and whether it annealed."""
        return self.schedule.record(int(self.scheduler.last_epoch), self.epochs_run, self.stop_reason)

    def _checkpointed(self) -> dict[str, Any]:
        """What a checkpoint holds of the loop (:mod:`medclf.training.checkpoint`)."""
        return {
            "best": self.best,
            "model": self.model,
            "ema": self.ema,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "schedule": self.schedule,
            "gen": self.gen,
        }

    def _checkpoint(self, epoch: int, history: list[dict[str, float]]) -> None:
        assert self.ckpt_dir is not None
        fingerprint = self.prepared.fingerprint
        checkpoint.save(
            self.ckpt_dir, epoch, history, plan=self.plan, fingerprint=fingerprint, **self._checkpointed()
        )

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("data_fingerprint") != self.prepared.fingerprint:
            raise ConfigError("--resume: the data changed since the checkpoint was written; start a new run")
        assert self.ckpt_dir is not None
        checkpoint.restore(self.ckpt_dir, state, **self._checkpointed())
        if self.best.state is not None:
            self.best.probs = self.predict_val(to_device(self.best_model(), self.device, self.fmt))
