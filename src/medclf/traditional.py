"""``medclf baseline``: hand-crafted features + classical classifiers, the comparison reviewers ask for.

The data goes through the same path as training (source, validation split, decode-once cache) and the
results through the same scorer and report as ``medclf evaluate``, so a CNN and its traditional-ML
baseline are measured on exactly the same test samples, copies of training samples left out.

Features
--------
Every image is preprocessed once (greyscale, a square of ``size`` pixels, intensities in [0, 1]) and
described by one vector of :data:`N_FEATURES` numbers, laid out in this order (:func:`feature_layout`):

======================  =====  ============================================================================
block                   size   content
======================  =====  ============================================================================
``intensity_hist``         32  fraction of pixels in each of 32 equal bins of [0, 1]
``intensity_stats``        12  mean, std, skewness, excess kurtosis, percentiles 1/5/25/50/75/95/99,
                               Shannon entropy (bits) of the 256-level histogram
``glcm``                   36  grey-level co-occurrence matrix (Haralick, Shanmugam & Dinstein 1973) of the
                               image quantised to 32 levels, symmetric and normalised, at distances 1, 2
                               and 4 px and angles 0, 45, 90, 135 degrees; for each of contrast,
                               dissimilarity, homogeneity, energy, correlation and ASM (in that order) and
                               each distance: the mean over the 4 angles (rotation invariant) and the range
                               over them, as Haralick proposed (``glcm_<prop>_d<d>_<mean|range>``)
``lbp_8_1``                10  histogram of rotation-invariant uniform local binary patterns
                               (Ojala, Pietikäinen & Mäenpää 2002; P=8 neighbours at radius 1)
``lbp_16_2``               18  the same with P=16, R=2
``hog``                  1764  histogram of oriented gradients (Dalal & Triggs 2005) of a 64 x 64 copy:
                               9 orientations, 8 x 8-pixel cells, 2 x 2-cell blocks, L2-Hys
======================  =====  ============================================================================

Intensity statistics, quantisation, the 64-pixel copy and the GLCM properties are computed on whole
chunks of images at once with numpy/scipy; the GLCM counts, LBP and HOG use scikit-image per image.
Chunks are spread over ``workers`` processes (joblib) when the data is large enough to repay starting
them. Roughly 130-150 images/s per core at 128 px, 550 at 28 px.

Classifiers
-----------
Each method is a scikit-learn estimator (with a ``StandardScaler`` in front where scale matters) with
balanced class weights, tried over a small grid (:data:`GRIDS`):

- ``logreg``: L2 logistic regression, ``C`` in the grid;
- ``rf``: random forest of 300 trees (``min_samples_leaf`` in the grid);
- ``svm``: RBF support-vector machine (``C`` in the grid, ``gamma="scale"``), probabilities by Platt
  scaling fitted with scikit-learn's internal cross-validation on the training split;
- ``gbm``: histogram gradient boosting (``learning_rate`` in the grid), not run by default.

Every candidate is fitted on the training split and scored on the validation split only, minus the
validation samples that copy a training sample. The candidate with the highest validation AUC (binary:
AUC of class 1; multi-class: macro one-vs-rest) wins, validation accuracy breaking ties, then the order of
the candidates. The winner, as fitted on the training split, predicts the test split once. Models are
never written to disk (no pickle); ``baseline.json`` records what is needed to refit them.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage, stats
from skimage.feature import graycomatrix, hog, local_binary_pattern

from medclf import reporting  # light: no rich until something is shown
from medclf.data.samples import DEFAULT_VAL_FRACTION  # light: no torch, no scikit-learn

if TYPE_CHECKING:
    from medclf.data.cache import PreparedData
    from medclf.data.samples import SampleSet
    from medclf.preprocess import PreprocessSpec

# Heavy imports (medclf.data, which brings torch, and scikit-learn) live inside the functions that need
# them, so the worker processes that extract features start quickly.

__all__ = [
    "DEFAULT_METHODS",
    "GRIDS",
    "METHODS",
    "N_FEATURES",
    "extract_features",
    "feature_layout",
    "feature_names",
    "image_features",
    "run_baseline",
    "validation_auc",
]

# ----------------------------------------------------------------------------- feature settings

HIST_BINS = 32
PERCENTILES = (1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0)
STAT_NAMES = ("mean", "std", "skewness", "kurtosis", *[f"p{int(p)}" for p in PERCENTILES], "entropy")
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2, 4)
GLCM_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
LBP_SETTINGS = ((8, 1.0), (16, 2.0))
HOG_SIZE = 64
HOG_ORIENTATIONS = 9
HOG_CELL = 8
HOG_BLOCK = 2
MIN_SIZE = 16
CHUNK = 128
# Below this many pixels in all, one process is faster than starting worker processes (~1-2 s each).
PARALLEL_MIN_PIXELS = 16_000_000

_HOG_BLOCKS = HOG_SIZE // HOG_CELL - HOG_BLOCK + 1
_BLOCKS: tuple[tuple[str, int, str], ...] = (
    ("intensity_hist", HIST_BINS, f"fraction of pixels in {HIST_BINS} equal bins of [0, 1]"),
    ("intensity_stats", len(STAT_NAMES), ", ".join(STAT_NAMES)),
    (
        "glcm",
        len(GLCM_PROPS) * len(GLCM_DISTANCES) * 2,
        f"Haralick 1973 GLCM at {GLCM_LEVELS} levels: {', '.join(GLCM_PROPS)} x distances "
        f"{', '.join(map(str, GLCM_DISTANCES))} x (mean, range) over angles 0/45/90/135",
    ),
    *(
        (
            f"lbp_{p}_{int(r)}",
            p + 2,
            f"Ojala 2002 rotation-invariant uniform LBP histogram, P={p}, R={r:g}",
        )
        for p, r in LBP_SETTINGS
    ),
    (
        "hog",
        _HOG_BLOCKS**2 * HOG_BLOCK**2 * HOG_ORIENTATIONS,
        f"Dalal & Triggs 2005 HOG of a {HOG_SIZE} px copy: {HOG_ORIENTATIONS} orientations, "
        f"{HOG_CELL} px cells, {HOG_BLOCK}x{HOG_BLOCK} blocks, L2-Hys",
    ),
)
N_FEATURES = sum(n for _, n, _ in _BLOCKS)

# ----------------------------------------------------------------------------- classifier settings

METHODS = ("logreg", "rf", "svm", "gbm")
DEFAULT_METHODS = ("logreg", "rf", "svm")
GRIDS: dict[str, list[dict[str, Any]]] = {
    "logreg": [{"C": c} for c in (0.001, 0.01, 0.1, 1.0)],
    "rf": [{"min_samples_leaf": m} for m in (1, 3)],
    "svm": [{"C": c} for c in (0.5, 2.0, 8.0)],
    "gbm": [{"learning_rate": lr} for lr in (0.05, 0.15)],
}
SELECTION_RULE = (
    "each candidate fitted on the training split; the highest validation AUC wins (binary: AUC of class 1; "
    "multi-class: macro one-vs-rest), validation accuracy breaks ties, then candidate order; validation "
    "samples that copy a training sample are left out; the test split is never consulted"
)


# ----------------------------------------------------------------------------- features


def feature_layout() -> list[dict[str, Any]]:
    """The blocks of the feature vector, in order: ``name``, ``start``, ``stop`` (exclusive), ``size``
    and a one-line ``description``."""
    out, start = [], 0
    for name, size, desc in _BLOCKS:
        out.append({"name": name, "start": start, "stop": start + size, "size": size, "description": desc})
        start += size
    return out


def feature_names() -> list[str]:
    """One name per column of the feature matrix (:data:`N_FEATURES` of them)."""
    names = [f"hist_{i:02d}" for i in range(HIST_BINS)]
    names += list(STAT_NAMES)
    names += [
        f"glcm_{prop}_d{d}_{agg}" for prop in GLCM_PROPS for d in GLCM_DISTANCES for agg in ("mean", "range")
    ]
    for p, r in LBP_SETTINGS:
        names += [f"lbp_{p}_{int(r)}_{k:02d}" for k in range(p + 2)]
    names += [f"hog_{k:04d}" for k in range(N_FEATURES - len(names))]
    return names


def image_features(image: np.ndarray) -> np.ndarray:
    """The feature vector (float32, :data:`N_FEATURES`) of one greyscale image with values in [0, 1]."""
    return _chunk_features(np.asarray(image)[None])[0]


def extract_features(
    images: np.ndarray,
    *,
    workers: int = 1,
    progress: bool = False,
) -> np.ndarray:
    """Features of a stack of greyscale images ``(N, H, W)`` (or ``(N, 1, H, W)``) in [0, 1].

    Returns float32 ``(N, N_FEATURES)``. Chunks of :data:`CHUNK` images go to ``workers`` processes
    (one process below :data:`PARALLEL_MIN_PIXELS` pixels in all); the result does not depend on
    ``workers``. ``images`` may be float16 or a memory map: chunks are converted one at a time.
    """
    if images.ndim == 4:
        if images.shape[1] != 1:
            raise ValueError(f"expected greyscale images, got {images.shape[1]} channels")
        images = images[:, 0]
    if images.ndim != 3:
        raise ValueError(f"expected a stack of 2D images (N, H, W), got shape {images.shape}")
    n = len(images)
    out = np.zeros((n, N_FEATURES), dtype=np.float32)
    if n == 0:
        return out
    starts = list(range(0, n, CHUNK))
    chunks = (np.asarray(images[s : s + CHUNK]) for s in starts)
    if workers <= 1 or len(starts) == 1 or images.size < PARALLEL_MIN_PIXELS:
        results: Iterator[np.ndarray] = map(_chunk_features, chunks)
    else:
        from joblib import Parallel, delayed

        parallel = Parallel(n_jobs=workers, backend="loky", return_as="generator")
        results = iter(parallel(delayed(_chunk_features)(c) for c in chunks))
    with reporting.progress("[bold]baseline[/] features", n, enabled=progress) as bar:
        for s, feats in zip(starts, results, strict=True):
            out[s : s + len(feats)] = feats
            bar.advance(len(feats))
    return out


def _chunk_features(chunk: np.ndarray) -> np.ndarray:
    """Features of ``(n, H, W)`` images in [0, 1]: vectorised over the chunk where numpy allows it."""
    x = np.clip(np.nan_to_num(np.asarray(chunk, dtype=np.float32)), 0.0, 1.0)
    n, h, w = x.shape
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"images must be at least {MIN_SIZE} px on each side, got {h} x {w}")
    flat = x.reshape(n, -1)
    offsets = np.arange(n)[:, None]

    # Intensity histogram and statistics.
    bins = np.minimum((flat * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    hist: np.ndarray = np.bincount((bins + offsets * HIST_BINS).ravel(), minlength=n * HIST_BINS)
    hist = hist.reshape(n, HIST_BINS) / flat.shape[1]
    levels256 = np.minimum((flat * 256).astype(np.int64), 255)
    h256 = np.bincount((levels256 + offsets * 256).ravel(), minlength=n * 256).reshape(n, 256)
    p256 = h256 / flat.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p256 > 0, p256 * np.log2(p256), 0.0).sum(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # constant images: skew/kurtosis undefined
            skew = stats.skew(flat, axis=1)
            kurt = stats.kurtosis(flat, axis=1)
    pct = np.percentile(flat, PERCENTILES, axis=1).T
    stats_block = np.column_stack([flat.mean(axis=1), flat.std(axis=1), skew, kurt, pct, entropy])

    # Haralick texture: GLCM counts per image (scikit-image), properties for the whole chunk at once.
    quant = np.minimum((x * GLCM_LEVELS).astype(np.uint8), GLCM_LEVELS - 1)
    glcm = np.stack(
        [
            graycomatrix(q, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS, symmetric=True, normed=True)
            for q in quant
        ]
    )
    props = glcm_properties(glcm)  # (n, props, distances, angles)
    glcm_block = np.stack([props.mean(axis=3), props.max(axis=3) - props.min(axis=3)], axis=3)
    glcm_block = glcm_block.reshape(n, -1)

    # LBP (integer input: scikit-image warns that floats make near-ties unstable).
    grey8 = np.round(x * 255).astype(np.uint8)
    lbp_blocks = []
    for p, r in LBP_SETTINGS:
        codes = np.stack([local_binary_pattern(g, p, r, method="uniform") for g in grey8]).astype(np.int64)
        counts = np.bincount((codes.reshape(n, -1) + offsets * (p + 2)).ravel(), minlength=n * (p + 2))
        lbp_blocks.append(counts.reshape(n, p + 2) / codes[0].size)

    # HOG on a 64-pixel copy, so the vector has the same length for every input size.
    small = _resize_stack(x, HOG_SIZE)
    hog_block = np.stack(
        [
            hog(
                s,
                orientations=HOG_ORIENTATIONS,
                pixels_per_cell=(HOG_CELL, HOG_CELL),
                cells_per_block=(HOG_BLOCK, HOG_BLOCK),
                block_norm="L2-Hys",
                feature_vector=True,
            )
            for s in small
        ]
    )
    feats = np.concatenate([hist, stats_block, glcm_block, *lbp_blocks, hog_block], axis=1)
    return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def glcm_properties(glcm: np.ndarray) -> np.ndarray:
    """Haralick properties of normalised GLCMs ``(n, L, L, D, A)`` -> ``(n, len(GLCM_PROPS), D, A)``.

    The definitions of :func:`skimage.feature.graycoprops` (checked against it in the tests), computed
    for a whole chunk at once instead of one call per image and property.
    """
    levels = glcm.shape[1]
    i = np.arange(levels, dtype=np.float64).reshape(1, levels, 1, 1, 1)
    j = i.reshape(1, 1, levels, 1, 1)
    diff = i - j
    p = glcm.astype(np.float64)
    contrast = (p * diff**2).sum(axis=(1, 2))
    dissimilarity = (p * np.abs(diff)).sum(axis=(1, 2))
    homogeneity = (p / (1.0 + diff**2)).sum(axis=(1, 2))
    asm = (p**2).sum(axis=(1, 2))
    energy = np.sqrt(asm)
    mu_i = (p * i).sum(axis=(1, 2), keepdims=True)
    mu_j = (p * j).sum(axis=(1, 2), keepdims=True)
    sd_i = np.sqrt((p * (i - mu_i) ** 2).sum(axis=(1, 2)))
    sd_j = np.sqrt((p * (j - mu_j) ** 2).sum(axis=(1, 2)))
    cov = (p * (i - mu_i) * (j - mu_j)).sum(axis=(1, 2))
    flat_image = sd_i * sd_j < 1e-15
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = np.where(flat_image, 1.0, cov / np.where(flat_image, 1.0, sd_i * sd_j))
    by_name = {
        "contrast": contrast,
        "dissimilarity": dissimilarity,
        "homogeneity": homogeneity,
        "energy": energy,
        "correlation": correlation,
        "ASM": asm,
    }
    return np.stack([by_name[name] for name in GLCM_PROPS], axis=1)


def _resize_stack(x: np.ndarray, size: int) -> np.ndarray:
    """``(n, H, W)`` -> ``(n, size, size)``: block means for integer factors, else anti-aliased linear."""
    n, h, w = x.shape
    if h == w == size:
        return x
    if h % size == 0 and w % size == 0:
        return x.reshape(n, size, h // size, size, w // size).mean(axis=(2, 4))
    fy, fx = h / size, w / size
    if fy > 1 or fx > 1:  # low-pass before shrinking (the sigma skimage.transform.resize uses)
        x = ndimage.gaussian_filter(x, sigma=(0, max((fy - 1) / 2, 0), max((fx - 1) / 2, 0)), mode="nearest")
    return ndimage.zoom(x, (1, size / h, size / w), order=1, mode="nearest", grid_mode=True)


# ----------------------------------------------------------------------------- classifiers


def validation_auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """The selection score: binary, ROC AUC of class 1; multi-class, the mean one-vs-rest AUC over the
    classes present in ``y`` (the :func:`medclf.metrics.classification.compute_metrics` definition). None when
    undefined (fewer than two classes in ``y``)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    k = probs.shape[1]
    if y.ndim == 2:  # multi-label findings: macro AUC over the findings with positives and negatives
        scorable = [j for j in range(k) if 0 < y[:, j].sum() < len(y)]
        return float(np.mean([roc_auc_score(y[:, j], probs[:, j]) for j in scorable])) if scorable else None
    present = [c for c in range(k) if (y == c).any()]
    if len(present) < 2:
        return None
    if k == 2:
        return float(roc_auc_score(y == 1, probs[:, 1]))
    return float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))


