"""Validation splits carved from training data: stratified, grouped by patient, seeded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, StratifiedShuffleSplit

from medclf.data.samples import DEFAULT_VAL_FRACTION, SampleSet
from medclf.errors import DataError


def ensure_validation(
    samples: SampleSet, *, fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0
) -> SampleSet:
    """Return ``samples`` with a ``val`` split, carving one from ``train`` when the source has none.

    Stratified by class so rare classes appear in validation; when patient ids exist, all samples of a
    patient land on the same side (StratifiedGroupKFold), so validation never sees a training patient.
    """
    if samples.has_split("val"):
        return samples
    train_idx = samples.indices("train")
    if len(train_idx) < 4:
        raise DataError(f"{samples.source}: only {len(train_idx)} training samples; need at least 4")
    if samples.task == "multilabel":  # stratified on every finding at once, grouped by patient
        known = np.maximum(samples.labels[train_idx], 0)
        val_local = carve_multilabel(known, [samples.patient_ids[i] for i in train_idx], fraction, seed)
    else:
        val_local = carve(
            samples.labels[train_idx], [samples.patient_ids[i] for i in train_idx], fraction, seed
        )
    splits = list(samples.splits)
    for j in val_local:
        splits[int(train_idx[j])] = "val"
    return samples.with_splits(splits)


def carve(labels: np.ndarray, patient_ids: list[str | None], fraction: float, seed: int) -> np.ndarray:
    """Indices (into ``labels``) of a held-out part of about ``fraction`` of the samples."""
    if not 0.0 < fraction < 1.0:
        raise ValueError("fraction must be between 0 and 1")
    n = len(labels)
    counts = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.array([n])
    stratify_ok = counts[counts > 0].min() >= 2
    y = labels if stratify_ok else np.zeros(n, dtype=np.int64)
    if any(p is not None for p in patient_ids):
        groups = np.array([p if p is not None else f"__sample{i}" for i, p in enumerate(patient_ids)])
        n_splits = max(2, round(1.0 / fraction))
        n_groups = len(set(groups.tolist()))
        if n_groups < n_splits:
            raise DataError(f"only {n_groups} patients: too few to carve a patient-grouped validation split")
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        try:
            _, held = next(sgkf.split(np.zeros(n), y, groups))
        except ValueError as exc:  # e.g. a class with fewer patients than folds
            raise DataError(f"cannot carve a patient-grouped validation split: {exc}") from exc
        return np.sort(held)
    n_classes = len(np.unique(y))
    # A stratified hold-out needs at least one sample of every class on each side.
    n_held = max(round(fraction * n), n_classes if stratify_ok else 1)
    if n - n_held < n_classes:
        raise DataError(
            f"only {n} training samples for {n_classes} classes: too few to carve a validation split"
        )
    sss = StratifiedShuffleSplit(n_splits=1, test_size=n_held, random_state=seed)
    _, held = next(sss.split(np.zeros(n), y))
    return np.sort(held)


def fold_split(samples: SampleSet, fold: int, n_folds: int, *, seed: int = 0) -> SampleSet:
    """Return ``samples`` with fold ``fold`` of ``n_folds`` of the training split turned into ``val``.

    The folds partition the training split (stratified by class, or for multi-label findings on every
    finding at once; grouped by patient when ids exist) and depend only on ``seed``, so the ``n_folds`` runs
    of K-fold bagging validate on disjoint folds. A validation split the source already has stays ``val`` in
    every run (a common held-out set).
    """
    if n_folds < 2 or not 0 <= fold < n_folds:
        raise DataError(f"fold {fold} of {n_folds}: need at least 2 folds and 0 <= fold < folds")
    train_idx = samples.indices("train")
    if len(train_idx) < 2 * n_folds:
        raise DataError(f"only {len(train_idx)} training samples: too few for {n_folds} folds")
    pids = [samples.patient_ids[i] for i in train_idx]
    if samples.task == "multilabel":
        folds = _finding_folds(np.maximum(samples.labels[train_idx], 0), pids, n_folds, seed)
    else:
        folds = _class_folds(samples.labels[train_idx], pids, n_folds, seed)
    splits = list(samples.splits)
    for j in folds[fold]:
        splits[int(train_idx[j])] = "val"
    return samples.with_splits(splits)


def _class_folds(labels: np.ndarray, pids: list[str | None], n_folds: int, seed: int) -> list[np.ndarray]:
    """The validation indices (into ``labels``) of each of ``n_folds`` folds, stratified by class when every
    class can appear in every fold, grouped by patient when ids exist."""
    counts = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.array([len(labels)])
    y = labels if counts[counts > 0].min() >= n_folds else np.zeros(len(labels), dtype=np.int64)
    if any(p is not None for p in pids):
        groups = np.array([p if p is not None else f"__sample{i}" for i, p in enumerate(pids)])
        if len(set(groups.tolist())) < n_folds:
            raise DataError(f"only {len(set(groups.tolist()))} patients: too few for {n_folds} folds")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        try:
            return [held for _, held in splitter.split(np.zeros(len(y)), y, groups)]
        except ValueError as exc:
            raise DataError(f"cannot split the training patients into {n_folds} folds: {exc}") from exc
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros(len(y)), y)]


def _finding_folds(targets: np.ndarray, pids: list[str | None], n_folds: int, seed: int) -> list[np.ndarray]:
    """The validation indices (into ``targets``, (N, L) 0/1) of each of ``n_folds`` folds of multi-label
    findings: :func:`stratify_multilabel` with equal shares, so each fold gets about 1/K of the patients with
    each finding (every finding in every fold when it has at least K patients, as far as co-occurring
    findings allow) and a patient's images all in one fold."""
    part, n_groups = stratify_multilabel(targets, pids, [1.0 / n_folds] * n_folds, seed)
    folds = [np.flatnonzero(part == k) for k in range(n_folds)]
    if n_groups < n_folds or any(len(f) == 0 for f in folds):
        raise DataError(f"only {n_groups} patients: too few for {n_folds} folds")
    return folds


