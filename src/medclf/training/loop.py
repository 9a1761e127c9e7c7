"""The epoch loop: training steps, validation, model selection, early stopping, the clock-driven
schedule, checkpoints and resume."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from medclf import augment as augment_mod
from medclf import threads as threads_mod
from medclf.budget import epoch_pace
from medclf.data.cache import PreparedData
from medclf.data.samples import SampleSet
from medclf.data.stream import (
    block_shuffled_order,
    parse_bytes,
    prefetched,
    return_freed_batches_to_os,
    should_stream,
)
from medclf.distributed import DistContext, epoch_seed, shard
from medclf.errors import ConfigError
from medclf.planner import (
    Plan,
)
from medclf.schedule import Schedule
from medclf.training.checkpoint import _atomic_save_tensors, _json_safe
from medclf.training.config import TrainConfig
from medclf.training.network import _create, _freeze, _load_transfer_weights, _plain_state, _warmup_ema
from medclf.training.progress import _ProgressDisplay
from medclf.training.rows import _log_shards, _rows

AUC_TIE = 1e-3


class _Loop:
    """The epoch loop, its checkpoints and its progress display."""

    def __init__(
        self,
        plan: Plan,
        samples: SampleSet,
        prepared: PreparedData,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        cfg: TrainConfig,
        device: str,
        ckpt_dir: Path,
        console: Console,
        progress: bool,
        dist: DistContext | None = None,
        clock_driven: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.plan, self.samples, self.prepared, self.cfg = plan, samples, prepared, cfg
        self.clock = clock or time.perf_counter
        self.device, self.ckpt_dir, self.console, self.progress = device, ckpt_dir, console, progress
        self.train_idx, self.val_idx = train_idx, val_idx
        dims = plan.spec.spatial_dims
        self.fmt = (
            (torch.channels_last if dims == 2 else torch.channels_last_3d) if plan.channels_last else None
        )
        n_classes = len(samples.classes)
        self.model = _create(plan, n_classes)
        if plan.init_from:
            _load_transfer_weights(self.model, plan, samples.classes, console)
        self.dist = dist or DistContext()
        if self.dist.enabled and device.startswith("cuda"):
            # Per-GPU batches of images are small: batch-norm statistics over the global batch instead.
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.frozen = _freeze(self.model, plan.freeze)
        self.model = self._to_device(self.model)
        # What the training step calls: DDP (gradients all-reduced) and/or torch.compile around the model;
        # checkpoints, EMA and the bundle always use the plain self.model.
        self.train_model = self._parallel(self.model)
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        steps_per_epoch = max(1, len(train_idx) // plan.batch_size)
        # Warm-up and cosine, the EMA's horizon and the patience (re-planned after epochs when clock-driven).
        self.schedule = Schedule(steps_per_epoch, plan.epochs, plan.patience, clock_driven=clock_driven)
        self.total_steps = self.schedule.total_steps
        if plan.ema:
            # Average over roughly the last tenth of training (at least 10 steps).
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=_warmup_ema(self.schedule.ema_decay), use_buffers=True
            )
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=plan.lr,
            weight_decay=plan.weight_decay,
        )
        schedule = self.schedule

        def lr_factor(step: int) -> float:  # a plain function: LambdaLR's state then holds only counters
            return schedule.lr_factor(step)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        # Another process's load, measured over each epoch (set by _train_one when threads were measured).
        self.load_monitor: threads_mod.LoadMonitor | None = None
        counts = np.bincount(samples.labels[train_idx], minlength=n_classes).astype(np.float64)
        # Balanced class weights (n / (K n_c)), so a rare class counts as much as a common one.
        weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
        self.class_weights = torch.tensor(weights, dtype=torch.float32, device=device)
        self.aug = augment_mod.build_augmentation(plan.augment, dims)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.amp)
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        # fp16 has too few exponent bits for small gradients: scale the loss (bf16 needs no scaling).
        self.scaler = torch.amp.GradScaler(dev_type) if plan.amp == "fp16" else None
        self.pin = dev_type == "cuda"  # page-locked host batches: the copy to the GPU runs asynchronously
        self.epoch = 0
        self.streaming = self._decide_streaming()
        # Streaming means memory is tight: evaluate in training-sized batches (activations of 256 samples at
        # once can outweigh the data); otherwise in larger ones for speed.
        self.eval_batch: int | None = plan.batch_size if self.streaming else None
        self.train_x = _rows(prepared.tensors, train_idx, self.streaming)
        self.val_x = _rows(prepared.tensors, val_idx, self.streaming)
        self.train_y = torch.from_numpy(samples.labels[train_idx])
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epoch_callback: Callable[[dict[str, Any], nn.Module, Plan], dict[str, Any] | None] | None = None
        # (augmented batch, logits, cross-entropy) -> the loss to minimise; knowledge distillation sets it.
        self.loss_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # Per-training-sample sampling weights (shortcut mitigation: class x acquisition group balance).
        self.sample_weights: torch.Tensor | None = None
        self.t_start = self.clock()

    def _to_device(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=self.fmt) if self.fmt is not None else model

    def _parallel(self, model: nn.Module) -> nn.Module:
        wrapped = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _decide_streaming(self) -> bool:
        t = self.prepared.tensors
        row_bytes = int(np.prod(t.shape[1:])) * t.dtype.itemsize
        nbytes = row_bytes * (len(self.train_idx) + len(self.val_idx))
        stream, why = should_stream(
            self.cfg.stream,
            nbytes,
            copies=self.dist.local_world_size,
            memory_limit=parse_bytes(self.cfg.memory_limit),
        )
        if stream and getattr(t, "filename", None) is None:
            stream, why = False, "no disk cache to stream from: rows held in memory"
        if stream or self.cfg.stream != "auto":
            self.console.print(f"Training data: {why}")
        if stream:
            return_freed_batches_to_os()
        return stream

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.train_idx)
        order_gen = self.gen
        if self.dist.enabled:
            # One permutation for all ranks (seeded by the epoch, as DistributedSampler.set_epoch does) and
            # augmentation draws of each rank's own; recomputed from the epoch, so resuming is exact.
            order_gen = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, self.epoch))
            self.gen.manual_seed(epoch_seed(self.cfg.seed, self.epoch, self.dist.rank))
            # Dropout draws from the global generator: per rank and epoch too (only rank 0's is checkpointed).
            torch.manual_seed(epoch_seed(self.cfg.seed, self.epoch, self.dist.rank, stream=1))
        if self.sample_weights is not None:
            perm = torch.multinomial(self.sample_weights, n, replacement=True, generator=order_gen)
        elif self.streaming:  # neighbouring rows together: sequential-ish reads from the disk cache
            perm = block_shuffled_order(n, order_gen)
        else:
            perm = torch.randperm(n, generator=order_gen)
        bs = self.plan.batch_size
        # Drop the ragged last batch: a batch of 1 breaks batch norm, and the order is reshuffled anyway.
        # Under DDP each rank takes its disjoint share of every global batch of bs samples.
        starts = range(0, n - bs + 1 if n >= bs else 1, bs)
        shards = [shard(perm[start : start + bs], self.dist) for start in starts]
        if os.environ.get("MEDCLF_DEBUG_SHARDS"):
            _log_shards(self.dist, self.epoch, [self.train_idx[s.numpy()] for s in shards])
        for idx, x in prefetched(self.train_x.__getitem__, shards, depth=2 if self.streaming else 0):
            x, y = self.aug(x.float(), self.gen), self.train_y[idx]
            if self.plan.mix != "none":
                x, y = augment_mod.mix_batch(
                    self.plan.mix, self.plan.mix_alpha, x, y, len(self.samples.classes), self.gen
                )
            # CUDA kernels run asynchronously: this CPU work for the next batch overlaps the GPU's step.
            yield (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dev_type = "cuda" if self.device.startswith("cuda") else "cpu"
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev_type, dtype=self.amp_dtype)

    def train_epoch(self) -> float:
        self.model.train()
        for module in self.frozen:
            module.eval()  # frozen layers keep their batch-norm statistics too
        total, count, skipped = 0.0, 0, 0
        for x, y in self._batches():
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.fmt is not None:
                x = x.contiguous(memory_format=self.fmt)
            with self._autocast():
                logits = self.train_model(x)
            # Hard labels, or the soft targets of a mixed batch (the same weighted cross-entropy on both).
            loss = F.cross_entropy(
                logits.float(), y, weight=self.class_weights, label_smoothing=self.plan.label_smoothing
            )
            if self.loss_hook is not None:
                loss = self.loss_hook(x, logits.float(), loss)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = True
            else:
                loss.backward()
                # One non-finite gradient would make every weight it reaches NaN for good (seen with
                # PyTorch 2.13's CPU bf16 3D convolution backward, now and then, on finite inputs): skip such
                # a step, as GradScaler does for fp16. Only on the CPU, whose steps are synchronous anyway: on
                # a GPU the check would make every step wait for the host.
                stepped = self.device.startswith("cuda") or self._finite_gradients()
                if stepped:
                    self.optimizer.step()
                else:
                    skipped += 1
            if stepped:  # a skipped step advances neither the schedule nor the average
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
            total += loss.detach().double() * len(y)  # no .item(): a GPU step need not wait for the host
            count += len(y)
        if skipped:
            self.console.print(
                f"[yellow]warning:[/] {skipped} training step(s) of epoch {self.epoch + 1} had non-finite "
                "gradients and were skipped"
            )
        total, count = self.dist.sum([float(total), count])
        return total / max(count, 1)

    def _finite_gradients(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    @torch.no_grad()
    def predict(self, x: torch.Tensor, model: nn.Module) -> np.ndarray:
        model.eval()
        out = []
        step = self.eval_batch or 256
        for start in range(0, len(x), step):
            xb = x[start : start + step].float()
            xb = (xb.pin_memory() if self.pin else xb).to(self.device, non_blocking=True)
            if self.fmt is not None:
                xb = xb.contiguous(memory_format=self.fmt)
            with self._autocast():
                out.append(torch.softmax(model(xb).float(), dim=1).cpu())
        return torch.cat(out).numpy().astype(np.float64)

    def predict_val(self, model: nn.Module) -> np.ndarray:
        """Validation probabilities; under DDP each rank predicts a strided shard and all gather them."""
        if not self.dist.enabled:
            return self.predict(self.val_x, model)
        n = len(self.val_x)
        mine = torch.arange(self.dist.rank, n, self.dist.world_size)
        k = len(self.samples.classes)
        local = self.predict(self.val_x[mine], model) if len(mine) else np.zeros((0, k))
        return self.dist.gather_strided(local, n)

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def best_model(self) -> nn.Module:
        # Building a model draws initial weights: keep the training RNG stream untouched (exact resume).
        with torch.random.fork_rng(devices=[]):
            model = _create(self.plan, len(self.samples.classes))
        assert self.best_state is not None
        model.load_state_dict(self.best_state)
        return model.eval()

    def run(
        self, state: dict[str, Any] | None, deadline: float | None
    ) -> tuple[list[dict[str, float]], int, np.ndarray]:
        history: list[dict[str, float]] = []
        self.stop_reason = "completed"
        self.epochs_run = 0
        best_auc, best_loss, best_epoch, start_epoch = -1.0, float("inf"), 0, 0
        if state is not None:
            self._restore(state)
            history = state["history"]
            best_auc, best_loss, best_epoch = state["best_auc"], state["best_loss"], state["best_epoch"]
            start_epoch = state["epoch"] + 1
        val_y = self.samples.labels[self.val_idx]
        epoch_times: list[float] = []
        bar = _ProgressDisplay(self.console, self.plan.epochs, start_epoch, enabled=self.progress)
        with bar:
            for epoch in range(start_epoch, self.plan.epochs):
                t0 = self.clock()
                self.epoch = epoch
                loss = self.train_epoch()
                probs = self.predict_val(self.eval_model())
                val_auc = _auc(val_y, probs, len(self.samples.classes))
                val_loss = float(
                    F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(val_y))
                )
                val_acc = float((probs.argmax(1) == val_y).mean())
                epoch_times.append(self.clock() - t0)
                # Validation AUCs within AUC_TIE of the best are noise: among them keep the later, more
                # annealed model (PneumoniaMNIST: val AUC flat at 0.9965 +- 0.0005 from epoch 11 on while
                # test AUC rose from 0.973 to 0.980).
                if np.isnan(val_auc):  # a validation split with one class: fall back to the loss
                    improved = val_loss < best_loss
                else:
                    improved = val_auc >= best_auc - AUC_TIE
                if self.dist.agree(improved):
                    best_auc, best_loss, best_epoch = (
                        max(best_auc, np.nan_to_num(val_auc, nan=-1.0)),
                        val_loss,
                        epoch + 1,
                    )
                    self.best_state = {
                        k: v.detach().cpu().contiguous().clone()
                        for k, v in _plain_state(self.eval_model()).items()
                    }
                    self.best_probs = probs
                lr = self.optimizer.param_groups[0]["lr"]
                row = {
                    "epoch": epoch + 1,
                    "loss": loss,
                    "val_auc": val_auc,
                    "val_acc": val_acc,
                    "val_loss": val_loss,
                    "lr": lr,
                    "seconds": epoch_times[-1],
                    "wall_s": self.clock() - self.t_start,
                    "threads": torch.get_num_threads(),
                }
                if self.epoch_callback is not None and self.dist.is_main:
                    with torch.random.fork_rng(devices=[]):
                        row.update(self.epoch_callback(dict(row), self.eval_model(), self.plan) or {})
                history.append(row)
                self._replan(epoch + 1, epoch_times, deadline)
                if self.dist.is_main:
                    self._checkpoint(epoch, history, best_auc, best_loss, best_epoch)
                horizon = self.schedule.horizon_epochs if self.schedule.clock_driven else self.plan.epochs
                remaining = (horizon - epoch - 1) * float(np.mean(epoch_times[-3:]))
                if deadline is not None:
                    remaining = min(remaining, max(deadline - self.clock(), 0.0))
                bar.update(row, best_auc, remaining, total=horizon)
                patience = self.schedule.patience()
                if epoch + 1 - best_epoch >= patience:
                    self.stop_reason = "early_stop"
                    self.console.print(
                        f"Early stop: validation AUC has not come within {AUC_TIE} of its best for {patience} epochs"
                    )
                    break
                if self.schedule.clock_driven and deadline is not None:
                    if epoch + 1 >= self.schedule.horizon_epochs:
                        if epoch + 1 < self.plan.epochs:
                            self.stop_reason = "time_budget"
                            annealed = self.schedule.completed(self.scheduler.last_epoch)
                            self.console.print(
                                f"Time budget reached after {epoch + 1} of {self.plan.epochs} planned epochs: "
                                + (
                                    "the schedule was fitted to end here"
                                    if annealed
                                    else "[yellow]stopping before the learning rate annealed[/]"
                                )
                            )
                        break
                elif self.dist.agree(
                    deadline is not None
                    and self.clock() + epoch_pace(float(np.mean(epoch_times[-3:]))) > deadline
                ):
                    if epoch + 1 < self.plan.epochs:
                        self.stop_reason = "time_budget"
                        self.console.print("Time budget reached: stopping with the best model so far")
                    break
                self._follow_load()
        self.epochs_run = len(history)
        if self.best_state is None:
            # Resumed after the last epoch had already run: rebuild the best model from its checkpoint.
            self.best_state = load_file(str(self.ckpt_dir / "best.safetensors"))
            model = self.best_model()
            self.best_probs = self.predict_val(self._to_device(model))
        return history, best_epoch, self.best_probs

    def _replan(self, epochs_done: int, epoch_times: list[float], deadline: float | None) -> None:
        """Clock-driven schedule: fit the horizon to the epochs that still fit (rank 0 decides for all)."""
        if not self.schedule.clock_driven or deadline is None:
            return
        # The first epoch pays one-off costs (kernel creation, compilation): leave it out once others ran.
        recent = epoch_times[1:][-3:] if len(epoch_times) > 1 else epoch_times
        pace = epoch_pace(max(epoch_times[-1], float(np.mean(recent))))
        if self.dist.is_main:
            self.schedule.replan(self.scheduler.last_epoch, epochs_done, deadline - self.clock(), pace)
        self.schedule.load_state_dict(self.dist.broadcast_json(self.schedule.state_dict()))
        # LambdaLR computed the next step's learning rate under the old horizon.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.schedule.lr_factor(self.scheduler.last_epoch)

    def _follow_load(self) -> None:
        """With measured threads: give a core back when another process took it during the last epoch,
        take it again when it is free (see :mod:`medclf.threads`)."""
        policy = threads_mod.current()
        if self.load_monitor is None or policy is None:
            return
        others = self.load_monitor.sample()
        if others is None:
            return
        wanted = replace(policy.cpus, others_busy=others).available
        have = torch.get_num_threads()
        if wanted != have:
            self.console.print(
                f"Threads: {have} -> {wanted} (other processes kept {others:.1f} core(s) busy in the last epoch)"
            )
            threads_mod.set_torch_threads(wanted)

    def schedule_record(self) -> dict[str, Any]:
        """The schedule as it ran, for the bundle: planned vs run epochs and whether it annealed."""
        step = int(self.scheduler.last_epoch)
        return {
            "mode": "clock" if self.schedule.clock_driven else "epochs",
            "planned_epochs": self.schedule.planned_epochs,
            "horizon_epochs": self.schedule.horizon_epochs,
            "epochs_run": self.epochs_run,
            "stop_reason": self.stop_reason,
            "completed": self.schedule.completed(step),
            "final_progress": round(self.schedule.progress(step), 4),
            "final_lr_factor": round(self.schedule.lr_factor(step), 4),
        }

    # --- checkpoints: safetensors for tensors, JSON for the rest (no pickle) ---

    def _checkpoint(
        self, epoch: int, history: list[dict[str, float]], best_auc: float, best_loss: float, best_epoch: int
    ) -> None:
        d = self.ckpt_dir
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for k, v in _plain_state(self.model).items():
            tensors[f"model.{k}"] = v
        if self.ema is not None:
            for k, v in self.ema.state_dict().items():
                tensors[f"ema.{k}"] = v
        opt_state = self.optimizer.state_dict()
        for pid, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.gen"] = self.gen.get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_save_tensors(tensors, d / "last.safetensors")
        if self.best_state is not None and best_epoch == epoch + 1:
            _atomic_save_tensors(self.best_state, d / "best.safetensors")
        meta = {
            "epoch": epoch,
            "plan": self.plan.to_dict(),
            "history": history,
            "best_auc": best_auc,
            "best_loss": best_loss,
            "best_epoch": best_epoch,
            "scheduler": self.scheduler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "optim_param_groups": opt_state["param_groups"],
            "data_fingerprint": self.prepared.fingerprint,
        }
        tmp = d / "state.json.tmp"
        tmp.write_text(json.dumps(meta, default=_json_safe))
        os.replace(tmp, d / "state.json")

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("data_fingerprint") != self.prepared.fingerprint:
            raise ConfigError("--resume: the data changed since the checkpoint was written; start a new run")
        tensors = load_file(str(self.ckpt_dir / "last.safetensors"))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["optim_param_groups"]}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict(opt_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.schedule.load_state_dict(state.get("schedule"))
        torch.set_rng_state(tensors["rng.torch"])
        self.gen.set_state(tensors["rng.gen"])
        best = self.ckpt_dir / "best.safetensors"
        if best.exists():
            self.best_state = load_file(str(best))
            self.best_probs = self.predict_val(self._to_device(self.best_model()))


def _auc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    scores = [roc_auc_score(y == c, probs[:, c]) for c in present]
    return float(np.mean(scores))
