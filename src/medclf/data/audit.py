"""Dataset audit: one decoding pass, then duplicates, train/test leakage, and a readable report.

:func:`scan` decodes every sample once (optionally computing the preprocessed tensor in the same pass) and
keeps small per-sample facts: content hash, a near-duplicate signature, size, channels, format, intensity
statistics. Everything else works on those facts without decoding again:

- :func:`find_duplicates` groups byte-identical samples (same sha256) and near copies (re-encoded,
  resized) whose signatures correlate at or above a threshold;
- :func:`train_copy_flags` marks every val/test sample that is a copy of a training sample, so model
  selection and headline test figures can leave them out;
- :func:`audit` assembles counts, problems and warnings into an :class:`AuditReport`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from medclf.data.acquisition import header_cues, image_cues_of
from medclf.data.samples import SPLITS, SampleSet
from medclf.data.shift import MIN_PER_SIDE, WARN_AUC, layout_features, split_shift
from medclf.data.shortcuts import check_shortcuts, pixel_cues
from medclf.errors import InputRejected
from medclf.io import Image

SIGNATURE_LEN = 1024
# 2D: 32x32. 3D: 4 slabs x 16x16 in-plane, so 2D and 3D signatures have the same length and one matrix
# product handles a mixed dataset; in-plane detail separates scans better than depth, which is often
# coarse and anisotropic.
SIGNATURE_SHAPE_2D = (32, 32)
SIGNATURE_SHAPE_3D = (4, 16, 16)

# Correlation of signatures at or above which two images count as the same picture. Measured on
# brain-tumor-mri (5,712 Training / 1,311 Testing JPEGs): each Testing image's best correlation with any
# Training image has a clear valley here: 475 test images >= 0.999, 4 in [0.995, 0.999), 19 in
# [0.99, 0.995), 102 in [0.98, 0.99). Side by side, the 4 pairs in [0.995, 0.999) and a sample above are
# the same picture (re-encoded, resized, contrast-changed or sharpened); [0.99, 0.995) mixes heavily
# processed copies with adjacent slices of one patient; below 0.99 pairs are mostly different slices. At 28 px the margin is wide:
# in pneumoniamnist no two different images correlate above 0.979, so no stricter threshold is needed.
NEAR_THRESHOLD = 0.995

STAT_NAMES = ("min", "max", "mean", "std", "p01", "p99")
# Percentiles of huge volumes on a strided subsample: the audit needs ranges, not exact order statistics.
_MAX_STAT_VOXELS = 1 << 22
# Keep one block of the correlation matrix under ~64 MiB of float32, whatever the dataset size.
_BLOCK_ELEMENTS = 1 << 24
# Near-duplicate edges are folded into components once this many accumulate: bounded memory even on
# pathological data where every image resembles every other.
_MAX_PENDING_EDGES = 1 << 22


# --------------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------------


def image_signature(image: Image) -> np.ndarray:
    """A float32 vector of length :data:`SIGNATURE_LEN` whose dot products are Pearson correlations.

    Greyscale (mean over channels), anti-aliased shrink to 32x32 (2D) or area-averaged to 4x16x16 (3D),
    minus its mean, divided by its L2 norm. Re-encoding and resizing barely change it; a constant image
    has no pattern to correlate and gives all zeros (see :func:`is_constant_signature`).
    """
    x = np.nan_to_num(np.asarray(image.pixels, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    grey = torch.from_numpy(np.ascontiguousarray(x.mean(axis=0)))
    if grey.ndim == 3 and grey.shape[0] == 1:
        grey = grey[0]  # a single-slice "volume" is a 2D image
    if grey.ndim == 2:
        small = F.interpolate(
            grey[None, None], size=SIGNATURE_SHAPE_2D, mode="bilinear", antialias=True, align_corners=False
        )
    else:
        # torch has no anti-aliased trilinear mode; adaptive average pooling is a box filter, good enough
        # for a fingerprint and fast.
        small = F.adaptive_avg_pool3d(grey[None, None], SIGNATURE_SHAPE_3D)
    v = small.reshape(-1).double().numpy()
    v = v - v.mean()
    norm = float(np.linalg.norm(v))
    scale = float(np.abs(x).max()) if x.size else 0.0
    # Relative test: a flat image with rounding noise must not become a "pattern" of pure noise.
    if norm <= 1e-6 * max(scale, 1e-12) * np.sqrt(v.size):
        return np.zeros(SIGNATURE_LEN, dtype=np.float32)
    return (v / norm).astype(np.float32)


def is_constant_signature(signatures: np.ndarray) -> np.ndarray:
    """True for signatures of constant images (all zeros), which can never be near duplicates."""
    return ~np.any(np.atleast_2d(signatures) != 0, axis=1)


def nearest(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query signature, the highest correlation with any reference signature and its index.

    Computed in row blocks, so memory stays bounded for any size. Returns ``(-inf, -1)`` when
    ``reference`` is empty.
    """
    q = np.ascontiguousarray(query, dtype=np.float32)
    r = np.ascontiguousarray(reference, dtype=np.float32)
    best = np.full(len(q), -np.inf, dtype=np.float32)
    arg = np.full(len(q), -1, dtype=np.int64)
    if len(q) == 0 or len(r) == 0:
        return best, arg
    block = _block_rows(len(r))
    for start in range(0, len(q), block):
        sims = q[start : start + block] @ r.T
        j = sims.argmax(axis=1)
        arg[start : start + block] = j
        best[start : start + block] = sims[np.arange(len(j)), j]
    return best, arg


