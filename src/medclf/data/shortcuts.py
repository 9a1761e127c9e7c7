"""Shortcut check: can acquisition cues alone predict the label?

A network learns whatever separates the classes most easily. When one source supplied most images of one
class (a different scanner, file format, image size, JPEG quality, padding or contrast style), those cues
separate the classes without looking at any anatomy, and the network learns the source instead of the
disease. Test splits drawn from the same collection share the confound, so their scores cannot reveal it:
the model fails on the first hospital whose images look different.

:func:`check_shortcuts` measures it. Per class against the rest, a gradient-boosted classifier
(scikit-learn's ``HistGradientBoostingClassifier``) sees only the cues of each image (:func:`cue_table`:
header cues from :mod:`medclf.data.acquisition`, the border/padding pattern and a coarse intensity
histogram from :func:`pixel_cues`, a CSV manifest's extra columns), never its pixels. Its cross-validated
(stratified, grouped by patient when ids exist) out-of-fold AUC, with a bootstrap interval, says how much
of the label the acquisition alone gives away. Each cue's own out-of-fold AUC (a per-value class rate)
names the cues responsible.

Two cue sets are scored: *acquisition* cues (size, aspect ratio, file format, colour mode, bit depth, JPEG
quality, bytes per pixel, DICOM scanner tags, manifest columns, border and padding pattern), which say
nothing about anatomy and decide the flag, and *intensity style* (coarse histogram, value range), reported
too but not flagged on its own: a disease can legitimately change how bright an image is (pneumonia makes
lungs whiter), so its AUC alone cannot tell a shortcut from a finding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medclf.data.acquisition import GROUP_KEYS, UNKNOWN
from medclf.data.samples import SampleSet

# A class is flagged when acquisition cues alone reach this cross-validated AUC and the lower end of its
# 95 % interval clears FLAG_LOWER: a confound this strong is visible to a small gradient-boosted model on a
# handful of header numbers, so a deep network that sees the pixels will find it too. On data without a
# confound (generated data, MedMNIST, whose cues are constant) the cue-only AUC stays near 0.5.
FLAG_AUC = 0.75
FLAG_LOWER = 0.65
# A cue is named when its own out-of-fold AUC for the class reaches this.
CUE_AUC = 0.6
# Too few samples of a class (or of the rest) for a cross-validated AUC worth reporting.
MIN_PER_SIDE = 10
N_FOLDS = 5
N_BOOTSTRAP = 200
# Pixel cues are computed on a strided view at most this many pixels per side: enough for borders and a
# coarse histogram, cheap for 2000-px images.
_PIXEL_CUE_SIDE = 160
_HIST_BINS = 8

# Cue families: which columns of the cue table belong where, and what a reader calls them.
ACQUISITION_FAMILIES = ("geometry", "file", "dicom", "metadata", "border")
STYLE_FAMILIES = ("intensity",)
_NUMERIC_CUES = {
    "width": "geometry",
    "height": "geometry",
    "depth": "geometry",
    "aspect": "geometry",
    "bit_depth": "file",
    "jpeg_quality": "file",
    "bytes_per_pixel": "file",
    "field_strength": "dicom",
    "slice_thickness": "dicom",
    "kvp": "dicom",
    "pixel_spacing": "dicom",
    "pad_top": "border",
    "pad_bottom": "border",
    "pad_left": "border",
    "pad_right": "border",
    "border_mean": "intensity",
    "border_std": "intensity",
    "dark_fraction": "intensity",
    "value_min": "intensity",
    "value_max": "intensity",
    **{f"hist_{k}": "intensity" for k in range(_HIST_BINS)},
}
_CATEGORICAL_CUES = {
    "format": "file",
    "mode": "file",
    "progressive": "file",
    "chroma_subsampling": "file",
    "modality": "dicom",
    "manufacturer": "dicom",
    "model": "dicom",
    "station": "dicom",
    "institution": "dicom",
    "view_position": "dicom",
    "body_part": "dicom",
}
# Cue -> the acquisition group key (medclf.data.acquisition.GROUP_KEYS) to evaluate and balance by.
CUE_GROUP_KEY = {
    "size": "size",
    "width": "size",
    "height": "size",
    "depth": "size",
    "aspect": "aspect",
    "bit_depth": "bit_depth",
    "jpeg_quality": "jpeg_quality",
    "bytes_per_pixel": "bytes_per_pixel",
    **{c: c for c in _CATEGORICAL_CUES if c in GROUP_KEYS},
    **{c: c for c in ("field_strength", "slice_thickness", "kvp", "pixel_spacing")},
}
_CUE_WORDS = {
    "size": "image size",
    "width": "image width",
    "height": "image height",
    "depth": "number of slices",
    "aspect": "aspect ratio",
    "bit_depth": "bit depth",
    "jpeg_quality": "JPEG quality",
    "bytes_per_pixel": "bytes per pixel (compression)",
    "format": "file format",
    "mode": "colour mode",
    "progressive": "progressive JPEG",
    "chroma_subsampling": "chroma subsampling",
    "dark_fraction": "share of black background",
    "border_mean": "border brightness",
    "border_std": "border texture",
    "value_min": "darkest value",
    "value_max": "brightest value",
}


# Among cues that predict equally well, the plainer one is named first.
_PLAIN_ORDER = ("size", "format", "mode", "bit_depth", "jpeg_quality", "aspect", "width", "height")


def _cue_rank(name: str) -> int:
    return _PLAIN_ORDER.index(name) if name in _PLAIN_ORDER else len(_PLAIN_ORDER)


def cue_words(name: str) -> str:
    """What a cue name means, for warnings (``pad_top`` -> ``padding (top)``, ``hist_3`` -> ...)."""
    if name in _CUE_WORDS:
        return _CUE_WORDS[name]
    if name.startswith("pad_"):
        return f"padding ({name[4:]})"
    if name.startswith("hist_"):
        k = int(name[5:])
        return f"intensity histogram ({k}/{_HIST_BINS}-{k + 1}/{_HIST_BINS} of range)"
    if name.startswith("column:"):
        return f"manifest column '{name[7:]}'"
    return name.replace("_", " ")


# --------------------------------------------------------------------------------------------------
# Pixel cues (computed in the audit's decoding pass)
# --------------------------------------------------------------------------------------------------


def pixel_cues(pixels: np.ndarray) -> dict[str, float]:
    """Border/padding pattern and a coarse intensity histogram of a decoded image ``(C, *spatial)``.

    On the grey image (channel mean; the middle slice of a volume) scaled to [0, 1] by its own range:
    ``pad_<edge>``, the share of rows/columns at each edge that are near-constant (padding, letterboxing);
    ``border_mean``/``border_std`` of the outer ring; ``dark_fraction``, the share of near-black pixels;
    ``hist_0..7``, the share of pixels in each eighth of the range; ``value_min``/``value_max``, the raw
    extremes (how the source scaled its values).
    """
    x = np.asarray(pixels)
    if x.ndim == 4:
        x = x[:, x.shape[1] // 2]
    # Strided first (a view), then the channel mean: the cues need coarse structure, not every pixel.
    step = max(1, math.ceil(max(x.shape[1:]) / _PIXEL_CUE_SIDE))
    small = x[:, ::step, ::step]
    g = (
        small.mean(axis=0, dtype=np.float32)
        if small.shape[0] > 1
        else small[0].astype(np.float32, copy=False)
    )
    lo, hi = float(g.min()), float(g.max())
    cues: dict[str, float] = {"value_min": lo, "value_max": hi}
    span = hi - lo
    if not (span > 0 and math.isfinite(span)):
        return cues
    g = (g - lo) / span
    flat = 0.02
    rows, cols = g.std(axis=1) < flat, g.std(axis=0) < flat
    for name, line in (("top", rows), ("bottom", rows[::-1]), ("left", cols), ("right", cols[::-1])):
        cues[f"pad_{name}"] = round(_leading_run(line) / len(line), 4)
    ring = max(1, round(0.03 * min(g.shape)))
    border = np.concatenate([g[:ring].ravel(), g[-ring:].ravel(), g[:, :ring].ravel(), g[:, -ring:].ravel()])
    cues["border_mean"] = round(float(border.mean()), 4)
    cues["border_std"] = round(float(border.std()), 4)
    cues["dark_fraction"] = round(float((g < 0.02).mean()), 4)
    bins = np.minimum((g * _HIST_BINS).astype(np.int64), _HIST_BINS - 1)
    hist = np.bincount(bins.ravel(), minlength=_HIST_BINS) / g.size
    cues.update({f"hist_{k}": round(float(v), 4) for k, v in enumerate(hist)})
    return cues


def _leading_run(flags: np.ndarray) -> int:
    """How many leading entries of ``flags`` are True."""
    return len(flags) if flags.all() else int(np.argmin(flags))


# --------------------------------------------------------------------------------------------------
# The cue table
# --------------------------------------------------------------------------------------------------


@dataclass
class CueTable:
    """Cues as a float matrix (NaN = missing; categorical columns hold category codes)."""

    x: np.ndarray
    names: list[str]
    categorical: np.ndarray
    families: list[str]

    def columns(self, families: Sequence[str]) -> np.ndarray:
        return np.array([f in families for f in self.families], dtype=bool)


def cue_table(cues: Sequence[dict[str, Any]], metadata: dict[str, list[str]] | None = None) -> CueTable:
    """Turn per-sample cue dicts (header + pixel cues) and manifest columns into a :class:`CueTable`.

    Columns that are constant (or missing) for every sample are dropped: they cannot predict anything.
    """
    n = len(cues)
    cols: list[np.ndarray] = []
    names: list[str] = []
    cat: list[bool] = []
    fams: list[str] = []

    def add(name: str, values: np.ndarray, categorical: bool, family: str) -> None:
        finite = values[np.isfinite(values)]
        if len(finite) == 0 or (len(np.unique(finite)) < 2 and len(finite) == n):
            return
        cols.append(values)
        names.append(name)
        cat.append(categorical)
        fams.append(family)

    for name, family in _NUMERIC_CUES.items():
        values = np.full(n, np.nan)
        for i, c in enumerate(cues):
            v = c.get(name)
            if isinstance(v, list):  # pixel spacing: the in-plane mean
                v = float(np.mean(v)) if v else None
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, int | float) and math.isfinite(v):
                values[i] = float(v)
        add(name, values, False, family)
    # The exact size as a category: one source's 512x512 is invisible to bins of width and height.
    add("size", _codes([_size_text(c) for c in cues]), True, "geometry")
    for name, family in _CATEGORICAL_CUES.items():
        add(name, _codes([_as_text(c.get(name)) for c in cues]), True, family)
    for column, values_text in (metadata or {}).items():
        add(f"column:{column}", _codes([v.strip() or None for v in values_text]), True, "metadata")
    x = np.stack(cols, axis=1) if cols else np.zeros((n, 0))
    return CueTable(x=x, names=names, categorical=np.array(cat, dtype=bool), families=fams)


def _size_text(cues: dict[str, Any]) -> str | None:
    w, h, d = cues.get("width"), cues.get("height"), cues.get("depth")
    if not w or not h:
        return None
    return f"{w}x{h}x{d}" if d else f"{w}x{h}"


def _as_text(v: Any) -> str | None:
    if v is None or v == "":
        return None
    return str(v)


def _codes(values: Sequence[str | None]) -> np.ndarray:
    """Category codes by frequency (0 = most common); NaN for missing. Rare categories beyond the 250 most
    common share one code (the gradient-boosting model allows at most 255 categories)."""
    counts: dict[str, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    order = {v: min(k, 250) for k, (v, _) in enumerate(sorted(counts.items(), key=lambda kv: -kv[1]))}
    return np.array([order[v] if v is not None else np.nan for v in values], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------


@dataclass
class ClassShortcut:
    """The cue-only AUC of one class against the rest, and the cues that carry it."""

    cls: str
    n: int
    n_rest: int
    auc: float | None
    ci: tuple[float, float] | None
    style_auc: float | None
    cue_aucs: dict[str, float]
    flagged: bool

    @property
    def top_cues(self) -> list[str]:
        """The acquisition cues that predict this class best on their own (at most 5; one per group key,
        so width, height and size do not crowd out the format)."""
        ranked = sorted(self.cue_aucs.items(), key=lambda kv: (-round(kv[1], 3), _cue_rank(kv[0])))
        named: list[str] = []
        seen: set[str] = set()
        for k, v in ranked:
            if v < CUE_AUC or _NUMERIC_CUES.get(k, "") in STYLE_FAMILIES:
                continue
            key = CUE_GROUP_KEY.get(k, k)
            if key not in seen:
                seen.add(key)
                named.append(k)
        return named[:5]

    def to_dict(self) -> dict[str, Any]:
        cues = self.top_cues
        # The ten best cues, and every named cue even where ties or style cues pushed it past the tenth.
        shown = [k for k, _ in sorted(self.cue_aucs.items(), key=lambda kv: -kv[1])[:10]]
        shown += [k for k in cues if k not in shown]
        return {
            "auc": _r(self.auc),
            "ci": [_r(v) for v in self.ci] if self.ci else None,
            "style_auc": _r(self.style_auc),
            "n": self.n,
            "n_rest": self.n_rest,
            "flagged": self.flagged,
            "cues": cues,
            "cue_aucs": {k: _r(self.cue_aucs[k]) for k in shown},
        }


def _r(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 4)


@dataclass
class ShortcutReport:
    """What :func:`check_shortcuts` found; :meth:`to_manifest` is the bundle's ``shortcuts`` section."""

    per_class: list[ClassShortcut]
    cue_names: list[str]
    n_samples: int
    seconds: float
    threshold: float = FLAG_AUC
    lower: float = FLAG_LOWER
    mitigation: str = "off"
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return any(c.flagged for c in self.per_class)

    @property
    def flagged_classes(self) -> list[ClassShortcut]:
        return [c for c in self.per_class if c.flagged]

    @property
    def flagged_keys(self) -> list[str]:
        """Acquisition group keys behind the flagged classes (most telling first): evaluate and balance by
        these (``medclf evaluate --by``)."""
        scores: dict[str, float] = {}
        for c in self.flagged_classes:
            for cue in c.top_cues:
                key = CUE_GROUP_KEY.get(cue) or (cue[7:] if cue.startswith("column:") else None)
                if key:
                    scores[key] = max(scores.get(key, 0.0), c.cue_aucs[cue])
        return sorted(scores, key=lambda k: -scores[k])

    def warnings(self) -> list[str]:
        """One warning per flagged class, saying what it means."""
        out = []
        for c in self.flagged_classes:
            lo, hi = c.ci or (float("nan"), float("nan"))
            cues = ", ".join(cue_words(k) for k in c.top_cues) or "several weak cues together"
            out.append(
                f"possible shortcut: acquisition cues alone predict '{c.cls}' (AUC {c.auc:.2f}, 95% CI "
                f"{lo:.2f}-{hi:.2f}, from {cues}): a model can learn the source instead of the disease; "
                "test scores on splits that share the confound will not reveal it (evaluate by "
                f"{', '.join(self.flagged_keys) or 'acquisition group'}, validate externally, or train with "
                "--shortcut-mitigation on)"
            )
        return out

    def to_manifest(self) -> dict[str, Any]:
        return {
            "checked": True,
            "threshold": self.threshold,
            "lower_bound": self.lower,
            "flagged": self.flagged,
            "flagged_keys": self.flagged_keys,
            "per_class": {c.cls: c.to_dict() for c in self.per_class},
            "cues": self.cue_names,
            "n_samples": self.n_samples,
            "seconds": round(self.seconds, 2),
            "mitigation": self.mitigation,
            "notes": self.notes,
        }


