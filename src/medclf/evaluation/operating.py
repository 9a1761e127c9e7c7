"""Binary decisions at a threshold: fitting the threshold and the figures it achieves.

Used by ``medclf recalibrate`` (fit an operating point on a site sample) and ``medclf evaluate`` (score a
bundle's operating point on a test set). A decision is positive when the positive group's probability
reaches the threshold (``score >= threshold``).

Intervals of sensitivity, specificity, PPV and NPV are Clopper-Pearson (exact binomial) intervals, the
usual choice for diagnostic accuracy studies with small samples; they treat images as independent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from medclf.errors import ConfigError

__all__ = ["CI_METHOD", "binary_figures", "clopper_pearson", "fit_threshold"]

CI_METHOD = "Clopper-Pearson exact binomial intervals (images treated as independent)"


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float] | None:
    """Exact binomial interval of the proportion ``k / n`` (None when ``n`` is 0)."""
    if n <= 0:
        return None
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return [lo, hi]


def binary_figures(
    positive: np.ndarray, score: np.ndarray, threshold: float, level: float = 0.95
) -> dict[str, Any]:
    """Counts, sensitivity, specificity, PPV, NPV (with exact intervals) and the AUC of ``score`` at
    ``threshold``; ``positive`` is the truth (bool per sample)."""
    truth = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    called = s >= threshold
    tp = int((called & truth).sum())
    fn = int((~called & truth).sum())
    tn = int((~called & ~truth).sum())
    fp = int((called & ~truth).sum())

    def ratio(k: int, n: int) -> float | None:
        return k / n if n else None

    auc = float(roc_auc_score(truth, s)) if truth.any() and not truth.all() else None
    return {
        "n": len(truth),
        "n_positive": tp + fn,
        "n_negative": tn + fp,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "auc": auc,
        "ci": {
            "sensitivity": clopper_pearson(tp, tp + fn, level),
            "specificity": clopper_pearson(tn, tn + fp, level),
            "ppv": clopper_pearson(tp, tp + fp, level),
            "npv": clopper_pearson(tn, tn + fn, level),
            "level": level,
        },
        "ci_method": CI_METHOD,
    }


def fit_threshold(positive: np.ndarray, score: np.ndarray, *, sensitivity: float | None = None) -> float:
    """The threshold on ``score`` reaching at least ``sensitivity`` (the highest such threshold, so that
    specificity is as high as the target allows), or maximising Youden's J when ``sensitivity`` is None.

    The threshold sits midway between the chosen score and the next lower score of the sample, so the
    decisions on the sample are those of the chosen point while a rounding difference between engines
    (PyTorch, ONNX) cannot flip a sample that sat exactly on it."""
    truth = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    if not truth.any() or truth.all():
        raise ConfigError("fitting a threshold needs positive and negative samples")
    if sensitivity is not None and not 0 < sensitivity <= 1:
        raise ConfigError(f"--sensitivity must lie in (0, 1], got {sensitivity}")
    fpr, tpr, thresholds = roc_curve(truth, s, drop_intermediate=False)
    if sensitivity is not None:
        i = int(np.argmax(tpr >= sensitivity - 1e-12))
    else:
        i = int(np.argmax(tpr - fpr))
    i = max(i, 1)  # thresholds[0] is +inf (nothing positive)
    here = float(thresholds[i])
    below = float(thresholds[i + 1]) if i + 1 < len(thresholds) else float(np.nextafter(here, -np.inf))
    return (here + below) / 2
