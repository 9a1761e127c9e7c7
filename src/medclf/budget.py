"""One owner for time-budget arithmetic: when the budget started, what is left, what is set aside, and every
margin the run keeps against its own estimates.

Every step of ``medclf train`` (fingerprinting, planning, decoding, the epochs, the out-of-distribution fit,
writing the bundle, extra members, fusion) draws on the same :class:`Budget`, so no part of the run can
spend time the others were counting on. The headroom rules below are the only place a margin is stated;
callers ask the budget (``budget.epoch_seconds()``, ``budget.reserve_finishing(...)``) instead of restating a
factor. The clock is injectable: tests drive a budget with a fake clock instead of sleeping or asserting
wall times.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from medclf.errors import ConfigError

__all__ = ["Budget", "inference_seconds", "member_seconds", "parse_duration"]

# --- Headroom rules: each margin, and why it is there ---
# The planner's timing probe gets this share of the budget, at least this many seconds: planning is overhead.
PLANNING_SHARE, PLANNING_MIN_S = 0.05, 3.0
# Decoding every file takes this much longer than the fingerprint's per-file probe time divided by the
# workers: the probe only decodes, the cache pass also preprocesses, scans and writes each file.
DECODE_SLACK = 1.3
# A plan gives its epochs this share of the time left, less these seconds: per-epoch validation and the work
# after the last epoch are not reserved yet when the planner counts epochs.
PLAN_EPOCHS_SHARE, PLAN_EPOCHS_MARGIN_S = 0.92, 5.0
# Once the work after the last epoch is reserved, the epochs get this share of the rest, less these seconds:
# per-epoch validation still comes out of the epochs' time.
REFIT_EPOCHS_SHARE, REFIT_EPOCHS_MARGIN_S = 0.95, 2.0
# The work after the last epoch: this many seconds (temperature, sanity baseline, writing the bundle) plus the
# OOD guard's forward passes, which run this many times faster than a training step at the plan's throughput
# (images per second; a slow machine's rate when the plan measured none).
FINISH_FIXED_S, INFERENCE_SPEEDUP, FALLBACK_THROUGHPUT = 7.0, 3.0, 100.0
# The next epoch may run this much slower than the recent ones (epoch times vary with other processes' load).
EPOCH_PACE_SLACK = 1.05
# An extra seed-bag member after an early stop costs the first member's time to its best epoch, times this
# slack plus these seconds: headroom for what a member does besides its epochs (its OOD guard and bundle)
# and for a slower pace than the first run's.
MEMBER_SLACK, MEMBER_MARGIN_S = 1.15, 5.0
# Fusing the leftover-budget members: the validation predictions of each, fitting and writing the ensemble.
LEFTOVER_FUSION_S = 20.0
# Fusing K-fold or seed-bag members (validation predictions of each, fitting, writing): this share of the
# budget plus these seconds.
BAG_FUSION_SHARE, BAG_FUSION_MIN_S = 0.02, 5.0
# The least any run is given: a budget must be positive, and the planner needs something to divide.
MIN_RUN_S = 1.0

Clock = Callable[[], float]


def decode_seconds(probe_s: float, n_files: int, workers: int) -> float:
    """How long decoding ``n_files`` takes with ``workers``, from the probe's seconds per file."""
    return probe_s * n_files / workers * DECODE_SLACK


def epoch_pace(epoch_seconds: float) -> float:
    """The time to expect for the next epoch from a recent one's ``epoch_seconds``."""
    return epoch_seconds * EPOCH_PACE_SLACK


def replan_pace(epoch_times: list[float]) -> float:
    """The epoch time a clock-driven schedule re-plans with: the slower of the last epoch and the mean of the
    last three. The first epoch pays one-off costs (kernel creation, compilation): it is left out once others
    ran."""
    recent = epoch_times[1:][-3:] if len(epoch_times) > 1 else epoch_times
    return epoch_pace(max(epoch_times[-1], sum(recent) / len(recent)))


def inference_seconds(n_inferred: int, throughput: float | None) -> float:
    """Forward passes over ``n_inferred`` samples, at :data:`INFERENCE_SPEEDUP` times the training
    ``throughput`` (images per second; :data:`FALLBACK_THROUGHPUT` when none was measured)."""
    return n_inferred / (INFERENCE_SPEEDUP * (throughput or FALLBACK_THROUGHPUT))


def member_seconds(seconds_to_best: float) -> float:
    """The price of an extra seed-bag member: the first member's ``seconds_to_best`` epoch, plus headroom."""
    return max(seconds_to_best, MIN_RUN_S) * MEMBER_SLACK + MEMBER_MARGIN_S


