"""The sanity gate: is the trained model clearly better than answers that need no deep learning?

After training, on the validation split, the model is compared with

* the **majority class**: always answering the most frequent training class (its accuracy; AUC 0.5);
* a **cheap baseline**: a logistic regression (scikit-learn) on small thumbnails of the cached input
  tensors (area-averaged to at most 256 values, see :func:`thumbnails`), fitted on (up to
  :data:`MAX_FIT` of) the training rows;

and the schedule is checked: did the learning rate anneal, or did the time budget cut it?

A model that is not clearly better, or whose schedule was cut, is not necessarily useless, but nobody should
deploy it without knowing: the verdict goes into ``bundle.json`` (``sanity``), the console (loudly), ``medclf
info`` and the ``evaluate`` report, and ``medclf train --strict`` exits with code 3 when the gate fails.

"Clearly better" means: validation accuracy above the majority class's by more than one standard error of
that accuracy (``sqrt(p (1 - p) / n)``: on 78 validation images with 73 % in one class, 5 points), and
validation AUC above the baseline's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medclf import reporting
from medclf.data.stream import StreamedRows

__all__ = ["SanityVerdict", "baselines", "judge"]

MAX_FIT = 4000
EXIT_CODE = 3


@dataclass
class SanityVerdict:
    passed: bool
    model: dict[str, Any]
    majority: dict[str, Any]
    baseline: dict[str, Any] | None
    schedule: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def majority_class(train_y: np.ndarray, val_y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Always answering the most frequent training class: its validation accuracy."""
    counts = np.bincount(train_y, minlength=len(classes))
    c = int(np.argmax(counts))
    return {"class": classes[c], "accuracy": float(np.mean(val_y == c)) if len(val_y) else None}


