"""The epochs of one pretraining run (:class:`PretrainLoop`): SimCLR steps on the cached rows, a k-NN probe
after every epoch, a checkpoint after every epoch, and the clock.

The clock, as in ``medclf train``: without ``--epochs`` the cosine's horizon is re-planned after every epoch
to end at the last epoch that fits (:class:`medclf.schedule.Schedule`), and, beyond what train does, the
run stops at the step at which the next one would end after the deadline (a machine that slows down, or a
budget that holds less than one full pass over the images: :mod:`medclf.pretrain.pace`).

Under torchrun (:mod:`medclf.distributed`) the pieces are train's: every epoch all processes draw the same
permutation (seeded by the epoch), each global batch is split into one disjoint shard per process, DDP
all-reduces the gradients, and the loss is the global batch's (:func:`medclf.pretrain.simclr.
global_contrastive_loss`). Rank 0 runs the k-NN probe, takes every decision that depends on the clock and
tells the others, and alone writes checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from medclf import reporting
from medclf.budget import Budget, epoch_pace, replan_pace
from medclf.distributed import DistContext, epoch_seed, log_shards, shard
from medclf.errors import ConfigError
from medclf.pretrain.config import PretrainConfig
from medclf.pretrain.data import PretrainData, ProbeSet
from medclf.pretrain.simclr import ContrastiveNet, SimclrStep, build_net
from medclf.schedule import Schedule

LAST, STATE = "last.safetensors", "state.json"
STATE_KEY = "medclf_pretraining_state"  # the metadata entry of LAST that holds the state
KNN_K = 10
# The pace of the next step: the median of this many recent steps (one slowed by another process does not
# stop the run).
RECENT_STEPS = 5


class PretrainLoop:
    """The network, optimiser, schedule and history of one run, epoch by epoch: ``planned_epochs`` of
    ``steps_per_epoch`` steps of ``batch`` images (the global batch under torchrun); ``step_seconds``: the
    timing probe's price of a step (None without a clock: ``--epochs``)."""

    def __init__(
        self,
        cfg: PretrainConfig,
        data: PretrainData,
        arch_kwargs: dict[str, Any],
        *,
        batch: int,
        stepper: SimclrStep,
        budget: Budget,
        dist: DistContext,
        steps_per_epoch: int,
        planned_epochs: int,
        step_seconds: float | None = None,
    ) -> None:
        self.cfg, self.data, self.arch_kwargs, self.batch = cfg, data, dict(arch_kwargs), batch
        self.stepper, self.device, self.budget, self.dist = stepper, stepper.device, budget, dist
        net, self.omitted = build_net(cfg.arch, data.spec, self.arch_kwargs, cfg.projection_dim)
        if dist.enabled and self.device.startswith("cuda"):
            # Per-GPU batches are small: batch-norm statistics over the global batch, as train does.
            net = cast(ContrastiveNet, nn.SyncBatchNorm.convert_sync_batchnorm(net))
        self.net = net.to(self.device)
        self.train_net: nn.Module = self.net
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            self.train_net = DistributedDataParallel(self.net, device_ids=ids)
        self.steps_per_epoch = steps_per_epoch
        self.schedule = Schedule(
            steps_per_epoch, planned_epochs, patience_epochs=10**6, clock_driven=not cfg.epochs
        )
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = self.schedule

        def lr_factor(step: int) -> float:
            return schedule.lr_factor(step)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.amp = stepper.amp
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.amp == "fp16" and self.device.startswith("cuda") else None
        )
        self.step_seconds = step_seconds
        self.step_times: list[float] = []
        self.history: list[dict[str, float]] = []
        self.start_epoch, self.epochs_run, self.stop_reason = 0, 0, "completed"

    # -- the epochs ------------------------------------------------------------------------------------
    def epochs(self, ckpt: Path, deadline: float | None) -> None:
        """Train from ``start_epoch`` until the planned epochs are done or ``deadline`` (a reading of the
        budget's clock; None: no clock) comes."""
        clock, times = self.budget.clock, []
        planned = self.schedule.planned_epochs
        for epoch in range(self.start_epoch, planned):
            if self.schedule.clock_driven and epoch >= self.schedule.horizon_epochs:
                break
            t0 = clock()
            loss, steps = self._train_epoch(epoch, deadline)
            if steps == 0:  # the deadline came before this epoch's first step
                self.stop_reason = "time_budget"
                break
            cut = steps < self.steps_per_epoch
            knn = self.knn_accuracy() if self.dist.is_main else None
            times.append(clock() - t0)
            row = {
                "epoch": epoch + 1,
                "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": times[-1],
                "wall_s": self.budget.elapsed(),
            }
            if cut:
                row["steps"] = steps
                self.stop_reason = "time_budget"
            if knn is not None:
                row["knn_acc"] = knn
            self.history.append(row)
            if not cut:
                self._replan(epoch + 1, times, deadline)
            if self.dist.is_main:
                self._save(ckpt, epoch)
            last = (
                cut
                or epoch + 1 >= planned
                or (deadline is not None and self._out_of_time(epoch, times, deadline))
            )
            self._report(row, last, deadline)
            if last:
                break
        self.epochs_run = len(self.history)
        if self.stop_reason == "time_budget" and not self.schedule.completed(int(self.scheduler.last_epoch)):
            reporting.current().warn(
                "the time budget ran out before the learning rate annealed (the machine ran slower than "
                "timed); the backbone is written as it stands"
            )

    def _batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """This process's images of each step of epoch ``epoch``."""
        rows, b = self.data.rows, self.batch
        if self.dist.enabled:
            # As train's batches (medclf.training.rows): one permutation for all processes, seeded by the
            # epoch as DistributedSampler.set_epoch does, and augmentation draws of each process's own;
            # recomputed from the epoch, so resuming is exact on every rank.
            order_gen = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch))
            self.gen.manual_seed(epoch_seed(self.cfg.seed, epoch, self.dist.rank))
            torch.manual_seed(epoch_seed(self.cfg.seed, epoch, self.dist.rank, stream=1))
            order = torch.randperm(len(rows), generator=order_gen)
        else:
            order = torch.randperm(len(rows), generator=self.gen)
        shards = [shard(order[s * b : (s + 1) * b], self.dist) for s in range(self.steps_per_epoch)]
        if os.environ.get("MEDCLF_DEBUG_SHARDS"):
            log_shards(self.dist, epoch, [s.numpy() for s in shards])
        for idx in shards:
            yield rows[idx].float()

    def _train_epoch(self, epoch: int, deadline: float | None) -> tuple[float, int]:
        """The steps of epoch ``epoch`` that fit before ``deadline``: their mean loss and their number."""
        self.train_net.train()
        clock = self.budget.clock
        total, count, steps = 0.0, 0, 0
        for x in self._batches(epoch):
            if deadline is not None and self._no_time_for_a_step(deadline):
                break
            t0 = clock()
            loss = self.stepper.run(self.train_net, self.optimizer, self.scaler, x, self.gen, gather=True)
            self.step_times.append(clock() - t0)
            steps += 1
            if loss is None:
                reporting.current().warn(f"a non-finite SSL loss at step {steps}: step skipped")
                continue
            self.scheduler.step()
            total += loss * len(x)
            count += len(x)
        if steps and not count:
            raise ConfigError(
                f"every SimCLR step of epoch {epoch + 1} had a non-finite loss: lower --lr or raise --temperature"
            )
        return total / max(count, 1), steps

    def _no_time_for_a_step(self, deadline: float) -> bool:
        """Whether the next step, at the recent pace (the timing probe's before any), would end after
        ``deadline`` (rank 0's clock decides for every process)."""
        recent = self.step_times[-RECENT_STEPS:]
        step_s = float(np.median(recent)) if recent else (self.step_seconds or 0.0)
        return self.dist.agree(self.budget.clock() + epoch_pace(step_s) > deadline)

    def _replan(self, epochs_done: int, times: list[float], deadline: float | None) -> None:
        """Fit the cosine's horizon to the epochs that still fit before ``deadline`` (rank 0 decides)."""
        if not self.schedule.clock_driven or deadline is None:
            return
        pace = replan_pace(times)
        if self.dist.is_main:
            self.schedule.replan(self.scheduler.last_epoch, epochs_done, deadline - self.budget.clock(), pace)
        self.schedule.load_state_dict(self.dist.broadcast_json(self.schedule.state_dict()))
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.schedule.lr_factor(self.scheduler.last_epoch)

    def _out_of_time(self, epoch: int, times: list[float], deadline: float) -> bool:
        """Whether no further epoch fits: the clock's horizon is reached, or (when the schedule could not
        shrink below the epochs done) the next epoch at the recent pace would end after ``deadline``."""
        next_end = self.budget.clock() + epoch_pace(float(np.mean(times[-3:])))
        done = self.dist.agree(
            next_end > deadline or (self.schedule.clock_driven and epoch + 1 >= self.schedule.horizon_epochs)
        )
        if done:
            self.stop_reason = "time_budget"
        return done

    def _report(self, row: dict[str, float], last: bool, deadline: float | None) -> None:
        epoch = int(row["epoch"])
        horizon = epoch if last else self.schedule.horizon_epochs
        knn = f"  k-NN acc {row['knn_acc']:.3f}" if "knn_acc" in row else ""
        left = (horizon - epoch) * row["seconds"]
        if deadline is not None:
            left = min(left, max(deadline - self.budget.clock(), 0.0))
        cut = f", stopped by the time budget after {int(row['steps'])} steps" if "steps" in row else ""
        reporting.current().print(
            f"epoch {epoch}/{horizon}  SSL loss {row['loss']:.4f}{knn}  "
            f"lr {row['lr']:.2e}  left ~{left / 60:.1f} min  ({row['seconds']:.1f} s{cut})",
            highlight=False,
        )

    # -- the k-NN probe ----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``x`` (no projection head, as SimCLR evaluates), L2-normalised."""
        self.net.eval()
        out = [
            self.net.backbone(x[i : i + 256].float().to(self.device)).float().cpu()
            for i in range(0, len(x), 256)
        ]
        return torch.nn.functional.normalize(torch.cat(out), dim=1)

    def knn_accuracy(self) -> float | None:
        """Accuracy of a k-nearest-neighbour classifier (cosine) on the backbone's features, from the probe
        source's labels: a pretraining run learns without them; this only shows whether it learns."""
        probe: ProbeSet | None = self.data.probe
        if probe is None:
            return None
        from sklearn.neighbors import KNeighborsClassifier

        k = min(KNN_K, len(probe.ref_y))
        ref, query = self.embed(probe.ref_x), self.embed(probe.query_x)
        if not (torch.isfinite(ref).all() and torch.isfinite(query).all()):
            raise ConfigError(
                "the backbone's features are no longer finite numbers (SimCLR diverged): lower --lr or "
                "raise --temperature"
            )
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(ref.numpy(), probe.ref_y)
        return float(np.mean(knn.predict(query.numpy()) == probe.query_y))

    # -- checkpoints -------------------------------------------------------------------------------------
    def _save(self, ckpt: Path, epoch: int) -> None:
        """The checkpoint after epoch ``epoch``: the tensors and, in the same file's metadata, the state that
        goes with them, so one rename commits both (a kill at any moment leaves a consistent epoch).
        ``state.json`` repeats the state for people and scripts to read."""
        ckpt.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.gen"] = self.gen.get_state()
        meta = json.dumps(
            {
                "epoch": epoch,
                "history": self.history,
                "config": {**asdict(self.cfg), "splits": list(self.cfg.splits)},
                "spec": self.data.spec.to_dict(),
                "arch_kwargs": self.arch_kwargs,
                "batch_size": self.batch,
                "world_size": self.dist.world_size,
                "steps_per_epoch": self.steps_per_epoch,
                "planned_epochs": self.schedule.planned_epochs,
                "scheduler": self.scheduler.state_dict(),
                "schedule": self.schedule.state_dict(),
                "optim_param_groups": opt["param_groups"],
                "data_fingerprint": self.data.fingerprint,
            }
        )
        tmp = ckpt / (LAST + ".tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata={STATE_KEY: meta})
        os.replace(tmp, ckpt / LAST)
        tmp = ckpt / (STATE + ".tmp")
        tmp.write_text(meta)
        os.replace(tmp, ckpt / STATE)

    def restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        """Continue from the checkpoint ``state`` in ``ckpt`` (every process reads the same files)."""
        try:
            tensors = load_file(str(ckpt / LAST))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"{ckpt}: the checkpoint is damaged ({exc}); start a new run") from exc
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        opt: dict[str, Any] = {"state": {}, "param_groups": state["optim_param_groups"]}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                opt["state"].setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(state["scheduler"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(tensors["rng.torch"])
        self.gen.set_state(tensors["rng.gen"])
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"]) + 1


def load_state(ckpt: Path) -> dict[str, Any] | None:
    """The checkpoint's state (None when there is no checkpoint): the one stored with its tensors, or, from a
    checkpoint written before the two were one file, ``state.json``."""
    if not (ckpt / LAST).exists():
        return None
    try:
        with safe_open(str(ckpt / LAST), framework="pt") as fh:
            stored = (fh.metadata() or {}).get(STATE_KEY)
        if stored is None:
            if not (ckpt / STATE).exists():
                return None
            stored = (ckpt / STATE).read_text()
        state: dict[str, Any] = json.loads(stored)
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{ckpt}: the checkpoint is damaged ({exc}); start a new run") from exc
    return state
