"""The evaluation protocol that single-label and multi-label evaluation share: which samples of a split are
scored (the headline leaves out copies of training samples; ``all_samples`` keeps them), how metrics.json
records that, and where the outputs go."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclf.errors import DataError

__all__ = [
    "COPIES_KEPT",
    "PROTOCOL",
    "SplitRows",
    "output_folder",
    "protocol_fields",
    "split_rows",
    "write_metrics",
]

PROTOCOL = (
    "Headline metrics use the split minus every sample that is an exact or near copy (re-encoded or "
    "resized) of a training sample; 'all_samples' holds the same metrics on the whole split."
)
COPIES_KEPT = "all samples of the split (copies kept)"


@dataclass(frozen=True)
class SplitRows:
    """The rows (sample indices) of one split that an evaluation scores."""

    idx: np.ndarray  # every sample of the split
    usable: np.ndarray  # readable, labelled and predicted: what ``all_samples`` scores
    clean: np.ndarray  # the headline: ``usable`` minus copies of training samples (unless they are kept)
    copies: np.ndarray  # per sample (mask): a copy of a training sample, within the split
    n_removed: int  # usable copies left out of the headline


def split_rows(
    splits: Sequence[str],
    split: str,
    scorable: np.ndarray,
    probs: np.ndarray,
    train_copy: np.ndarray,
    include_train_copies: bool,
) -> SplitRows:
    """The rows of ``split`` to score. ``scorable``, ``train_copy``: per sample masks (readable with a known
    label; a copy of a training sample); ``probs``: one row per sample, NaN where not predicted."""
    in_split = np.array([s == split for s in splits])
    idx = np.flatnonzero(in_split)
    usable = idx[scorable[idx] & ~np.isnan(probs[idx]).any(axis=1)]
    copies = train_copy & in_split
    clean = usable if include_train_copies else usable[~copies[usable]]
    if len(clean) == 0:
        raise DataError(f"no usable samples in split {split!r} after removing unreadable files and copies")
    n_removed = 0 if include_train_copies else int(copies[usable].sum())
    return SplitRows(idx=idx, usable=usable, clean=clean, copies=copies, n_removed=n_removed)


def protocol_fields(rows: SplitRows, ok: np.ndarray, include_train_copies: bool) -> dict[str, Any]:
    """What metrics.json says about the samples left out of the headline, and why."""
    return {
        "n_removed_duplicates": rows.n_removed,
        "n_train_copies_in_split": int(rows.copies[rows.idx].sum()),
        "n_unreadable": int((~ok[rows.idx]).sum()),
        "protocol": PROTOCOL if not include_train_copies else COPIES_KEPT,
    }


def output_folder(out: str | Path) -> Path:
    """The evaluation's output folder, created when missing."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_metrics(out: Path, metrics: dict[str, Any]) -> Path:
    """``metrics.json`` in ``out``."""
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    return path
