"""Metrics of multi-label predictions (several findings per image), with bootstrap intervals.

``y_true`` is an (N, L) 0/1 matrix (one column per finding; an image with no finding is a row of zeros),
``probs`` the (N, L) per-finding probabilities (independent sigmoids: rows need not sum to 1). Per finding:
prevalence, ROC AUC, average precision (AP), and sensitivity/specificity at that finding's operating point,
a threshold chosen on *validation* data (:func:`choose_thresholds`), never on the data scored. Summaries:
macro AUC and mAP (the mean over findings that have positives and negatives; ChestX-ray14's usual figures),
micro AUC (all (image, finding) pairs pooled), subset accuracy and the Hamming loss at the thresholds. Intervals
are percentile bootstraps that resample patients when their ids are known (a patient's images are drawn
together), else images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from medclf.metrics.classification import _jsonable, expected_calibration_error, weighted_auc
from medclf.metrics.resample import (
    percentile_intervals,
    resample_weights,
    resampling_units,
    weighted_average_precision,
)

__all__ = ["THRESHOLD_RULES", "choose_thresholds", "finding_ece", "multilabel_metrics"]

THRESHOLD_RULES = ("youden", "sensitivity")
DEFAULT_THRESHOLD = 0.5


def choose_thresholds(
    y_val: np.ndarray,
    probs_val: np.ndarray,
    *,
    rule: str = "youden",
    sensitivity: float = 0.9,
) -> tuple[np.ndarray, list[str]]:
    """One decision threshold per finding from validation data, and notes on findings that kept the default.

    ``youden``: the threshold maximising sensitivity + specificity - 1; ``sensitivity``: the highest
    threshold whose validation sensitivity reaches ``sensitivity`` (a screening operating point). A finding
    without positives or without negatives in validation keeps 0.5 (noted)."""
    y, p = _validate(y_val, probs_val)
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose from {', '.join(THRESHOLD_RULES)}")
    thresholds = np.full(p.shape[1], DEFAULT_THRESHOLD)
    notes: list[str] = []
    for j in range(p.shape[1]):
        pos = y[:, j] == 1
        if pos.all() or not pos.any():
            notes.append(f"finding {j}: validation holds only one class; threshold {DEFAULT_THRESHOLD}")
            continue
        cands = np.unique(p[:, j])
        # Predicted positive when p >= t: sensitivity and specificity at every candidate t at once.
        sens = (p[pos, j][None, :] >= cands[:, None]).mean(axis=1)
        spec = (p[~pos, j][None, :] < cands[:, None]).mean(axis=1)
        if rule == "youden":
            thresholds[j] = cands[int(np.argmax(sens + spec - 1))]
        else:
            ok = np.flatnonzero(sens >= sensitivity)
            thresholds[j] = cands[ok.max()] if len(ok) else cands[0]
    return thresholds, notes


def multilabel_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    label_names: Sequence[str],
    *,
    thresholds: np.ndarray | Sequence[float] | None = None,
    patient_ids: Sequence[str | None] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Per-finding and summary metrics of ``probs`` against ``y_true`` with bootstrap intervals (JSON-ready).

    ``thresholds``: each finding's operating point (from :func:`choose_thresholds` on validation); 0.5 when
    not given (the result says so)."""
    y, p = _validate(y_true, probs)
    n, n_labels = y.shape
    if len(label_names) != n_labels:
        raise ValueError(f"{len(label_names)} label names for {n_labels} columns")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    t = _operating_thresholds(thresholds, n_labels)
    pred = p >= t
    scorable = np.flatnonzero((y.sum(axis=0) > 0) & (y.sum(axis=0) < n))
    scored = set(scorable.tolist())
    notes = [
        f"{label_names[j]}: {'no positives' if y[:, j].sum() == 0 else 'no negatives'}; no AUC or AP"
        for j in range(n_labels)
        if j not in scored
    ]
    if thresholds is None:
        notes.append(f"no operating points given: every finding thresholded at {DEFAULT_THRESHOLD}")
    per_label = _per_label(y, p, pred, t, label_names, scorable)
    summary = _summary(y, p, pred, [per_label[label_names[j]] for j in scorable.tolist()])
    units = resampling_units(patient_ids, n)
    intervals = _bootstrap(y, p, pred, scorable, units, n_bootstrap, seed, ci)
    for j, name in enumerate(label_names):
        per_label[name]["ci"] = {
            m: intervals.pop(f"{m}:{j}", None) for m in ("auc", "ap", "sensitivity", "specificity")
        }
    return _jsonable(
        {
            "task": "multilabel",
            "n": n,
            "n_patients": len(np.unique(units)) if patient_ids is not None else None,
            "labels": list(label_names),
            **summary,
            "per_label": per_label,
            "ci": {
                **intervals,
                "level": ci,
                "n_bootstrap": n_bootstrap,
                "unit": "patient" if patient_ids is not None else "image",
            },
            "decision_rule": "finding present when its probability >= its threshold (operating point)",
            "notes": notes,
        }
    )


