"""The out-of-distribution guard of a run (:mod:`medclf.ood`), fitted on the selected model after the last
epoch."""

from __future__ import annotations

import numpy as np
from torch import nn

from medclf.data.stream import StreamedRows
from medclf.ood import OODDetector, fit_detector, input_statistics, penultimate_features

OOD_FIT_SAMPLES = 3000  # plenty for class means and a shrunk covariance of a few hundred features


def fit_ood(
    model: nn.Module,
    tensors: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    labels: np.ndarray,
    seed: int,
    batch_size: int | None = None,
    *,
    label_names: list[str] | None = None,
) -> OODDetector:
    """The out-of-distribution guard for this model: penultimate features and input statistics of (up to) a
    few thousand un-augmented training samples and of the validation samples (:mod:`medclf.ood`). ``labels``:
    one class per sample, or (multi-label) a 0/1 row of findings, named by ``label_names``."""
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(train_idx, size=min(len(train_idx), OOD_FIT_SAMPLES), replace=False))
    train_f, train_s = _features(model, tensors, fit_idx, batch_size)
    val_f, val_s = _features(model, tensors, np.sort(val_idx), batch_size)
    return fit_detector(
        train_f,
        labels[fit_idx],
        val_f,
        train_inputs=train_s,
        val_inputs=val_s,
        seed=seed,
        label_names=label_names,
    )


def _features(
    model: nn.Module, tensors: np.ndarray, idx: np.ndarray, batch_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and input statistics of the cache rows ``idx``. With ``batch_size`` (streaming:
    memory is tight) the rows are read from disk one batch at a time instead of all at once."""
    if batch_size is None or getattr(tensors, "filename", None) is None:
        x = np.asarray(tensors[idx], dtype=np.float32)
        return penultimate_features(model, x), input_statistics(x)
    rows = StreamedRows(tensors, idx)
    feats, stats = [], []
    for start in range(0, len(idx), batch_size):
        batch = rows[start : start + batch_size]
        feats.append(penultimate_features(model, batch, batch_size=batch_size))
        stats.append(input_statistics(batch))
    if not feats:
        return penultimate_features(model, rows[0:0]), input_statistics(rows[0:0])
    return np.concatenate(feats), np.concatenate(stats)
