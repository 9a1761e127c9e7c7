"""The Python API; the CLI is a thin layer over these functions.

import medclf
result = medclf.train("data/", "runs/model", time_budget="10m")
metrics = medclf.evaluate("runs/model", "data/", "runs/eval")
bundle = medclf.load_bundle("runs/model")
bundle.predict(["scan.dcm", "slice.png"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medclf.bundle import Bundle, load_bundle
from medclf.data.audit import NEAR_THRESHOLD, AuditReport
from medclf.data.audit import audit as _audit
from medclf.data.sources import load_source
from medclf.evaluation.runner import evaluate
from medclf.training import TrainConfig, TrainResult, train

__all__ = ["Bundle", "TrainConfig", "TrainResult", "audit", "evaluate", "load_bundle", "predict", "train"]


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