def not_checked(reason: str, mitigation: str = "off") -> dict[str, Any]:
    """The manifest section when the check did not run (e.g. skipped for time)."""
    return {
        "checked": False,
        "threshold": FLAG_AUC,
        "flagged": False,
        "flagged_keys": [],
        "per_class": {},
        "mitigation": mitigation,
        "notes": [reason],
    }


def check_shortcuts(
    samples: SampleSet,
    cues: Sequence[dict[str, Any]],
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
    n_bootstrap: int = N_BOOTSTRAP,
) -> ShortcutReport:
    """How well acquisition cues alone predict each class (one against the rest), cross-validated.

    ``cues`` holds one dict per sample of ``samples`` (header cues merged with :func:`pixel_cues`; ``{}``
    for unreadable samples, which are left out). ``indices`` restricts the check (e.g. to the training
    split); labelled samples only.
    """
    t0 = time.perf_counter()
    idx = np.arange(len(samples)) if indices is None else np.asarray(indices, dtype=np.int64)
    idx = idx[(samples.labels[idx] >= 0) & np.array([bool(cues[i]) for i in idx], dtype=bool)]
    y = samples.labels[idx]
    meta = {k: [v[i] for i in idx] for k, v in samples.metadata.items()}
    table = cue_table([cues[i] for i in idx], meta)
    groups = _patient_groups(samples, idx)
    folds = _folds(y, groups, seed)
    acq = table.columns(ACQUISITION_FAMILIES)
    style = table.columns(STYLE_FAMILIES)
    n_classes = len(samples.classes)
    p_acq = _oof_probs(table, acq, y, n_classes, folds, seed)
    p_style = _oof_probs(table, style, y, n_classes, folds, seed, iterations=15)
    rng = np.random.default_rng(seed)
    boot = [rng.integers(0, len(y), len(y)) for _ in range(n_bootstrap)] if len(y) else []
    per_class = []
    for k, name in enumerate(samples.classes):
        pos = y == k
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if min(n_pos, n_neg) < MIN_PER_SIDE:
            per_class.append(ClassShortcut(name, n_pos, n_neg, None, None, None, {}, False))
            continue
        auc = _auc(pos, p_acq[:, k]) if p_acq is not None else 0.5
        ci = _bootstrap_ci(pos, p_acq[:, k], boot) if p_acq is not None else (0.5, 0.5)
        style_auc = _auc(pos, p_style[:, k]) if p_style is not None else None
        cue_aucs = {
            table.names[j]: _single_cue_auc(table.x[:, j], table.categorical[j], pos, folds)
            for j in range(len(table.names))
        }
        flagged = auc >= FLAG_AUC and ci[0] >= FLAG_LOWER
        per_class.append(ClassShortcut(name, n_pos, n_neg, auc, ci, style_auc, cue_aucs, flagged))
    return ShortcutReport(
        per_class=per_class,
        cue_names=table.names,
        n_samples=len(idx),
        seconds=time.perf_counter() - t0,
    )


