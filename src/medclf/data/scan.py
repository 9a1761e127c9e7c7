"""The audit's decoding pass: every sample decoded once, small per-sample facts kept.

:func:`scan` decodes every sample once (optionally computing the preprocessed tensor in the same pass, which
is how :mod:`medclf.data.cache` fills its cache) and keeps a content hash, a near-duplicate signature
(:mod:`medclf.data.signatures`), size, channels, format, intensity statistics and acquisition cues.
:func:`train_copy_flags` then marks every val/test sample that is a copy of a training sample, so model
selection and headline test figures can leave them out.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medclf import reporting
from medclf.data.acquisition import header_cues, image_cues_of
from medclf.data.samples import SampleSet
from medclf.data.shortcuts import pixel_cues
from medclf.data.signatures import (
    NEAR_THRESHOLD,
    SIGNATURE_LEN,
    image_signature,
    is_constant_signature,
    nearest,
)
from medclf.errors import InputRejected
from medclf.io import Image

STAT_NAMES = ("min", "max", "mean", "std", "p01", "p99")
# Percentiles of huge volumes on a strided subsample: the audit needs ranges, not exact order statistics.
_MAX_STAT_VOXELS = 1 << 22


# --------------------------------------------------------------------------------------------------
# The decoding pass
# --------------------------------------------------------------------------------------------------


@dataclass
class ScanResult:
    """Per-sample facts from one decoding pass; index ``i`` is sample ``i`` of the scanned set.

    ``decoded`` says the reader produced pixels; ``ok`` additionally says ``extra`` (when given)
    succeeded, i.e. the sample is usable. ``reasons``/``messages`` explain failures (``None`` when ok).
    ``stats`` columns are :data:`STAT_NAMES` (NaN for failed samples). ``extra`` holds the outputs of the
    ``extra`` callable (``None`` for failed samples, or ``None`` altogether when none was given).
    """

    ok: np.ndarray
    decoded: np.ndarray
    reasons: list[str | None]
    messages: list[str | None]
    hashes: list[str | None]
    signatures: np.ndarray
    constant: np.ndarray
    shapes: list[tuple[int, ...] | None]
    channels: np.ndarray
    formats: list[str | None]
    modes: list[str | None]
    stats: np.ndarray
    extra: list[Any] | None = None
    seconds: float = 0.0
    # Acquisition cues per sample (header facts + border/histogram, see medclf.data.shortcuts); {} for
    # failed samples; None when loaded from a cache written before cues were recorded.
    cues: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.ok)

    def failed(self) -> np.ndarray:
        """Indices of samples that cannot be used."""
        return np.flatnonzero(~self.ok)


@dataclass
class _Record:
    """What a worker sends back for one sample (small: no pixels unless ``extra`` returns them)."""

    ok: bool = False
    decoded: bool = False
    reason: str | None = None
    message: str | None = None
    sha256: str | None = None
    signature: np.ndarray | None = None
    shape: tuple[int, ...] | None = None
    channels: int = -1
    format: str | None = None
    mode: str | None = None
    stats: np.ndarray | None = None
    cues: dict[str, Any] | None = None
    extra: Any = None


# Set in the parent before forking: workers inherit the samples (with any in-memory npz arrays) and the
# extra callable without pickling them.
_STATE: tuple[SampleSet, Callable[[Image], Any] | None] | None = None


def _init_worker() -> None:
    # Two processes on two cores: torch's own thread pool would only oversubscribe them.
    torch.set_num_threads(1)


def _image_mode(image: Image) -> str:
    meta = image.meta or {}
    for key in ("mode", "photometric_interpretation", "photometric", "color_mode"):
        if meta.get(key):
            return str(meta[key])
    return {1: "grey", 3: "rgb", 4: "rgba"}.get(image.channels, f"{image.channels}ch")


def _intensity_stats(pixels: np.ndarray) -> np.ndarray:
    flat = pixels.reshape(-1)
    flat = flat[np.isfinite(flat)] if not np.isfinite(flat).all() else flat
    if flat.size == 0:
        return np.full(len(STAT_NAMES), np.nan)
    sub = flat[:: max(1, flat.size // _MAX_STAT_VOXELS)]
    p01, p99 = np.percentile(sub, [1.0, 99.0])
    return np.array(
        [flat.min(), flat.max(), flat.mean(dtype=np.float64), flat.std(dtype=np.float64), p01, p99],
        dtype=np.float64,
    )


def _scan_one(i: int) -> _Record:
    assert _STATE is not None
    samples, extra = _STATE
    rec = _Record()
    try:
        rec.sha256 = samples.content_hash(i)
        image = samples.load(i)
    except InputRejected as exc:
        rec.reason, rec.message = exc.reason, exc.message
        return rec
    except OSError as exc:
        # A file that vanished or cannot be opened is a data problem, not a reader bug.
        rec.reason, rec.message = "unreadable", f"{samples.display_ref(i)}: {exc.strerror or exc}"
        return rec
    except Exception as exc:  # a reader bug: list it, never let one file end the scan
        rec.reason, rec.message = "reader_error", f"{samples.display_ref(i)}: {type(exc).__name__}: {exc}"
        return rec
    try:
        rec.signature = image_signature(image)
        rec.stats = _intensity_stats(image.pixels)
        rec.shape, rec.channels = image.spatial_shape, image.channels
        rec.format, rec.mode = image.format, _image_mode(image)
        rec.cues = _cues(samples, i, image)
    except Exception as exc:
        rec.reason, rec.message = "scan_error", f"{samples.display_ref(i)}: {type(exc).__name__}: {exc}"
        return rec
    rec.decoded = True
    if extra is not None:
        try:
            rec.extra = extra(image)
        except InputRejected as exc:
            rec.reason, rec.message = exc.reason, exc.message
            return rec
        except Exception as exc:
            rec.reason = "preprocess_error"
            rec.message = f"{samples.display_ref(i)}: {type(exc).__name__}: {exc}"
            return rec
    rec.ok = True
    return rec


def _cues(samples: SampleSet, i: int, image: Image) -> dict[str, Any]:
    """Acquisition cues of sample ``i``: its file header (an array's layout for ``.npz``) and pixel cues."""
    if samples.arrays:
        split = samples.refs[i].split("/")[0]
        cues = image_cues_of(image, samples.arrays[split].dtype)
    else:
        cues = header_cues(samples.refs[i])
    cues.update(pixel_cues(image.pixels))
    return cues


@contextmanager
def _pool(n: int, workers: int) -> Iterator[Any]:
    """A fork pool, or ``None`` when decoding in this process is the better (or only) choice."""
    if workers <= 1 or n < 2 * workers or "fork" not in mp.get_all_start_methods():
        yield None
        return
    with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
        yield pool


def scan(
    samples: SampleSet,
    *,
    workers: int = 2,
    extra: Callable[[Image], Any] | None = None,
    progress: bool = True,
    sink: Callable[[int, Any], None] | None = None,
) -> ScanResult:
    """Decode every sample once and collect the facts the audit needs.

    ``workers`` processes (fork context; 1 = in this process) decode in sample order. ``extra``, when
    given, is applied to each decoded image in the same pass (e.g. ``functools.partial(preprocess,
    spec=spec)``); its outputs land in :attr:`ScanResult.extra`, or, when ``sink`` is given, are handed to
    ``sink(i, output)`` in sample order as they arrive and not kept (so a dataset larger than memory can
    be written to disk while it is decoded). A file that cannot be read is listed with its reason, never
    fatal.
    """
    global _STATE
    n = len(samples)
    t0 = time.perf_counter()
    recs: list[_Record] = []
    _STATE = (samples, extra)
    try:
        # The pool forks here, before the progress bar starts its refresh thread.
        with _pool(n, workers) as pool:
            if pool is None:
                records: Iterator[_Record] = map(_scan_one, range(n))
            else:
                # Chunks amortise IPC but stay small for a smooth progress bar and balanced workers.
                chunk = int(max(1, min(32, n // (workers * 16))))
                records = pool.imap(_scan_one, range(n), chunksize=chunk)
            with reporting.progress("[bold]audit[/] decoding", n, enabled=progress) as bar:
                for i, rec in enumerate(records):
                    if sink is not None:
                        sink(i, rec.extra)
                        rec.extra = None
                    recs.append(rec)
                    bar.advance()
    finally:
        _STATE = None

    sigs = np.zeros((n, SIGNATURE_LEN), dtype=np.float32)
    stats = np.full((n, len(STAT_NAMES)), np.nan, dtype=np.float64)
    for i, rec in enumerate(recs):
        if rec.signature is not None:
            sigs[i] = rec.signature
        if rec.stats is not None:
            stats[i] = rec.stats
    decoded = np.array([r.decoded for r in recs], dtype=bool)
    return ScanResult(
        ok=np.array([r.ok for r in recs], dtype=bool),
        decoded=decoded,
        reasons=[r.reason for r in recs],
        messages=[r.message for r in recs],
        hashes=[r.sha256 for r in recs],
        signatures=sigs,
        constant=decoded & is_constant_signature(sigs),
        shapes=[r.shape for r in recs],
        channels=np.array([r.channels for r in recs], dtype=np.int64),
        formats=[r.format for r in recs],
        modes=[r.mode for r in recs],
        stats=stats,
        extra=[r.extra for r in recs] if extra is not None and sink is None else None,
        seconds=time.perf_counter() - t0,
        cues=[r.cues or {} for r in recs],
    )


# --------------------------------------------------------------------------------------------------
# Leakage
# --------------------------------------------------------------------------------------------------


def train_copy_matches(
    samples: SampleSet,
    scan_result: ScanResult,
    *,
    near_threshold: float = NEAR_THRESHOLD,
    extra_train_hashes: set[str] | None = None,
    extra_train_signatures: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: ``(exact, near, best)`` — exact copy of a training file (same bytes), near copy of a
    training image (correlation >= threshold, direct pair, no chaining), and the best correlation with any
    training image (NaN for train samples and for samples without a usable signature).

    Training references are the ``train`` split plus ``extra_train_hashes`` / ``extra_train_signatures``
    (e.g. stored in a model bundle, for evaluating when the training data is not at hand).
    """
    n = len(samples)
    is_train = np.array([s == "train" for s in samples.splits], dtype=bool)
    train_hashes = {h for h, t in zip(scan_result.hashes, is_train, strict=True) if t and h is not None}
    train_hashes |= set(extra_train_hashes or ())
    exact = np.array(
        [
            not t and h is not None and h in train_hashes
            for h, t in zip(scan_result.hashes, is_train, strict=True)
        ],
        dtype=bool,
    )
    usable = scan_result.decoded & ~scan_result.constant
    ref = scan_result.signatures[is_train & usable]
    if extra_train_signatures is not None and len(extra_train_signatures):
        ref = np.concatenate([ref, np.asarray(extra_train_signatures, dtype=np.float32)])
    query = np.flatnonzero(~is_train & usable)
    best = np.full(n, np.nan, dtype=np.float64)
    if len(ref) and len(query):
        best[query] = nearest(scan_result.signatures[query], ref)[0]
    near = np.nan_to_num(best, nan=-np.inf) >= near_threshold
    return exact, near & ~is_train, best


def train_copy_flags(
    samples: SampleSet,
    scan_result: ScanResult,
    *,
    near_threshold: float = NEAR_THRESHOLD,
    extra_train_hashes: set[str] | None = None,
    extra_train_signatures: np.ndarray | None = None,
) -> np.ndarray:
    """True for each non-train sample that is an exact or near copy of some training sample.

    Use it to keep such samples out of model selection and out of headline test figures; train samples
    are always False.
    """
    exact, near, _ = train_copy_matches(
        samples,
        scan_result,
        near_threshold=near_threshold,
        extra_train_hashes=extra_train_hashes,
        extra_train_signatures=extra_train_signatures,
    )
    return exact | near
