"""Evaluation: metrics with bootstrap CIs, figures and the HTML report (pure functions, no I/O of data).

Imported lazily (scikit-learn and matplotlib load only when used)::

    compute_metrics(y_true, probs, class_names, n_bootstrap=1000, seed=0, ci=0.95) -> dict
    expected_calibration_error(y_true, probs, n_bins=15) -> float
    plot_roc(y_true, probs, class_names, path) -> Path
    plot_confusion(confusion_matrix, class_names, path, normalise=True) -> Path
    plot_reliability(y_true, probs, path, n_bins=15) -> Path
    write_report(path, title=..., metrics=..., figures=..., sections=None) -> Path

The orchestration (bundle + dataset split -> outputs) is :func:`medclf.evaluation.runner.evaluate`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "compute_metrics": "metrics",
    "expected_calibration_error": "metrics",
    "plot_roc": "plots",
    "plot_confusion": "plots",
    "plot_reliability": "plots",
    "write_report": "report",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"medclf.evaluation.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'medclf.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
