"""Classification metrics with bootstrap confidence intervals, as a JSON-ready dict.

Point estimates come from scikit-learn. Only the bootstrap is hand-written, because 1000 calls of
``roc_auc_score`` per class would take tens of seconds: each resample is expressed as per-sample
weights (how often each sample was drawn), so accuracy is one matrix product and AUC one sort per
class (:func:`weighted_auc`, checked against ``roc_auc_score(..., sample_weight=...)`` in the tests).

The predicted class is the argmax of the probabilities; for two classes that is class 1 when
p1 > 0.5 (an exact tie goes to class 0).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = ["calibration_bins", "compute_metrics", "expected_calibration_error", "weighted_auc"]

AUC_BINARY = "ROC AUC of class 1's probability"
AUC_MULTICLASS = "macro one-vs-rest: mean over classes of the AUC of that class's probability vs rest"
DECISION_RULE = "argmax of the class probabilities (two classes: class 1 when p1 > 0.5)"
# Rows of ``probs`` may be float32 softmax outputs: allow rounding, reject logits or scores.
_SUM_TOL = 1e-3


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Accuracy, AUC, per-class figures, calibration and bootstrap CIs of ``probs`` against ``y_true``.

    ``y_true``: int labels (N,) indexing ``class_names``; ``probs``: (N, K) class probabilities.
    AUC: two classes, ROC AUC of class 1's probability; more, the mean over classes of the one-vs-rest
    AUC of that class's probability (the MedMNIST definition). A class absent from ``y_true`` has no
    AUC (None) and the mean runs over the present classes; ``notes`` says so. Undefined values are
    None, every number is a plain Python int/float, so ``json.dumps`` works on the result.
    """
    y, p = _validate(y_true, probs, class_names)
    n, k = p.shape
    labels = list(range(k))
    pred = p.argmax(axis=1)
    present = np.bincount(y, minlength=k) > 0
    notes = _absent_class_notes(class_names, present)
    per_class_auc = [_ovr_auc(y, p, c) for c in labels]
    auc = _overall_auc(y, p, present, per_class_auc)
    if auc is None:
        notes.append("AUC is undefined: it needs at least two classes present in the labels")
    cm = confusion_matrix(y, pred, labels=labels)
    per_class = _per_class(y, pred, cm, per_class_auc, class_names)
    intervals = _bootstrap(
        y,
        p,
        pred,
        present,
        n_bootstrap=n_bootstrap,
        seed=seed,
        level=ci,
        binary=k == 2,
        want_auc=auc is not None,
    )
    notes.extend(_bootstrap_notes(intervals["n_bootstrap"], n_bootstrap))
    out = {
        "n": n,
        "class_names": list(class_names),
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": _balanced_accuracy(y, pred),
        "auc": auc,
        "auc_definition": AUC_BINARY if k == 2 else AUC_MULTICLASS,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ece": expected_calibration_error(y, p),
        "log_loss": log_loss(y, p, labels=labels),
        # Binary: the usual mean (p1 - y)^2 in [0, 1]; multi-class: sum over classes, in [0, 2].
        "brier": brier_score_loss(y, p, labels=labels),
        "ci": intervals,
        "ci_method": f"percentile bootstrap, {n_bootstrap} resamples" if n_bootstrap > 0 else "none",
        "decision_rule": DECISION_RULE,
        "notes": notes,
    }
    return _jsonable(out)


def _absent_class_notes(class_names: list[str], present: np.ndarray) -> list[str]:
    absent = [class_names[c] for c in range(len(present)) if not present[c]]
    if not absent:
        return []
    return [
        f"classes absent from the labels: {', '.join(absent)}; their sensitivity and AUC are "
        "undefined (null) and the overall AUC and balanced accuracy use the present classes only"
    ]


def _overall_auc(
    y: np.ndarray, p: np.ndarray, present: np.ndarray, per_class_auc: list[float | None]
) -> float | None:
    """Two classes: class 1's ROC AUC (None unless both are present); more: the mean of the defined
    one-vs-rest AUCs."""
    if p.shape[1] == 2:
        return float(roc_auc_score(y == 1, p[:, 1])) if present.all() else None
    defined = [a for a in per_class_auc if a is not None]
    return float(np.mean(defined)) if defined else None


def _per_class(
    y: np.ndarray,
    pred: np.ndarray,
    cm: np.ndarray,
    per_class_auc: list[float | None],
    class_names: list[str],
) -> dict[str, dict[str, Any]]:
    """Sensitivity, specificity, precision, F1, support and one-vs-rest AUC of every class."""
    k = len(class_names)
    labels = list(range(k))
    # zero_division=nan: a class never predicted has no precision, rather than a misleading 0.
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=np.nan)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    tn = len(y) - cm.sum(axis=1) - fp
    spec = np.divide(tn, tn + fp, out=np.full(k, np.nan), where=(tn + fp) > 0)
    return {
        str(name): {
            "sensitivity": rec[c],
            "specificity": spec[c],
            "precision": prec[c],
            "f1": f1[c],
            "support": int(support[c]),
            "auc": per_class_auc[c],
        }
        for c, name in enumerate(class_names)
    }


