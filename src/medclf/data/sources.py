"""Data sources: turn a folder, a CSV manifest or a MedMNIST ``.npz`` into a :class:`SampleSet`.

Layouts understood (the first that matches wins):

1. ``DATA.npz`` — MedMNIST style (``train_images``, ``train_labels``, ``val_*``, ``test_*``).
2. ``DATA.csv`` or ``DATA/manifest.csv`` — columns ``path,label[,patient_id][,split]``; paths relative to
   the CSV's folder. Any other column is kept as per-sample metadata (``SampleSet.metadata``).
3. ``DATA/`` with split folders (``Training``/``train``, ``Validation``/``val``, ``Testing``/``test``, any
   case), each holding one sub-folder per class.
4. ``DATA/`` with one sub-folder per class; every sample gets ``default_split``.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from medclf.data.samples import SPLITS, TASKS, SampleSet
from medclf.errors import ConfigError, DataError
from medclf.io import read_npz

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}

# The manifest columns medclf itself reads; any other column is kept as metadata.
MANIFEST_COLUMNS = ("path", "label", "patient_id", "split")

# Files that are never images: skipping them keeps audit reports about real problems.
NON_IMAGE_SUFFIXES = {".txt", ".csv", ".json", ".md", ".db", ".ini", ".xml", ".html", ".py", ".yaml", ".yml"}

# MedMNIST v2 label names (INFO in the medmnist package), keyed by the file's stem.
# MedMNIST v2's datasets whose task is "ordinal-regression" (its INFO table).
MEDMNIST_ORDINAL = frozenset({"retinamnist"})
MEDMNIST_CLASSES: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal_or_benign"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature_granulocytes",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "dermamnist": [
        "actinic_keratoses",
        "basal_cell_carcinoma",
        "benign_keratosis",
        "dermatofibroma",
        "melanoma",
        "melanocytic_nevi",
        "vascular_lesions",
    ],
    "octmnist": ["cnv", "dme", "drusen", "normal"],
    "retinamnist": ["grade0", "grade1", "grade2", "grade3", "grade4"],
    "organmnist3d": [
        "liver",
        "kidney_right",
        "kidney_left",
        "femur_right",
        "femur_left",
        "bladder",
        "heart",
        "lung_right",
        "lung_left",
        "spleen",
        "pancreas",
    ],
    "nodulemnist3d": ["benign", "malignant"],
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "fracturemnist3d": ["buckle", "nondisplaced", "displaced"],
    "vesselmnist3d": ["vessel", "aneurysm"],
    "synapsemnist3d": ["inhibitory", "excitatory"],
}


def load_source(path: str | Path, *, default_split: str = "train", task: str | None = None) -> SampleSet:
    """Read a dataset description into a :class:`SampleSet` (no pixels are decoded).

    ``default_split`` is given to samples whose layout names no split: ``"train"`` when the data is for
    training, ``"test"`` when a plain class folder is handed to ``evaluate``. ``task``: ``multiclass`` or
    ``ordinal``; None infers it from the data (:func:`infer_task`).
    """
    samples = _load(path, default_split)
    if task is None:
        task, _ = infer_task(samples)
    return with_task(samples, task)


def infer_task(samples: SampleSet) -> tuple[str, str]:
    """The task the data declare, and why: ``ordinal`` for MedMNIST's ordinal sets (RetinaMNIST) and for
    classes named by consecutive integers from 0 (class folders ``0/ 1/ 2/ ...``, at least 3 of them: grades,
    as Kellgren-Lawrence or retinopathy folders are laid out); ``multiclass`` otherwise."""
    if samples.kind == "npz" and Path(samples.source).stem.lower().split("_")[0] in MEDMNIST_ORDINAL:
        return "ordinal", f"MedMNIST lists {Path(samples.source).stem} as ordinal regression"
    numeric = _integer_names(samples.classes)
    if len(samples.classes) >= 3 and numeric is not None and sorted(numeric) == list(range(len(numeric))):
        return "ordinal", f"classes named 0..{len(samples.classes) - 1}: grades"
    return "multiclass", "classes without an order"


def with_task(samples: SampleSet, task: str) -> SampleSet:
    """``samples`` as data of ``task`` (checked: grades need at least 3 classes, in their numeric order)."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if task == "ordinal":
        if len(samples.classes) < 3:
            raise DataError(f"ordinal grades need at least 3 classes, found {len(samples.classes)}")
        numeric = _integer_names(samples.classes)
        if numeric is not None and numeric != sorted(numeric):  # folders sort "10" before "2"
            order = np.argsort(numeric)
            remap = np.empty(len(order), dtype=np.int64)
            remap[order] = np.arange(len(order))
            labels = np.where(samples.labels >= 0, remap[np.maximum(samples.labels, 0)], -1)
            samples = replace(samples, classes=[samples.classes[i] for i in order], labels=labels)
    return replace(samples, task=task)