def _patient_groups(samples: SampleSet, idx: np.ndarray) -> np.ndarray | None:
    ids = [samples.patient_ids[i] for i in idx]
    if not any(p is not None for p in ids):
        return None
    codes: dict[str, int] = {}
    # A sample without an id is its own group.
    return np.array(
        [codes.setdefault(p if p is not None else f"\0{i}", len(codes)) for i, p in enumerate(ids)]
    )


def _folds(y: np.ndarray, groups: np.ndarray | None, seed: int) -> np.ndarray:
    """Fold number per sample: stratified by class, grouped by patient when ids exist (all of a patient's
    samples in one fold). Groups are dealt round-robin within their majority class, in a seeded order."""
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    present = np.bincount(y)
    k = int(min(N_FOLDS, max(2, present[present > 0].min())))
    g = groups if groups is not None else np.arange(len(y))
    uniq, inverse = np.unique(g, return_inverse=True)
    counts = np.zeros((len(uniq), len(present)), dtype=np.int64)
    np.add.at(counts, (inverse, y), 1)
    majority = counts.argmax(axis=1)
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(majority[order], kind="stable")]
    group_fold = np.zeros(len(uniq), dtype=np.int64)
    group_fold[order] = np.arange(len(uniq)) % k
    return group_fold[inverse]


