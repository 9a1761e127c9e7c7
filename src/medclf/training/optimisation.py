"""What a loop optimises, and with what: the loss (weighted so that rare classes and findings count), AdamW
(with the probing phase's parameter groups), the learning-rate schedule, the average of the weights (EMA)
and the schedule of frozen layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medclf.models import tasks
from medclf.planner import Plan
from medclf.schedule import Schedule
from medclf.training import probe
from medclf.training.network import warmup_ema


@dataclass
class Optimisation:
    """The loss and the optimiser state of one loop (:func:`build_optimisation`)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: torch.optim.swa_utils.AveragedModel | None
    freeze_schedule: probe.FreezeSchedule
    class_weights: torch.Tensor | None  # one class per image: balanced cross-entropy weights
    pos_weight: torch.Tensor | None  # multi-label findings: per-finding positive weights
    multilabel_loss: str  # its name (tasks.MULTILABEL_LOSSES)
    label_smoothing: float

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The per-finding binary loss (multi-label), or the weighted cross-entropy on hard labels or on the
        soft targets of a mixed batch."""
        if self.pos_weight is not None:
            return tasks.multilabel_loss(self.multilabel_loss, logits, y, self.pos_weight)
        return F.cross_entropy(
            logits.float(), y, weight=self.class_weights, label_smoothing=self.label_smoothing
        )


def build_optimisation(
    model: nn.Module,
    frozen: list[nn.Module],
    plan: Plan,
    schedule: Schedule,
    labels: np.ndarray,
    n_classes: int,
    *,
    multilabel_loss: str | None,
    device: str,
) -> Optimisation:
    """The optimisation of ``model`` as ``plan`` and ``schedule`` say, weighted by the training ``labels``;
    ``multilabel_loss``: the name of the multi-label loss (None: one class per image)."""
    ema: torch.optim.swa_utils.AveragedModel | None = None
    if plan.ema:
        # Average over roughly the last tenth of training (at least 10 steps).
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=warmup_ema(schedule.ema_decay), use_buffers=True
        )
    trainable: Any = [p for p in model.parameters() if p.requires_grad]
    if plan.linear_probe > 0:  # the output layer at the peak rate, the backbone lower (training.probe)
        trainable = probe.param_groups(model, plan.lr, plan.backbone_lr)
    freeze_schedule = probe.FreezeSchedule(model, plan.linear_probe, frozen)
    optimizer = torch.optim.AdamW(trainable, lr=plan.lr, weight_decay=plan.weight_decay)

    def lr_factor(step: int) -> float:  # a plain function: LambdaLR's state then holds only counters
        return schedule.lr_factor(step)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    class_weights = pos_weight = None
    if multilabel_loss is not None:
        pos_weight = torch.tensor(tasks.positive_weights(labels), dtype=torch.float32, device=device)
    elif plan.class_weights == "balanced":
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        # Balanced class weights (n / (K n_c)), so a rare class counts as much as a common one.
        weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
        class_weights = torch.tensor(weights, dtype=torch.float32, device=device)
    return Optimisation(
        optimizer,
        scheduler,
        ema,
        freeze_schedule,
        class_weights,
        pos_weight,
        multilabel_loss=multilabel_loss or "",
        label_smoothing=plan.label_smoothing,
    )


def finite_gradients(model: nn.Module) -> bool:
    """Whether every gradient of ``model`` is finite (no gradient: True)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
