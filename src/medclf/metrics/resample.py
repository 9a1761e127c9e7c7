"""Bootstrap resamples as per-sample weights, drawn by sample or by patient (cluster bootstrap).

A resample is a row of weights: how many times each sample was drawn. Drawing patients instead of images
keeps a patient's images together, as the data were collected (several images of one patient are not
independent evidence). Metrics are then weighted sums (accuracy, confusion matrices) or one sort per score
column (:func:`medclf.metrics.classification.weighted_auc`, :func:`weighted_average_precision`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["percentile_intervals", "resample_weights", "resampling_units", "weighted_average_precision"]

# Weights held at once per chunk of resamples (~16 MB of float64).
_CHUNK_ELEMENTS = 2_000_000


def resampling_units(patient_ids: Sequence[str | None] | None, n: int) -> np.ndarray:
    """Resampling unit of each of ``n`` samples: its patient (samples without an id are their own unit), or
    the sample itself when there are no ids."""
    if patient_ids is None:
        return np.arange(n)
    if len(patient_ids) != n:
        raise ValueError(f"{len(patient_ids)} patient ids for {n} samples")
    keys = [f"p:{pid}" if pid not in (None, "") else f"s:{i}" for i, pid in enumerate(patient_ids)]
    return np.unique(np.array(keys, dtype=object), return_inverse=True)[1].astype(np.int64)


def resample_weights(units: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Chunks of bootstrap weights (B, n): units drawn with replacement, each sample weighted by how often
    its unit was drawn. ``n_bootstrap`` rows in all."""
    codes = np.unique(units, return_inverse=True)[1]
    n_units = int(codes.max()) + 1 if len(codes) else 0
    if n_bootstrap <= 0 or n_units == 0:
        return
    chunk = max(1, min(n_bootstrap, _CHUNK_ELEMENTS // max(len(codes), n_units)))
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        draws = rng.integers(0, n_units, size=(b, n_units))
        flat = (draws + (np.arange(b) * n_units)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n_units).reshape(b, n_units).astype(np.float64)
        yield counts[:, codes]


def weighted_average_precision(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision of ``scores`` (N,) for the ``positive`` (N,) samples under each row of ``weights``
    (B, N): scikit-learn's definition (precision at each distinct score, weighted by the recall it adds; no
    interpolation), equal to ``average_precision_score(positive, scores, sample_weight=w)`` row by row. NaN
    where a row gives no weight to positives."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # ties share one threshold
    w = weights[:, order].astype(np.float64, copy=False)
    pos = positive[order]
    tp = np.cumsum(np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1), axis=1)
    total_pos = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall_step = np.diff(np.concatenate([np.zeros_like(total_pos), tp], axis=1), axis=1) / total_pos
        return np.sum(precision * recall_step, axis=1)


def percentile_intervals(draws: dict[str, list[np.ndarray]], level: float) -> dict[str, list[float] | None]:
    """Percentile interval at ``level`` of each metric's bootstrap values (chunks concatenated); values that
    were undefined in a resample (NaN: a class or finding lost all its positives) are left out."""
    tail = (1 - level) / 2 * 100
    out: dict[str, list[float] | None] = {}
    for key, parts in draws.items():
        v = np.concatenate(parts)
        v = v[np.isfinite(v)]
        out[key] = [float(x) for x in np.percentile(v, [tail, 100 - tail])] if len(v) else None
    return out
