"""The training schedule: warm-up and cosine learning rate, EMA decay and early-stopping patience, driven by
the epochs that really fit the time budget.

With ``--epochs N`` the schedule is the classic one: linear warm-up over (at most) the first epoch, then a
cosine from the peak to zero at step ``N x steps_per_epoch``; the EMA averages over about the last tenth of
the steps, and early stopping waits ``patience`` epochs.

When the planner chose the epochs from a time budget, the machine may not keep the planner's promise: another
process takes a core, and epochs run three times slower than timed. A cosine laid out over the planned
epochs would then be cut by the deadline while the learning rate is still high. So after every epoch the
schedule is **re-planned**: the horizon becomes the epochs done plus those that still fit before the
deadline at the pace just measured, and the cosine is stretched or compressed to end exactly there.

Why re-planning at epoch boundaries rather than progress = max(step fraction, time fraction): training can
only stop at an epoch boundary (validation, checkpoint and model selection happen there), and the deadline
usually falls inside an epoch that cannot run. A time fraction reaches 1 only at the deadline, so the last
epoch that does run would end with the learning rate well above zero whenever epochs are long (at 5 epochs
in the budget: ~10 % of the peak). Re-planning in whole epochs anneals to zero at the end of the last epoch
that fits. It also keeps the schedule a function of the step counter and three numbers changed only at epoch
boundaries (:meth:`Schedule.state_dict`), so a checkpoint holds all of it and resuming is exact.

Progress never goes backwards: re-planning anchors the cosine at the progress reached so far and spreads
what remains over the new horizon (a faster machine slows the decay, a slower one speeds it up). The EMA
horizon (a tenth of the planned steps) and the patience (the same fraction of the horizon as of the planned
epochs) follow the horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Schedule"]


@dataclass
class Schedule:
    """``steps_per_epoch`` optimiser steps per epoch, ``planned_epochs`` of them, early stopping after
    ``patience`` epochs without improvement; ``clock_driven``: re-plan with :meth:`replan` after epochs."""

    steps_per_epoch: int
    planned_epochs: int
    patience_epochs: int
    clock_driven: bool = False

    def __post_init__(self) -> None:
        self.steps_per_epoch = max(1, int(self.steps_per_epoch))
        self.planned_epochs = max(1, int(self.planned_epochs))
        self.horizon_epochs = self.planned_epochs
        planned_steps = self.steps_per_epoch * self.planned_epochs
        self.warmup = min(self.steps_per_epoch, planned_steps // 5 + 1)
        # The cosine runs from (anchor_step, anchor_progress) to progress 1 at the horizon's last step.
        self.anchor_step = self.warmup
        self.anchor_progress = 0.0

    @property
    def total_steps(self) -> int:
        return self.horizon_epochs * self.steps_per_epoch

    def progress(self, step: int) -> float:
        """How far along the cosine ``step`` is, from 0 (end of warm-up) to 1 (the horizon)."""
        if step < self.warmup:
            return 0.0
        span = max(1, self.total_steps - self.anchor_step)
        return min(
            1.0, self.anchor_progress + (1.0 - self.anchor_progress) * (step - self.anchor_step) / span
        )

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of the peak (``LambdaLR``'s lambda)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def ema_decay(self) -> float:
        """The EMA decay that averages over about the last tenth of the horizon (at least 10 steps)."""
        return min(0.9995, 1.0 - 1.0 / max(10.0, self.total_steps / 10))

    def patience(self) -> int:
        """Epochs without improvement before early stopping: the planned patience, scaled with the horizon
        when the schedule follows the clock (at least 2)."""
        if not self.clock_driven or self.horizon_epochs == self.planned_epochs:
            return self.patience_epochs
        return max(2, math.ceil(self.patience_epochs * self.horizon_epochs / self.planned_epochs))

    def replan(self, step: int, epochs_done: int, seconds_left: float, epoch_seconds: float) -> int:
        """After ``epochs_done`` epochs (``step`` optimiser steps), with ``seconds_left`` before the deadline
        and epochs taking ``epoch_seconds``: set the horizon to the epochs that fit (at most the planned
        ones, at least those done) and return it. Does nothing unless the schedule follows the clock."""
        if not self.clock_driven:
            return self.horizon_epochs
        fit = int(max(0.0, seconds_left) // max(epoch_seconds, 1e-9))
        horizon = max(epochs_done, min(self.planned_epochs, epochs_done + fit))
        if horizon == epochs_done:
            return horizon  # no further epoch fits: training ends here, annealed or not (completed() says)
        if horizon != self.horizon_epochs:
            if step >= self.warmup:
                self.anchor_progress = self.progress(step)
                self.anchor_step = step
            self.horizon_epochs = horizon
        return horizon

    def completed(self, step: int) -> bool:
        """Whether the learning rate has been annealed (the cosine ran to its end) by ``step``."""
        return self.progress(step) >= 0.999 or self.lr_factor(step) <= 1e-3

    def record(self, step: int, epochs_run: int, stop_reason: str) -> dict[str, Any]:
        """The schedule as it ran up to ``step``, for the bundle: planned vs run epochs, whether it annealed."""
        return {
            "mode": "clock" if self.clock_driven else "epochs",
            "planned_epochs": self.planned_epochs,
            "horizon_epochs": self.horizon_epochs,
            "epochs_run": epochs_run,
            "stop_reason": stop_reason,
            "completed": self.completed(step),
            "final_progress": round(self.progress(step), 4),
            "final_lr_factor": round(self.lr_factor(step), 4),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "horizon_epochs": self.horizon_epochs,
            "anchor_step": self.anchor_step,
            "anchor_progress": self.anchor_progress,
            "clock_driven": self.clock_driven,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:  # a checkpoint from before the schedule was saved: the epoch-based schedule
            return
        self.horizon_epochs = int(state["horizon_epochs"])
        self.anchor_step = int(state["anchor_step"])
        self.anchor_progress = float(state["anchor_progress"])