def _bootstrap_notes(kept: int, asked: int) -> list[str]:
    """What the notes say when resamples lacking a class were skipped (``kept`` of ``asked``)."""
    if 0 < kept < asked:
        return [f"{asked - kept} of {asked} bootstrap resamples lacked a class and were skipped"]
    if asked > 0 and kept == 0:
        return ["no usable bootstrap resample (every one lacked a class): no confidence intervals"]
    return []


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence: sum over equal-width bins of |accuracy - confidence| x share."""
    counts, acc, conf = calibration_bins(y_true, probs, n_bins)
    total = counts.sum()
    if total == 0:
        return float("nan")
    filled = counts > 0
    return float(np.sum(counts[filled] / total * np.abs(acc[filled] - conf[filled])))


def calibration_bins(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, accuracy, mean confidence) of the max probability; empty bins hold NaN.

    Bins are (i/n, (i+1)/n]; a confidence of exactly 0 (impossible for a max of probabilities) goes to
    the first bin.
    """
    y = np.asarray(y_true).astype(np.int64, copy=False)
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / counts
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / counts
    return counts.astype(np.int64), acc, mean_conf


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` (N,) for the ``positive`` (N,) samples, under each row of ``weights`` (B, N).

    Equals ``roc_auc_score(positive, scores, sample_weight=w)`` for every row ``w`` (ties count 1/2),
    NaN where a row gives no weight to positives or to negatives. One sort serves all rows: the weights
    are summed per distinct score value, then each positive weight meets the negative weight below it.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each distinct score
    w = weights[:, order].astype(np.float64, copy=False)
    pos = positive[order]
    w_pos = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    w_neg = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    total_pos = w_pos.sum(axis=1)
    total_neg = w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(w_pos * (neg_below + 0.5 * w_neg), axis=1) / (total_pos * total_neg)


def _validate(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional (N,), got shape {y.shape}")
    if len(y) == 0:
        raise ValueError("cannot compute metrics on zero samples (y_true is empty)")
    if k < 2:
        raise ValueError(f"need at least two classes, got class_names={list(class_names)!r}")
    if len({str(c) for c in class_names}) != k:
        raise ValueError(f"class names must be distinct, got {list(class_names)!r}")
    if p.shape != (len(y), k):
        raise ValueError(f"probs must have shape (N, K) = ({len(y)}, {k}), got {p.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true values must lie in [0, {k - 1}], got {y.min()}..{y.max()}")
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    sums = p.sum(axis=1)
    if p.min() < -_SUM_TOL or np.abs(sums - 1).max() > _SUM_TOL:
        worst = int(np.argmax(np.abs(sums - 1)))
        raise ValueError(
            f"probs rows must be probabilities summing to 1 (row {worst} sums to {sums[worst]:.6g}); "
            "pass softmax outputs, not logits"
        )
    # Renormalise in float64 so scikit-learn's strict sum check never warns on float32 rounding.
    p = np.clip(p, 0.0, None)
    return y.astype(np.int64, copy=False), p / p.sum(axis=1, keepdims=True)


def _ovr_auc(y: np.ndarray, p: np.ndarray, c: int) -> float | None:
    is_c = y == c
    if is_c.all() or not is_c.any():
        return None
    return float(roc_auc_score(is_c, p[:, c]))


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    # sklearn warns when a predicted class is absent from y_true; the mean over the present classes
    # is what we want and report (see ``notes``), so the warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


def _bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    pred: np.ndarray,
    present: np.ndarray,
    *,
    n_bootstrap: int,
    seed: int,
    level: float,
    binary: bool,
    want_auc: bool,
) -> dict[str, Any]:
    """Percentile bootstrap CIs of accuracy, balanced accuracy and AUC over resampled samples."""
    empty: dict[str, Any] = {
        "accuracy": None,
        "balanced_accuracy": None,
        "auc": None,
        "level": level,
        "n_bootstrap": 0,
    }
    if not 0 < level < 1:
        raise ValueError(f"ci must lie in (0, 1), got {level}")
    if n_bootstrap <= 0:
        return empty
    n, k = p.shape
    rng = np.random.default_rng(seed)
    onehot = np.eye(k)[y]
    correct = (pred == y).astype(np.float64)
    hits = onehot * correct[:, None]
    # Resamples in chunks of ~2 M weights (16 MB per array), so memory stays bounded on large splits.
    chunk = max(1, min(n_bootstrap, 2_000_000 // n))
    acc_l, bal_l, auc_l = [], [], []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        # Resample as weights: w[r, i] = how many times sample i was drawn in resample r.
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        w = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        class_n = w @ onehot  # (b, K) samples of each class per resample
        # A resample missing a class present in the data would change what balanced accuracy and AUC
        # average over; skip it (and report how many were kept).
        keep = (class_n[:, present] > 0).all(axis=1)
        w, class_n = w[keep], class_n[keep]
        if len(w) == 0:
            continue
        acc_l.append((w @ correct) / n)
        bal_l.append(((w @ hits)[:, present] / class_n[:, present]).mean(axis=1))
        if want_auc:
            if binary:
                auc_l.append(weighted_auc(p[:, 1], y == 1, w))
            else:
                per = [weighted_auc(p[:, c], y == c, w) for c in range(k) if present[c]]
                auc_l.append(np.mean(per, axis=0))
    if not acc_l:
        return empty
    acc, bal = np.concatenate(acc_l), np.concatenate(bal_l)
    aucs = np.concatenate(auc_l) if want_auc else None

    tail = (1 - level) / 2 * 100

    def interval(v: np.ndarray | None) -> list[float] | None:
        return None if v is None else [float(x) for x in np.percentile(v, [tail, 100 - tail])]

    return {
        "accuracy": interval(acc),
        "balanced_accuracy": interval(bal),
        "auc": interval(aucs),
        "level": level,
        "n_bootstrap": len(acc),
    }


def _jsonable(v: Any) -> Any:
    """Plain Python types for ``json.dumps``; NaN and infinities become None."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    return v