def _operating_thresholds(thresholds: np.ndarray | Sequence[float] | None, n_labels: int) -> np.ndarray:
    """One threshold per finding: those given, else the default for every finding."""
    t = (
        np.full(n_labels, DEFAULT_THRESHOLD)
        if thresholds is None
        else np.asarray(thresholds, dtype=np.float64)
    )
    if t.shape != (n_labels,):
        raise ValueError(f"{t.shape[0] if t.ndim else 1} thresholds for {n_labels} findings")
    return t


def _per_label(
    y: np.ndarray,
    p: np.ndarray,
    pred: np.ndarray,
    t: np.ndarray,
    label_names: Sequence[str],
    scorable: np.ndarray,
) -> dict[str, Any]:
    """Each finding's prevalence, AUC and AP (when it has positives and negatives), operating point and ECE."""
    n = len(y)
    scored = set(scorable.tolist())
    per_label: dict[str, Any] = {}
    for j, name in enumerate(label_names):
        pos = y[:, j] == 1
        has_both = j in scored
        per_label[name] = {
            "n_positive": int(pos.sum()),
            "prevalence": float(pos.mean()) if n else None,
            "auc": float(roc_auc_score(pos, p[:, j])) if has_both else None,
            "ap": float(average_precision_score(pos, p[:, j])) if has_both else None,
            "threshold": float(t[j]),
            "sensitivity": float(pred[pos, j].mean()) if pos.any() else None,
            "specificity": float((~pred[~pos, j]).mean()) if (~pos).any() else None,
            "ece": finding_ece(pos, p[:, j]),
        }
    return per_label


def finding_ece(positive: np.ndarray, p: np.ndarray) -> float:
    """The ECE of one finding's probabilities ``p`` as a binary prediction (rows ``[1 - p, p]``) against
    ``positive`` (bool or 0/1)."""
    p = np.asarray(p, dtype=np.float64)
    return expected_calibration_error(np.asarray(positive).astype(int), np.stack([1 - p, p], axis=1))


def _summary(
    y: np.ndarray, p: np.ndarray, pred: np.ndarray, scorable: list[dict[str, Any]]
) -> dict[str, Any]:
    """Macro AUC and mAP over the ``scorable`` findings' entries, micro AUC, subset accuracy, Hamming loss."""
    return {
        "macro_auc": _mean_or_none([e["auc"] for e in scorable]),
        "map": _mean_or_none([e["ap"] for e in scorable]),
        "micro_auc": _micro_auc(y, p),
        "subset_accuracy": float((pred == (y == 1)).all(axis=1).mean()),
        "hamming_loss": float((pred != (y == 1)).mean()),
    }


def _validate(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or p.shape != y.shape:
        raise ValueError(
            f"multi-label targets and probabilities must be (N, L) alike, got {y.shape} and {p.shape}"
        )
    if not np.isin(y, (0, 1)).all():
        raise ValueError("multi-label targets must be 0 or 1")
    if not np.isfinite(p).all() or p.min(initial=0.0) < 0 or p.max(initial=0.0) > 1:
        raise ValueError("probabilities must be finite and within [0, 1] (sigmoid outputs, not logits)")
    return y.astype(np.int64), p


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _row_nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN, NaN where a column is all NaN (without numpy's warning)."""
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    total = np.where(finite, values, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _micro_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    flat_y, flat_p = y.ravel(), p.ravel()
    if flat_y.min(initial=0) == flat_y.max(initial=0):
        return None
    return float(roc_auc_score(flat_y, flat_p))


def _bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    pred: np.ndarray,
    scorable: np.ndarray,
    units: np.ndarray,
    n_bootstrap: int,
    seed: int,
    level: float,
) -> dict[str, list[float] | None]:
    """Percentile intervals of every finding's AUC, AP, sensitivity and specificity, of macro AUC and mAP."""
    rng = np.random.default_rng(seed)
    pos = y == 1
    hit = (pred & pos).astype(np.float64)
    true_neg = (~pred & ~pos).astype(np.float64)
    scored = set(scorable.tolist())
    draws: dict[str, list[np.ndarray]] = {}
    for w in resample_weights(units, n_bootstrap, rng):
        aucs, aps = [], []
        for j in range(y.shape[1]):
            with np.errstate(invalid="ignore", divide="ignore"):
                draws.setdefault(f"sensitivity:{j}", []).append((w @ hit[:, j]) / (w @ pos[:, j]))
                draws.setdefault(f"specificity:{j}", []).append((w @ true_neg[:, j]) / (w @ ~pos[:, j]))
            if j in scored:
                aucs.append(weighted_auc(p[:, j], pos[:, j], w))
                aps.append(weighted_average_precision(p[:, j], pos[:, j], w))
                draws.setdefault(f"auc:{j}", []).append(aucs[-1])
                draws.setdefault(f"ap:{j}", []).append(aps[-1])
        if aucs:  # over the findings still scorable in each resample (NaN where none is)
            draws.setdefault("macro_auc", []).append(_row_nanmean(np.stack(aucs)))
            draws.setdefault("map", []).append(_row_nanmean(np.stack(aps)))
    return percentile_intervals(draws, level)
