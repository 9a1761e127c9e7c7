"""Evaluation: the evaluate runner (bundle + data -> outputs), figures and the HTML report.

Imported lazily (scikit-learn and matplotlib load only when used)::

    compute_metrics(y_true, probs, class_names, n_bootstrap=1000, seed=0, ci=0.95) -> dict
    expected_calibration_error(y_true, probs, n_bins=15) -> float
    plot_roc(y_true, probs, class_names, path) -> Path
    plot_confusion(confusion_matrix, class_names, path, normalise=True) -> Path
    plot_reliability(y_true, probs, path, n_bins=15) -> Path
    write_report(path, title=..., metrics=..., figures=..., sections=None) -> Path

The orchestration (bundle + dataset split -> outputs) is :func:`medclf.evaluation.runner.evaluate`; the metrics
themselves live in the lower :mod:`medclf.metrics` (what training scores with), re-exported here by name.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "compute_metrics": "medclf.metrics.classification",
    "expected_calibration_error": "medclf.metrics.classification",
    "plot_roc": "medclf.evaluation.plots",
    "plot_confusion": "medclf.evaluation.plots",
    "plot_reliability": "medclf.evaluation.plots",
    "write_report": "medclf.evaluation.report",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'medclf.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