def _block_rows(n_cols: int) -> int:
    return int(max(16, min(2048, _BLOCK_ELEMENTS // max(n_cols, 1))))


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
    console = Console(stderr=True)
    show = progress and console.is_terminal and n > 0
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
            with Progress(
                TextColumn("[bold]audit[/] decoding"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                disable=not show,
                transient=True,
            ) as bar:
                task = bar.add_task("scan", total=n)
                for i, rec in enumerate(records):
                    if sink is not None:
                        sink(i, rec.extra)
                        rec.extra = None
                    recs.append(rec)
                    bar.advance(task)
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
# Duplicates
# --------------------------------------------------------------------------------------------------


@dataclass
class DuplicateGroup:
    """Samples that hold the same picture. ``kind`` is ``"exact"`` (same bytes) or ``"near"`` (signatures
    correlate at or above the threshold, through a chain of such pairs; at least two different files)."""

    members: list[int]
    kind: str
    splits: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    @property
    def crosses_splits(self) -> bool:
        return len(self.splits) > 1

    @property
    def label_conflict(self) -> bool:
        return len({lab for lab in self.labels if lab >= 0}) > 1


def near_components(signatures: np.ndarray, eligible: np.ndarray, threshold: float) -> np.ndarray:
    """Connected components of the graph "correlation >= threshold" over the ``eligible`` rows.

    Returns one component label per row (-1 for ineligible rows). Row blocks of the upper triangle are
    multiplied one at a time and folded into the components, so neither an N x N matrix nor an unbounded
    edge list is ever held.
    """
    n_all = len(signatures)
    idx = np.flatnonzero(eligible)
    labels_all = np.full(n_all, -1, dtype=np.int64)
    n = len(idx)
    if n == 0:
        return labels_all
    x = np.ascontiguousarray(signatures[idx], dtype=np.float32)
    comp = np.arange(n)
    pending_r: list[np.ndarray] = []
    pending_c: list[np.ndarray] = []
    pending = 0

    def fold() -> np.ndarray:
        # Previous components enter as a star (each node -> its component's first node), at most n edges;
        # labels from connected_components are 0..k-1, so first[comp] is each node's representative.
        _, first = np.unique(comp, return_index=True)
        rows = np.concatenate([*pending_r, np.arange(n)])
        cols = np.concatenate([*pending_c, first[comp]])
        graph = sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
        return connected_components(graph, directed=False)[1]

    block = _block_rows(n)
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = x[start:stop] @ x[start:].T
        r, c = np.nonzero(sims >= threshold)
        r = r + start
        c = c + start
        upper = c > r
        if upper.any():
            pending_r.append(r[upper])
            pending_c.append(c[upper])
            pending += int(upper.sum())
        if pending > _MAX_PENDING_EDGES:
            comp = fold()
            pending_r, pending_c, pending = [], [], 0
    if pending:
        comp = fold()
    labels_all[idx] = comp
    return labels_all


def find_duplicates(
    hashes: Sequence[str | None],
    signatures: np.ndarray,
    ok: np.ndarray,
    *,
    near_threshold: float = NEAR_THRESHOLD,
    splits: Sequence[str] | None = None,
    labels: np.ndarray | Sequence[int] | None = None,
) -> list[DuplicateGroup]:
    """Exact groups (same sha256; any sample with a hash) and near groups (decoded, non-constant samples
    linked by correlation >= ``near_threshold``; reported only when they hold at least two different
    files). ``splits``/``labels`` fill in :attr:`DuplicateGroup.splits` and ``labels``."""
    n = len(hashes)
    spl = list(splits) if splits is not None else [""] * n
    lab = np.asarray(labels if labels is not None else np.full(n, -1), dtype=np.int64)

    def group(members: list[int], kind: str) -> DuplicateGroup:
        return DuplicateGroup(
            members=members,
            kind=kind,
            splits=sorted({spl[i] for i in members}, key=_split_order),
            labels=sorted({int(lab[i]) for i in members}),
        )

    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h is not None:
            by_hash.setdefault(h, []).append(i)
    groups = [group(m, "exact") for m in by_hash.values() if len(m) > 1]

    eligible = np.asarray(ok, dtype=bool) & ~is_constant_signature(signatures)
    comp = near_components(signatures, eligible, near_threshold)
    members_of: dict[int, list[int]] = {}
    for i in np.flatnonzero(comp >= 0):
        members_of.setdefault(int(comp[i]), []).append(int(i))
    for members in members_of.values():
        if len({hashes[i] for i in members}) > 1:
            groups.append(group(members, "near"))
    groups.sort(key=lambda g: (g.kind != "exact", g.members[0]))
    return groups


def _split_order(s: str) -> tuple[int, str]:
    return (SPLITS.index(s) if s in SPLITS else len(SPLITS), s)


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


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

# Thresholds for warnings: a ratio above which class imbalance deserves attention, and how much sizes
# may vary before resizing to one input size distorts some images heavily.
_IMBALANCE_WARN = 3.0
_SIZE_SPREAD_WARN = 4.0


@dataclass
class AuditReport:
    """What :func:`audit` found. :meth:`to_dict` is JSON-ready; :meth:`render` prints it."""

    data: dict[str, Any]
    scan: ScanResult = field(repr=False)
    train_copies: np.ndarray = field(repr=False)
    groups: list[DuplicateGroup] = field(repr=False, default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return list(self.data["warnings"])

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.data))

    def write_json(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")
        return p

    def render(self, console: Console | None = None, *, max_warnings: int = 12) -> None:
        """Print the counts per class and split, an issues summary and the warnings."""
        console = console or Console()
        d = self.data
        splits = list(d["counts"])
        t = Table(title=f"Samples per class and split — {escape(d['source'])}", title_justify="left")
        t.add_column("class")
        for s in splits:
            t.add_column(s, justify="right")
        t.add_column("total", justify="right")
        classes = d["classes"]
        for c in classes:
            row = [d["counts"][s].get(c, 0) for s in splits]
            t.add_row(escape(c), *map(str, row), str(sum(row)))
        totals = [sum(d["counts"][s].values()) for s in splits]
        t.add_row("[bold]total[/]", *map(str, totals), str(sum(totals)), end_section=True)
        t.add_row(
            "imbalance (max/min)",
            *[_fmt_ratio(d["imbalance_ratio"].get(s)) for s in splits],
            "",
        )
        console.print(t)

        dup = d["duplicates"]
        copies = d["train_copies"]
        it = Table(title="Issues", title_justify="left")
        it.add_column("check")
        it.add_column("found", justify="right")
        it.add_column("detail")
        it.add_row("unreadable files", str(len(d["unreadable"])), _top_reasons(d["unreadable"]))
        it.add_row(
            "exact duplicate groups",
            str(dup["exact_groups"]),
            f"{dup['exact_cross_split_groups']} cross splits; {dup['exact_redundant_files']} redundant files",
        )
        it.add_row(
            "near duplicate groups",
            str(dup["near_groups"]),
            f"{dup['near_cross_split_groups']} cross splits (correlation >= {d['near_threshold']})",
        )
        for s, c in copies["per_split"].items():
            it.add_row(
                f"{s} copies of train",
                str(c["total"]),
                f"{c['exact']} exact + {c['near_only']} near, of {c['of']} ({_pct(c['total'], c['of'])})",
            )
        what = "different sets of findings" if d.get("task") == "multilabel" else "different classes"
        it.add_row("label conflicts", str(len(d["label_conflicts"])), f"same picture, {what}")
        it.add_row("constant images", str(d["constant_images"]), "no content to learn from")
        shift = d.get("split_shift")
        if shift and shift["results"]:
            worst = max(shift["results"], key=lambda r: r["auc"])
            it.add_row(
                "split shift (class-wise)",
                str(sum(r["shifted"] for r in shift["results"])),
                f"of {len(shift['results'])} split/class pairs tell apart from train (AUC >= "
                f"{shift['warn_auc']}, higher on small sets); highest {worst['auc']:.2f} "
                f"({escape(worst['split'])}, {escape(worst['cls'])})",
            )
        if d["patients"]["with_ids"]:
            it.add_row("patients in several splits", str(d["patients"]["crossing_splits"]), "")
        console.print(it)
        f = d.get("findings")
        if f:
            by_n = ", ".join(f"{k}: {v}" for k, v in f["images_by_number_of_findings"].items())
            top = "; ".join(f"{escape(' + '.join(p['findings']))} {p['images']}" for p in f["top_pairs"][:5])
            console.print(f"[bold]findings per image[/] {by_n}   [bold]most frequent pairs[/] {top or '-'}")

        sizes = "; ".join(
            f"{k}: per axis min {_fmt_size(v['min'])}, median {_fmt_size(v['median'])}, max "
            f"{_fmt_size(v['max'])}; most common {_fmt_size(v['most_common'][0]['size'])} "
            f"({v['most_common'][0]['count']})"
            for k, v in d["sizes"].items()
        )
        console.print(f"[bold]sizes[/] {sizes or '-'}")
        console.print(
            "[bold]channels[/] "
            + escape(_fmt_counts(d["channels"]))
            + "   [bold]formats[/] "
            + escape(_fmt_counts(d["formats"]))
            + "   [bold]modes[/] "
            + escape(_fmt_counts(d["modes"]))
        )
        _render_shortcuts(console, d.get("shortcuts"))
        console.print(f"[dim]scanned {d['n_samples']} samples in {d['scan_seconds']:.1f} s[/]")
        if d["warnings"]:
            console.print("[bold yellow]Warnings[/]")
            for w in d["warnings"][:max_warnings]:
                console.print(f"  [yellow]![/] {escape(w)}")
            if len(d["warnings"]) > max_warnings:
                console.print(f"  ... and {len(d['warnings']) - max_warnings} more (see the JSON report)")
        else:
            console.print("[green]No warnings.[/]")


def _render_shortcuts(console: Console, sc: dict[str, Any] | None) -> None:
    """The shortcut check as a table: per class, the cue-only AUC and the cues that carry it."""
    if not sc or not sc.get("checked") or not sc.get("per_class"):
        return
    from medclf.data.shortcuts import cue_words

    t = Table(
        title=f"Shortcut check — can acquisition cues alone predict the class? (flag: AUC >= "
        f"{sc['threshold']}, lower bound >= {sc.get('lower_bound', '-')})",
        title_justify="left",
    )
    t.add_column("class")
    t.add_column("cue-only AUC (95% CI)", justify="right")
    t.add_column("intensity style AUC", justify="right")
    t.add_column("cues")
    for cls, c in sc["per_class"].items():
        if c["auc"] is None:
            t.add_row(escape(cls), "-", "-", f"too few samples ({c['n']})")
            continue
        ci = c.get("ci") or [float("nan"), float("nan")]
        mark = "[bold red]" if c["flagged"] else ""
        t.add_row(
            escape(cls),
            f"{mark}{c['auc']:.2f} ({ci[0]:.2f}-{ci[1]:.2f})",
            "-" if c.get("style_auc") is None else f"{c['style_auc']:.2f}",
            escape(", ".join(f"{cue_words(k)} {c['cue_aucs'][k]:.2f}" for k in c["cues"][:3]) or "-"),
        )
    console.print(t)


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def _fmt_counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items()) or "-"


def _fmt_size(size: list[float]) -> str:
    return "x".join(str(int(v)) if float(v).is_integer() else f"{v:.1f}" for v in size)


def _top_reasons(unreadable: list[dict[str, str]]) -> str:
    counts = Counter(u["reason"] for u in unreadable)
    return ", ".join(f"{r} {n}" for r, n in counts.most_common(4))


def audit(
    samples: SampleSet,
    *,
    scan_result: ScanResult | None = None,
    near_threshold: float = NEAR_THRESHOLD,
    workers: int = 2,
    progress: bool = True,
    check_shift: bool = True,
    check_shortcut: bool = True,
) -> AuditReport:
    """Audit ``samples`` (scanning them unless ``scan_result`` from :func:`scan` is given).

    Warnings come most serious first: leakage into val/test, label conflicts, unusable files, patient
    leakage, then duplicates within splits, distribution shift between splits, balance and heterogeneity.
    ``check_shift``: also ask whether each val/test class can be told apart from the same class in train
    (:mod:`medclf.data.shift`; a few seconds per class on large sets). ``check_shortcut``: also ask how
    well acquisition cues alone predict each class (:mod:`medclf.data.shortcuts`).
    """
    sr = scan_result if scan_result is not None else scan(samples, workers=workers, progress=progress)
    if len(sr) != len(samples):
        raise ValueError(f"scan_result has {len(sr)} samples, the sample set {len(samples)}")
    findings = _findings_summary(samples) if samples.task == "multilabel" else None
    counted = samples
    # Multi-label: duplicates, shift and shortcuts compare sets of findings (a conflict is the same picture
    # with two different sets); the counts above stay per finding.
    samples = samples.label_set_view()
    n = len(samples)
    splits = [s for s in SPLITS if s in samples.splits]
    refs = [samples.display_ref(i) for i in range(n)]
    warn: list[tuple[int, str]] = []  # (priority, text): lower is more serious

    # Counts and balance (per finding for multi-label data)
    counts = {s: counted.class_counts(s) for s in splits}
    imbalance: dict[str, float | None] = {}
    for s in splits:
        present = [v for v in counts[s].values() if v > 0]
        missing = [c for c, v in counts[s].items() if v == 0]
        ratio = round(max(present) / min(present), 3) if present and not missing else None
        imbalance[s] = ratio
        if missing and present:
            warn.append((5, f"{s}: no samples of class {', '.join(missing)}"))
        elif ratio is not None and ratio > _IMBALANCE_WARN:
            warn.append(
                (
                    6,
                    f"{s}: classes are imbalanced (largest/smallest = {ratio:.1f}); report balanced accuracy "
                    "and per-class recall, not only accuracy",
                )
            )
    unlabelled = int((~samples.known).sum())
    if unlabelled:
        warn.append((5, f"{_n(unlabelled, 'sample')} without a label"))

    # Unusable files
    unreadable = [
        {
            "ref": refs[i],
            "split": samples.splits[i],
            "reason": sr.reasons[i] or "",
            "message": sr.messages[i] or "",
        }
        for i in sr.failed()
    ]
    if unreadable:
        warn.append(
            (
                2,
                f"{_n(len(unreadable), 'file')} cannot be used ({_top_reasons(unreadable)}); they are skipped",
            )
        )
    bugs = sum(u["reason"] in ("reader_error", "scan_error") for u in unreadable)
    if bugs:
        warn.append((2, f"{_n(bugs, 'file')} hit an internal reader error: please report this as a bug"))

    # Duplicates
    groups = find_duplicates(
        sr.hashes,
        sr.signatures,
        sr.decoded,
        near_threshold=near_threshold,
        splits=samples.splits,
        labels=samples.labels,
    )
    exact = [g for g in groups if g.kind == "exact"]
    near = [g for g in groups if g.kind == "near"]

    def gdict(g: DuplicateGroup) -> dict[str, Any]:
        return {
            "kind": g.kind,
            "refs": [refs[i] for i in g.members],
            "splits": g.splits,
            "classes": [_class_name(samples, lab) for lab in g.labels],
            "crosses_splits": g.crosses_splits,
            "label_conflict": g.label_conflict,
        }

    exact_cross = sum(g.crosses_splits for g in exact)
    near_cross = sum(g.crosses_splits for g in near)
    redundant = sum(len(g.members) - 1 for g in exact)
    if exact:
        copies_txt = _n(redundant, "redundant copy", "redundant copies")
        warn.append(
            (
                4,
                f"{_n(len(exact), 'group')} of byte-identical files ({copies_txt}), {exact_cross} of them across splits",
            )
        )
    if near:
        warn.append(
            (
                4,
                f"{_n(len(near), 'group')} of near-identical images (re-encoded, resized or retouched copies, "
                f"correlation >= {near_threshold}), {near_cross} of them across splits",
            )
        )

    # Leakage into val/test: per sample, direct match with the training split.
    ex, nr, _ = train_copy_matches(samples, sr, near_threshold=near_threshold)
    copies = ex | nr
    per_split: dict[str, dict[str, int]] = {}
    for s in splits:
        if s == "train":
            continue
        m = np.array([x == s for x in samples.splits], dtype=bool)
        c = {
            "of": int(m.sum()),
            "exact": int((ex & m).sum()),
            "near_only": int((nr & ~ex & m).sum()),
            "total": int((copies & m).sum()),
        }
        per_split[s] = c
        if c["total"]:
            warn.append(
                (
                    0,
                    f"{c['total']} of {c['of']} {s} samples are copies of training samples ({c['exact']} exact, "
                    f"{c['near_only']} near): they inflate {s} scores; keep them out of model selection and "
                    "headline figures",
                )
            )

    conflicts = [gdict(g) for g in groups if g.label_conflict]
    if conflicts:
        warn.append(
            (
                1,
                f"{_n(len(conflicts), 'duplicate group')} with different labels for the same picture (label noise)",
            )
        )

    patients = _patient_summary(samples)
    if patients["crossing_splits"]:
        warn.append(
            (
                3,
                f"{_n(patients['crossing_splits'], 'patient')} with samples in more than one split (patient leakage)",
            )
        )

    shift = _split_shift_summary(samples, sr, copies, warn, progress) if check_shift else None
    shortcuts = _shortcut_summary(samples, sr, copies, warn) if check_shortcut else None

    dec = np.flatnonzero(sr.decoded)
    sizes = _size_summary([shape for i in dec if (shape := sr.shapes[i]) is not None], warn)
    channels = {str(k): v for k, v in sorted(Counter(int(sr.channels[i]) for i in dec).items())}
    if len(channels) > 1:
        warn.append(
            (
                7,
                f"mixed channel counts ({_fmt_counts(channels)}): all images are converted to the model's channels",
            )
        )
    formats = dict(Counter(sr.formats[i] or "?" for i in dec).most_common())
    modes = dict(Counter(sr.modes[i] or "?" for i in dec).most_common())
    n_constant = int(sr.constant.sum())
    if n_constant:
        warn.append((5, f"{_n(n_constant, 'constant image')} (a single value everywhere): check them"))
    intensity = _intensity_summary(sr.stats[dec], warn)

    data: dict[str, Any] = {
        "source": samples.source,
        "kind": samples.kind,
        "n_samples": n,
        "classes": list(counted.classes),
        "task": counted.task,
        "findings": findings,
        "splits": splits,
        "counts": counts,
        "imbalance_ratio": imbalance,
        "unreadable": unreadable,
        "near_threshold": near_threshold,
        "duplicates": {
            "exact_groups": len(exact),
            "exact_cross_split_groups": exact_cross,
            "exact_redundant_files": redundant,
            "near_groups": len(near),
            "near_cross_split_groups": near_cross,
            "exact": [gdict(g) for g in exact],
            "near": [gdict(g) for g in near],
        },
        "train_copies": {"per_split": per_split, "refs": [refs[i] for i in np.flatnonzero(copies)]},
        "label_conflicts": conflicts,
        "patients": patients,
        "sizes": sizes,
        "channels": channels,
        "formats": formats,
        "modes": modes,
        "constant_images": n_constant,
        "intensity": intensity,
        "split_shift": shift,
        "shortcuts": shortcuts,
        "scan_seconds": round(sr.seconds, 3),
        "warnings": [text for _, text in sorted(warn, key=lambda w: w[0])],
    }
    return AuditReport(data=data, scan=sr, train_copies=copies, groups=groups)


def _split_shift_summary(
    samples: SampleSet,
    sr: ScanResult,
    copies: np.ndarray,
    warn: list[tuple[int, str]],
    progress: bool = False,
) -> dict[str, Any]:
    is_3d = np.array([s is not None and len(s) == 3 and s[0] > 1 for s in sr.shapes], dtype=bool)
    usable = sr.decoded & ~sr.constant & ~copies
    found = split_shift(
        layout_features(sr.signatures, is_3d),
        samples.splits,
        samples.labels,
        usable,
        samples.classes,
        progress=progress,
    )
    for r in found:
        if r.shifted:
            warn.append(
                (
                    5,
                    f"{r.split} differs from train within class {r.cls}: a classifier tells them apart "
                    f"(AUC {r.auc:.2f}, {r.n_per_side} images each); scores on {r.split} measure another "
                    "distribution than training, and validation may not show it",
                )
            )
    return {"warn_auc": WARN_AUC, "min_per_side": MIN_PER_SIDE, "results": [r.to_dict() for r in found]}


def _shortcut_summary(
    samples: SampleSet, sr: ScanResult, copies: np.ndarray, warn: list[tuple[int, str]]
) -> dict[str, Any] | None:
    """The shortcut check on every usable labelled sample (copies of training images left out: a copy
    adds no new acquisition)."""
    if sr.cues is None:
        return None
    usable = np.flatnonzero(sr.decoded & ~copies)
    report = check_shortcuts(samples, sr.cues, indices=usable)
    for text in report.warnings():
        warn.append((1, text))
    return report.to_manifest()


def _findings_summary(samples: SampleSet) -> dict[str, Any]:
    """Multi-label data: images per number of findings, the co-occurrence of findings (images showing both,
    per pair, overall and per split) and the most frequent pairs."""
    known = samples.known
    per_image = samples.labels[known].sum(axis=1)
    both = samples.co_occurrence()
    names = samples.classes
    pairs = [
        {"findings": [names[i], names[j]], "images": int(both[i, j])}
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if both[i, j]
    ]
    pairs.sort(key=lambda p: -p["images"])
    return {
        "no_finding": int((per_image == 0).sum()),
        "images_by_number_of_findings": {
            str(k): int(v) for k, v in sorted(Counter(per_image.tolist()).items())
        },
        "co_occurrence": {"labels": list(names), "images": both.tolist()},
        "co_occurrence_per_split": {
            s: samples.co_occurrence(s).tolist() for s in SPLITS if s in samples.splits
        },
        "top_pairs": pairs[:10],
    }


def _patient_summary(samples: SampleSet) -> dict[str, Any]:
    where: dict[str, set[str]] = {}
    for p, s in zip(samples.patient_ids, samples.splits, strict=True):
        if p is not None:
            where.setdefault(p, set()).add(s)
    crossing = sorted(p for p, ss in where.items() if len(ss) > 1)
    return {
        "with_ids": sum(p is not None for p in samples.patient_ids),
        "n_patients": len(where),
        "crossing_splits": len(crossing),
        "crossing_examples": crossing[:20],
    }


def _size_summary(shapes: list[tuple[int, ...]], warn: list[tuple[int, str]]) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for nd in sorted({len(s) for s in shapes}):
        arr = np.array([s for s in shapes if len(s) == nd])
        common = Counter(map(tuple, arr.tolist())).most_common(5)
        sizes[f"{nd}d"] = {
            "count": len(arr),
            "min": arr.min(axis=0).tolist(),
            "median": np.median(arr, axis=0).tolist(),
            "max": arr.max(axis=0).tolist(),
            "most_common": [{"size": list(s), "count": c} for s, c in common],
        }
        side_min, side_max = int(arr.min()), int(arr.max())
        if side_min > 0 and side_max / side_min > _SIZE_SPREAD_WARN:
            warn.append(
                (
                    7,
                    f"image sizes vary widely ({side_min} to {side_max} px per side): small images are upsampled "
                    "and large ones shrunk to the model's input size",
                )
            )
    if len(sizes) > 1:
        mix = ", ".join(f"{k} {v['count']}" for k, v in sizes.items())
        warn.append((5, f"mixed 2D images and 3D volumes: {mix}"))
    return sizes


def _intensity_summary(stats: np.ndarray, warn: list[tuple[int, str]]) -> dict[str, Any]:
    """min/median/max over samples of each per-sample statistic; warns when scales differ wildly."""
    out: dict[str, Any] = {}
    for k, name in enumerate(STAT_NAMES):
        col = stats[:, k][np.isfinite(stats[:, k])] if len(stats) else np.empty(0)
        if len(col):
            out[name] = {"min": float(col.min()), "median": float(np.median(col)), "max": float(col.max())}
    if len(stats):
        p99 = stats[:, STAT_NAMES.index("p99")]
        p99 = p99[np.isfinite(p99) & (p99 > 0)]
        if len(p99) >= 2:
            lo, hi = np.percentile(p99, [5, 95])
            # Two orders of magnitude between typical images: mixed modalities or units (0-1 vs 0-255).
            if lo > 0 and hi / lo > 100:
                warn.append(
                    (
                        7,
                        f"intensity scales differ widely (99th percentile {lo:.3g} to {hi:.3g} across images): "
                        "files may mix modalities or scalings",
                    )
                )
    return out


def _class_name(samples: SampleSet, label: int) -> str:
    return samples.classes[label] if 0 <= label < len(samples.classes) else "?"