def _integer_names(names: list[str]) -> list[int] | None:
    try:
        return [int(n) for n in names]
    except ValueError:
        return None


def _load(path: str | Path, default_split: str) -> SampleSet:
    if default_split not in SPLITS:
        raise ValueError(f"default_split must be one of {SPLITS}")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file():
        with open(p, "rb") as fh:
            head = fh.read(4)
        if head[:2] == b"PK":
            return _from_npz(p)
        if p.suffix.lower() == ".csv" or _looks_like_csv(p):
            return _from_csv(p, default_split)
        raise DataError(f"{p}: a dataset must be a folder, a CSV manifest or a MedMNIST .npz file")
    if (p / "manifest.csv").is_file():
        return _from_csv(p / "manifest.csv", default_split)
    subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_ALIASES]
    if split_dirs:
        return _from_split_folders(p, split_dirs)
    if not subdirs:
        raise DataError(f"{p}: expected one sub-folder per class (or split folders such as train/ and test/)")
    return _from_class_folders(p, {default_split: p}, subdirs)


def _looks_like_csv(p: Path) -> bool:
    try:
        first = p.open("r", encoding="utf-8").readline()
    except (UnicodeDecodeError, OSError):
        return False
    cols = [c.strip().lower() for c in first.split(",")]
    return "path" in cols and "label" in cols


def _list_files(folder: Path) -> list[Path]:
    files = [
        f
        for f in folder.rglob("*")
        # Not only regular files: a FIFO, device or broken link is listed as unreadable (by the guard's
        # specific reason) instead of vanishing from the audit.
        if not f.is_dir()
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
        and f.suffix.lower() not in NON_IMAGE_SUFFIXES
    ]
    return sorted(files)


def _from_class_folders(root: Path, split_roots: dict[str, Path], class_dirs: list[Path]) -> SampleSet:
    classes = sorted({d.name for d in class_dirs})
    refs: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    for split, split_root in split_roots.items():
        for cls in classes:
            cdir = split_root / cls
            if not cdir.is_dir():
                continue
            for f in _list_files(cdir):
                refs.append(str(f))
                labels.append(classes.index(cls))
                splits.append(split)
    if not refs:
        raise DataError(f"{root}: no image files found in the class folders {classes}")
    return SampleSet(
        refs=refs,
        labels=np.array(labels),
        splits=splits,
        patient_ids=[None] * len(refs),
        classes=classes,
        source=str(root),
        kind="folder",
        root=str(root),
    )


def _from_split_folders(root: Path, split_dirs: list[Path]) -> SampleSet:
    split_roots: dict[str, Path] = {}
    for d in split_dirs:
        split = SPLIT_ALIASES[d.name.lower()]
        if split in split_roots:
            raise DataError(
                f"{root}: two folders mean the same split: {split_roots[split].name} and {d.name}"
            )
        split_roots[split] = d
    class_dirs = [
        c for d in split_roots.values() for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")
    ]
    if not class_dirs:
        raise DataError(f"{root}: split folders hold no class sub-folders")
    # Keep the canonical split order so sample order does not depend on folder listing.
    ordered = {s: split_roots[s] for s in SPLITS if s in split_roots}
    return _from_class_folders(root, ordered, class_dirs)