def make_estimator(method: str, params: dict[str, Any], *, seed: int, workers: int) -> Any:
    """A fresh scikit-learn estimator for ``method`` with ``params`` (see :data:`GRIDS`)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if method == "logreg":
        clf = LogisticRegression(C=params["C"], class_weight="balanced", max_iter=2000, random_state=seed)
        return make_pipeline(StandardScaler(), clf)
    if method == "rf":
        return RandomForestClassifier(
            n_estimators=300,
            max_features="sqrt",
            min_samples_leaf=params["min_samples_leaf"],
            class_weight="balanced",
            n_jobs=workers,
            random_state=seed,
        )
    if method == "svm":
        clf = SVC(
            C=params["C"],
            kernel="rbf",
            gamma="scale",
            class_weight="balanced",
            probability=True,
            cache_size=500,
            random_state=seed,
        )
        return make_pipeline(StandardScaler(), clf)
    if method == "gbm":
        return HistGradientBoostingClassifier(
            learning_rate=params["learning_rate"],
            max_iter=200,
            class_weight="balanced",
            early_stopping=False,
            random_state=seed,
        )
    raise ValueError(f"unknown method {method!r}")


def check_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    """Validate method names (a sequence, or one comma-separated string); raises ConfigError."""
    from medclf.errors import ConfigError

    if isinstance(methods, str):
        methods = methods.split(",")
    names = tuple(dict.fromkeys(m.strip().lower() for m in methods if m.strip()))
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        what = f"unknown method(s) {', '.join(map(repr, unknown))}" if unknown else "no method given"
        raise ConfigError(f"{what}; valid methods: {', '.join(METHODS)}")
    return names


@dataclass
class _Candidate:
    method: str
    params: dict[str, Any]
    val_auc: float | None
    val_accuracy: float
    fit_seconds: float
    note: str = ""

    def row(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": dict(self.params),
            "val_auc": self.val_auc,
            "val_accuracy": self.val_accuracy,
            "fit_seconds": round(self.fit_seconds, 3),
            "note": self.note,
        }

    def key(self) -> tuple[float, float]:
        return (self.val_auc if self.val_auc is not None else -math.inf, self.val_accuracy)


def _full_probs(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities as ``(n, n_classes)``: columns of classes absent from training are 0. A
    one-vs-rest model (multi-label findings) gives one probability per finding already."""
    p = model.predict_proba(x)
    if _is_ovr(model):
        return np.asarray(p, dtype=np.float64)
    out = np.zeros((len(x), n_classes), dtype=np.float64)
    out[:, np.asarray(model.classes_, dtype=np.int64)] = p
    return out


