"""The images a pretraining run learns from: any mix of sources medclf reads (class folders, CSV manifests,
MedMNIST ``.npz``, and for pretraining also a plain folder of images), labels ignored, decoded once through
medclf's cache with one preprocessing spec; and, when a source happens to carry labels, a k-NN probe set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medclf.data.cache import prepare
from medclf.data.samples import SampleSet
from medclf.data.sources import NON_IMAGE_SUFFIXES, SPLIT_ALIASES, fingerprint_files, load_source
from medclf.errors import ConfigError, DataError
from medclf.planner import arch_kwargs_for, fingerprint, initial_plan
from medclf.preprocess import PreprocessSpec

# Default input size: the sources' native size, at most this (a CPU pretrains many epochs at 64 px in an hour).
MAX_DEFAULT_SIZE = 64
# The k-NN probe: at most this many labelled reference and query images (its cost stays small per epoch).
PROBE_REFERENCES, PROBE_QUERIES = 2000, 1000


@dataclass
class ProbeSet:
    """Labelled images of one source for the k-NN probe: references (its training split) and queries (its
    validation split, or a seeded fifth of the training split when it has none). Never its test split."""

    source: str
    classes: list[str]
    ref_x: torch.Tensor
    ref_y: np.ndarray
    query_x: torch.Tensor
    query_y: np.ndarray


@dataclass
class PretrainData:
    spec: PreprocessSpec
    rows: torch.Tensor  # N x C x ... float16, every usable image of the chosen splits of every source
    sources: list[dict[str, Any]]  # per source: path, kind, splits used, images used, unreadable
    fingerprint: str  # of the sources' files, the splits and the spec (a resumed run refuses other data)
    probe: ProbeSet | None = None
    reasons: list[str] = field(default_factory=list)


def load_unlabelled(path: str | Path) -> SampleSet:
    """A source as medclf reads it (a CSV manifest may leave out its label column), or (pretraining only) a
    folder holding the images themselves: every image in it and below, unlabelled, in the training split
    unless its first sub-folder names a split (``train/``, ``test/``, ...: a test folder stays test)."""
    try:
        return load_source(path, default_split="train", labelled=False)
    except DataError:
        p = Path(path).expanduser()
        files = _image_files(p) if p.is_dir() and not (p / "manifest.csv").is_file() else []
        if not files:
            raise
    return SampleSet(
        refs=[str(f) for f in files],
        labels=np.full(len(files), -1),
        splits=[_folder_split(f.relative_to(p)) for f in files],
        patient_ids=[None] * len(files),
        classes=[],
        source=str(p),
        kind="folder",
        root=str(p),
    )


def _folder_split(relative: Path) -> str:
    first = relative.parts[0].lower() if len(relative.parts) > 1 else ""
    return SPLIT_ALIASES.get(first, "train")


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
        and f.suffix.lower() not in NON_IMAGE_SUFFIXES
    )


def plan_input(
    first: SampleSet, *, arch: str, size: int | None, seed: int
) -> tuple[PreprocessSpec, dict[str, Any], list[str], int]:
    """The preprocessing spec (as ``medclf train`` would plan it for the first source, at its native size up
    to :data:`MAX_DEFAULT_SIZE` unless ``size``), the architecture's arguments at that size, the reasons,
    and how many files the fingerprint decoded (its time prices decoding)."""
    fp = fingerprint(first, seed=seed)
    plan = initial_plan(fp, len(first.indices("train")), {"arch": arch})
    native = int(plan.spec.size[0])
    chosen = int(size) if size is not None else min(native, MAX_DEFAULT_SIZE)
    if chosen < 4:
        raise ConfigError("--size must be at least 4")
    spec = PreprocessSpec.from_dict({**plan.spec.to_dict(), "size": [chosen] * plan.spec.spatial_dims})
    why = (
        "--size"
        if size is not None
        else f"the first source's native size {native}, at most {MAX_DEFAULT_SIZE}"
    )
    reasons = [f"input {list(spec.input_shape)} ({why}), preprocessing as planned for {first.source}"]
    return spec, arch_kwargs_for(arch, chosen, spec.spatial_dims), reasons, fp.n_probed


def prepare_sources(
    sets: list[SampleSet],
    spec: PreprocessSpec,
    *,
    splits: tuple[str, ...],
    cache_dir: str | None,
    workers: int | None,
    progress: bool,
    seed: int,
) -> PretrainData:
    """Decode every source through the cache and gather the images of ``splits`` (labels ignored)."""
    if "test" in splits:
        raise ConfigError("pretraining never reads a test split: use --splits train or train,val")
    rows, described, probe = [], [], None
    digest = hashlib.sha256(f"{spec.digest()}\0{','.join(splits)}".encode())
    for samples in sets:
        prepared = prepare(samples, spec, cache_dir=cache_dir, workers=workers, progress=progress)
        in_split = np.isin(np.array(samples.splits), list(splits))
        idx = np.flatnonzero(prepared.ok & in_split)
        described.append(
            {
                "path": samples.source,
                "kind": samples.kind,
                "splits": [s for s in splits if s in set(samples.splits)],
                "images": len(idx),
                "unreadable": int((~prepared.ok & in_split).sum()),
                "fingerprint": fingerprint_files(samples),
            }
        )
        digest.update(f"\0{fingerprint_files(samples)}".encode())
        if len(idx):
            rows.append(torch.from_numpy(np.ascontiguousarray(prepared.tensors[idx])))
        if probe is None:
            probe = _probe_set(samples, prepared.tensors, prepared.ok, seed)
    if not rows:
        raise DataError(f"no readable images in the {'/'.join(splits)} split(s) of the sources given")
    return PretrainData(spec, torch.cat(rows), described, digest.hexdigest()[:24], probe)


def _probe_set(samples: SampleSet, tensors: np.ndarray, ok: np.ndarray, seed: int) -> ProbeSet | None:
    """The k-NN probe of a labelled source (None when it has fewer than two labelled classes, or several
    findings per image: a nearest-neighbour vote needs one class each)."""
    if samples.labels.ndim != 1:
        return None
    split = np.array(samples.splits)
    labelled = ok & (samples.labels >= 0)
    if len(np.unique(samples.labels[labelled])) < 2:
        return None
    rng = np.random.default_rng(seed)
    ref = np.flatnonzero(labelled & (split == "train"))
    query = np.flatnonzero(labelled & (split == "val"))
    if len(query) == 0:
        ref = rng.permutation(ref)
        cut = max(1, len(ref) // 5)
        query, ref = ref[:cut], ref[cut:]
    ref = np.sort(rng.permutation(ref)[:PROBE_REFERENCES])
    query = np.sort(rng.permutation(query)[:PROBE_QUERIES])
    if len(ref) < 2 or len(query) == 0:
        return None

    def rows(i: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(tensors[i]))

    return ProbeSet(
        samples.source,
        list(samples.classes),
        rows(ref),
        samples.labels[ref],
        rows(query),
        samples.labels[query],
    )