def _from_csv(path: Path, default_split: str) -> SampleSet:
    base = path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "path" not in fields or "label" not in fields:
                raise DataError(f"{path}: a manifest needs the columns path,label[,patient_id][,split]")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text CSV ({exc.reason})") from exc
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    classes = sorted({r["label"] for r in rows if r["label"]})
    refs, labels, splits, pids = [], [], [], []
    extra_columns = [f for f in dict.fromkeys(fields) if f and f not in MANIFEST_COLUMNS]
    metadata: dict[str, list[str]] = {c: [] for c in extra_columns}
    for n, r in enumerate(rows, start=2):
        if not r["path"]:
            raise DataError(f"{path}, line {n}: empty path")
        f = Path(r["path"])
        refs.append(str(f if f.is_absolute() else base / f))
        labels.append(classes.index(r["label"]) if r["label"] else -1)
        raw_split = r.get("split", "").lower()
        if raw_split and raw_split not in SPLIT_ALIASES:
            raise DataError(f"{path}, line {n}: unknown split {r['split']!r} (use train, val or test)")
        splits.append(SPLIT_ALIASES[raw_split] if raw_split else default_split)
        pids.append(r.get("patient_id") or None)
        for c in extra_columns:
            metadata[c].append(r.get(c, ""))
    return SampleSet(
        refs=refs,
        labels=np.array(labels),
        splits=splits,
        patient_ids=pids,
        classes=classes,
        source=str(path),
        kind="csv",
        root=str(base),
        metadata=metadata,
    )


def _from_npz(path: Path) -> SampleSet:
    arrays = read_npz(path)
    images = {s: arrays[f"{s}_images"] for s in SPLITS if f"{s}_images" in arrays}
    if not images:
        raise DataError(f"{path}: a MedMNIST .npz needs train_images/train_labels (and val_*, test_*)")
    refs, labels, splits = [], [], []
    for split, imgs in images.items():
        lab = arrays.get(f"{split}_labels")
        if lab is None or len(lab) != len(imgs):
            raise DataError(f"{path}: {split}_labels is missing or does not match {split}_images")
        lab = np.asarray(lab)
        if lab.ndim == 2 and lab.shape[1] > 1:
            raise DataError(f"{path}: multi-label data ({lab.shape[1]} labels per image) is not supported")
        lab = lab.reshape(-1).astype(np.int64)
        refs += [f"{split}/{i}" for i in range(len(imgs))]
        labels.append(lab)
        splits += [split] * len(imgs)
    all_labels = np.concatenate(labels)
    n_classes = int(all_labels.max()) + 1
    classes = MEDMNIST_CLASSES.get(path.stem.lower().split("_")[0])
    if classes is None or len(classes) != n_classes:
        classes = [str(i) for i in range(n_classes)]
    return SampleSet(
        refs=refs,
        labels=all_labels,
        splits=splits,
        patient_ids=[None] * len(refs),
        classes=classes,
        source=str(path),
        kind="npz",
        arrays=images,
    )


def fingerprint_files(samples: SampleSet, *, include_splits: bool = True) -> str:
    """A cheap identity of the dataset's contents (refs, sizes, mtimes; labels and splits unless told
    otherwise) for cache keys and bundle records."""
    h = hashlib.sha256()
    h.update("\0".join(samples.classes).encode())
    if samples.arrays:
        for split in sorted(samples.arrays):
            arr = np.ascontiguousarray(samples.arrays[split])
            h.update(split.encode())
            h.update(str(arr.shape).encode())
            h.update(hashlib.sha256(arr.tobytes()).digest())
    else:
        for ref in samples.refs:
            try:
                st = Path(ref).stat()
                h.update(f"{ref}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{ref}\0missing\n".encode())
    if include_splits:
        h.update(samples.labels.tobytes())
        h.update("\0".join(samples.splits).encode())
    return h.hexdigest()