def parse_duration(text: str | float | int) -> float:
    """'90s', '10m', '2h', '1h30m', or a number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ConfigError("a time budget must be positive")
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return parse_duration(float(s))
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|min|s|sec)", s)
    if not parts or "".join(a + b for a, b in parts) != s.replace(" ", ""):
        raise ConfigError(f"cannot read the duration {text!r}: use e.g. 90s, 10m, 2h or 1h30m")
    unit = {"h": 3600, "m": 60, "min": 60, "s": 1, "sec": 1}
    return parse_duration(sum(float(a) * unit[b] for a, b in parts))


class Budget:
    """``seconds`` of wall time from ``start`` (default: now) on ``clock`` (default: ``time.perf_counter``).

    ``reserved`` seconds are set aside for work that must follow (the OOD fit, writing the bundle, fusing
    members): :meth:`available` is what the current step may spend, :meth:`left` what remains in all.
    """

    def __init__(
        self, seconds: float | str, *, clock: Clock | None = None, start: float | None = None
    ) -> None:
        self.total = parse_duration(seconds)
        self.clock: Clock = clock or time.perf_counter
        self.start = self.clock() if start is None else float(start)
        self.reserved = 0.0

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds until the budget ends (negative once it is overspent)."""
        return self.total - self.elapsed()

    @property
    def deadline(self) -> float:
        """The clock reading at which the budget ends."""
        return self.start + self.total

    def reserve(self, seconds: float) -> None:
        """Set ``seconds`` aside for work after the current step (replaces any earlier reservation)."""
        self.reserved = max(0.0, float(seconds))

    def available(self) -> float:
        """Seconds the current step may spend: what is left minus what is reserved."""
        return self.left() - self.reserved

    def work_deadline(self) -> float:
        """The clock reading by which the current step must end to leave the reservation intact."""
        return self.deadline - self.reserved

    def fraction(self, share: float, *, at_least: float = 0.0, at_most: float | None = None) -> float:
        """``share`` of the whole budget in seconds, clamped to ``[at_least, at_most]``."""
        s = max(at_least, share * self.total)
        return s if at_most is None else min(s, at_most)

    def share(self, parts: int) -> float:
        """An equal share of what is available for each of ``parts`` steps still to run."""
        return self.available() / max(1, parts)

    def planning_seconds(self) -> float:
        """The timing probe's allowance (:data:`PLANNING_SHARE` of the budget, at least
        :data:`PLANNING_MIN_S`)."""
        return self.fraction(PLANNING_SHARE, at_least=PLANNING_MIN_S)

    def plan_epoch_seconds(self, *, before: float = 0.0) -> float:
        """What a plan may give its epochs: what is left after ``before`` seconds of other work (decoding,
        the timing probe), less the headroom for per-epoch validation and the work after the last epoch."""
        return (self.left() - before) * PLAN_EPOCHS_SHARE - PLAN_EPOCHS_MARGIN_S

    def epoch_seconds(self) -> float:
        """What the epochs may take once the work after them is reserved (:meth:`reserve_finishing`): what is
        available, less the headroom for per-epoch validation."""
        return self.available() * REFIT_EPOCHS_SHARE - REFIT_EPOCHS_MARGIN_S

    def needed_for_epochs(self, seconds: float) -> float:
        """The whole budget under which :meth:`epoch_seconds` would be ``seconds``, with what was spent so
        far and the reservation as they are (the inverse of :meth:`epoch_seconds`)."""
        return self.elapsed() + self.reserved + (seconds + REFIT_EPOCHS_MARGIN_S) / REFIT_EPOCHS_SHARE

    def reserve_finishing(self, n_inferred: int, throughput: float | None) -> None:
        """Set aside the work after the last epoch: a fixed part, and forward passes over ``n_inferred``
        samples at :data:`INFERENCE_SPEEDUP` times the training ``throughput`` (images per second)."""
        self.reserve(FINISH_FIXED_S + inference_seconds(n_inferred, throughput))

    def reserve_bag_fusion(self) -> None:
        """Set aside the fusion of K-fold or seed-bag members (:data:`BAG_FUSION_SHARE`)."""
        self.reserve(self.fraction(BAG_FUSION_SHARE) + BAG_FUSION_MIN_S)

    def reserve_leftover_fusion(self) -> None:
        """Set aside the fusion of the members trained with the time an early stop left."""
        self.reserve(LEFTOVER_FUSION_S)

    def child(self, seconds: float) -> Budget:
        """A budget of ``seconds`` (at most what is available) starting now, on the same clock."""
        return Budget(max(min(seconds, self.available()), 1e-3), clock=self.clock)

    def __repr__(self) -> str:
        return f"Budget(total={self.total:.1f}s, left={self.left():.1f}s, reserved={self.reserved:.1f}s)"