def carve_multilabel(
    targets: np.ndarray, patient_ids: list[str | None], fraction: float, seed: int
) -> np.ndarray:
    """Indices of a held-out part of about ``fraction`` of multi-label samples (``targets``: (N, L) 0/1),
    stratified on every finding at once and grouped by patient (a patient's images stay on one side): the
    first part of :func:`stratify_multilabel` with shares ``fraction`` and ``1 - fraction``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError("fraction must be between 0 and 1")
    part, n_groups = stratify_multilabel(targets, patient_ids, [fraction, 1.0 - fraction], seed)
    held = np.flatnonzero(part == 0)
    if len(held) == 0 or len(held) == len(part):
        raise DataError(f"only {n_groups} patients: too few to carve a validation split of {fraction:.0%}")
    return held


def stratify_multilabel(
    targets: np.ndarray, patient_ids: list[str | None], shares: Sequence[float], seed: int
) -> tuple[np.ndarray, int]:
    """The part (0 .. len(shares) - 1) of every multi-label sample (``targets``: (N, L) 0/1), each part
    holding about its share of the images and of the patients with each finding, a patient's images all in
    one part; and the number of patients.

    Iterative stratification (Sechidis, Tsoumakas and Vlahavas, ECML PKDD 2011) on patients instead of
    images: repeatedly take the finding with the fewest patients still unassigned, and give each of its
    patients (in random order) to the part that still wants the most of that finding (ties: the part that
    wants the most images, then the first). Patients without findings fill the remaining demand for
    images. A stratified shuffle cannot do this: it stratifies on one label, and findings co-occur. Both the
    carved validation split (two parts) and the folds of K-fold bagging (K equal parts) come from here."""
    y = np.asarray(targets, dtype=np.int64)
    n = len(y)
    keys = [f"p:{p}" if p not in (None, "") else f"s:{i}" for i, p in enumerate(patient_ids)]
    group_of = np.unique(np.array(keys, dtype=object), return_inverse=True)[1]
    n_groups = int(group_of.max()) + 1 if n else 0
    if n_groups < 2:
        raise DataError("fewer than 2 patients (or images): too few to split")
    rng = np.random.default_rng(seed)
    group_labels = np.zeros((n_groups, y.shape[1]), dtype=np.int64)
    np.add.at(group_labels, group_of, y)
    group_has = group_labels > 0
    group_size = np.bincount(group_of, minlength=n_groups)
    share = np.asarray(shares, dtype=np.float64)
    want_label = share[:, None] * group_has.sum(axis=0)[None, :]  # patients with each finding, per part
    want_images = share * n
    part = np.full(n_groups, -1)
    unassigned = np.ones(n_groups, dtype=bool)
    while True:
        remaining = (group_has & unassigned[:, None]).sum(axis=0)
        candidates = np.flatnonzero(remaining > 0)
        if not len(candidates):
            break
        label = candidates[np.argmin(remaining[candidates])]
        for g in rng.permutation(np.flatnonzero(group_has[:, label] & unassigned)):
            need = want_label[:, label]
            tied = np.flatnonzero(need == need.max())
            s = int(tied[np.argmax(want_images[tied])])
            part[g], unassigned[g] = s, False
            want_label[s] -= group_has[g]
            want_images[s] -= group_size[g]
    for g in rng.permutation(np.flatnonzero(unassigned)):  # patients without any finding
        s = int(np.argmax(want_images))
        part[g] = s
        want_images[s] -= group_size[g]
    return part[group_of], n_groups