def thumbnails(tensors: Any, idx: np.ndarray, *, chunk_bytes: int = 1 << 20) -> np.ndarray:
    """Block-averaged thumbnails of the cache rows ``idx``, flattened to at most 256 values each: 16x16 for
    one channel, 8x8 per channel for up to four, channels pooled to four groups beyond (2.5D slabs), 4x4x4
    per channel in 3D.

    Memory stays flat however many rows there are (a streamed run has little to spare): a disk cache is read
    with preadv a few rows (``chunk_bytes``) at a time, as streamed training reads it, rather than through
    the memory map, and the averages are numpy reductions written into one array allocated up front
    (per-chunk tensors kept alive between large temporary buffers grew the heap by about the bytes read)."""
    idx = np.sort(np.asarray(idx))
    shape = tuple(int(v) for v in tensors.shape[1:])
    channels, spatial = shape[0], shape[1:]
    if len(spatial) == 3:
        size: tuple[int, ...] = tuple(min(4, s) for s in spatial)
    elif channels <= 4:
        size = tuple(min(16 if channels == 1 else 8, s) for s in spatial)
    else:  # the channels are slabs of a volume: average them in groups too
        size = (4, *(min(8, s) for s in spatial))
    n_values = int(np.prod(size)) * (channels if len(size) == len(spatial) else 1)
    out = np.empty((len(idx), n_values), dtype=np.float32)
    rows = StreamedRows(tensors, idx) if getattr(tensors, "filename", None) is not None else None
    per_chunk = max(1, chunk_bytes // (int(np.prod(shape)) * np.dtype(tensors.dtype).itemsize))
    try:
        for start in range(0, len(idx), per_chunk):
            stop = min(len(idx), start + per_chunk)
            x = rows.read(idx[start:stop]) if rows is not None else np.asarray(tensors[idx[start:stop]])
            out[start:stop] = _block_mean(x, size).reshape(stop - start, -1)
    finally:
        if rows is not None:
            rows.close()
    return out


def _block_mean(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Means over near-equal blocks of the trailing ``len(size)`` axes of ``x`` (float32)."""
    for k, n_out in enumerate(size):
        axis = x.ndim - len(size) + k
        length = x.shape[axis]
        starts = (np.arange(n_out) * length) // n_out
        counts = np.diff(np.append(starts, length)).astype(np.float32)
        x = np.add.reduceat(x, starts, axis=axis, dtype=np.float32)
        x /= counts.reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return x


def thumbnail_baseline(
    tensors: Any,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Validation AUC and accuracy of a logistic regression on thumbnails (None when it cannot be fitted)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from medclf.metrics.classification import compute_metrics

    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(train_idx, size=min(len(train_idx), MAX_FIT), replace=False))
    y_fit, y_val = labels[fit_idx], labels[np.sort(val_idx)]
    if len(np.unique(y_fit)) < 2 or len(y_val) == 0:
        return None
    # float64 once and scaled in place: sklearn would otherwise copy the rows at each step, and a streamed
    # run has little memory to spare after training.
    x_fit = thumbnails(tensors, fit_idx).astype(np.float64)
    x_val = thumbnails(tensors, val_idx).astype(np.float64)
    clf = make_pipeline(
        StandardScaler(copy=False),
        LogisticRegression(C=0.1, max_iter=500, class_weight="balanced", random_state=seed),
    )
    with threadpool_limits(1):  # a few hundred features: threads cost more than they save on a busy CPU
        clf.fit(x_fit, y_fit)
        p = np.zeros((len(x_val), n_classes))
        p[:, clf.classes_] = clf.predict_proba(x_val)
    m = compute_metrics(y_val, p, [str(c) for c in range(n_classes)], n_bootstrap=0)
    return {
        "method": f"logistic regression on {x_fit.shape[1]}-value thumbnails",
        "n_fit": len(fit_idx),
        "auc": m.get("auc"),
        "accuracy": m.get("accuracy"),
    }


def baselines(
    tensors: Any,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The references the gate compares with: ``majority`` and ``baseline`` (see the module doc)."""
    try:
        base = thumbnail_baseline(tensors, train_idx, val_idx, labels, len(classes), seed=seed)
    except Exception as exc:  # a baseline that cannot be fitted must not cost the trained model
        base = {"method": "logistic regression on thumbnails", "error": str(exc)[:200]}
    return {
        "majority": majority_class(labels[train_idx], labels[np.sort(val_idx)], classes),
        "baseline": base,
    }


def judge(
    model: dict[str, Any], references: dict[str, Any], schedule: dict[str, Any] | None
) -> SanityVerdict:
    """The verdict for validation metrics ``model`` (``accuracy``, ``auc``, ``n``, optional
    ``balanced_accuracy``), the ``references`` from :func:`baselines` and the run's ``schedule``
    (``completed``, ``stop_reason``, ``epochs_run``, ``planned_epochs``)."""
    warnings: list[str] = []
    majority, base = references.get("majority") or {}, references.get("baseline")
    acc, auc, n = model.get("accuracy"), model.get("auc"), int(model.get("n") or 0)
    p = majority.get("accuracy")
    if acc is not None and p is not None and n:
        margin = math.sqrt(max(p * (1 - p), 1e-12) / n)
        if acc <= p + margin:
            extra = ""
            bal = model.get("balanced_accuracy")
            if bal is not None:
                extra = f" (balanced accuracy {bal:.3f}, AUC {_f(auc)})"
            warnings.append(
                f"validation accuracy {acc:.3f} is not clearly above the {p:.3f} of always answering "
                f"'{majority.get('class')}' (margin {margin:.3f}, n={n}){extra}"
            )
    if base and base.get("auc") is not None and auc is not None and auc <= base["auc"]:
        warnings.append(
            f"validation AUC {auc:.3f} is not above the {base['auc']:.3f} of a {base['method']}: the network "
            "learned no more than a linear model on tiny images"
        )
    if schedule and not schedule.get("completed", True) and schedule.get("stop_reason") == "time_budget":
        warnings.append(
            f"the time budget cut training after {schedule.get('epochs_run')} of {schedule.get('planned_epochs')} "
            f"planned epochs, before the learning rate had annealed (at {schedule.get('final_lr_factor', 0):.0%} "
            "of its peak): give a larger --time-budget"
        )
    return SanityVerdict(
        passed=not warnings,
        model={k: model.get(k) for k in ("accuracy", "auc", "balanced_accuracy", "n")},
        majority=majority,
        baseline=base,
        schedule=schedule,
        warnings=warnings,
    )


def render(verdict: dict[str, Any]) -> None:
    """Report the verdict (:mod:`medclf.reporting`): one line when it passed, a loud red panel when it did
    not."""
    rep = reporting.current()
    if verdict.get("passed"):
        base = verdict.get("baseline") or {}
        majority = verdict.get("majority") or {}
        if majority.get("accuracy") is None and base.get("auc") is None:  # multi-label findings: neither
            rep.print(
                "Sanity check passed: the schedule ran as planned (findings have no majority-class reference)"
            )
            return
        rep.print(
            f"Sanity check passed: validation accuracy {_f(verdict['model'].get('accuracy'))} vs "
            f"{_f(verdict['majority'].get('accuracy'))} (majority class), AUC {_f(verdict['model'].get('auc'))} "
            f"vs {_f(base.get('auc'))} (thumbnail logistic regression)"
        )
        return
    from rich.markup import escape

    rule = "[bold red]" + "!" * 78 + "[/]"
    rep.print(rule)
    rep.print("[bold red]WARNING: the sanity check failed[/]", highlight=False)
    for w in verdict.get("warnings", []):
        rep.print(f"[red]  - {escape(w)}[/]", highlight=False)
    rep.print(
        f"  The bundle was written; check it before relying on it (`medclf train --strict` exits with code "
        f"{EXIT_CODE} here).",
        highlight=False,
    )
    rep.print(rule)


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"
