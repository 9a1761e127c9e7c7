"""The data a compression step needs: the bundle's training and validation samples, preprocessed with the
bundle's own spec (from the tensor cache that training filled), split exactly as training split them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medclf import reporting
from medclf.bundle import Bundle
from medclf.data.cache import PreparedData, prepare
from medclf.data.samples import SampleSet
from medclf.data.sources import load_source
from medclf.errors import DataError
from medclf.manifest import Manifest
from medclf.metrics.classification import compute_metrics
from medclf.predictor import Predictor


@dataclass
class TrainingData:
    samples: SampleSet
    prepared: PreparedData
    train_idx: np.ndarray
    val_idx: np.ndarray  # validation samples that copy no training sample, as training selected on
    same_as_training: bool  # the files, labels and splits are those the bundle was trained on (or, when the
    # dataset's path is spelled differently, at least the per-split class counts are)

    @property
    def val_y(self) -> np.ndarray:
        return self.samples.labels[self.val_idx]

    def tensors(self, idx: np.ndarray) -> np.ndarray:
        """Rows of the cache as float32 (sorted reads from the memory map)."""
        order = np.argsort(idx)
        out = np.empty((len(idx), *self.prepared.tensors.shape[1:]), dtype=np.float32)
        out[order] = self.prepared.tensors[np.asarray(idx)[order]]
        return out

    def stratified(self, idx: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
        """Up to ``n`` of ``idx``, every class in proportion (seeded)."""
        if len(idx) <= n:
            return np.asarray(idx)
        rng = np.random.default_rng(seed)
        # Multi-label: each set of findings in proportion.
        y = self.samples.label_set_view().labels[idx]
        picked: list[np.ndarray] = []
        for c in np.unique(y):
            members = idx[y == c]
            k = max(1, round(n * len(members) / len(idx)))
            picked.append(rng.choice(members, size=min(k, len(members)), replace=False))
        return np.sort(np.concatenate(picked))  # n, give or take the rounding of each class's share


def load_training_data(
    bundle: Bundle | Predictor,
    data: str | Path,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> TrainingData:
    """Load ``data`` as training did for ``bundle``: the same validation split (the recipe's split seed and
    fraction, or its K-fold fold), the same spec, validation copies of training samples left out."""
    # A CSV read with options at training (a split file, other column names) is read the same way here.
    options = bundle.manifest.get("data", {}).get("manifest_options")
    samples = load_source(data, default_split="train", manifest=options)
    if not samples.has_split("train"):
        raise DataError(f"{data}: no training split found")
    if list(samples.classes) != list(bundle.classes):
        raise DataError(
            f"{data}: its classes {samples.classes} are not the bundle's {bundle.classes}; "
            "give the data the bundle was trained on"
        )
    samples = Manifest.from_dict(bundle.manifest).recipe.rebuild_splits(samples)
    prepared = prepare(samples, bundle.spec, cache_dir=cache_dir, workers=workers, progress=progress)
    splits = np.array(samples.splits)
    labelled = prepared.ok & samples.known
    train_idx = np.flatnonzero(labelled & (splits == "train"))
    val_idx = np.flatnonzero(labelled & (splits == "val") & ~prepared.train_copy)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"{data}: no usable training or validation samples")
    recorded = bundle.manifest.get("data", {})
    # The fingerprint covers file paths as given: compare the class counts per split when it differs.
    same = prepared.fingerprint == recorded.get("fingerprint") or samples.summary() == recorded.get("counts")
    if not same:
        reporting.current().print(
            "[yellow]note:[/] this data (or its validation split) differs from what the bundle was trained on"
        )
    return TrainingData(samples, prepared, train_idx, val_idx, same)


def val_scores(
    y: np.ndarray, probs: np.ndarray, classes: list[str], thresholds: np.ndarray | None = None
) -> dict[str, float | int | None]:
    """Accuracy and AUC (as ``evaluate`` computes them, no bootstrap) for before/after records. Multi-label
    findings (``y`` (N, K)): macro AUC, and the accuracy of the per-finding decisions at ``thresholds``
    (the bundle's; 0.5 without) over all (image, finding) pairs."""
    if y.ndim == 2:
        from medclf.metrics.multilabel import multilabel_metrics

        m = multilabel_metrics(y, probs, classes, thresholds=thresholds, n_bootstrap=0)
        return {"n": len(y), "accuracy": 1.0 - m["hamming_loss"], "auc": m["macro_auc"]}
    m = compute_metrics(y, probs, classes, n_bootstrap=0)
    return {"n": len(y), "accuracy": m["accuracy"], "auc": m["auc"]}