def _oof_probs(
    table: CueTable,
    columns: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    folds: np.ndarray,
    seed: int,
    iterations: int = 30,
) -> np.ndarray | None:
    """Out-of-fold class probabilities of a gradient-boosted model on the chosen cue columns (None when
    there are no usable columns: every prediction would be the prior, AUC 0.5)."""
    if not columns.any() or len(y) == 0:
        return None
    import warnings

    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    x = table.x[:, columns]
    categorical = table.categorical[columns]
    probs = np.full((len(y), n_classes), 1.0 / max(n_classes, 1))
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        classes = np.unique(y[train])
        # A column with no value in the training folds cannot be binned (and carries nothing there).
        keep = np.isfinite(x[train]).any(axis=0)
        if len(classes) < 2 or not keep.any():
            continue
        model = HistGradientBoostingClassifier(
            max_iter=iterations,
            learning_rate=0.2,
            max_leaf_nodes=15,
            min_samples_leaf=10,
            l2_regularization=1.0,
            categorical_features=categorical[keep] if categorical[keep].any() else None,
            early_stopping=False,
            random_state=seed,
        )
        # One OpenMP thread: on a busy machine sklearn's spinning threads run 10-20x slower, not faster.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")
            model.fit(x[train][:, keep], y[train])
            p = model.predict_proba(x[test][:, keep])
        probs[np.ix_(test, [int(c) for c in model.classes_])] = p
        missing = [c for c in range(n_classes) if c not in set(classes.tolist())]
        probs[np.ix_(test, missing)] = 0.0
    return probs


