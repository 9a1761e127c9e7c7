"""What a bundle carries about its training images, so that copies of them can be found without the data.

Two files travel in every bundle written by training (and by fusion and export, which carry them on):

- ``train_hashes.json``: the sorted sha256 of every training file (exact copies);
- ``train_signatures.safetensors``: the near-duplicate signature (:func:`medclf.data.signatures.image_signature`)
  of the image behind each of those hashes, in the same order (near copies: re-encoded, resized).

Signatures are stored as int8, one row of :data:`~medclf.data.signatures.SIGNATURE_LEN` bytes per training
image. A signature is a unit vector whose dot products are correlations, and a correlation does not depend
on the vector's scale, so each row is scaled to use the full int8 range and no scale needs to be kept:
reading renormalises the rows to unit length. ``benchmarks/signature_quantisation.py`` measures what the
rounding changes in copy detection on a real dataset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from medclf.errors import BundleError

__all__ = [
    "TRAIN_HASHES",
    "TRAIN_SIGNATURES",
    "TrainReferences",
    "aligned_signatures",
    "dequantise_signatures",
    "pack_signatures",
    "quantise_signatures",
    "read_train_references",
]

TRAIN_HASHES = "train_hashes.json"
TRAIN_SIGNATURES = "train_signatures.safetensors"
_KEY = "signatures_int8"
_FORMAT = "medclf-train-signatures-int8-v1"


def quantise_signatures(signatures: np.ndarray) -> np.ndarray:
    """int8 rows, each scaled so its largest absolute value maps to 127 (all-zero rows stay zero)."""
    s = np.asarray(signatures, dtype=np.float32)
    peak = np.abs(s).max(axis=1, keepdims=True) if len(s) else np.zeros((0, 1), np.float32)
    scale = np.divide(127.0, peak, out=np.zeros_like(peak), where=peak > 0)
    return np.clip(np.rint(s * scale), -127, 127).astype(np.int8)


def dequantise_signatures(q: np.ndarray) -> np.ndarray:
    """float32 unit rows from int8 rows (all-zero rows, i.e. constant images, stay zero)."""
    v = np.asarray(q, dtype=np.float32)
    norm = np.linalg.norm(v, axis=1, keepdims=True) if len(v) else np.zeros((0, 1), np.float32)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def pack_signatures(signatures: np.ndarray) -> bytes:
    """The bytes of ``train_signatures.safetensors`` for float signatures (N, SIGNATURE_LEN)."""
    return save({_KEY: quantise_signatures(signatures)}, metadata={"format": _FORMAT})


def aligned_signatures(
    train_hashes: Sequence[str], sample_hashes: Sequence[str | None], signatures: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """The signature of the first of ``rows`` holding each of ``train_hashes`` (zeros for a hash none holds),
    so row ``i`` of the result belongs to ``train_hashes[i]``."""
    first: dict[str, int] = {}
    for i in np.asarray(rows, dtype=np.int64):
        h = sample_hashes[int(i)]
        if h is not None and h not in first:
            first[h] = int(i)
    out = np.zeros((len(train_hashes), signatures.shape[1]), dtype=np.float32)
    for j, h in enumerate(train_hashes):
        if h in first:
            out[j] = signatures[first[h]]
    return out


@dataclass
class TrainReferences:
    """A bundle's training references: hashes (exact copies) and, when it carries them, signatures."""

    hashes: list[str]
    signatures: np.ndarray | None  # float32 unit rows aligned with ``hashes``, or None (older bundles)

    @property
    def by_hash(self) -> dict[str, np.ndarray]:
        if self.signatures is None:
            return {}
        return dict(zip(self.hashes, self.signatures, strict=True))


def read_train_references(folder: str | Path, files: Mapping[str, str]) -> TrainReferences:
    """Read the training references of the bundle in ``folder`` whose manifest lists ``files``."""
    folder = Path(folder)
    hashes: list[str] = []
    if TRAIN_HASHES in files:
        hashes = list(json.loads((folder / TRAIN_HASHES).read_text(encoding="utf-8")))
    signatures = None
    if TRAIN_SIGNATURES in files:
        try:
            q = load_file(str(folder / TRAIN_SIGNATURES))[_KEY]
        except (SafetensorError, KeyError, OSError) as exc:
            raise BundleError(f"{folder}: {TRAIN_SIGNATURES} cannot be read ({exc})") from exc
        if q.ndim != 2 or len(q) != len(hashes):
            raise BundleError(
                f"{folder}: {TRAIN_SIGNATURES} holds {len(q)} rows for {len(hashes)} training hashes"
            )
        signatures = dequantise_signatures(q)
    return TrainReferences(hashes=hashes, signatures=signatures)
