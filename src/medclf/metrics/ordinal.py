"""Metrics of ordinal grades (retinopathy, Kellgren-Lawrence, tumour grade), with bootstrap intervals.

``y_true`` holds grades 0..K-1, ``probs`` an (N, K) distribution over grades. The predicted grade is the
*median* of that distribution (the first grade whose cumulative probability reaches 0.5), which minimises
the expected absolute error, the natural loss for grades; an ordinal head (CORN, cumulative logits) predicts
exactly this. Reported: accuracy, mean absolute error (MAE, in grades), quadratic weighted kappa (QWK, the
agreement statistic of grading studies), accuracy within one grade, the confusion matrix, each grade's
sensitivity, and MedMNIST's own figures (macro one-vs-rest AUC and the accuracy of the argmax) so that
results compare with its published table. Intervals: percentile bootstrap by patient when ids are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

from medclf.metrics.classification import _jsonable, weighted_auc
from medclf.metrics.resample import percentile_intervals, resample_weights, resampling_units
from medclf.models.tasks import median_grade

__all__ = ["ordinal_metrics"]

_SUM_TOL = 1e-3
DECISIONS = {
    "median": "median of the predicted grade distribution",
    "argmax": "most probable grade (a multi-class model's decision)",
}


def ordinal_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    grade_names: Sequence[str],
    *,
    patient_ids: Sequence[str | None] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    decision: str = "median",
) -> dict[str, Any]:
    """Accuracy, MAE, QWK, within-one accuracy, confusion matrix and MedMNIST's AUC/ACC (JSON-ready).

    ``decision``: ``median`` (an ordinal model's grade) or ``argmax`` (what a plain multi-class model
    predicts, for scoring one on grades side by side)."""
    y, p = _validate(y_true, probs, grade_names)
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    n, k = p.shape
    grade = median_grade(p) if decision == "median" else p.argmax(axis=1)
    present = np.flatnonzero(np.bincount(y, minlength=k) > 0)
    auc = None
    if len(present) >= 2:
        auc = float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))
    cm = confusion_matrix(y, grade, labels=list(range(k)))
    units = resampling_units(patient_ids, n)
    point = {
        "accuracy": float((grade == y).mean()),
        "mae": float(np.abs(grade - y).mean()),
        "qwk": _qwk(y, grade, k),
        "within_one_accuracy": float((np.abs(grade - y) <= 1).mean()),
        "auc": auc,
        "argmax_accuracy": float((p.argmax(axis=1) == y).mean()),
    }
    return _jsonable(
        {
            "task": "ordinal",
            "n": n,
            "n_patients": len(np.unique(units)) if patient_ids is not None else None,
            "grades": list(grade_names),
            **point,
            "per_grade": {
                name: {
                    "n": int(cm[c].sum()),
                    "sensitivity": float(cm[c, c] / cm[c].sum()) if cm[c].sum() else None,
                }
                for c, name in enumerate(grade_names)
            },
            "confusion_matrix": cm,
            "ci": {
                **_bootstrap(y, p, grade, present, units, n_bootstrap, seed, ci),
                "level": ci,
                "n_bootstrap": n_bootstrap,
                "unit": "patient" if patient_ids is not None else "image",
            },
            "decision_rule": DECISIONS[decision],
            "medmnist": "auc: macro one-vs-rest AUC; argmax_accuracy: accuracy of the most probable grade",
        }
    )


def _qwk(y: np.ndarray, grade: np.ndarray, k: int) -> float | None:
    if len(np.unique(np.r_[y, grade])) < 2:
        return None  # one grade everywhere: kappa is undefined
    return float(cohen_kappa_score(y, grade, labels=list(range(k)), weights="quadratic"))


def _weighted_qwk(y: np.ndarray, grade: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """QWK under each row of sample weights ``w`` (B, N): 1 - sum(W * O) / sum(W * E), with O the weighted
    confusion matrix and E the outer product of its margins (Cohen's definition)."""
    cell = np.eye(k * k)[y * k + grade]  # (N, K*K) one-hot confusion cell of each sample
    observed = (w @ cell).reshape(-1, k, k)
    total = observed.sum(axis=(1, 2), keepdims=True)
    expected = observed.sum(axis=2, keepdims=True) * observed.sum(axis=1, keepdims=True) / total
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / (k - 1) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - (weights * observed).sum(axis=(1, 2)) / (weights * expected).sum(axis=(1, 2))


def _bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    grade: np.ndarray,
    present: np.ndarray,
    units: np.ndarray,
    n_bootstrap: int,
    seed: int,
    level: float,
) -> dict[str, list[float] | None]:
    rng = np.random.default_rng(seed)
    k = p.shape[1]
    err = np.abs(grade - y).astype(np.float64)
    draws: dict[str, list[np.ndarray]] = {}
    for w in resample_weights(units, n_bootstrap, rng):
        total = w.sum(axis=1)
        draws.setdefault("accuracy", []).append((w @ (err == 0)) / total)
        draws.setdefault("mae", []).append((w @ err) / total)
        draws.setdefault("within_one_accuracy", []).append((w @ (err <= 1)) / total)
        draws.setdefault("qwk", []).append(_weighted_qwk(y, grade, k, w))
        if len(present) >= 2:
            with np.errstate(invalid="ignore"):
                per = [weighted_auc(p[:, c], y == c, w) for c in present]
            draws.setdefault("auc", []).append(np.mean(per, axis=0))
    return percentile_intervals(draws, level)


def _validate(
    y_true: np.ndarray, probs: np.ndarray, grade_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    k = len(grade_names)
    if k < 2:
        raise ValueError("ordinal metrics need at least two grades")
    if p.ndim != 2 or p.shape != (len(y), k):
        raise ValueError(f"probabilities must be (N, {k}) for {len(y)} grades, got {p.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0 or y.max(initial=0) >= k:
        raise ValueError(f"grades must be integers in 0..{k - 1}")
    if not np.isfinite(p).all() or (np.abs(p.sum(axis=1) - 1) > _SUM_TOL).any():
        raise ValueError("each row of probabilities must be a distribution over the grades (sum 1)")
    return y.astype(np.int64), p
