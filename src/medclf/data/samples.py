"""The table of samples every data source produces."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medclf.io import Image, image_from_array, read_image
from medclf.io.guard import check_file

# The share of the training split carved off for validation when a dataset has no validation split.
DEFAULT_VAL_FRACTION = 0.15

SPLITS = ("train", "val", "test")
# What one label means: one class among K (unordered), or a grade 0..K-1 (ordered: grade 3 is closer to 4
# than to 0), or any number of findings per image (multi-label: ``labels`` is then an (N, K) 0/1 matrix).
TASKS = ("multiclass", "ordinal", "multilabel")


@dataclass
class SampleSet:
    """Labelled samples of one dataset, whatever its layout.

    ``refs`` are file paths, or ``"<split>/<index>"`` for samples held in a ``.npz`` array (then
    ``arrays`` maps the npz split name to its image array). ``labels`` index into ``classes`` (-1 when
    unknown); for ``task="multilabel"`` they are an (N, K) multi-hot matrix over ``classes`` (the findings; a
    row of zeros: no finding; a row of -1: unknown). ``splits`` is one of :data:`SPLITS` per sample. ``patient_ids`` group samples that must never
    be separated by a split (``None`` when the source has no ids). ``metadata`` holds a manifest's other
    columns (site, scanner, sex, ...), one string per sample (``""`` when blank), for subgroup evaluation and
    the shortcut audit.
    """

    refs: list[str]
    labels: np.ndarray
    splits: list[str]
    patient_ids: list[str | None]
    classes: list[str]
    source: str
    kind: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # Paths relative to the dataset root keep fingerprints stable when a dataset moves.
    root: str | None = None
    metadata: dict[str, list[str]] = field(default_factory=dict)
    task: str = "multiclass"  # one of TASKS; ordinal: ``classes`` are the grades in order

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        want_dims = 2 if self.task == "multilabel" else 1
        if self.labels.ndim != want_dims and len(self.labels):
            raise ValueError(
                f"{self.task} labels must have {want_dims} dimension(s), got {self.labels.shape}"
            )
        if self.task == "multilabel":
            self.labels = self.labels.reshape(len(self.labels), len(self.classes))
        n = len(self.refs)
        if not (len(self.labels) == len(self.splits) == len(self.patient_ids) == n):
            raise ValueError("refs, labels, splits and patient_ids must have the same length")
        for column, values in self.metadata.items():
            if len(values) != n:
                raise ValueError(f"metadata column {column!r} has {len(values)} values for {n} samples")

    def __len__(self) -> int:
        return len(self.refs)

    def load(self, i: int) -> Image:
        """Decode sample ``i`` (raises :class:`InputRejected` for a file that cannot be used)."""
        ref = self.refs[i]
        if self.arrays:
            split, index = ref.split("/")
            return image_from_array(self.arrays[split][int(index)], source=f"{self.source}:{ref}")
        return read_image(ref)

    def content_hash(self, i: int) -> str:
        """sha256 of the sample's stored bytes (the file, or the array's raw bytes for ``.npz``)."""
        ref = self.refs[i]
        if self.arrays:
            split, index = ref.split("/")
            arr = np.ascontiguousarray(self.arrays[split][int(index)])
            return hashlib.sha256(arr.tobytes()).hexdigest()
        # The guard's file checks first: opening a FIFO would block forever, a device never end.
        check_file(Path(ref), None)
        h = hashlib.sha256()
        with open(ref, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def display_ref(self, i: int) -> str:
        """The reference as users should see it: relative to the dataset root when possible."""
        ref = self.refs[i]
        if self.root and not self.arrays:
            try:
                return str(Path(ref).relative_to(self.root))
            except ValueError:
                return ref
        return ref

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def subset(self, idx: Sequence[int] | np.ndarray) -> SampleSet:
        idx = [int(i) for i in idx]
        return replace(
            self,
            refs=[self.refs[i] for i in idx],
            labels=self.labels[idx],
            splits=[self.splits[i] for i in idx],
            patient_ids=[self.patient_ids[i] for i in idx],
            metadata={k: [v[i] for i in idx] for k, v in self.metadata.items()},
        )

    def with_splits(self, splits: Sequence[str]) -> SampleSet:
        return replace(self, splits=list(splits))

    @property
    def known(self) -> np.ndarray:
        """(N,) mask of the samples whose label is known."""
        known = (self.labels >= 0).all(axis=1) if self.labels.ndim == 2 else self.labels >= 0
        return np.asarray(known, dtype=bool)

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        """Samples per class (multi-label: images showing each finding)."""
        mask = np.ones(len(self), bool) if split is None else np.array([s == split for s in self.splits])
        if self.labels.ndim == 2:
            counts = self.labels[mask & self.known].sum(axis=0) if len(self) else np.zeros(len(self.classes))
            return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}
        counts = np.bincount(self.labels[mask & (self.labels >= 0)], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def label_set_view(self, no_finding: str = "No Finding") -> SampleSet:
        """Multi-label samples as one class per distinct set of findings (``"Effusion|Nodule"``, or
        ``no_finding`` for the empty set; unknown rows stay -1), for checks that compare classes (duplicates
        with different labels, shift within a class, acquisition shortcuts). Other tasks: ``self``."""
        if self.task != "multilabel":
            return self
        known = self.known
        keys = [
            "|".join(c for c, v in zip(self.classes, row, strict=True) if v) or no_finding
            for row in self.labels
        ]
        names = sorted({k for k, ok in zip(keys, known, strict=True) if ok})
        codes = np.array(
            [names.index(k) if ok else -1 for k, ok in zip(keys, known, strict=True)], dtype=np.int64
        )
        return replace(self, labels=codes, classes=names, task="multiclass")

    def co_occurrence(self, split: str | None = None) -> np.ndarray:
        """(K, K) multi-label images showing both findings i and j (the diagonal: finding i at all)."""
        mask = self.known if split is None else self.known & np.array([s == split for s in self.splits])
        y = self.labels[mask].astype(np.int64)
        return y.T @ y

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts per split and class, for printing and for bundle.json."""
        return {s: self.class_counts(s) for s in SPLITS if s in self.splits}