def _is_ovr(model: Any) -> bool:
    from sklearn.multiclass import OneVsRestClassifier

    return isinstance(model, OneVsRestClassifier)


def select_model(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    *,
    methods: Sequence[str],
    seed: int = 0,
    workers: int = 1,
    multilabel: bool = False,
) -> tuple[Any, _Candidate, list[_Candidate]]:
    """Fit every candidate of ``methods`` on the training features, score it on the validation features
    with :func:`validation_auc`, and return ``(best model, its candidate, all candidates)``.

    Only ``x_val``/``y_val`` are scored: the test split never reaches this function.
    """
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    best_model, best, table = None, None, []
    for method in methods:
        for params in GRIDS[method]:
            t0 = time.perf_counter()
            model = make_estimator(method, params, seed=seed, workers=workers)
            if multilabel:  # one binary classifier per finding (scikit-learn's one-vs-rest)
                from sklearn.multiclass import OneVsRestClassifier

                model = OneVsRestClassifier(model)
            with threadpool_limits(limits=workers), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(x_train, y_train)
                p_val = _full_probs(model, x_val, n_classes)
            seconds = time.perf_counter() - t0
            note = "did not converge" if any(w.category is ConvergenceWarning for w in caught) else ""
            cand = _Candidate(
                method=method,
                params=dict(params),
                val_auc=validation_auc(y_val, p_val),
                # Multi-label: the accuracy of the per-finding decisions at 0.5.
                val_accuracy=float(
                    ((p_val >= 0.5) == (y_val == 1)).mean()
                    if multilabel
                    else (p_val.argmax(axis=1) == y_val).mean()
                ),
                fit_seconds=seconds,
                note=note,
            )
            table.append(cand)
            auc = "n/a" if cand.val_auc is None else f"{cand.val_auc:.4f}"
            reporting.current().print(
                f"  {method:7s} {_params_text(params):24s} val AUC {auc}  "
                f"accuracy {cand.val_accuracy:.4f}  ({seconds:.1f} s)"
            )
            if best is None or cand.key() > best.key():
                best, best_model = cand, model
    assert best is not None and best_model is not None
    return best_model, best, table


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


