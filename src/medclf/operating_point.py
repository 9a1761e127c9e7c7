"""A bundle's operating point: a yes/no decision for one group of classes, at a fitted threshold.

``medclf recalibrate`` fits it on a labelled sample from a site (see
:mod:`medclf.evaluation.recalibrate`) and records it in ``bundle.json`` as ``operating_point``. The score of
an image is the (calibrated) probability of the positive group, the sum of its member classes'
probabilities; the decision is positive when the score reaches the threshold (``score >= threshold``,
sklearn's ``roc_curve`` convention). ``predict``, the HTTP API, the web page, the DICOM node and
``evaluate`` read it from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medclf.errors import BundleError, ConfigError

__all__ = ["METHODS", "OperatingPoint"]

METHODS = {
    "sensitivity": "the highest threshold whose sensitivity on the site sample reaches the target",
    "youden": "the threshold maximising Youden's J = sensitivity + specificity - 1 on the site sample",
}


@dataclass(frozen=True)
class OperatingPoint:
    """``positive``: the group's name; ``classes``: the model classes in it; ``negative``: the name of a
    negative decision; ``fit``: what the fit recorded (figures, intervals, site, ...), kept as is."""

    positive: str
    classes: tuple[str, ...]
    threshold: float
    method: str
    negative: str
    target: float | None = None
    fit: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> OperatingPoint | None:
        """The bundle's operating point, or None when it has none."""
        op = manifest.get("operating_point")
        if not op:
            return None
        try:
            point = cls(
                positive=str(op["positive"]),
                classes=tuple(str(c) for c in op["classes"]),
                threshold=float(op["threshold"]),
                method=str(op["method"]),
                negative=str(op.get("negative") or f"not {op['positive']}"),
                target=None if op.get("target") is None else float(op["target"]),
                fit={k: v for k, v in op.items() if k not in _FIELDS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"bundle.json: operating_point is malformed ({exc})") from exc
        unknown = [c for c in point.classes if c not in manifest.get("classes", [])]
        if unknown or not point.classes:
            raise BundleError(f"bundle.json: operating_point names classes the model lacks: {unknown}")
        return point

    def to_manifest(self) -> dict[str, Any]:
        return {
            "positive": self.positive,
            "classes": list(self.classes),
            "negative": self.negative,
            "threshold": self.threshold,
            "method": self.method,
            "target": self.target,
            "rule": self.rule,
            **self.fit,
        }

    @property
    def rule(self) -> str:
        """The decision rule in words."""
        members = "" if self.classes == (self.positive,) else f" (= {' + '.join(self.classes)})"
        why = (
            f"sensitivity >= {self.target:g} on the site sample"
            if self.method == "sensitivity"
            else "Youden's J"
        )
        return f"{self.positive} when P({self.positive}){members} >= {self.threshold:.6g} ({why})"

    def columns(
        self, class_names: Sequence[str], groups: Mapping[str, Sequence[str]] | None = None
    ) -> np.ndarray:
        """Indices of the ``class_names`` columns whose probabilities sum to the positive group's.

        ``groups`` maps each column name to the model classes it stands for (a class map's groups); by
        default each column is one model class. A column that holds some but not all of its classes on the
        positive side cannot be scored at this operating point: :class:`ConfigError`."""
        wanted = set(self.classes)
        cols = []
        for j, name in enumerate(class_names):
            members = set(groups[name]) if groups is not None else {name}
            inside = members & wanted
            if inside and inside != members:
                raise ConfigError(
                    f"the operating point's positive group {self.positive!r} ({', '.join(self.classes)}) "
                    f"splits {name!r} ({', '.join(sorted(members))}): it cannot be scored on these labels"
                )
            if inside:
                cols.append(j)
        covered = set().union(*(set(groups[class_names[j]]) if groups else {class_names[j]} for j in cols))
        if covered != wanted:
            raise ConfigError(
                f"the operating point's classes {sorted(wanted - covered)} are not among {list(class_names)}"
            )
        return np.array(cols, dtype=np.int64)

    def scores(self, probs: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """The positive group's probability per row of ``probs``."""
        return np.asarray(probs, dtype=np.float64)[:, columns].sum(axis=1)

    def decide(self, score: float) -> dict[str, Any]:
        """The ``decision`` entry of a prediction whose positive-group probability is ``score``."""
        positive = bool(score >= self.threshold)
        return {
            "label": self.positive if positive else self.negative,
            "positive": positive,
            "group": self.positive,
            "score": float(score),
            "threshold": self.threshold,
            "method": self.method,
        }


_FIELDS = {"positive", "classes", "negative", "threshold", "method", "target", "rule"}
