"""Data sources: turn a folder, a CSV manifest or a MedMNIST ``.npz`` into a :class:`SampleSet`.

Layouts understood (the first that matches wins):

1. ``DATA.npz`` — MedMNIST style (``train_images``, ``train_labels``, ``val_*``, ``test_*``).
2. ``DATA.csv`` or ``DATA/manifest.csv`` — columns ``path,label[,patient_id][,split]``; paths relative to
   the CSV's folder (or its ``images/`` sub-folder when they are not found there). Any other column is kept
   as per-sample metadata (``SampleSet.metadata``). Other column names, a label separator (multi-label
   findings such as ``Effusion|Atelectasis``), the name of the "no finding" label and a separate split file
   are given by :class:`ManifestOptions`; NIH ChestX-ray14's ``Data_Entry_2017.csv`` columns (``Image Index``,
   ``Finding Labels``, ``Patient ID``) are recognised without options.
3. ``DATA/`` with split folders (``Training``/``train``, ``Validation``/``val``, ``Testing``/``test``, any
   case), each holding one sub-folder per class.
4. ``DATA/`` with one sub-folder per class; every sample gets ``default_split``.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

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

# Column names recognised when a manifest has no ``path``/``label``/``patient_id`` column (NIH ChestX-ray14's
# Data_Entry_2017.csv, CheXpert-style exports), lower case.
PATH_ALIASES = ("image index", "image", "filename", "file")
LABEL_ALIASES = ("finding labels", "findings", "labels")
PATIENT_ALIASES = ("patient id", "patient", "subject_id", "patientid")
# Separators between findings that a multi-label cell may use: ``|`` is recognised without being told.
AUTO_SEPARATOR = "|"
KNOWN_SEPARATORS = ("|", ";", ",")
NO_FINDING = "No Finding"


@dataclass(frozen=True)
class ManifestOptions:
    """How to read a CSV manifest whose columns are not medclf's own names.

    ``label_separator``: findings in one cell are joined by it (multi-label; ``|`` is recognised without it).
    ``no_finding``: the label meaning "none of the findings" (an empty set, not a class of its own), compared
    without regard to case. ``split_file``: a CSV of ``<image>,split`` rows (NIH's ``splits.csv``) naming each
    image's split by the manifest's path column value."""

    path_column: str | None = None
    label_column: str | None = None
    patient_column: str | None = None
    label_separator: str | None = None
    no_finding: str = NO_FINDING
    split_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in asdict(self).items()
            if v is not None and not (k == "no_finding" and v == NO_FINDING)
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ManifestOptions:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown manifest option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


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
    # Multi-label (14 findings, ChestX-ray14's order).
    "chestmnist": [
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural_thickening",
        "hernia",
    ],
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


def load_source(
    path: str | Path,
    *,
    default_split: str = "train",
    task: str | None = None,
    manifest: ManifestOptions | dict[str, Any] | None = None,
    labelled: bool = True,
) -> SampleSet:
    """Read a dataset description into a :class:`SampleSet` (no pixels are decoded).

    ``default_split`` is given to samples whose layout names no split: ``"train"`` when the data is for
    training, ``"test"`` when a plain class folder is handed to ``evaluate``. ``task``: ``multiclass``,
    ``ordinal`` or ``multilabel``; None infers it from the data (:func:`infer_task`). ``manifest``: how to
    read a CSV manifest (:class:`ManifestOptions`). ``labelled=False`` (pretraining): a CSV manifest may
    leave out the label column; its images are then unlabelled.
    """
    options = manifest if isinstance(manifest, ManifestOptions) else ManifestOptions.from_dict(manifest)
    samples = _load(path, default_split, options, task, labelled)
    if task is None:
        task, _ = infer_task(samples)
    return with_task(samples, task)


def infer_task(samples: SampleSet) -> tuple[str, str]:
    """The task the data declare, and why: ``ordinal`` for MedMNIST's ordinal sets (RetinaMNIST) and for
    classes named by consecutive integers from 0 (class folders ``0/ 1/ 2/ ...``, at least 3 of them: grades,
    as Kellgren-Lawrence or retinopathy folders are laid out); ``multilabel`` for multi-hot labels (a 2-D
    label array in an ``.npz``, as ChestMNIST; findings joined by a separator in a CSV); ``multiclass``
    otherwise."""
    if samples.task == "multilabel":
        return "multilabel", "several findings per image (multi-hot labels)"
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
    if (task == "multilabel") != (samples.task == "multilabel"):
        if samples.task == "multilabel":
            raise DataError(f"{samples.source}: the labels are multi-label findings; they cannot be {task}")
        raise DataError(
            f"{samples.source}: --task multilabel needs several findings per image (a 2-D label array, or a "
            "CSV label column with findings joined by a separator, e.g. --label-separator '|')"
        )
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


def _load(
    path: str | Path, default_split: str, options: ManifestOptions, task: str | None, labelled: bool = True
) -> SampleSet:
    if default_split not in SPLITS:
        raise ValueError(f"default_split must be one of {SPLITS}")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    is_csv = (p.is_file() and (p.suffix.lower() == ".csv" or _looks_like_csv(p))) or (
        p / "manifest.csv"
    ).is_file()
    if options != ManifestOptions() and not is_csv:
        raise ConfigError(
            f"{p}: manifest options (--label-column, --split-file, ...) apply to CSV manifests only"
        )
    if p.is_file():
        with open(p, "rb") as fh:
            head = fh.read(4)
        if head[:2] == b"PK":
            return _from_npz(p)
        if p.suffix.lower() == ".csv" or _looks_like_csv(p):
            return _from_csv(p, default_split, options, task, labelled)
        raise DataError(f"{p}: a dataset must be a folder, a CSV manifest or a MedMNIST .npz file")
    if (p / "manifest.csv").is_file():
        return _from_csv(p / "manifest.csv", default_split, options, task, labelled)
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


def _from_csv(
    path: Path, default_split: str, options: ManifestOptions, task: str | None, labelled: bool = True
) -> SampleSet:
    base = path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or []) if f]
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text CSV ({exc.reason})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from exc
    path_col = _column(path, fields, options.path_column, "path", PATH_ALIASES, "--path-column")
    label_col = _column(path, fields, options.label_column, "label", LABEL_ALIASES, "--label-column")
    patient_col = _column(
        path, fields, options.patient_column, "patient_id", PATIENT_ALIASES, "--patient-column"
    )
    if path_col is None or (label_col is None and labelled):
        raise DataError(f"{path}: a manifest needs the columns path,label[,patient_id][,split]")
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    raw = [r[label_col] if label_col else "" for r in rows]
    if labelled and not any(raw):
        raise DataError(f"{path}: the label column {label_col!r} is empty in every row")
    separator = _label_separator(path, raw, options.label_separator, task)
    split_of = _read_split_file(path, options.split_file, [r[path_col] for r in rows])
    own = {path_col, label_col, patient_col, "split"}
    extra_columns = [f for f in dict.fromkeys(fields) if f and f not in own]
    image_base = _image_base(base, [r[path_col] for r in rows])
    refs, splits, pids = [], [], []
    metadata: dict[str, list[str]] = {c: [] for c in extra_columns}
    for n, r in enumerate(rows, start=2):
        if not r[path_col]:
            raise DataError(f"{path}, line {n}: empty path")
        f = Path(r[path_col])
        refs.append(str(f if f.is_absolute() else image_base / f))
        raw_split = split_of.get(r[path_col], "") if split_of else r.get("split", "").lower()
        if raw_split and raw_split not in SPLIT_ALIASES:
            raise DataError(f"{path}, line {n}: unknown split {raw_split!r} (use train, val or test)")
        splits.append(SPLIT_ALIASES[raw_split] if raw_split else default_split)
        pids.append((r.get(patient_col, "") if patient_col else "") or None)
        for c in extra_columns:
            metadata[c].append(r.get(c, ""))
    if separator is None:
        classes = sorted({v for v in raw if v})
        labels = np.array([classes.index(v) if v else -1 for v in raw])
        sample_task = "multiclass"
    else:
        classes, labels = _multi_hot(path, raw, separator, options.no_finding)
        sample_task = "multilabel"
    return SampleSet(
        refs=refs,
        labels=labels,
        splits=splits,
        patient_ids=pids,
        classes=classes,
        source=str(path),
        kind="csv",
        root=str(base),
        metadata=metadata,
        task=sample_task,
    )


def _column(
    path: Path, fields: list[str], given: str | None, own: str, aliases: tuple[str, ...], option: str
) -> str | None:
    """The manifest column (lower case) holding one kind of value: the one named by ``option``, else
    medclf's own name, else a recognised alias; None when there is none."""
    if given is not None:
        name = given.strip().lower()
        if name not in fields:
            raise DataError(f"{path}: {option} {given!r} is not a column (columns: {', '.join(fields)})")
        return name
    if own in fields:
        return own
    return next((a for a in aliases if a in fields), None)


def _label_separator(path: Path, raw: list[str], given: str | None, task: str | None) -> str | None:
    """The separator of multi-label cells, or None for one label per row. A separator that no cell uses
    while another common one is used is refused (a mismatch, not single findings)."""
    used = [s for s in KNOWN_SEPARATORS if any(s in v for v in raw)]
    if given is not None:
        if not given:
            raise DataError(f"{path}: --label-separator must not be empty")
        if not any(given in v for v in raw) and used:
            raise DataError(
                f"{path}: no label contains the separator {given!r}, but labels contain {used[0]!r}: "
                f"use --label-separator {used[0]!r}"
            )
        return given
    if AUTO_SEPARATOR in used or task == "multilabel":
        return AUTO_SEPARATOR
    return None


def _multi_hot(path: Path, raw: list[str], separator: str, no_finding: str) -> tuple[list[str], np.ndarray]:
    """Findings (sorted) and the (N, K) multi-hot matrix of ``raw`` cells: the ``no_finding`` label is the
    empty set, an empty cell unknown (a row of -1)."""
    none = no_finding.strip().lower()
    cells = [None if not v else {f.strip() for f in v.split(separator) if f.strip()} for v in raw]
    for n, cell in enumerate(cells, start=2):
        if cell is not None and any(f.lower() == none for f in cell):
            if len(cell) > 1:
                raise DataError(f"{path}, line {n}: {no_finding!r} together with findings: {raw[n - 2]!r}")
            cells[n - 2] = set()
    classes = sorted({f for cell in cells if cell for f in cell})
    if not classes:
        raise DataError(f"{path}: no row names a finding (every label is {no_finding!r} or empty)")
    column = {c: j for j, c in enumerate(classes)}
    labels = np.zeros((len(cells), len(classes)), dtype=np.int64)
    for i, cell in enumerate(cells):
        if cell is None:
            labels[i] = -1
        else:
            labels[i, [column[f] for f in cell]] = 1
    return classes, labels


def _image_base(base: Path, paths: list[str]) -> Path:
    """Where relative image paths start: the manifest's folder, or its ``images/`` sub-folder when the first
    path is found only there (NIH's layout: the CSV next to ``images/``)."""
    first = next((Path(p) for p in paths if p), None)
    if first is None or first.is_absolute() or (base / first).exists():
        return base
    return base / "images" if (base / "images" / first).exists() else base


def _read_split_file(path: Path, split_file: str | None, names: list[str]) -> dict[str, str]:
    """``<image>,split`` rows of a split file (lower-cased split names), keyed by the image's name as the
    manifest's path column writes it; {} without a split file."""
    if split_file is None:
        return {}
    p = Path(split_file).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: split file not found")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            table = [[c.strip() for c in row] for row in csv.reader(fh) if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{p}: not a readable CSV split file ({exc})") from exc
    header = [c.lower() for c in table[0]] if table else []
    if "split" not in header or len(header) < 2:
        raise DataError(
            f"{p}: a split file needs two columns, the image and 'split' (e.g. 'Image Index,split')"
        )
    col = header.index("split")
    key = 1 - col if len(header) == 2 else next(i for i, h in enumerate(header) if h != "split")
    split_of = {row[key]: row[col].lower() for row in table[1:] if len(row) > max(key, col)}
    if not set(split_of) & set(names):
        raise DataError(f"{p}: the split file names none of the manifest's images")
    return split_of


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
        lab = np.asarray(lab).astype(np.int64)
        # (N, K > 1) labels are multi-hot findings (ChestMNIST); (N,) or (N, 1) one class per image.
        lab = lab.reshape(len(lab), -1) if lab.ndim == 2 and lab.shape[1] > 1 else lab.reshape(-1)
        refs += [f"{split}/{i}" for i in range(len(imgs))]
        labels.append(lab)
        splits += [split] * len(imgs)
    if len({lab.ndim for lab in labels}) > 1 or len({lab.shape[1:] for lab in labels}) > 1:
        raise DataError(f"{path}: the splits' label arrays differ in shape")
    all_labels = np.concatenate(labels)
    multilabel = all_labels.ndim == 2
    if multilabel and not np.isin(all_labels, (0, 1)).all():
        raise DataError(f"{path}: a 2-D label array must hold 0/1 findings")
    n_classes = all_labels.shape[1] if multilabel else int(all_labels.max()) + 1
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
        task="multilabel" if multilabel else "multiclass",
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