# ----------------------------------------------------------------------------- the command


def feature_spec(samples: SampleSet, *, size: int | None, seed: int) -> PreprocessSpec:
    """The :class:`~medclf.preprocess.PreprocessSpec` of the feature extractor for ``samples``.

    Greyscale; the native size for images of at most 64 px (as MedMNIST), else 128 px, unless ``size``
    is given; empty borders cropped as the default spec does, except for images of at most 64 px (the
    training planner's rule: they have no border and cropping would change their scale); CT gets the
    planner's fixed -1000..1000 HU window. 3D data is refused.
    """
    from medclf.errors import ConfigError
    from medclf.planner import fingerprint
    from medclf.preprocess import PreprocessSpec

    fp = fingerprint(samples, seed=seed)
    if fp.spatial_dims != 2:
        raise ConfigError(
            f"{samples.source}: the baseline handles 2D images only, but this dataset holds 3D volumes "
            f"(median shape {fp.median_shape}); train a 3D network with `medclf train` instead"
        )
    native = min(fp.median_shape)
    if size is not None and size < MIN_SIZE:
        raise ConfigError(f"--size must be at least {MIN_SIZE} for the baseline's texture features")
    chosen = size or (native if native <= 64 else 128)
    kw: dict[str, Any] = {"spatial_dims": 2, "channels": 1, "size": (chosen, chosen)}
    if native <= 64:
        kw["crop_foreground"] = False
    if fp.modalities.get("CT", 0) > fp.n_probed // 2:
        kw.update(normalise="window", window=(-1000.0, 1000.0))
    return PreprocessSpec(**kw)


