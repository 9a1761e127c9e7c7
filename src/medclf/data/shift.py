"""Are validation and test drawn from the training split's distribution? A domain-classifier check.

For each class and each split beside ``train``, a gradient-boosted tree classifier learns to tell that split's
images from training images of the same class, on the audit's near-duplicate signatures averaged down to a
coarse layout (8x8 cells in 2D, 4x4x4 in 3D; each signature is already standardised, so brightness and
contrast alone cannot explain a difference). Its cross-validated AUC is 0.5 when the two are exchangeable.

Why it matters: a test split that a classifier can tell apart from training, while validation cannot, is a
test set from another distribution. Validation scores then overstate test performance, and no amount of model
selection on validation will show it. PneumoniaMNIST is the measured case: within the class ``normal`` the
check tells test from train at AUC ~0.8 and validation from train at ~0.5 (``benchmarks/shift.py``).
Copies of training samples are left out (the audit reports them separately), as are constant images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from medclf import reporting
from medclf.data.samples import SPLITS

# Fewer images per side than this give an AUC too noisy to read (its null spread is about +-0.1).
MIN_PER_SIDE = 30
# Larger sets are subsampled: the check's cost stays a few seconds per class and split.
MAX_PER_SIDE = 500
# Below this many per side, the AUC is averaged over REPEATS draws (see domain_auc).
SMALL = 120
REPEATS = 3
# A cross-validated AUC at or above this earns a warning; on small sets the bar is higher (see warn_at).
WARN_AUC = 0.70


def warn_at(n_per_side: int) -> float:
    """The AUC that earns a warning with ``n_per_side`` images per side: at least :data:`WARN_AUC`, and four
    null standard errors above chance (Mann-Whitney: sqrt((2n + 1) / (12 n^2))), so that a dataset with many
    small classes does not raise false alarms (n=30: 0.80, n=40: 0.76, n >= 68: 0.70)."""
    return round(max(WARN_AUC, 0.5 + 4 * float(np.sqrt((2 * n_per_side + 1) / (12 * n_per_side**2)))), 3)


@dataclass(frozen=True)
class SplitShift:
    """How well ``split`` images of class ``cls`` can be told from training images of that class."""

    split: str
    cls: str
    auc: float
    n_per_side: int

    @property
    def warn_at(self) -> float:
        return warn_at(self.n_per_side)

    @property
    def shifted(self) -> bool:
        return self.auc >= self.warn_at

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "warn_at": self.warn_at, "shifted": self.shifted}


def layout_features(signatures: np.ndarray, is_3d: np.ndarray) -> np.ndarray:
    """Audit signatures (32x32 in 2D, 4x16x16 in 3D) averaged to 64 coarse cells each."""
    sig = np.asarray(signatures, dtype=np.float32)
    out = np.empty((len(sig), 64), dtype=np.float32)
    flat = ~np.asarray(is_3d, dtype=bool)
    out[flat] = sig[flat].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(-1, 64)
    out[~flat] = sig[~flat].reshape(-1, 4, 4, 4, 4, 4).mean(axis=(3, 5)).reshape(-1, 64)
    # A signature has unit L2 norm: rescaled, its values have unit variance, like a standardised image.
    return out * np.sqrt(sig.shape[1])


def domain_auc(
    a: np.ndarray,
    b: np.ndarray,
    *,
    seed: int = 0,
    max_per_side: int = MAX_PER_SIDE,
    repeats: int | None = None,
) -> tuple[float, int]:
    """Cross-validated (5-fold) AUC of telling the rows of ``a`` from those of ``b``, and the n per side.

    The same number is drawn from each (at most ``max_per_side``), so chance is exactly 0.5. Below
    :data:`SMALL` per side the AUC is the mean of :data:`REPEATS` runs with other draws and folds: one run's
    spread under no shift, measured on two disjoint draws of PneumoniaMNIST training images (25 trials), was
    0.111 at n=36 and 0.065 at n=60, against 0.066 and 0.041 for the mean of three (0.036 vs 0.026 at n=120;
    ``benchmarks/shift.py DATA --null-trials 25``). ``repeats`` overrides that choice."""
    n = min(len(a), len(b), max_per_side)
    if n < 5:
        raise ValueError(f"need at least 5 samples per side, got {min(len(a), len(b))}")
    aucs = []
    if repeats is None:
        repeats = REPEATS if n < SMALL else 1
    # One thread (OpenMP and BLAS): a few hundred rows of 64 features gain nothing from threads, and on a
    # machine where another process holds a core, OpenMP threads waiting for each other at every tree made
    # one check about a hundred times slower.
    with threadpool_limits(limits=1):
        for k in range(repeats):
            rng = np.random.default_rng(seed + k)
            pick_a, pick_b = rng.choice(len(a), n, replace=False), rng.choice(len(b), n, replace=False)
            x = np.concatenate([a[pick_a], b[pick_b]])
            y = np.r_[np.zeros(n), np.ones(n)]
            clf = HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=seed + k)
            folds = StratifiedKFold(5, shuffle=True, random_state=seed + k)
            p = cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[:, 1]
            aucs.append(roc_auc_score(y, p))
    return float(np.mean(aucs)), n


def split_shift(
    features: np.ndarray,
    splits: Sequence[str],
    labels: np.ndarray,
    usable: np.ndarray,
    classes: Sequence[str],
    *,
    seed: int = 0,
    min_per_side: int = MIN_PER_SIDE,
    progress: bool = False,
) -> list[SplitShift]:
    """One :class:`SplitShift` per (non-train split, class) with at least ``min_per_side`` usable images
    on both sides; ``usable`` marks the rows to compare (decoded, not constant, not a copy of train).

    The classifiers run single-threaded (see :func:`domain_auc`); ``progress`` shows a bar over the
    split/class pairs (:mod:`medclf.reporting`)."""
    split_arr = np.asarray(splits)
    labels = np.asarray(labels)
    usable = np.asarray(usable, dtype=bool)
    present = set(split_arr.tolist()) - {"train"}
    pairs = []
    for split in [s for s in SPLITS if s in present] + sorted(present - set(SPLITS)):
        for c, name in enumerate(classes):
            train = usable & (split_arr == "train") & (labels == c)
            other = usable & (split_arr == split) & (labels == c)
            if min(int(train.sum()), int(other.sum())) >= min_per_side:
                pairs.append((split, str(name), train, other))
    results = []
    with reporting.progress(
        "split shift check", len(pairs), enabled=progress, info=True, clock="elapsed"
    ) as bar:
        for split, name, train, other in pairs:
            auc, n = domain_auc(features[train], features[other], seed=seed)
            results.append(SplitShift(split=split, cls=name, auc=round(auc, 3), n_per_side=n))
            bar.advance(info=f"{split}/{name}")
    return results
