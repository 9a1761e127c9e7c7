"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One scalar ``T`` divides the logits before the softmax; it is fitted on validation data by minimising the
negative log-likelihood. Accuracy never changes (the argmax is the same), only the confidence does.

Log-probabilities serve as well as logits: ``log_softmax(z) = z - logsumexp(z)`` differs from ``z`` by a
constant per row, which the softmax of ``(z - c) / T`` cancels. So a model's softmax outputs are enough to
fit and apply a temperature.

Multi-label findings (:func:`fit_finding_temperatures`): each finding is its own binary problem, so each gets
its own ``T_j``, dividing its logit before its sigmoid and fitted by minimising that finding's binary NLL (Platt
scaling without its bias term; like the softmax case it never reorders a finding's images, so its AUC and the
ranking behind its threshold stay as they were). The sigmoid's saturation loses the logit, unlike
``log_softmax``: these temperatures are fitted on the logits themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

from medclf.metrics.classification import expected_calibration_error

__all__ = [
    "FINDING_METHOD",
    "TemperatureFit",
    "apply_temperature",
    "finding_calibration_record",
    "fit_finding_temperatures",
    "fit_temperature",
    "fit_temperature_from_probs",
    "log_probs",
]

# The search interval of T. The upper end lets a useless model say "uniform"; the lower end sharpens
# at most 20-fold (further sharpening on a finite validation set only chases its last few errors).
T_BOUNDS = (0.05, 20.0)
# Fewer validation samples than this fit noise (8 samples of simulated MRI: validation ECE 0.024 -> 0.120
# after "scaling"), so the temperature stays 1.
MIN_SAMPLES = 20
# Probabilities of exactly 0 (float32 underflow) would give -inf log-probabilities.
_PROB_FLOOR = 1e-12


@dataclass
class TemperatureFit:
    """A fitted temperature and what it did to the fitting data."""

    temperature: float
    n: int
    nll_before: float | None
    nll_after: float | None
    ece_before: float | None
    ece_after: float | None
    method: str = "temperature scaling (minimum validation NLL)"
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None}


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Log of class probabilities, floored so that an underflowed 0 stays finite."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _PROB_FLOOR, None))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / T)`` in float64 (``logits`` may be log-probabilities)."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """The temperature minimising the NLL of ``softmax(logits / T)`` against ``labels``.

    NLL is convex in ``1/T``, hence unimodal in ``log T``: a bounded scalar search finds the minimum.
    Degenerate data leaves ``T = 1`` with a ``note``: fewer than :data:`MIN_SAMPLES` samples, or no
    validation errors (then the NLL falls forever as ``T -> 0``, which says nothing about unseen data).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError(f"logits must be (N, K) with one label per row, got {z.shape} and {y.shape}")
    if len(y) == 0:
        return TemperatureFit(1.0, 0, None, None, None, None, note="no validation samples: T left at 1")
    return fit_temperature_by(
        y,
        lambda t: _nll(z, y, t),
        lambda t: apply_temperature(z, t),
        samples="validation samples",
        no_errors="no validation errors",
    )


def fit_temperature_by(
    labels: np.ndarray,
    nll: Callable[[float], float],
    probs_at: Callable[[float], np.ndarray],
    *,
    samples: str = "samples",
    no_errors: str = "no errors",
    method: str | None = None,
) -> TemperatureFit:
    """The temperature minimising ``nll(T)``, whose predictions at ``T`` are ``probs_at(T)`` (rows scored
    against ``labels``): the search, its bounds and degenerate cases shared by every temperature fit.

    Degenerate data leaves ``T = 1`` with a ``note``: fewer than :data:`MIN_SAMPLES` ``samples``, or no
    errors at ``T = 1``; the search never ends worse than not scaling."""
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    before = probs_at(1.0)
    nll_before, ece_before = nll(1.0), expected_calibration_error(y, before)
    unfit = None
    if n < MIN_SAMPLES:
        unfit = f"{n} {samples} are too few to fit a temperature (need {MIN_SAMPLES}): T left at 1"
    elif (before.argmax(axis=1) == y).all():
        unfit = f"{no_errors}: nothing to calibrate against, T left at 1"
    if unfit:
        return TemperatureFit(1.0, n, nll_before, nll_before, ece_before, ece_before, note=unfit)
    res = minimize_scalar(
        lambda log_t: nll(math.exp(log_t)),
        bounds=(math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])),
        method="bounded",
        options={"xatol": 1e-5},
    )
    t = float(math.exp(res.x))
    nll_after = nll(t)
    if nll_after > nll_before:  # the search never does worse than not scaling
        t, nll_after = 1.0, nll_before
    note = None
    if min(abs(t - b) / b for b in T_BOUNDS) < 1e-3:
        note = f"the fitted temperature lies at the edge of the search interval {T_BOUNDS}"
    return TemperatureFit(
        temperature=t,
        n=n,
        nll_before=nll_before,
        nll_after=nll_after,
        ece_before=ece_before,
        ece_after=expected_calibration_error(y, probs_at(t)),
        note=note,
        **({"method": method} if method is not None else {}),
    )


def fit_temperature_from_probs(probs: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """:func:`fit_temperature` on the log of softmax outputs (equivalent to fitting on the logits)."""
    return fit_temperature(log_probs(probs), labels)


FINDING_METHOD = "temperature scaling per finding (minimum validation binary NLL)"


def _binary_nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean ``-log sigmoid(+-z / T)`` (the sign of the label), without overflow."""
    return float(np.logaddexp(0.0, np.where(y == 1, -z, z) / temperature).mean())