def run_baseline(
    data: str | Path,
    out: str | Path,
    *,
    size: int | None = None,
    methods: Sequence[str] | str = DEFAULT_METHODS,
    seed: int = 0,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    manifest: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Features + classical classifiers on ``data``; writes the ``evaluate`` outputs and ``baseline.json``
    to ``out`` and returns the test metrics with a ``baseline`` key (selection table, features, times).
    Multi-label findings: each classifier one-vs-rest (one binary classifier per finding), each finding's
    threshold chosen on validation, scored as ``evaluate`` scores a multi-label bundle. ``manifest``: how to
    read a CSV manifest (:class:`medclf.data.sources.ManifestOptions`). Messages and progress go to the
    active reporter (:mod:`medclf.reporting`)."""
    from medclf.data.cache import prepare

    t_start = time.perf_counter()
    rep = reporting.current()
    names = check_methods(methods)
    workers = workers or min(4, os.cpu_count() or 1)
    samples, given_train = _load_with_validation(data, val_fraction, seed, manifest)
    multilabel = samples.task == "multilabel"
    spec = feature_spec(samples, size=size, seed=seed)
    rep.print(
        f"[bold]Baseline[/] on {data}: {len(samples)} samples, greyscale {spec.size[0]} px, "
        f"methods {', '.join(names)}"
    )
    t0 = time.perf_counter()
    prepared = prepare(samples, spec, cache_dir=cache_dir, workers=workers, progress=progress)
    times = {"decode_seconds": time.perf_counter() - t0}
    rows = _baseline_rows(samples, prepared, given_train)
    (x_train, x_val, x_test), n_images, rate = _baseline_features(prepared, rows, workers, progress, times)
    k = len(samples.classes)
    rep.print("Model selection on the validation split:")
    t0 = time.perf_counter()
    model, best, table = select_model(
        x_train,
        samples.labels[rows.train],
        x_val,
        samples.labels[rows.val],
        k,
        methods=names,
        seed=seed,
        workers=workers,
        multilabel=multilabel,
    )
    times["fit_seconds"] = time.perf_counter() - t0
    rep.print(f"Selected [bold]{best.method}[/] ({_params_text(best.params)})")
    t0 = time.perf_counter()
    probs = np.full((len(samples), k), np.nan)
    probs[rows.test] = _full_probs(model, x_test, k)
    times["predict_seconds"] = time.perf_counter() - t0

    summary = _summary(
        data, samples, names, seed, model, best, table, rows, prepared, spec, n_images, rate, workers, times
    )
    sections = _report_sections(data, best, table, model, summary, spec, rate, workers, times)
    if prepared.errors:
        sections["Unreadable files (left out)"] = prepared.errors[:50]
    metrics = _write_report(
        out, data, samples, prepared, rows, probs, model, x_val, best, sections, summary, seed
    )
    summary["times"]["total_seconds"] = round(time.perf_counter() - t_start, 3)
    summary["test"] = _test_summary(metrics)
    out = Path(out)
    (out / "baseline.json").write_text(json.dumps(summary, indent=2))
    return {**metrics, "baseline": summary}


def _baseline_features(
    prepared: PreparedData,
    rows: _Rows,
    workers: int,
    progress: bool,
    times: dict[str, float],
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int, float]:
    """The hand-crafted features of the training, validation and test rows; the images read and their rate."""
    needed = np.concatenate([rows.train, rows.val, rows.test])
    t0 = time.perf_counter()
    feats = extract_features(
        prepared.tensors[needed, 0],  # float16 copy; each chunk becomes float32 in its worker
        workers=workers,
        progress=progress,
    )
    times["features_seconds"] = time.perf_counter() - t0
    rate = len(needed) / max(times["features_seconds"], 1e-9)
    reporting.current().print(
        f"Features: {len(needed)} images x {N_FEATURES} in {times['features_seconds']:.1f} s ({rate:.0f} images/s)"
    )
    n_tr, n_va = len(rows.train), len(rows.val)
    return (feats[:n_tr], feats[n_tr : n_tr + n_va], feats[n_tr + n_va :]), len(needed), rate


def _write_report(
    out: str | Path,
    data: str | Path,
    samples: SampleSet,
    prepared: PreparedData,
    rows: _Rows,
    probs: np.ndarray,
    model: Any,
    x_val: np.ndarray,
    best: _Candidate,
    sections: dict[str, Any],
    summary: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """The test split scored as ``evaluate`` scores a bundle (per finding for multi-label data)."""
    from medclf.evaluation.runner import write_evaluation

    labels, k = samples.labels, len(samples.classes)
    train_copy = np.where(np.array(samples.splits) == "test", rows.test_copy, prepared.train_copy)
    if samples.task == "multilabel":
        from medclf.evaluation.findings import write_findings_evaluation
        from medclf.metrics.multilabel import choose_thresholds

        # Each finding's operating point on validation, as training chooses a network's.
        thresholds, _ = choose_thresholds(labels[rows.val], _full_probs(model, x_val, k))
        summary["thresholds"] = dict(zip(samples.classes, map(float, thresholds), strict=True))
        metrics = write_findings_evaluation(
            out,
            samples=samples,
            labels=labels,
            probs=probs,
            findings=list(samples.classes),
            thresholds=thresholds,
            ok=prepared.ok,
            train_copy=train_copy,
            split="test",
            seed=seed,
            title=f"medclf baseline: {Path(str(data)).name} / test ({best.method}, one vs rest)",
            sections=sections,
            extra={"model": f"baseline {best.method} one-vs-rest ({_params_text(best.params)})"},
        )
    else:
        metrics = write_evaluation(
            out,
            samples=samples,
            labels=labels,
            probs=probs,
            ok=prepared.ok,
            train_copy=train_copy,
            errors=[str(m or "unreadable") for m in prepared.scan.messages],
            split="test",
            classes=list(samples.classes),
            seed=seed,
            title=f"medclf baseline: {Path(str(data)).name} / test ({best.method})",
            sections=sections,
            extra={"model": f"baseline {best.method} ({_params_text(best.params)})"},
        )
    return metrics


def _test_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """``baseline.json``'s test figures."""
    return {
        "n": metrics["n"],
        "auc": metrics["auc"],
        "accuracy": metrics.get("accuracy"),  # multi-label: per finding, in metrics.json
        "n_removed_duplicates": metrics["n_removed_duplicates"],
        "all_samples": {
            "n": metrics["all_samples"]["n"],
            "auc": metrics["all_samples"]["auc"],
            "accuracy": metrics["all_samples"].get("accuracy"),
        },
    }


def _load_with_validation(
    data: str | Path, val_fraction: float, seed: int, manifest: dict[str, str] | None
) -> tuple[SampleSet, np.ndarray]:
    """The dataset with a validation split (carved from training when it has none), and which samples the
    dataset itself put in its training split."""
    from medclf.data.sources import load_source
    from medclf.data.splits import ensure_validation
    from medclf.errors import DataError

    samples = load_source(data, default_split="train", manifest=manifest)
    if not samples.has_split("train"):
        raise DataError(f"{data}: no training split found")
    if not samples.has_split("test"):
        raise DataError(
            f"{data}: no test split; the baseline reports on a held-out test split (a 'test' split folder, "
            "a split column in the CSV, or test_* arrays in the .npz)"
        )
    given_train = np.array(samples.splits) == "train"
    return ensure_validation(samples, fraction=val_fraction, seed=seed), given_train


@dataclass
class _Rows:
    """The samples each stage uses, after unreadable files and copies of training images are left out."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    n_val_copies: int
    test_copy: np.ndarray  # per sample: a copy of the dataset's whole training split (carved validation too)


def _baseline_rows(samples: SampleSet, prepared: PreparedData, given_train: np.ndarray) -> _Rows:
    from medclf.data.scan import train_copy_flags
    from medclf.errors import DataError

    split = np.array(samples.splits)
    labels = samples.labels
    usable = prepared.ok & samples.known
    train_idx = np.flatnonzero(usable & (split == "train"))
    val_all = usable & (split == "val")
    n_val_copies = int((val_all & prepared.train_copy).sum())
    val_idx = np.flatnonzero(val_all & ~prepared.train_copy)
    test_idx = np.flatnonzero(prepared.ok & (split == "test"))
    # Test samples are scored minus copies of the dataset's whole training split, as `evaluate` does: the
    # validation part carved out of it here counts as training data too (selection saw it).
    carved = given_train & (split == "val") & prepared.ok
    test_copy = train_copy_flags(
        samples,
        prepared.scan,
        extra_train_hashes={h for h, c in zip(prepared.scan.hashes, carved, strict=True) if c and h},
        extra_train_signatures=prepared.scan.signatures[carved],
    )
    if len(train_idx) == 0 or len(val_idx) == 0 or len(test_idx) == 0:
        raise DataError(
            "after removing unreadable files and validation copies of training samples, the train, "
            f"validation or test split is empty ({len(train_idx)} / {len(val_idx)} / {len(test_idx)})"
        )
    if samples.task == "multilabel":
        positives = labels[train_idx].sum(axis=0)
        if not ((positives > 0) & (positives < len(train_idx))).any():
            raise DataError("no finding has both positive and negative training images: nothing to learn")
    elif len(np.unique(labels[train_idx])) < 2:
        raise DataError("the training split holds a single class: nothing to learn")
    if n_val_copies:
        reporting.current().print(
            f"{n_val_copies} validation sample(s) copy a training sample: left out of model selection"
        )
    return _Rows(train_idx, val_idx, test_idx, n_val_copies, test_copy)


def _summary(
    data: str | Path,
    samples: SampleSet,
    names: Sequence[str],
    seed: int,
    model: Any,
    best: _Candidate,
    table: list[_Candidate],
    rows: _Rows,
    prepared: PreparedData,
    spec: PreprocessSpec,
    n_images: int,
    rate: float,
    workers: int,
    times: dict[str, float],
) -> dict[str, Any]:
    """``baseline.json`` (its test figures are added once the evaluation is written)."""
    from medclf._version import __version__

    return {
        "data": str(data),
        "classes": list(samples.classes),
        "seed": seed,
        "methods": list(names),
        "grids": {m: GRIDS[m] for m in names},
        "selection_rule": SELECTION_RULE,
        "selected": {
            "method": best.method,
            "params": dict(best.params),
            "val_auc": best.val_auc,
            "val_accuracy": best.val_accuracy,
            "estimator": repr(model),
        },
        "candidates": [c.row() for c in table],
        "n": {
            "train": len(rows.train),
            "val": len(rows.val),
            "val_train_copies_left_out": rows.n_val_copies,
            "test": len(rows.test),
            "unreadable": int((~prepared.ok).sum()),
        },
        "preprocessing": spec.to_dict(),
        "features": {
            "n_features": N_FEATURES,
            "layout": feature_layout(),
            "images": n_images,
            "seconds": round(times["features_seconds"], 3),
            "images_per_second": round(rate, 1),
            "workers": workers,
        },
        "times": {name: round(v, 3) for name, v in times.items()},
        "versions": _versions(__version__),
    }


def _report_sections(
    data: str | Path,
    best: _Candidate,
    table: list[_Candidate],
    model: Any,
    summary: dict[str, Any],
    spec: PreprocessSpec,
    rate: float,
    workers: int,
    times: dict[str, float],
) -> dict[str, Any]:
    """The baseline's own sections of the evaluation report."""
    from medclf.evaluation.runner import PROTOCOL

    return {
        "Baseline model selection (validation split)": [
            {
                "method": c.method,
                "hyper-parameters": _params_text(c.params),
                "val AUC": c.val_auc,
                "val accuracy": c.val_accuracy,
                "fit (s)": round(c.fit_seconds, 2),
                "selected": "yes" if c is best else "",
                "note": c.note,
            }
            for c in table
        ],
        "Selected model": {
            "method": best.method,
            "hyper-parameters": _params_text(best.params),
            "validation AUC": best.val_auc,
            "validation accuracy": best.val_accuracy,
            "estimator": repr(model),
            "rule": SELECTION_RULE,
        },
        "Features": [
            {"block": b["name"], "columns": f"{b['start']}-{b['stop'] - 1}", "description": b["description"]}
            for b in feature_layout()
        ],
        "Samples": summary["n"],
        "Preprocessing": spec.to_dict(),
        "Times (s)": {
            "decoding + preprocessing (cached)": round(times["decode_seconds"], 2),
            f"feature extraction ({rate:.0f} images/s, {workers} workers)": round(
                times["features_seconds"], 2
            ),
            "fitting every candidate": round(times["fit_seconds"], 2),
            "predicting the test split": round(times["predict_seconds"], 3),
        },
        "Evaluation protocol": PROTOCOL + f" Data: {data}, split: test.",
    }


def _versions(medclf_version: str) -> dict[str, str]:
    import skimage
    import sklearn

    return {
        "medclf": medclf_version,
        "scikit-learn": sklearn.__version__,
        "scikit-image": skimage.__version__,  # type: ignore[attr-defined]  # set by its lazy loader, not in its stub
    }
