"""The Python API; the CLI is a thin layer over these functions.

import medclf
result = medclf.train("data/", "runs/model", time_budget="10m")
metrics = medclf.evaluate("runs/model", "data/", "runs/eval")
bundle = medclf.load_bundle("runs/model")
bundle.predict(["scan.dcm", "slice.png"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medclf.bundle import Bundle, load_bundle
from medclf.data.audit import NEAR_THRESHOLD, AuditReport
from medclf.data.audit import audit as _audit
from medclf.data.sources import load_source
from medclf.evaluation.runner import evaluate
from medclf.training import TrainConfig, TrainResult, train

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "Bundle",
    "TrainConfig",
    "TrainResult",
    "audit",
    "baseline",
    "evaluate",
    "load_bundle",
    "predict",
    "train",
]


def audit(
    data: str | Path, *, workers: int = 2, near_threshold: float | None = None, progress: bool = True
) -> AuditReport:
    """Audit a dataset: counts, unreadable files, exact/near duplicates, cross-split leakage, conflicts."""
    samples = load_source(data, default_split="train")
    return _audit(
        samples, workers=workers, near_threshold=near_threshold or NEAR_THRESHOLD, progress=progress
    )


def predict(bundle: str | Path | Bundle, inputs: Any, *, batch_size: int = 32) -> list[dict[str, Any]]:
    """Classify files, folders or arrays with a bundle (see :meth:`Bundle.predict`)."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    return b.predict(inputs, batch_size=batch_size)


def baseline(
    data: str | Path,
    out: str | Path,
    *,
    size: int | None = None,
    methods: Sequence[str] | str = ("logreg", "rf", "svm"),
    seed: int = 0,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Traditional-ML baseline: hand-crafted features (intensity, GLCM, LBP, HOG) and classical classifiers
    chosen on validation AUC; writes the ``evaluate`` outputs for the test split plus ``baseline.json``.

    Returns the test metrics (headline without copies of training samples, ``all_samples`` with them) and
    a ``baseline`` key holding the selection table. See :mod:`medclf.baseline`.
    """
    from medclf.baseline import run_baseline

    return run_baseline(
        data,
        out,
        size=size,
        methods=methods,
        seed=seed,
        workers=workers,
        cache_dir=cache_dir,
        progress=progress,
        console=console,
    )
