"""Prediction on new inputs: files, folders (recursive), arrays or decoded images.

Each input is read through the guarded readers and preprocessed with the bundle's own spec, so serving
sees exactly what training saw. An input that cannot be used gets an ``error`` entry with a specific
reason; the others still get their answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medclf.data.sources import NON_IMAGE_SUFFIXES
from medclf.errors import InputRejected, MedclfError
from medclf.io import Image, image_from_array, iter_npz_images, read_image
from medclf.models.tasks import median_grade
from medclf.operating_point import OperatingPoint
from medclf.preprocess import preprocess

if TYPE_CHECKING:
    from medclf.bundle import Bundle


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


def _load(name: str, item: Any) -> Iterator[tuple[str, Image]]:
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


def predict_inputs(
    bundle: Bundle,
    inputs: Any,
    *,
    batch_size: int = 32,
    engine: str = "auto",
    tta: bool | str | Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """See :meth:`medclf.bundle.Bundle.predict`."""
    engine = bundle.engine(engine)  # an engine the bundle cannot run is refused before any file is read
    views = bundle.tta_views(tta)  # so is an unknown test-time transform
    point = OperatingPoint.from_manifest(bundle.manifest)
    columns = point.columns(bundle.classes) if point is not None else None
    results: list[dict[str, Any]] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        x = np.stack([t for _, t in pending])
        probs = bundle.predict_tensors(x, batch_size=batch_size, engine=engine, tta=views)
        ood = bundle.ood_scores(x, engine=engine)
        for j, ((slot, _), p) in enumerate(zip(pending, probs, strict=True)):
            results[slot].update(_answer(bundle, p))
            if point is not None:
                # The bundle's operating point (medclf recalibrate): a yes/no call at a site's threshold.
                results[slot]["decision"] = point.decide(float(p[columns].sum()))
            if ood is not None:
                results[slot].update(_ood_answer(bool(ood[0][j]), float(ood[1][j]), bundle))
        pending.clear()

    for name, item in expand_inputs(inputs):
        try:
            for ref, image in _load(name, item):
                t0 = time.perf_counter()
                tensor = preprocess(image, bundle.spec)
                results.append({"path": ref, "preprocess_ms": round((time.perf_counter() - t0) * 1000, 2)})
                pending.append((len(results) - 1, tensor))
                if len(pending) >= batch_size:
                    flush()
        except MedclfError as exc:
            reason = getattr(exc, "reason", "invalid")
            results.append({"path": name, "error": exc.message, "reason": reason})
        except OSError as exc:
            results.append({"path": name, "error": f"{name}: {exc.strerror or exc}", "reason": "unreadable"})
    flush()
    for r in results:
        r.pop("preprocess_ms", None)
    return results


OOD_WARNING = (
    "this image is unlike the images the model was trained on (out-of-distribution score {score:.1f} > "
    "threshold {threshold:.1f}): the prediction is unreliable"
)


def _ood_answer(flag: bool, score: float, bundle: Bundle) -> dict[str, Any]:
    answer: dict[str, Any] = {"ood": flag, "ood_score": round(score, 3)}
    if flag:
        answer["warning"] = OOD_WARNING.format(score=score, threshold=bundle.ood.threshold)
    return answer


def _answer(bundle: Bundle, probs: np.ndarray) -> dict[str, Any]:
    ordinal = bundle.manifest.get("task") == "ordinal"
    # A grade is the median of its distribution (what the ordinal model was selected and evaluated on).
    k = int(median_grade(probs[None])[0]) if ordinal else int(np.argmax(probs))
    answer: dict[str, Any] = {
        "predicted": bundle.classes[k],
        "confidence": float(probs[k]),
        "probabilities": {c: float(p) for c, p in zip(bundle.classes, probs, strict=True)},
    }
    if ordinal:
        answer["grade"] = {
            "grade": bundle.classes[k],
            "index": k,
            "rule": "median of the grade distribution",
            "expected_index": float(np.dot(np.arange(len(probs)), probs)),
        }
    return answer
