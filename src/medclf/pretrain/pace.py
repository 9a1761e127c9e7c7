"""What a time budget holds for pretraining, priced the way ``medclf train`` prices it (:mod:`medclf.budget`).

Decoding counts against the budget: before it starts, its estimate (the fingerprint's seconds per file,
for the sources not in the cache yet) must leave time to train and to write the backbone
(:func:`check_decoding`). After it, a timing probe (:func:`time_step`: a few SimCLR steps of a throwaway
network of the same architecture) prices a step, and :func:`plan_steps` lays the schedule over what is left:
the whole epochs that fit, or, when not even one full pass over the images fits, one partial epoch of the
steps that do. The run then stops at the step at which the next one would end after the deadline
(:class:`medclf.pretrain.loop.PretrainLoop`), whatever the probe promised.

A budget that leaves fewer than :data:`MIN_STEPS` steps after decoding is refused, in one line that says
what would do. Refused rather than trained with a warning: whoever asks for a pretrained backbone means to
fine-tune from it. A bundle of a handful of steps is, for that purpose, a randomly initialised network,
yet it would verify, call itself ``kind: backbone, method: simclr`` and be fine-tuned from as if it were
one: a warning scrolled past in a log does not travel with the file. ``medclf train`` refuses a budget
spent on decoding alone in the same way, and the refusal costs little: the decoded images stay in the
cache, so the rerun with a larger budget does not pay for decoding again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from medclf.budget import Budget, epoch_pace
from medclf.errors import ConfigError
from medclf.pretrain.simclr import SimclrStep

# The fewest SimCLR steps worth calling a backbone: a floor against random weights, not a promise of good
# ones. Adam-type updates move a weight by at most about the learning rate per step; over 20 steps of
# warm-up and cosine (about half the peak on average) at the default peak of 1e-3 that is ~0.01, about a
# tenth of a weight initialised at ~1/sqrt(fan-in) ~ 0.1. Fewer steps leave the network essentially at its
# random initialisation.
MIN_STEPS = 20
# The timing probe: untimed steps first (oneDNN builds its kernels on the first call and AdamW its state on
# the first step: either makes a step look several times slower than the run's), then the timed ones
# (their median; fewer once the planning allowance is spent, at least one).
PROBE_WARMUP, PROBE_TIMED = 2, 3


@dataclass
class StepPlan:
    """The steps a budget holds: ``epochs`` epochs (the schedule's horizon, re-planned after each) of
    ``steps_per_epoch`` optimiser steps (fewer than a full pass when not one full pass fits)."""

    epochs: int
    steps_per_epoch: int
    step_seconds: float
    reason: str

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def check_decoding(budget: Budget, decode_s: float) -> None:
    """Refuse before decoding when the estimated ``decode_s`` (with the reservation already set for the
    work after the last epoch) leaves no time to train."""
    if budget.available() - decode_s > 0:
        return
    raise ConfigError(
        f"the time budget ({budget.total:.0f} s) is spent on reading the data (about {decode_s:.0f} s) and "
        f"writing the backbone (about {budget.reserved:.0f} s) alone; give a larger --time-budget"
    )


def time_step(
    stepper: SimclrStep,
    make_net: Callable[[], nn.Module],
    x: torch.Tensor,
    budget: Budget,
    allowance_s: float,
) -> float:
    """Seconds of one SimCLR step on the images ``x`` on this machine, timed on the budget's clock.

    The steps train a throwaway network from ``make_net`` with its own optimiser and random draws, so the
    run's weights and random streams (and hence its resumability) are untouched. The probe stops early when
    ``allowance_s`` has passed (after one timed step) or the budget is spent (then the steps so far price
    a step, pessimistically)."""
    clock = budget.clock
    with torch.random.fork_rng(devices=[]):
        net = make_net()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        start, times, steps = clock(), [], 0
        for i in range(PROBE_WARMUP + PROBE_TIMED):
            t0 = clock()
            stepper.run(net, optimizer, None, x, gen, gather=False)
            steps += 1
            if i >= PROBE_WARMUP:
                times.append(clock() - t0)
            if budget.available() <= 0 or (times and clock() - start > allowance_s):
                break
    return float(np.median(times)) if times else (clock() - start) / steps


def plan_steps(budget: Budget, *, step_s: float, knn_s: float, full_steps: int, max_epochs: int) -> StepPlan:
    """The epochs (or the steps of one partial epoch) that fit what the budget leaves the epochs, at
    ``step_s`` a step and ``knn_s`` for the k-NN probe after every epoch but the last (whose probe is in the
    reservation); refused below :data:`MIN_STEPS` steps."""
    seconds = budget.epoch_seconds()
    pace = epoch_pace(step_s)
    epochs = int((seconds + knn_s) // (full_steps * pace + knn_s)) if seconds > 0 else 0
    if epochs >= 1:
        epochs, steps = min(epochs, max_epochs), full_steps
        reason = f"{epochs} epoch(s) of {steps} steps fit the time left"
    else:
        epochs, steps = 1, int(max(seconds, 0.0) // pace)
        reason = f"one partial epoch: {steps} of its {full_steps} steps fit the time left"
    if epochs * steps < MIN_STEPS:
        raise ConfigError(_refusal(budget, seconds, epochs * steps, step_s, knn_s, full_steps))
    return StepPlan(epochs, steps, step_s, f"{reason} ({seconds:.0f} s at {step_s:.2f} s a step, timed)")


def _refusal(budget: Budget, seconds: float, steps: int, step_s: float, knn_s: float, full_steps: int) -> str:
    need = MIN_STEPS * epoch_pace(step_s) + (math.ceil(MIN_STEPS / full_steps) - 1) * knn_s
    suggest = math.ceil(budget.needed_for_epochs(need)) + 1  # whole seconds, clear of rounding
    return (
        f"the time budget ({budget.total:.0f} s) leaves {max(seconds, 0.0):.0f} s to pretrain after "
        f"{budget.elapsed():.0f} s of reading the data and timing a step, and {budget.reserved:.0f} s set "
        f"aside for the k-NN probe and the bundle: {steps} SimCLR step(s) of {step_s:.2f} s, fewer than the "
        f"{MIN_STEPS} a backbone needs; give --time-budget {suggest}s or more (the decoded images are cached)"
    )
