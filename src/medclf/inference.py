"""Prediction on new inputs: files, folders (recursive), arrays or decoded images.

Each input is read through the guarded readers and preprocessed with the bundle's own spec, so serving
sees exactly what training saw. An input that cannot be used gets an ``error`` entry with a specific
reason; the others still get their answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medclf.data.sources import NON_IMAGE_SUFFIXES
from medclf.errors import InputRejected, MedclfError
from medclf.io import Image, image_from_array, read_image, read_npz
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
                    if (
                        f.is_file()
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
    if not p.exists():
        raise InputRejected("no such file", reason="not_found", path=name)
    if p.is_dir():
        raise InputRejected("is a folder", reason="not_a_file", path=name)
    try:
        yield name, read_image(p)
    except InputRejected as exc:
        if exc.reason != "dataset_npz":
            raise
        # A MedMNIST-style dataset file: predict every image in it, named file:split/index.
        arrays = read_npz(p)
        for key in sorted(k for k in arrays if k.endswith("_images")):
            for i, arr in enumerate(arrays[key]):
                ref = f"{name}:{key[: -len('_images')]}/{i}"
                yield ref, image_from_array(arr, source=ref)


def predict_inputs(bundle: Bundle, inputs: Any, *, batch_size: int = 32) -> list[dict[str, Any]]:
    """See :meth:`medclf.bundle.Bundle.predict`."""
    results: list[dict[str, Any]] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        x = np.stack([t for _, t in pending])
        probs = bundle.predict_tensors(x, batch_size=batch_size)
        for (slot, _), p in zip(pending, probs, strict=True):
            results[slot].update(_answer(bundle, p))
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


def _answer(bundle: Bundle, probs: np.ndarray) -> dict[str, Any]:
    k = int(np.argmax(probs))
    return {
        "predicted": bundle.classes[k],
        "confidence": float(probs[k]),
        "probabilities": {c: float(p) for c, p in zip(bundle.classes, probs, strict=True)},
    }
