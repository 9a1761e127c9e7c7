"""Out-of-distribution guard: is this input like the images the model was trained on?

A classifier answers for every input, also for a chest X-ray given to a brain MRI model. The guard
combines two scores, each fitted on the training split:

- **features**: the Mahalanobis distance of the network's penultimate features to the nearest class mean,
  with a covariance shared by the classes (Lee et al. 2018, "A simple unified framework for detecting
  out-of-distribution samples and adversarial attacks"), fitted with Ledoit-Wolf shrinkage
  (scikit-learn) so that it stays well-conditioned for small datasets;
- **input**: the Mahalanobis distance of a vector of statistics of the preprocessed input itself
  (:func:`input_statistics`: intensity quantiles and histogram, gradient and Laplacian energy, radial power
  spectrum, a coarse layout of mean intensities, left-right symmetry, colour spread) to their training
  mean. A small network sees an ultrasound and a brain MRI resized to 28 px as nearly the same features;
  their intensity histograms, textures and layouts still differ plainly.

Each score is put on a common scale on the validation split (``z = (s - median) / (q95 - median)``), and
the guard's score is the larger of the two: an input is unusual if either its features or its pixels are.
The threshold is a high quantile (default 99 %) of the validation scores, so about 1 % of
in-distribution inputs are flagged. Predictions above it carry ``ood: true`` and a warning.

Multi-label bundles (a 0/1 row of findings per image) take their class means per set of findings
(:func:`finding_set_groups`, which says why).

The penultimate features are the input of the network's last ``nn.Linear`` layer, captured with a
forward hook (an exported ONNX graph outputs them as ``features``); the input statistics are computed
in NumPy from the preprocessed tensor, so every engine and ensembles get the same guard. The fitted
arrays are stored in the bundle as ``ood.safetensors`` (no pickle), the threshold, the per-score
scales and the format ``version`` in ``bundle.json``. Bundles written before version 2 carry only the
feature score, with its threshold in raw distance units; they load and score as they always did.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

OOD_FILE = "ood.safetensors"
#: Version of the detector format this code writes (1: feature Mahalanobis only).
DETECTOR_VERSION = 2
DEFAULT_QUANTILE = 0.99
MAX_FIT_SAMPLES = 8000
# Scores are scaled by the distance from the validation median to this quantile: high enough to describe
# the upper tail, low enough to be stable on a validation split of a few dozen images.
_SCALE_QUANTILE = 0.95

__all__ = [
    "DETECTOR_VERSION",
    "MIN_SET_SAMPLES",
    "OOD_FILE",
    "OODDetector",
    "finding_set_groups",
    "fit_detector",
    "input_statistics",
    "penultimate_features",
]

# Multi-label training rows have no one class. Their class means are taken per distinct *set* of findings
# ("no finding", "effusion", "effusion + atelectasis", ...) seen at least this many times, the rarer sets
# pooled into one more group. Why sets rather than one mean per finding's positives: the sets partition the
# rows, so each row is centred on exactly one mean and the shared covariance is the within-group scatter of
# Lee et al.'s model; per-finding positives overlap (an image with two findings would sit in two groups) and
# leave the images without findings, often the largest group, with no mean. One mean over every row (what the
# guard did before) moves the differences between findings into the covariance, which then barely sees those
# directions: an input unlike every set of findings but near their average passes. Rarer sets are pooled, not
# dropped, so that a combination seen in training is not unusual in itself and every row still enters the
# covariance; a mean of fewer rows than this would be mostly noise.
MIN_SET_SAMPLES = 10


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take features from")
    return linears[-1]


@torch.no_grad()
def penultimate_features(
    model: nn.Module, x: torch.Tensor | np.ndarray, *, batch_size: int = 128
) -> np.ndarray:
    """The input of the model's last linear layer for each row of ``x`` (N, C, *spatial), as float64."""
    layer = _last_linear(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    try:
        t = torch.as_tensor(x)
        device = next(model.parameters()).device
        for start in range(0, len(t), batch_size):
            model(t[start : start + batch_size].float().to(device))
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        return np.zeros((0, layer.in_features))
    return torch.cat([c.float().flatten(1) for c in captured]).cpu().numpy().astype(np.float64)


# Radial frequency bands (cycles per pixel) of the power spectrum: the share of energy in each separates
# sharp from blurred (upsampled) images and speckle from smooth anatomy.
_BANDS = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
_HIST_BINS = 10


def input_statistics(x: np.ndarray | torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
    """A fixed-length vector of statistics for each preprocessed input ``(N, C, *spatial)``, float64.

    On the mean over channels: 9 intensity quantiles, a 10-bin histogram on [0, 1], mean and standard
    deviation, the fractions of near-black and near-white values, mean / spread / 90th percentile of the
    absolute finite differences, the mean absolute Laplacian, the share of spectral energy in 5 radial
    frequency bands, the mean of each cell of a coarse grid (4 x 4 in 2D, 3 x 3 x 3 in 3D) and the
    correlation with the left-right mirror image. With several channels also the spread across channels
    (mean and 90th percentile) and each channel's mean. Inputs larger than 64 px per axis (3D: 32) are
    first reduced by block means. Deterministic and cheap next to the network.
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim < 4:
        raise ValueError(f"inputs must be (N, C, *spatial) with 2 or 3 spatial axes, got shape {arr.shape}")
    parts = [_statistics(arr[i : i + batch_size]) for i in range(0, len(arr), batch_size)]
    if not parts:
        return np.zeros((0, _n_statistics(arr.shape[1:])))
    return np.concatenate(parts)


def _n_statistics(shape: tuple[int, ...]) -> int:
    return len(_statistics(np.zeros((1, *shape), np.float32))[0])


# Statistics are computed at most at this many pixels per axis (block means of larger inputs): they describe
# the image rather than its resolution, and their cost stays small next to the network's.
_WORKING_SIDE = {2: 64, 3: 32}


def _shrink(x: np.ndarray) -> np.ndarray:
    """Block means over ``ceil(side / working side)`` pixels along each spatial axis that exceeds it."""
    for axis in range(2, x.ndim):
        factor = -(-x.shape[axis] // _WORKING_SIDE.get(x.ndim - 2, 32))
        if factor > 1:
            keep = x.shape[axis] // factor * factor
            x = x[(slice(None),) * axis + (slice(0, keep),)]
            shape = (*x.shape[:axis], keep // factor, factor, *x.shape[axis + 1 :])
            x = x.reshape(shape).mean(axis=axis + 1)
    return x


def _statistics(x: np.ndarray) -> np.ndarray:
    x = np.nan_to_num(_shrink(np.asarray(x, dtype=np.float32)))
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    nd = len(spatial)
    grey = x.mean(axis=1)
    flat = grey.reshape(n, -1)
    quantiles = _row_quantiles(np.sort(flat, axis=1), _QUANTILES)
    # Histogram on [0, 1) in bins of 1/_HIST_BINS; values outside fall in none (bins -1 and _HIST_BINS).
    bins = np.clip(np.floor(flat * _HIST_BINS), -1, _HIST_BINS).astype(np.int64) + 1
    counts = np.bincount(
        (bins + np.arange(n)[:, None] * (_HIST_BINS + 2)).ravel(), minlength=n * (_HIST_BINS + 2)
    )
    hist = counts.reshape(n, _HIST_BINS + 2)[:, 1:-1] / flat.shape[1]
    moments = np.stack([flat.mean(1), flat.std(1), (flat < 0.02).mean(1), (flat > 0.98).mean(1)], 1)
    diffs = np.concatenate([np.abs(np.diff(grey, axis=1 + a)).reshape(n, -1) for a in range(nd)], 1)
    gradient = np.concatenate(
        [
            diffs.mean(1, keepdims=True),
            diffs.std(1, keepdims=True),
            _row_quantiles(np.sort(diffs, axis=1), (0.9,)),
        ],
        1,
    )
    # Mean absolute second difference, summed over the axes: a Laplacian's energy without aligning shapes.
    laplacian = np.zeros((n, 1))
    for a in range(nd):
        if spatial[a] > 2:
            laplacian[:, 0] += np.abs(np.diff(grey, n=2, axis=1 + a)).reshape(n, -1).mean(1)

    centred = grey - flat.mean(1).reshape(n, *([1] * nd))
    power = (np.abs(scipy.fft.rfftn(centred, axes=tuple(range(1, nd + 1)))) ** 2).reshape(n, -1)
    bands = (power @ _band_matrix(spatial)) / (power.sum(1, keepdims=True) + 1e-12)

    layout = _grid_means(grey, 4 if nd == 2 else 3)
    # Correlation with the left-right mirror image.
    centred_flat = flat - flat.mean(1, keepdims=True)
    mirrored = np.flip(grey, axis=-1).reshape(n, -1)
    mirrored = mirrored - mirrored.mean(1, keepdims=True)
    norm = np.sqrt((centred_flat**2).sum(1) * (mirrored**2).sum(1))
    symmetry = np.where(norm > 0, (centred_flat * mirrored).sum(1) / np.maximum(norm, 1e-12), 1.0)[:, None]

    parts = [quantiles, hist, moments, gradient, laplacian, bands, layout, symmetry]
    if c > 1:
        spread = x.std(axis=1).reshape(n, -1)
        parts.append(np.stack([spread.mean(1), np.quantile(spread, 0.9, axis=1)], 1))
        parts.append(x.reshape(n, c, -1).mean(2))
    return np.nan_to_num(np.concatenate(parts, 1).astype(np.float64))


def _row_quantiles(rows_sorted: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """Quantiles of each row of an already sorted (N, M) array, interpolated as ``np.quantile`` does."""
    m = rows_sorted.shape[1]
    pos = np.asarray(qs) * (m - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, m - 1)
    frac = pos - lo
    return rows_sorted[:, lo] * (1 - frac) + rows_sorted[:, hi] * frac


def _grid_means(grey: np.ndarray, cells: int) -> np.ndarray:
    """Mean of each cell of a ``cells`` per axis grid over the spatial axes of ``grey`` (N, *spatial); the
    last ``side % cells`` pixels of an axis are left out."""
    n, spatial = len(grey), grey.shape[1:]
    if min(spatial) < cells:
        cells = 1
    crop = grey[(slice(None), *(slice(0, s // cells * cells) for s in spatial))]
    shape = [n]
    for side in spatial:
        shape += [cells, side // cells]
    return crop.reshape(shape).mean(axis=tuple(range(2, 2 + 2 * len(spatial), 2))).reshape(n, -1)


@functools.lru_cache(maxsize=16)
def _band_matrix(spatial: tuple[int, ...]) -> np.ndarray:
    """(frequencies of rfftn over ``spatial``, bands): 1 where a frequency lies in a radial band."""
    freqs = [np.fft.fftfreq(s) for s in spatial[:-1]] + [np.fft.rfftfreq(spatial[-1])]
    radius = np.sqrt(sum(f**2 for f in np.meshgrid(*freqs, indexing="ij"))).ravel()
    return np.stack([(radius > lo) & (radius <= hi) for lo, hi in itertools.pairwise(_BANDS)], 1).astype(
        np.float64
    )


def _mahalanobis(f: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distance of each row of ``f`` to the nearest of ``means`` under ``precision``."""
    f = np.asarray(f, dtype=np.float64)
    # (x - mu)^T P (x - mu) per row, as a matrix product (BLAS): einsum's loop took 5x longer per image.
    d2 = np.stack([((f - mu) @ precision * (f - mu)).sum(axis=1) for mu in means], axis=1)
    return np.sqrt(np.clip(d2.min(axis=1), 0.0, None))


@dataclass
class OODDetector:
    """The fitted guard: class means (K, D) and the shared precision matrix (D, D) of the features, the
    input-statistics model (version 2), the per-score scales and the flagging threshold."""

    means: np.ndarray
    precision: np.ndarray
    threshold: float
    quantile: float = DEFAULT_QUANTILE
    version: int = 1
    stats_shift: np.ndarray | None = None  # input statistics are standardised: (s - shift) / scale
    stats_scale: np.ndarray | None = None
    stats_mean: np.ndarray | None = None  # then Mahalanobis to this mean with this precision
    stats_precision: np.ndarray | None = None
    # score name -> (median, scale) on the validation split
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Multi-label: what each of ``means`` is the mean of (:func:`finding_set_groups`); None: the classes.
    groups: list[dict[str, Any]] | None = None

    def component_scores(
        self,
        features: np.ndarray,
        inputs: np.ndarray | torch.Tensor | None = None,
        *,
        statistics: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Each score before scaling: ``features`` and (version 2) ``input``, from the preprocessed
        ``inputs`` or their precomputed :func:`input_statistics`."""
        scores = {"features": _mahalanobis(features, self.means, self.precision)}
        if self.version >= 2:
            if statistics is None:
                if inputs is None:
                    raise ValueError("this OOD detector scores the preprocessed inputs too: pass them")
                statistics = input_statistics(inputs)
            assert self.stats_shift is not None and self.stats_scale is not None
            assert self.stats_mean is not None and self.stats_precision is not None
            s = (statistics - self.stats_shift) / self.stats_scale
            scores["input"] = _mahalanobis(s, self.stats_mean[None], self.stats_precision)
        return scores

    def score(
        self,
        features: np.ndarray,
        inputs: np.ndarray | torch.Tensor | None = None,
        *,
        statistics: np.ndarray | None = None,
    ) -> np.ndarray:
        """One score per row (higher = more unusual). Version 1: the feature distance; version 2: the larger
        of the scaled feature and input-statistics distances (``inputs``: the preprocessed batch, or
        ``statistics``: its :func:`input_statistics`)."""
        scores = self.component_scores(features, inputs, statistics=statistics)
        if self.version < 2:
            return scores["features"]
        scaled = [(scores[name] - centre) / scale for name, (centre, scale) in self.calibration.items()]
        return np.max(np.stack(scaled), axis=0)

    def flags(
        self,
        features: np.ndarray,
        inputs: np.ndarray | torch.Tensor | None = None,
        *,
        statistics: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(score above the threshold, score) per row; arguments as for :meth:`score`."""
        s = self.score(features, inputs, statistics=statistics)
        return s > self.threshold, s

    def save(self, path: str | Path) -> None:
        tensors = {"means": self.means, "precision": self.precision}
        if self.version >= 2:
            assert self.stats_shift is not None and self.stats_scale is not None
            assert self.stats_mean is not None and self.stats_precision is not None
            tensors.update(
                stats_shift=self.stats_shift,
                stats_scale=self.stats_scale,
                stats_mean=self.stats_mean,
                stats_precision=self.stats_precision,
            )
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(path))

    def manifest(self) -> dict[str, Any]:
        info = self._manifest()
        if self.groups is not None:
            info["class_means"] = {
                "over": f"sets of findings seen at least {MIN_SET_SAMPLES} times in the fitting rows, and "
                "the rarer sets pooled",
                "groups": self.groups,
            }
        return info

    def _manifest(self) -> dict[str, Any]:
        if self.version < 2:
            return {
                "method": "mahalanobis-penultimate (Lee et al. 2018), Ledoit-Wolf shared covariance",
                "file": OOD_FILE,
                "threshold": self.threshold,
                "quantile": self.quantile,
                "threshold_from": "validation split",
            }
        return {
            "version": self.version,
            "method": "max of scaled Mahalanobis distances: penultimate features (Lee et al. 2018) and input "
            "statistics, Ledoit-Wolf covariances",
            "file": OOD_FILE,
            "scores": {
                name: {
                    "median": centre,
                    "scale": scale,
                    "scale_from": f"q{round(_SCALE_QUANTILE * 100)} - median",
                }
                for name, (centre, scale) in self.calibration.items()
            },
            "threshold": self.threshold,
            "quantile": self.quantile,
            "threshold_from": "validation split",
        }

    @classmethod
    def load(cls, path: str | Path, info: dict[str, Any]) -> OODDetector:
        t = load_file(str(path))
        version = int(info.get("version", 1))
        if version > DETECTOR_VERSION:
            from medclf.errors import BundleError

            raise BundleError(
                f"the bundle's OOD detector has format version {version}; this medclf reads up to "
                f"{DETECTOR_VERSION}: upgrade medclf"
            )
        detector = cls(
            means=t["means"],
            precision=t["precision"],
            threshold=float(info["threshold"]),
            quantile=float(info.get("quantile", DEFAULT_QUANTILE)),
            version=version,
        )
        if version >= 2:
            detector.stats_shift = t["stats_shift"]
            detector.stats_scale = t["stats_scale"]
            detector.stats_mean = t["stats_mean"]
            detector.stats_precision = t["stats_precision"]
            detector.calibration = {
                name: (float(v["median"]), float(v["scale"])) for name, v in info["scores"].items()
            }
        return detector


def _scale(scores: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(scores))
    spread = float(np.quantile(scores, _SCALE_QUANTILE)) - centre
    if not np.isfinite(spread) or spread <= 1e-9:
        spread = float(np.std(scores)) or 1.0
    return centre, spread


def finding_set_groups(
    labels: np.ndarray, names: Sequence[str] | None = None, *, min_samples: int = MIN_SET_SAMPLES
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The class-mean group of each multi-label row of ``labels`` (N, L) (:data:`MIN_SET_SAMPLES` says
    why): one group per set of findings with at least ``min_samples`` rows, the most frequent first, then one
    group for all rarer sets; and what each group holds (its findings by ``names``, or how many sets were
    pooled, and its rows)."""
    y = np.asarray(labels) > 0
    if y.ndim != 2:
        raise ValueError(f"multi-label rows must be (N, L), got shape {y.shape}")
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64), []
    sets, inverse, counts = np.unique(y, axis=0, return_inverse=True, return_counts=True)
    frequent = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] >= min_samples]
    group_of = np.full(len(sets), len(frequent), dtype=np.int64)  # rarer sets: the last group
    group_of[frequent] = np.arange(len(frequent))
    label = list(names) if names is not None else [str(j) for j in range(y.shape[1])]
    groups: list[dict[str, Any]] = [
        {"findings": [label[j] for j in np.flatnonzero(sets[k])], "n": int(counts[k])} for k in frequent
    ]
    rare = counts < min_samples
    if rare.any():
        groups.append({"pooled_sets": int(rare.sum()), "n": int(counts[rare].sum())})
    return group_of[np.asarray(inverse).reshape(-1)], groups


def fit_detector(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    *,
    train_inputs: np.ndarray | None = None,
    val_inputs: np.ndarray | None = None,
    quantile: float = DEFAULT_QUANTILE,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
) -> OODDetector:
    """Fit the guard on training rows; scale the scores and set the threshold on validation rows.

    ``train_labels``: a class per row, or (multi-label) a 0/1 row of findings (N, L), named by
    ``label_names``, whose class means are per set of findings (:func:`finding_set_groups`).
    With ``train_inputs`` / ``val_inputs`` (the preprocessed tensors of the same rows, or their
    :func:`input_statistics`), the detector also scores the inputs themselves (version 2); without, it is
    the feature score alone (version 1). Without validation rows the training rows stand in."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels)
    rng = np.random.default_rng(seed)
    keep = (
        np.sort(rng.choice(len(f), MAX_FIT_SAMPLES, replace=False))
        if len(f) > MAX_FIT_SAMPLES
        else slice(None)
    )
    f, y = f[keep], y[keep]
    groups = None
    if y.ndim == 2:
        y, groups = finding_set_groups(y, label_names)
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    has_val = len(val_features) > 0
    detector = OODDetector(
        means=means, precision=precision, threshold=np.inf, quantile=quantile, groups=groups
    )
    if train_inputs is None:
        ref = val_features if has_val else f
        detector.threshold = float(np.quantile(detector.score(ref), quantile))
        return detector

    s = _as_statistics(train_inputs)[keep]
    shift, scale = s.mean(axis=0), s.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    lw = LedoitWolf().fit((s - shift) / scale)
    detector.version = DETECTOR_VERSION
    detector.stats_shift, detector.stats_scale = shift, scale
    detector.stats_mean, detector.stats_precision = lw.location_, lw.precision_
    ref_features = val_features if has_val else f
    ref_stats = _as_statistics(val_inputs) if has_val and val_inputs is not None else s
    raw = detector.component_scores(ref_features, statistics=ref_stats)
    detector.calibration = {name: _scale(values) for name, values in raw.items()}
    detector.threshold = float(np.quantile(detector.score(ref_features, statistics=ref_stats), quantile))
    return detector


def _as_statistics(inputs: np.ndarray) -> np.ndarray:
    """Statistics of preprocessed inputs (N, C, *spatial), or already computed statistics (N, D)."""
    arr = np.asarray(inputs)
    return arr.astype(np.float64) if arr.ndim == 2 else input_statistics(arr)
