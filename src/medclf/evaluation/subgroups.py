"""Subgroup evaluation: the same metrics per group of samples (site, sex, image size, format, ...).

For one grouping key, :func:`subgroup_analysis` gives, per group, n, accuracy, AUC and each class's
sensitivity and specificity, with percentile bootstrap intervals resampled within the group (by patient
when patient ids exist: a patient's images are drawn together), the largest gap between groups, and a test
of whether a group is **significantly worse** than the rest of the samples.

The test, for each group with at least ``min_n`` samples and each of accuracy, AUC, every class's
sensitivity and, with more than two classes, every class's specificity (the per-class tests need
``min_class_n`` samples of that class, or of the other classes, in the group and in the rest):
the group and the rest are bootstrapped independently (by patient when ids exist), which gives the
standard error ``se`` of the difference ``d = group - rest``, and the one-sided p-value of "the group is
not worse" is ``Phi(d / se)`` (a Wald test with a bootstrap standard error; a p-value counted from the
resamples could not fall below ``1 / resamples``, too coarse for a correction over dozens of tests). The p-values
of all tests of one key are adjusted with Holm's step-down method (family-wise error rate ``alpha``), and a
group is flagged when its adjusted p-value is below ``alpha``. Sensitivity and specificity are compared
class by class, so a group's class mix decides their tests less; accuracy and AUC depend on the mix and
are to be read with it.

Groups smaller than ``min_n`` are reported with their intervals but not tested, and are left out of the
largest gap. When several values of a key are that small (image sizes, say), they are pooled into one
``other`` group; at most ``max_groups`` groups are kept, the smallest pooled beyond that.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclf.metrics.classification import _jsonable, weighted_auc
from medclf.metrics.resample import resample_weights, resampling_units

__all__ = [
    "ALPHA",
    "MAX_GROUPS",
    "MIN_CLASS_N",
    "MIN_GROUP_N",
    "TEST_METHOD",
    "holm",
    "merge_small_groups",
    "plot_forest",
    "subgroup_analysis",
]

MIN_GROUP_N = 30
MIN_CLASS_N = 10
MAX_GROUPS = 12
ALPHA = 0.05
OTHER = "other"
TEST_METHOD = (
    "one-sided Wald test of d = group - rest of the samples with the bootstrap standard error of d (group "
    "and rest resampled independently{unit}): p = Phi(d / se); Holm adjustment over every test of the "
    "key; flagged when the adjusted p < {alpha:g}. Tested: accuracy, AUC, each class's sensitivity and (more "
    "than two classes) specificity, in groups of at least {min_n} samples (per class: at least {min_class_n} "
    "samples of that class, or of the others, in the group and in the rest)."
)


def merge_small_groups(
    values: Sequence[str], *, min_n: int = MIN_GROUP_N, max_groups: int = MAX_GROUPS
) -> tuple[list[str], dict[str, list[str]]]:
    """Pool the values of a key held by fewer than ``min_n`` samples (when there are at least two such
    values) and, beyond ``max_groups`` groups, the smallest ones, into one ``other`` group.

    Returns the group of each sample and ``{pooled group name: the values it holds}``."""
    counts = Counter(values)
    ranked = sorted(counts, key=lambda v: (-counts[v], v))
    small = [v for v in ranked if counts[v] < min_n]
    pooled = small if len(small) >= 2 else []
    kept = [v for v in ranked if v not in pooled]
    if len(kept) + (1 if pooled else 0) > max_groups:
        room = max_groups - 1
        pooled = pooled + kept[room:]
        kept = kept[:room]
    if not pooled:
        return list(values), {}
    name = OTHER
    while name in counts:
        name = f"{name}_"
    label = f"{name} ({len(pooled)} values)"
    merged = set(pooled)
    return [label if v in merged else v for v in values], {label: sorted(pooled)}


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def subgroup_analysis(
    y: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[str],
    *,
    key: str,
    patient_ids: Sequence[str | None] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_n: int = MIN_GROUP_N,
    min_class_n: int = MIN_CLASS_N,
    alpha: float = ALPHA,
    max_groups: int = MAX_GROUPS,
) -> dict[str, Any]:
    """Per-group metrics with intervals, gaps and tests for one key (see the module's docstring).

    ``y`` (N,) class indices, ``probs`` (N, K), ``groups`` (N,) the key's value per sample; rows are the
    samples to analyse (the headline samples of an evaluation)."""
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if len(groups) != len(y) or p.shape != (len(y), len(class_names)):
        raise ValueError("y, probs and groups must have one row per sample")
    group_of, pooled = merge_small_groups([str(g) for g in groups], min_n=min_n, max_groups=max_groups)
    labels = np.array(group_of, dtype=object)
    # One generator drawn in a fixed order (overall, then each group and its rest): the figures reproduce.
    a = _Analysis(
        y=y,
        p=p,
        class_names=list(class_names),
        units=resampling_units(patient_ids, len(y)),
        by_patient=patient_ids is not None,
        n_bootstrap=n_bootstrap,
        rng=np.random.default_rng(seed),
        tail=(1 - ci) / 2 * 100,
    )
    overall, _ = a.summarise(np.arange(len(y)), "all", False)
    names = sorted(set(group_of), key=lambda g: (-int((labels == g).sum()), g))
    tests: list[dict[str, Any]]
    entries, tests = [], []
    for g in names:
        rows = np.flatnonzero(labels == g)
        rest = np.flatnonzero(labels != g)
        tested = len(rows) >= min_n and len(rest) >= min_n
        entry, boot = a.summarise(rows, g, tested)
        entries.append(entry)
        if tested:
            tests += a.compare(g, rows, rest, entry, boot, min_class_n)
    warnings = _adjust(tests, entries, key, alpha)
    gaps = _gaps(entries, class_names, min_class_n)
    unit = " by patient" if patient_ids is not None else ""
    return _jsonable(
        {
            "key": key,
            "n": len(y),
            "overall": overall,
            "groups": entries,
            "pooled": pooled,
            "tests": tests,
            "gaps": gaps,
            "largest_gap": gaps[0] if gaps else None,
            "warnings": warnings,
            "min_n": min_n,
            "min_class_n": min_class_n,
            "alpha": alpha,
            "ci_level": ci,
            "n_bootstrap": n_bootstrap,
            "ci_method": f"percentile bootstrap within each group{unit}, {n_bootstrap} resamples",
            "test_method": TEST_METHOD.format(unit=unit, alpha=alpha, min_n=min_n, min_class_n=min_class_n),
        }
    )


@dataclass
class _Analysis:
    """The samples of one subgroup analysis and the bootstrap that measures them."""

    y: np.ndarray
    p: np.ndarray
    class_names: list[str]
    units: np.ndarray
    by_patient: bool
    n_bootstrap: int
    rng: np.random.Generator
    tail: float

    @property
    def k(self) -> int:
        return len(self.class_names)

    def summarise(
        self, rows: np.ndarray, name: str, tested: bool
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The group's entry (point figures with intervals) and its bootstrap replicates."""
        y, p, k = self.y[rows], self.p[rows], self.k
        point = {m: float(v[0]) for m, v in _stats(y, p, k, np.ones((1, len(rows)))).items()}
        boot = _bootstrap(y, p, k, self.units[rows], self.n_bootstrap, self.rng)

        def interval(metric: str) -> list[float] | None:
            v = boot.get(metric)
            v = v[np.isfinite(v)] if v is not None else np.array([])
            return [float(x) for x in np.percentile(v, [self.tail, 100 - self.tail])] if len(v) else None

        support = np.bincount(y, minlength=k)
        entry = {
            "group": name,
            "n": len(rows),
            "n_patients": len(np.unique(self.units[rows])) if self.by_patient else None,
            "tested": tested,
            "accuracy": point["accuracy"],
            "auc": point.get("auc"),
            "per_class": {
                str(c): {
                    "support": int(support[j]),
                    "sensitivity": point[f"sensitivity:{j}"],
                    "specificity": point[f"specificity:{j}"],
                }
                for j, c in enumerate(self.class_names)
            },
            "ci": {
                "accuracy": interval("accuracy"),
                "auc": interval("auc"),
                "per_class": {
                    str(c): {
                        "sensitivity": interval(f"sensitivity:{j}"),
                        "specificity": interval(f"specificity:{j}"),
                    }
                    for j, c in enumerate(self.class_names)
                },
            },
        }
        return entry, boot

    def compare(
        self,
        g: str,
        rows: np.ndarray,
        rest: np.ndarray,
        entry: dict[str, Any],
        boot: dict[str, np.ndarray],
        min_class_n: int,
    ) -> list[dict[str, Any]]:
        """Group ``g`` against all other samples, for every metric with enough support on both sides."""
        y, p, k = self.y, self.p, self.k
        rest_point = _stats(y[rest], p[rest], k, np.ones((1, len(rest))))
        rest_boot = _bootstrap(y[rest], p[rest], k, self.units[rest], self.n_bootstrap, self.rng)
        g_support = np.bincount(y[rows], minlength=k)
        r_support = np.bincount(y[rest], minlength=k)
        g_other, r_other = len(rows) - g_support, len(rest) - r_support
        candidates = [("accuracy", None), ("auc", None)] + [
            (f"sensitivity:{j}", j)
            for j in range(k)
            if g_support[j] >= min_class_n and r_support[j] >= min_class_n
        ]
        if k > 2:  # with two classes, one class's specificity is the other's sensitivity
            candidates += [
                (f"specificity:{j}", j)
                for j in range(k)
                if g_other[j] >= min_class_n and r_other[j] >= min_class_n
            ]
        tests = []
        for metric, j in candidates:
            here = float(_point(entry, metric, self.class_names))
            there = float(rest_point[metric][0]) if metric in rest_point else float("nan")
            if not (np.isfinite(here) and np.isfinite(there)) or metric not in boot:
                continue
            diff = boot[metric] - rest_boot[metric]
            diff = diff[np.isfinite(diff)]
            if len(diff) == 0:
                continue
            tests.append(
                {
                    "group": g,
                    "metric": metric.split(":")[0],
                    "class": None if j is None else str(self.class_names[j]),
                    "value": here,
                    "rest": there,
                    "difference": here - there,
                    "p_value": _one_sided_p(here - there, float(diff.std(ddof=1)) if len(diff) > 1 else 0.0),
                }
            )
        return tests


def _adjust(tests: list[dict[str, Any]], entries: list[dict[str, Any]], key: str, alpha: float) -> list[str]:
    """Holm-adjust the tests' p-values, mark the groups that are significantly worse; return the warnings."""
    adjusted = holm([t["p_value"] for t in tests])
    warnings = []
    for t, q in zip(tests, adjusted, strict=True):
        t["p_holm"] = float(q)
        t["significantly_worse"] = bool(q < alpha and t["difference"] < 0)
        if t["significantly_worse"]:
            what = t["metric"] if t["class"] is None else f"{t['metric']} of {t['class']}"
            warnings.append(
                f"subgroup {key}={t['group']}: {what} is significantly worse than in the other samples "
                f"({t['value']:.3f} vs {t['rest']:.3f}; Holm-adjusted p = {t['p_holm']:.3g})"
            )
    for e in entries:
        e["significantly_worse"] = sorted(
            {
                (t["metric"] if t["class"] is None else f"{t['metric']}:{t['class']}")
                for t in tests
                if t["group"] == e["group"] and t["significantly_worse"]
            }
        )
    return warnings


def _one_sided_p(difference: float, se: float) -> float:
    """``Phi(difference / se)``: the one-sided p-value of "not worse" (small when the group is clearly worse)."""
    if se <= 0 or not np.isfinite(se):
        return 0.0 if difference < 0 else 1.0
    from scipy.stats import norm

    return float(norm.cdf(difference / se))


def _stats(y: np.ndarray, p: np.ndarray, k: int, w: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics under each row of sample weights ``w`` (B, n): NaN where undefined."""
    pred = p.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": (w @ correct) / w.sum(axis=1)}
        for c in range(k):
            pos = (y == c).astype(np.float64)
            out[f"sensitivity:{c}"] = (w @ (correct * pos)) / (w @ pos)
            neg = 1.0 - pos
            out[f"specificity:{c}"] = (w @ (neg * (pred != c))) / (w @ neg)
    present = np.flatnonzero(np.bincount(y, minlength=k) > 0)
    if k == 2 and len(present) == 2:
        out["auc"] = weighted_auc(p[:, 1], y == 1, w)
    elif k > 2 and len(present) >= 2:
        with np.errstate(invalid="ignore"):
            out["auc"] = np.mean([weighted_auc(p[:, c], y == c, w) for c in present], axis=0)
    return out


def _bootstrap(
    y: np.ndarray, p: np.ndarray, k: int, units: np.ndarray, n_bootstrap: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Metrics over ``n_bootstrap`` resamples of the units (patients or samples) of these rows."""
    if len(y) == 0:
        return {}
    parts = [_stats(y, p, k, w) for w in resample_weights(units, n_bootstrap, rng)]
    return {m: np.concatenate([part[m] for part in parts]) for m in parts[0]} if parts else {}


def _point(entry: dict[str, Any], metric: str, class_names: Sequence[str]) -> float:
    name, _, j = metric.partition(":")
    v = entry[name] if not j else entry["per_class"][str(class_names[int(j)])][name]
    return float("nan") if v is None else float(v)


def _gaps(
    entries: list[dict[str, Any]], class_names: Sequence[str], min_class_n: int
) -> list[dict[str, Any]]:
    """For each metric, the best and the worst tested group and the difference, largest first."""
    metrics: list[tuple[str, str | None]] = [("accuracy", None), ("auc", None)]
    metrics += [("sensitivity", str(c)) for c in class_names] + [("specificity", str(c)) for c in class_names]
    gaps = []
    for metric, cls in metrics:
        values = []
        for e in entries:
            if not e["tested"]:
                continue
            if cls is None:
                v = e.get(metric)
            else:
                pc = e["per_class"][cls]
                enough = (
                    pc["support"] >= min_class_n
                    if metric == "sensitivity"
                    else e["n"] - pc["support"] >= min_class_n
                )
                v = pc[metric] if enough else None
            if v is not None and np.isfinite(v):
                values.append((float(v), e["group"]))
        if len(values) < 2:
            continue
        worst, best = min(values), max(values)
        gaps.append(
            {
                "metric": metric,
                "class": cls,
                "best_group": best[1],
                "best": best[0],
                "worst_group": worst[1],
                "worst": worst[0],
                "gap": best[0] - worst[0],
            }
        )
    gaps.sort(key=lambda g: -g["gap"])
    return gaps


# ----------------------------------------------------------------------------- the forest plot


def plot_forest(analysis: dict[str, Any], path: str | Path) -> Path:
    """Forest plot of one key's analysis: a panel per metric (first row accuracy and AUC, then each class's
    sensitivity, then, with more than two classes, each class's specificity), a row per group (and all
    samples), the point estimate with its interval. Red: significantly worse than the rest; grey: too small
    to test; dashed line: all samples."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medclf.evaluation.plots import _FONT, DPI, _save

    rows = [analysis["overall"], *analysis["groups"]]
    classes = list(analysis["overall"]["per_class"])[:8]
    grid: list[list[tuple[str, str | None]]] = [[("accuracy", None)]]
    if any(r.get("auc") is not None for r in rows):
        grid[0].append(("auc", None))
    grid.append([("sensitivity", c) for c in classes])
    if len(analysis["overall"]["per_class"]) > 2:
        grid.append([("specificity", c) for c in classes])
    ncols = max(len(line) for line in grid)
    height = len(grid) * (0.9 + 0.36 * len(rows)) + 0.6
    fig = Figure(figsize=(2.4 * ncols + 2.6, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(grid), ncols, sharey=True, squeeze=False)
    ypos = np.arange(len(rows))[::-1]
    labels = [f"{r['group']} (n={r['n']})" for r in rows]
    for line, panels in zip(axes, grid, strict=True):
        for ax in line[len(panels) :]:
            ax.set_visible(False)
        for ax, (metric, cls) in zip(line, panels, strict=False):
            _forest_panel(ax, rows, ypos, metric, cls, _FONT)
        line[0].set_yticks(ypos, labels)
        for t in line[0].get_yticklabels():
            t.set_parse_math(False)
    fig.suptitle(
        f"Subgroups by {analysis['key']}: estimates with {100 * analysis['ci_level']:g}% bootstrap intervals "
        "(red: significantly worse than the rest; grey: too few to test)",
        fontsize=_FONT,
    ).set_parse_math(False)
    return _save(fig, path)


def _forest_panel(
    ax: Any, rows: list[dict[str, Any]], ypos: np.ndarray, metric: str, cls: str | None, font: int
) -> None:
    for yv, r in zip(ypos, rows, strict=True):
        if cls is None:
            v, iv = r.get(metric), r["ci"].get(metric)
        else:
            v, iv = r["per_class"][cls][metric], r["ci"]["per_class"][cls][metric]
        if v is None:
            continue
        flag = f"{metric}:{cls}" if cls is not None else metric
        if r is rows[0]:
            colour = "#0b3c5d"
        elif flag in r.get("significantly_worse", []):
            colour = "#c9302c"
        elif not r["tested"]:
            colour = "0.6"
        else:
            colour = "#3b6ea8"
        if iv:
            ax.plot(iv, [yv, yv], color=colour, lw=2)
        ax.plot([v], [yv], "D" if r is rows[0] else "o", color=colour, ms=6)
    ref = rows[0].get(metric) if cls is None else rows[0]["per_class"][cls][metric]
    if ref is not None:
        ax.axvline(ref, color="0.5", ls="--", lw=1)
    title = "AUC" if metric == "auc" else metric
    ax.set_title(title if cls is None else f"{metric}\n{cls}", fontsize=font)
    ax.title.set_parse_math(False)
    ax.set_xlim(-0.02, 1.02)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(labelsize=font - 2)