def _auc(pos: np.ndarray, score: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Mann-Whitney AUC (ties count half); ``weight`` counts each sample that many times (bootstrap)."""
    _, inverse = np.unique(score, return_inverse=True)
    return _auc_ranked(pos, inverse, weight)


def _auc_ranked(pos: np.ndarray, inverse: np.ndarray, weight: np.ndarray | None = None) -> float:
    w = np.ones(len(pos)) if weight is None else weight
    n_levels = int(inverse.max()) + 1 if len(inverse) else 0
    pos_w = np.bincount(inverse, weights=w * pos, minlength=n_levels)
    neg_w = np.bincount(inverse, weights=w * ~pos, minlength=n_levels)
    n_pos, n_neg = pos_w.sum(), neg_w.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(neg_w) - neg_w
    return float((pos_w * (below + 0.5 * neg_w)).sum() / (n_pos * n_neg))


def _bootstrap_ci(pos: np.ndarray, score: np.ndarray, boot: list[np.ndarray]) -> tuple[float, float]:
    _, inverse = np.unique(score, return_inverse=True)
    values = [_auc_ranked(pos, inverse, np.bincount(b, minlength=len(pos)).astype(float)) for b in boot]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _single_cue_auc(values: np.ndarray, categorical: bool, pos: np.ndarray, folds: np.ndarray) -> float:
    """Out-of-fold AUC of one cue: each value (or quantile bin) scored by the class rate the other folds
    show for it, smoothed towards the overall rate. Captures non-monotone cues (one exact size)."""
    bins = _bin_codes(values, categorical)
    n_bins = int(bins.max()) + 1
    score = np.zeros(len(pos))
    prior_weight = 5.0
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        prior = float(pos[train].mean()) if train.any() else 0.5
        count = np.bincount(bins[train], minlength=n_bins)
        hits = np.bincount(bins[train], weights=pos[train].astype(float), minlength=n_bins)
        rate = (hits + prior_weight * prior) / (count + prior_weight)
        score[test] = rate[bins[test]]
    auc = _auc(pos, score)
    return max(auc, 0.5) if math.isfinite(auc) else 0.5


def _bin_codes(values: np.ndarray, categorical: bool) -> np.ndarray:
    """Integer bins: categories as they are, numbers with few distinct values as they are, else 16
    quantile bins; missing values get a bin of their own."""
    missing = ~np.isfinite(values)
    v = np.where(missing, 0.0, values)
    if categorical or len(np.unique(v[~missing])) <= 32:
        _, codes = np.unique(v, return_inverse=True)
    else:
        edges = np.unique(np.quantile(v[~missing], np.linspace(0, 1, 17)[1:-1]))
        codes = np.searchsorted(edges, v, side="right")
    codes = codes.astype(np.int64) + 1
    codes[missing] = 0
    return codes


def group_labels_for_balance(
    samples: SampleSet, cues: Sequence[dict[str, Any]], keys: Sequence[str]
) -> list[str]:
    """One acquisition group per sample from ``keys`` (joined), for balancing training over class x group.

    Groups below 1 % of the samples are pooled into ``"other"`` so that a long tail of one-off sizes does not
    turn every image into its own group."""
    from medclf.data.acquisition import sample_groups

    if not keys:
        return [UNKNOWN] * len(samples)
    parts = [sample_groups(samples, k, cues=cues) for k in keys]
    joined = ["|".join(p) for p in zip(*parts, strict=True)]
    counts: dict[str, int] = {}
    for g in joined:
        counts[g] = counts.get(g, 0) + 1
    floor = max(5, int(0.01 * len(joined)))
    return [g if counts[g] >= floor else "other" for g in joined]