def _binary_probs(z: np.ndarray, temperature: float) -> np.ndarray:
    """(N, 2) rows ``[1 - p, p]`` with ``p = sigmoid(z / T)``: a finding as a two-class prediction, scored by
    the same ECE as the multi-class path (and as :mod:`medclf.metrics.multilabel`'s per-finding ECE)."""
    p = expit(z / temperature)
    return np.stack([1.0 - p, p], axis=1)


def _fit_finding(z: np.ndarray, y: np.ndarray) -> TemperatureFit:
    n, n_pos = len(y), int(y.sum())
    if n == 0:
        return TemperatureFit(
            1.0, 0, None, None, None, None, FINDING_METHOD, "no validation samples: T left at 1"
        )
    if n_pos in (0, n):
        # One class only: the NLL would reward pushing every probability towards it, which says nothing
        # about the finding's images of the other class.
        nll, ece = _binary_nll(z, y, 1.0), expected_calibration_error(y, _binary_probs(z, 1.0))
        missing = "positives" if n_pos == 0 else "negatives"
        return TemperatureFit(
            1.0, n, nll, nll, ece, ece, FINDING_METHOD, f"no {missing} in validation: T left at 1"
        )
    return fit_temperature_by(
        y,
        lambda t: _binary_nll(z, y, t),
        lambda t: _binary_probs(z, t),
        samples="validation samples",
        no_errors="no validation errors at 0.5",
        method=FINDING_METHOD,
    )


def fit_finding_temperatures(logits: np.ndarray, labels: np.ndarray) -> list[TemperatureFit]:
    """One temperature per finding (column) of multi-label ``logits`` (N, L) against 0/1 ``labels`` (N, L):
    the ``T_j`` minimising the binary NLL of ``sigmoid(logits[:, j] / T_j)``, with the search, bounds and
    degenerate cases of :func:`fit_temperature_by`. A finding without positives or without negatives keeps
    ``T = 1`` with a note."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape != y.shape:
        raise ValueError(f"logits and labels must be (N, L) alike, got {z.shape} and {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("multi-label targets must be 0 or 1")
    y = y.astype(np.int64)
    return [_fit_finding(z[:, j], y[:, j]) for j in range(z.shape[1])]


def finding_calibration_record(
    findings: Sequence[str], fits: Sequence[TemperatureFit], *, fitted_on: str = "validation split"
) -> dict[str, Any]:
    """The ``calibration`` section of a multi-label bundle: ``temperatures`` (finding -> T, what every
    engine divides that finding's logit by; :attr:`medclf.manifest.Manifest.finding_temperatures`), each
    fit's details, and the mean per-finding ECE before and after. No scalar ``temperature``: there is none."""
    if len(findings) != len(fits):
        raise ValueError(f"{len(fits)} temperature fits for {len(findings)} findings")
    before = [f.ece_before for f in fits if f.ece_before is not None]
    after = [f.ece_after for f in fits if f.ece_after is not None]
    return {
        "method": FINDING_METHOD,
        "fitted_on": fitted_on,
        "temperatures": {c: float(f.temperature) for c, f in zip(findings, fits, strict=True)},
        "n": max((f.n for f in fits), default=0),
        "ece_before": float(np.mean(before)) if before else None,
        "ece_after": float(np.mean(after)) if after else None,
        "per_finding": {
            c: {k: v for k, v in f.to_dict().items() if k != "method"}
            for c, f in zip(findings, fits, strict=True)
        },
        "note": "each finding's logit is divided by its own temperature before its sigmoid; ece_before/after "
        "are means over the findings of each finding's ECE. A finding without positives or without negatives "
        f"in validation, with fewer than {MIN_SAMPLES} samples or without errors keeps T = 1 (its own note says "
        "which)",
    }
