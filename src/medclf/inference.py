"""The inputs of a prediction and the shape of its answers.

Inputs are files, folders (recursive), arrays or decoded images; each is read through the guarded
readers (:func:`read_input`). :meth:`medclf.predictor.Predictor.predict` then preprocesses them with the
bundle's own spec, so serving sees exactly what training saw, and answers each with :func:`class_answer`
and :func:`ood_answer`; an input that cannot be used gets an ``error`` entry with a specific reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medclf.data.sources import NON_IMAGE_SUFFIXES
from medclf.errors import InputRejected
from medclf.io import Image, image_from_array, iter_npz_images, read_image
from medclf.models.tasks import median_grade


def expand_inputs(inputs: Iterable[Any] | Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, item)`` pairs: folders are walked recursively (hidden and non-image files skipped)."""
    if isinstance(inputs, (str, Path, np.ndarray, Image)):
        inputs = [inputs]
    for n, item in enumerate(inputs):
        if isinstance(item, Image):
            yield f"image[{n}]", item
        elif isinstance(item, np.ndarray):
            yield f"array[{n}]", item
        else:
            p = Path(item)
            if p.is_dir():
                for f in sorted(p.rglob("*")):
                    rel = f.relative_to(p).parts
                    # Not only regular files: a FIFO, device or looping link gets its own refusal.
                    if (
                        not f.is_dir()
                        and not any(s.startswith(".") for s in rel)
                        and f.suffix.lower() not in NON_IMAGE_SUFFIXES
                    ):
                        yield str(f), f
            else:
                yield str(p), p


def read_input(name: str, item: Any) -> Iterator[tuple[str, Image]]:
    """The image(s) of one expanded input: one, or every image of a MedMNIST-style ``.npz``."""
    if isinstance(item, Image):
        yield name, item
        return
    if isinstance(item, np.ndarray):
        yield name, image_from_array(item, source=name)
        return
    p = Path(item)
    if not p.exists() and not p.is_symlink():
        raise InputRejected("no such file", reason="not_found", path=name)
    if p.is_dir():
        raise InputRejected("is a folder", reason="not_a_file", path=name)
    try:
        yield name, read_image(p)
    except InputRejected as exc:
        if exc.reason != "dataset_npz":
            raise
        # A MedMNIST-style dataset file: predict every image in it, named file:split/index, holding one
        # split in memory at a time (bounded like a single image).
        for index, arr in iter_npz_images(p):
            ref = f"{name}:{index}"
            yield ref, image_from_array(arr, source=ref)


OOD_WARNING = (
    "this image is unlike the images the model was trained on (out-of-distribution score {score:.1f} > "
    "threshold {threshold:.1f}): the prediction is unreliable"
)


def ood_answer(flag: bool, score: float, threshold: float) -> dict[str, Any]:
    """The out-of-distribution fields of one answer: ``ood``, ``ood_score`` and, when flagged, ``warning``."""
    answer: dict[str, Any] = {"ood": flag, "ood_score": round(score, 3)}
    if flag:
        answer["warning"] = OOD_WARNING.format(score=score, threshold=threshold)
    return answer


def class_answer(
    classes: Sequence[str],
    probs: np.ndarray,
    task: str = "multiclass",
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The class fields of one answer: ``predicted``, ``confidence`` and ``probabilities``; for ordinal grades
    also ``grade`` (the median of the distribution, what the ordinal model was selected and evaluated on).

    Multi-label findings (``task="multilabel"``): ``findings`` (per finding its probability, its operating
    threshold from ``thresholds`` (0.5 when the bundle has none) and whether it is ``present``) and
    ``positive`` (the findings present); ``predicted`` joins them with ``|`` (``No Finding`` when none is)
    and ``confidence`` is the certainty of the least certain per-finding decision (p, or 1 - p when absent)."""
    if task == "multilabel":
        return _findings_answer(classes, probs, thresholds or {})
    ordinal = task == "ordinal"
    k = int(median_grade(probs[None])[0]) if ordinal else int(np.argmax(probs))
    answer: dict[str, Any] = {
        "predicted": classes[k],
        "confidence": float(probs[k]),
        "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
    }
    if ordinal:
        answer["grade"] = {
            "grade": classes[k],
            "index": k,
            "rule": "median of the grade distribution",
            "expected_index": float(np.dot(np.arange(len(probs)), probs)),
        }
    return answer


NO_FINDING = "No Finding"


def _findings_answer(
    classes: Sequence[str], probs: np.ndarray, thresholds: Mapping[str, float]
) -> dict[str, Any]:
    findings: dict[str, dict[str, Any]] = {}
    for c, p in zip(classes, probs, strict=True):
        t = float(thresholds.get(c, 0.5))
        findings[c] = {"probability": float(p), "threshold": t, "present": bool(p >= t)}
    positive = [c for c, f in findings.items() if f["present"]]
    certainty = [f["probability"] if f["present"] else 1.0 - f["probability"] for f in findings.values()]
    return {
        "predicted": "|".join(positive) or NO_FINDING,
        "confidence": float(min(certainty)) if certainty else 1.0,
        "probabilities": {c: f["probability"] for c, f in findings.items()},
        "findings": findings,
        "positive": positive,
    }
