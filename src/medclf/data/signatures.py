"""Near-duplicate signatures: what the audit, the cache and evaluation use to find the same picture twice.

An image's signature is a small greyscale thumbnail, centred and scaled to unit length, so the dot product
of two signatures is their Pearson correlation. :func:`nearest` finds each query's best match in a
reference set (copies of training images in val/test); :func:`find_duplicates` groups byte-identical
samples and near copies (re-encoded, resized) whose signatures correlate at or above a threshold. All of it
works in row blocks, so memory stays bounded whatever the dataset size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from medclf.data.samples import SPLITS
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
    for i in np.flatnonzero(comp >= 0).tolist():
        members_of.setdefault(int(comp[i]), []).append(int(i))
    for members in members_of.values():
        if len({hashes[i] for i in members}) > 1:
            groups.append(group(members, "near"))
    groups.sort(key=lambda g: (g.kind != "exact", g.members[0]))
    return groups


def _split_order(s: str) -> tuple[int, str]:
    return (SPLITS.index(s) if s in SPLITS else len(SPLITS), s)
