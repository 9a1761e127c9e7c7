"""Evaluation figures as PNG files: ROC curves, confusion matrix, reliability diagram, training curves.

Figures are built with :class:`matplotlib.figure.Figure` and an Agg canvas, never pyplot: no global
backend switch, no figure registry to leak, safe in servers and threads. Class names come from users,
so every text that can hold one is drawn with mathtext off (a ``$`` in a name must not be parsed as LaTeX).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from medclf.metrics.classification import calibration_bins, expected_calibration_error

__all__ = ["plot_confusion", "plot_reliability", "plot_roc", "plot_training_history"]

DPI = 100
_FONT = 11


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    """ROC curve(s) with AUC in the legend: class 1 vs 0 for two classes, else one-vs-rest per class."""
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    fig, ax = _figure(6.2, 5.6)
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6", label="chance")
    curves = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    skipped = []
    for i, c in enumerate(curves):
        is_c = y == c
        if is_c.all() or not is_c.any():
            skipped.append(str(class_names[c]))
            continue
        fpr, tpr, _ = roc_curve(is_c, p[:, c])
        auc = roc_auc_score(is_c, p[:, c])
        name = f"{class_names[1]} vs {class_names[0]}" if p.shape[1] == 2 else str(class_names[c])
        # The default colour cycle has 10 colours; vary the line style beyond that.
        ax.plot(fpr, tpr, lw=2, ls=("-", "--", ":")[i // 10 % 3], label=f"{name} (AUC {auc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC curve" if p.shape[1] == 2 else "ROC curves (one class vs rest)")
    ax.grid(alpha=0.3)
    title = "no curve (class absent or alone): " + ", ".join(skipped) if skipped else None
    _legend(
        ax,
        loc="lower right",
        fontsize=_FONT - 1 if len(curves) <= 8 else _FONT - 3,
        title=title,
        title_fontsize=_FONT - 2,
    )
    return _save(fig, path)


def plot_confusion(
    confusion_matrix: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    normalise: bool = True,
) -> Path:
    """Confusion matrix (rows true, columns predicted), each cell annotated with count and row %.

    ``normalise`` colours cells by the share of their row (so rare classes are as visible as common
    ones); otherwise by count.
    """
    cm = np.asarray(confusion_matrix, dtype=np.int64)
    k = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    size = min(4.0 + 0.7 * k, 16.0)
    fig, ax = _figure(size + 1.2, size)
    shade = share if normalise else cm / max(cm.max(), 1)
    im = ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label("share of true class" if normalise else "count (relative to the largest)")
    small = _FONT - (2 if k > 6 else 0) - (2 if k > 12 else 0)
    for i in range(k):
        for j in range(k):
            text = f"{cm[i, j]}\n{100 * share[i, j]:.1f}%" if rows[i, 0] else "0"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=small,
                color="white" if shade[i, j] > 0.55 else "black",
            )
    ticks = np.arange(k)
    ax.set_xticks(
        ticks, [str(c) for c in class_names], rotation=35 if k > 3 else 0, ha="right" if k > 3 else "center"
    )
    ax.set_yticks(ticks, [str(c) for c in class_names])
    for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        t.set_parse_math(False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (count, % of true class)")
    return _save(fig, path)


def plot_reliability(
    y_true: np.ndarray,
    probs: np.ndarray,
    path: str | Path,
    n_bins: int = 15,
    *,
    uncalibrated_probs: np.ndarray | None = None,
    temperature: float | None = None,
) -> Path:
    """Reliability diagram of the top-class confidence over a histogram of confidences; ECE in the title.

    With ``uncalibrated_probs`` (the same predictions before temperature scaling by ``temperature``), both
    curves are drawn: accuracy against mean confidence per bin, before and after scaling.
    """
    counts, acc, conf = calibration_bins(y_true, probs, n_bins)
    ece = expected_calibration_error(y_true, probs, n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / n_bins
    filled = counts > 0

    fig = Figure(figsize=(6.2, 7.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    top.plot([0, 1], [0, 1], ls="--", lw=1, color="0.5", label="perfect calibration")
    top.bar(
        centres[filled], acc[filled], width=width, color="#3b6ea8", edgecolor="white", label="accuracy in bin"
    )
    # The gap from each bar to its mean confidence: what the ECE sums, weighted by bin size.
    top.bar(
        centres[filled],
        conf[filled] - acc[filled],
        bottom=acc[filled],
        width=width,
        fill=False,
        hatch="///",
        edgecolor="#d9534f",
        lw=1,
        label="gap to mean confidence",
    )
    title = f"Reliability diagram (ECE {ece:.3f}, {n_bins} bins)"
    if uncalibrated_probs is not None:
        t = 1.0 if temperature is None else float(temperature)
        u_counts, u_acc, u_conf = calibration_bins(y_true, uncalibrated_probs, n_bins)
        u_ece = expected_calibration_error(y_true, uncalibrated_probs, n_bins)
        u = u_counts > 0
        before = f"before scaling (ECE {u_ece:.3f})"
        after = f"after, T = {t:.3g} (ECE {ece:.3f})"
        top.plot(u_conf[u], u_acc[u], "s--", color="#e08a00", lw=1.5, ms=5, label=before)
        top.plot(conf[filled], acc[filled], "o-", color="#0b3c5d", lw=1.5, ms=5, label=after)
        title = f"Reliability: ECE {u_ece:.3f} before, {ece:.3f} after temperature scaling"
    top.set(xlim=(0, 1), ylim=(0, 1))
    top.set_ylabel("accuracy")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=_FONT - 1)

    bottom.bar(centres, counts, width=width, color="0.55", edgecolor="white")
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if len(y):
        mean_conf = float(p.max(axis=1).mean())
        accuracy = float((p.argmax(axis=1) == y).mean())
        bottom.axvline(accuracy, color="#3b6ea8", lw=2, label=f"accuracy {accuracy:.3f}")
        bottom.axvline(mean_conf, color="#d9534f", lw=2, ls="--", label=f"mean confidence {mean_conf:.3f}")
        bottom.legend(loc="upper left", fontsize=_FONT - 2)
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("samples")
    for ax in (top, bottom):
        _style(ax)
    return _save(fig, path)


def plot_augmentation_gallery(
    original: np.ndarray, views: Sequence[np.ndarray], preset: str, path: str | Path
) -> Path:
    """Rows = samples; first column the preprocessed input, then augmented views (the middle slice for
    volumes). Arrays are ``(N, C, *spatial)`` in [0, 1]."""

    def show(a: np.ndarray) -> np.ndarray:
        if a.ndim == 4:  # (C, D, H, W): middle slice
            a = a[:, a.shape[1] // 2]
        return a[0] if a.shape[0] != 3 else np.moveaxis(a, 0, -1)

    n, cols = len(original), 1 + len(views)
    fig = Figure(figsize=(1.6 * cols, 1.6 * n + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        for j, src in enumerate([original, *views]):
            ax = axes[i][j]
            ax.imshow(show(np.asarray(src[i], dtype=np.float32)), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("input" if j == 0 else f"'{preset}' #{j}", fontsize=_FONT - 1)
    return _save(fig, path)


def plot_training_history(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Training curves from a bundle's ``history`` rows: training and validation loss (left), validation
    AUC and accuracy (right), against the epoch."""
    fig = Figure(figsize=(10.0, 4.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    epochs = [int(h["epoch"]) for h in history]
    for ax, keys, ylabel in (
        (left, (("loss", "training loss"), ("val_loss", "validation loss")), "loss"),
        (right, (("val_auc", "validation AUC"), ("val_acc", "validation accuracy")), "score"),
    ):
        _style(ax)
        for key, label in keys:
            values = [float(h[key]) if h.get(key) is not None else np.nan for h in history]
            ax.plot(epochs, values, marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        _legend(ax, fontsize=_FONT - 1)
    return _save(fig, path)


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    # Constrained layout keeps long class names and the colour bar inside the canvas.
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _style(ax)
    return fig, ax


def _style(ax: Axes) -> None:
    ax.tick_params(labelsize=_FONT - 1)
    ax.xaxis.label.set_fontsize(_FONT)
    ax.yaxis.label.set_fontsize(_FONT)
    ax.title.set_fontsize(_FONT + 2)


def _legend(ax: Axes, **kwargs: Any) -> None:
    leg = ax.legend(**kwargs)
    for t in [*leg.get_texts(), leg.get_title()]:
        t.set_parse_math(False)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" stamp: the PNG bytes depend on the figure alone (reproducible outputs).
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path
