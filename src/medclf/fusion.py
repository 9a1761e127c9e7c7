"""Model fusion (``medclf ensemble``): several trained bundles -> one ensemble bundle.

The ensemble is an :class:`~medclf.models.ensemble.Ensemble` module registered as architecture
``ensemble``: the members' weights and the fusion parameters share one ``model.safetensors``, so
``load_bundle``, ``evaluate``, ``predict``, explanations and export take it unchanged.

Anything fitted (the weights of ``weighted``, the meta-learner of ``stacking``, the ensemble's temperature)
is fitted on **validation predictions only**, on the samples that every member validated on: each member's
validation split is rebuilt from the dataset with the seed, fraction or fold recorded in its recipe, and
checked against the content hashes of the files it trained on. Samples that copy any member's training
sample are left out. Members trained on different carved validation splits (different seeds, or K-fold
bagging without a dataset validation split) share no such samples: then only ``mean`` works, and the
ensemble keeps temperature 1 (its members are each calibrated on their own validation split).

Multi-label findings are fused by the mean of the members' per-finding probabilities, each member's through
its own temperatures per finding. With shared validation samples the ensemble fits its own temperatures (one
per finding) on the fused logits and chooses each finding's threshold (Youden, as for one model) on the
probabilities through them; K-fold members without any choose the thresholds on their out-of-fold predictions
(every training sample scored by the member that did not train on it) and keep temperature 1; other members
without shared samples get the mean of the members' thresholds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medclf import reporting
from medclf.bundle import Bundle, save_bundle
from medclf.data.cache import PreparedData, prepare
from medclf.data.references import TRAIN_SIGNATURES, aligned_signatures, pack_signatures
from medclf.data.samples import SampleSet
from medclf.data.scan import train_copy_flags
from medclf.data.sources import load_source
from medclf.engines import probabilities
from medclf.errors import BundleError, ConfigError, DataError
from medclf.manifest import Manifest
from medclf.metrics.calibration import (
    MIN_SAMPLES,
    TemperatureFit,
    apply_temperature,
    finding_calibration_record,
    fit_finding_temperatures,
    fit_temperature,
)
from medclf.metrics.classification import compute_metrics, expected_calibration_error
from medclf.model_card import MODEL_CARD, model_card
from medclf.models.ensemble import LOG_FLOOR, METHODS, Ensemble
from medclf.ood import OOD_FILE, OODDetector, fit_detector, penultimate_features
from medclf.predictor import Predictor, as_bundle

__all__ = ["METHODS", "EnsembleResult", "ensemble", "fit_stacking", "fit_weights", "member_validation_splits"]

# Fewest shared validation samples for fitting fusion weights or a meta-learner (as for a temperature).
MIN_FIT = MIN_SAMPLES
STACKING_C = 1.0
_BATCH = 256
OOD_FIT_SAMPLES = 1000  # training rows whose features fit the ensemble's out-of-distribution guard


@dataclass
class EnsembleResult:
    bundle: Path
    method: str
    weights: list[float] | None
    temperature: float
    n_fit: int
    val_metrics: dict[str, Any] | None
    member_val_metrics: list[dict[str, Any] | None] = field(default_factory=list)
    seconds: float = 0.0


def ensemble(
    bundles: Sequence[str | Path | Bundle | Predictor],
    out: str | Path,
    *,
    data: str | Path,
    method: str = "mean",
    calibrate: bool = True,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    seed: int = 0,
    recipe: dict[str, Any] | None = None,
) -> EnsembleResult:
    """Fuse trained ``bundles`` into one ensemble bundle at ``out``; ``data``: the dataset they were
    trained on (for validation predictions). ``method``: ``mean``, ``weighted`` (weights minimising the
    validation log-loss over the simplex) or ``stacking`` (multinomial logistic regression on the members'
    validation log-probabilities). ``calibrate``: fit the ensemble's temperature on the same samples.
    ``recipe`` adds entries to the bundle's recipe (``medclf train --folds`` records its runs there)."""
    t_start = time.perf_counter()
    members = _members(bundles, method)
    base = max(members, key=lambda b: int(np.prod(b.spec.size)))
    classes = base.classes
    multilabel = _task(base) == "multilabel"
    splits = _rebuild_splits(members, base, data, cache_dir=cache_dir, workers=workers, progress=progress)
    model = _build(members, method)
    fit = _fit_set(model, splits, method)
    enough = _enough_to_fit(fit, method)
    with torch.no_grad():
        fitted = _FITTERS[method](model, fit.lp, fit.y, seed)
    weights = model.weights.tolist() if method != "stacking" else None
    val = _score_on_fit_set(model, members, splits, fit, method, calibrate, enough, seed)
    own = [_metrics(splits.labels[v], fit.log_probs[j][v], classes, seed) for j, v in enumerate(fit.own_val)]
    oof = _out_of_fold_predictions(members, fit.own_val, fit.log_probs)
    if multilabel and val.thresholds is None:  # too few shared validation samples to choose them
        val.thresholds = _oof_thresholds(splits.labels, oof, classes) or _mean_thresholds(members, classes)
    out_of_fold = _out_of_fold(oof, splits.labels, classes, seed, val.thresholds)
    fusion = _fusion_record(
        members, base, method, weights, fitted, len(fit.idx), val.member_metrics, own, out_of_fold
    )
    seconds = round(time.perf_counter() - t_start, 1)
    manifest = _manifest(members, base, splits, method, val, fusion, out_of_fold, seconds, recipe)
    path = _save(out, model, manifest, splits, fit, seed=seed)
    _print_summary(path, val.member_metrics, own, val.metrics, weights, val.cal)
    return EnsembleResult(
        bundle=path,
        method=method,
        weights=weights,
        temperature=val.cal.temperature,
        n_fit=len(fit.idx),
        val_metrics=val.metrics,
        member_val_metrics=val.member_metrics,
        seconds=seconds,
    )


@dataclass
class _Splits:
    """The members' dataset, every member's splits rebuilt from its recipe, decoded once for all members."""

    samples: SampleSet
    options: dict[str, Any] | None  # how the members read a CSV manifest
    member_splits: list[list[str]]
    is_train: np.ndarray  # (M, N): sample i in member j's training split
    is_val: np.ndarray  # (M, N): sample i in member j's validation split
    combined: SampleSet  # "train" where any member trained
    train_hashes: list[set[str]]  # per member: the content hashes of the files it trained on
    prepared: PreparedData
    readable: np.ndarray  # decoded, with a known label

    @property
    def labels(self) -> np.ndarray:
        return self.samples.labels


@dataclass
class _FitSet:
    """The fitting set: validation samples shared by every member, minus copies of any member's training
    sample; each member's own validation rows; the members' log-probabilities where they are needed."""

    idx: np.ndarray
    own_val: list[np.ndarray]  # per member: its validation rows, minus copies of its training samples
    log_probs: dict[int, np.ndarray]  # member -> (N, K), NaN outside its own validation rows and the fit set
    lp: np.ndarray | None  # (M, n_fit, K) on the fitting set; None when it is empty
    y: np.ndarray  # labels of the fitting set


@dataclass
class _Validation:
    """The ensemble's temperature, its metrics and its members' on the fitting set (None where too small),
    and the multi-label per-finding thresholds and temperatures."""

    cal: TemperatureFit
    metrics: dict[str, Any] | None = None
    member_metrics: list[dict[str, Any] | None] = field(default_factory=list)
    thresholds: dict[str, Any] | None = None
    finding_cal: dict[str, Any] | None = None  # the calibration section of a multi-label ensemble


def _members(bundles: Sequence[str | Path | Bundle | Predictor], method: str) -> list[Bundle]:
    """The member bundles, checked to be fusable with ``method``."""
    if method not in METHODS:
        raise ConfigError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    members = [as_bundle(b) for b in bundles]
    _check_compatible(members)
    if _task(members[0]) == "multilabel" and method != "mean":
        raise ConfigError(
            "multi-label members are fused by the mean of their per-finding probabilities: --method mean"
        )
    return members


def _rebuild_splits(
    members: list[Bundle],
    base: Bundle,
    data: str | Path,
    *,
    cache_dir: str | Path | None,
    workers: int | None,
    progress: bool,
) -> _Splits:
    """``data`` with every member's splits rebuilt, decoded with the ``base`` member's spec; refused unless
    each member's rebuilt training split holds exactly the files it trained on."""
    options = base.manifest.get("data", {}).get("manifest_options")
    samples = load_source(data, default_split="train", manifest=options)
    if samples.classes != base.classes:
        raise DataError(
            f"{data}: classes {samples.classes} differ from the members' {base.classes}; "
            "give the dataset the members were trained on"
        )
    member_splits = [member_validation_splits(samples, b) for b in members]
    is_train = np.array([[s == "train" for s in sp] for sp in member_splits])  # (M, N)
    is_val = np.array([[s == "val" for s in sp] for sp in member_splits])
    combined = samples.with_splits(
        ["train" if is_train[:, i].any() else s for i, s in enumerate(member_splits[0])]
    )
    train_hashes = [_train_hashes(b) for b in members]
    prepared = prepare(
        combined,
        base.spec,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
        extra_train_hashes=set().union(*train_hashes),
    )
    readable = prepared.ok & samples.known
    for j, b in enumerate(members):
        rebuilt = {prepared.hashes[i] for i in np.flatnonzero(is_train[j] & readable)}
        if rebuilt != train_hashes[j]:
            raise DataError(
                f"{b.path}: its training files are not the training split of {data} rebuilt from its recipe "
                f"(seed {b.manifest.get('recipe', {}).get('seed')}): give the dataset it was trained on"
            )
    return _Splits(
        samples, options, member_splits, is_train, is_val, combined, train_hashes, prepared, readable
    )


def _fit_set(model: Ensemble, splits: _Splits, method: str) -> _FitSet:
    """The fitting set and each member's own validation rows, with the members' log-probabilities (through
    the ensemble's own input path) on them."""
    n_members = len(splits.member_splits)
    # What every member validated on, minus copies of any member's training sample: the fitting set.
    fit_mask = splits.is_val.all(axis=0) & splits.readable & ~splits.prepared.train_copy
    fit_idx = np.flatnonzero(fit_mask)
    own_val = [
        splits.is_val[j]
        & splits.readable
        & ~train_copy_flags(splits.samples.with_splits(splits.member_splits[j]), splits.prepared.scan)
        for j in range(n_members)
    ]
    reporting.current().print(
        f"Fusing {n_members} members ({method}) on {len(fit_idx)} validation samples shared by all members"
    )
    log_probs = {
        j: _member_log_probs(model, j, splits.prepared.tensors, own_val[j] | fit_mask)
        for j in range(n_members)
    }
    fit_lp = np.stack([log_probs[j][fit_idx] for j in range(n_members)]) if len(fit_idx) else None
    return _FitSet(fit_idx, own_val, log_probs, fit_lp, splits.labels[fit_idx])


def _enough_to_fit(fit: _FitSet, method: str) -> bool:
    """Whether the fitting set can fit anything; refused for a method that must be fitted when it cannot."""
    enough = len(fit.idx) >= MIN_FIT and len(np.unique(fit.y)) >= 2
    if method != "mean" and not enough:
        raise DataError(
            f"'{method}' fusion is fitted on validation samples that every member left out of training, and "
            f"there are {len(fit.idx)} (need {MIN_FIT}, with two classes). Members whose validation splits "
            "differ (different seeds without a dataset validation split, or K-fold runs) can only be "
            "fused with --method mean"
        )
    return enough


def _score_on_fit_set(
    model: Ensemble,
    members: list[Bundle],
    splits: _Splits,
    fit: _FitSet,
    method: str,
    calibrate: bool,
    enough: bool,
    seed: int,
) -> _Validation:
    """The ensemble's temperature (fitted on the fitting set when asked for and possible), its validation
    metrics and its members' there; multi-label: per-finding thresholds chosen there (None when too few:
    :func:`ensemble` then chooses them out of fold)."""
    classes = members[0].classes  # the members share them (_check_compatible), as they share their task
    multilabel = _task(members[0]) == "multilabel"
    cal = TemperatureFit(1.0, 0, None, None, None, None, note="calibration not asked for: T = 1")
    val = _Validation(cal, member_metrics=[None] * len(members))
    if multilabel:
        val.cal.note = (
            "multi-label: the mean of the members' per-finding sigmoids (each through its own temperatures); "
            + (
                "no ensemble temperature: "
                + ("too few shared validation samples" if calibrate else "not asked for")
            )
        )
    if fit.lp is not None and enough:
        with torch.no_grad():
            fused = model.fuse(torch.from_numpy(fit.lp).float()).double().numpy()
        if multilabel:
            val.metrics, val.thresholds, val.finding_cal = _findings_metrics(
                fit.y, fused, classes, calibrate, seed
            )
        else:
            if calibrate:
                val.cal = fit_temperature(fused, fit.y)
            n_copies = int((splits.is_val.all(axis=0) & splits.readable & splits.prepared.train_copy).sum())
            val.metrics = _fused_metrics(fused, fit.y, val.cal, classes, method, calibrate, n_copies, seed)
        val.member_metrics = [_metrics(fit.y, fit.lp[j], classes, seed) for j in range(len(members))]
    elif calibrate and not multilabel:
        val.cal.note = (
            f"{len(fit.idx)} validation samples shared by all members (need {MIN_FIT}, two classes): T = 1; "
            "each member is calibrated on its own validation split"
        )
    return val


def _fused_metrics(
    fused: np.ndarray,
    y: np.ndarray,
    cal: TemperatureFit,
    classes: list[str],
    method: str,
    calibrate: bool,
    n_copies: int,
    seed: int,
) -> dict[str, Any]:
    """Metrics of the fused log-probabilities at the temperature ``cal`` on the fitting set (which left out
    ``n_copies`` copies of training samples), saying what was fitted on these same samples."""
    probs = apply_temperature(fused, cal.temperature)
    metrics = compute_metrics(y, probs, classes, n_bootstrap=200, seed=seed)
    metrics.update(
        ece_uncalibrated=expected_calibration_error(y, apply_temperature(fused, 1.0)),
        temperature=cal.temperature,
        n_removed_duplicates=n_copies,
    )
    fitted_here = ([] if method == "mean" else [f"the {method} fusion"]) + (
        ["the temperature"] if calibrate else []
    )
    if fitted_here:
        metrics["note"] = f"{' and '.join(fitted_here)} were fitted on these same samples"
    return metrics


def _fusion_record(
    members: list[Bundle],
    base: Bundle,
    method: str,
    weights: list[float] | None,
    fitted: dict[str, Any],
    n_fit: int,
    fit_metrics: list[dict[str, Any] | None],
    own_metrics: list[dict[str, Any] | None],
    out_of_fold: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest's ``ensemble`` section: the method, what it fitted and on what, the members, and (K-fold
    members) the out-of-fold estimate."""
    member_records = []
    for j, b in enumerate(members):
        recipe_j = b.manifest.get("recipe", {})
        member_records.append(
            {
                "sha256": b.sha256,
                "path": str(b.path),
                "arch": b.arch,
                "kwargs": b.manifest["model"].get("kwargs", {}),
                "size": list(b.spec.size),
                "temperature": b.temperature,
                **_finding_temperatures(b),
                "seed": recipe_j.get("seed"),
                "val_fold": recipe_j.get("val_fold"),
                "val": fit_metrics[j],
                "val_own": own_metrics[j],
            }
        )
    fusion = {
        "method": method,
        "weights": weights,
        "stacking": fitted or None,
        "fit_set": {
            "description": "validation samples shared by every member, minus copies of any member's training samples",
            "n": n_fit,
        },
        "members": member_records,
        "input_resampling": _resampling_note(members, base),
    }
    if out_of_fold is not None:
        fusion["out_of_fold"] = out_of_fold
    return fusion


def _manifest(
    members: list[Bundle],
    base: Bundle,
    splits: _Splits,
    method: str,
    val: _Validation,
    fusion: dict[str, Any],
    out_of_fold: dict[str, Any] | None,
    seconds: float,
    recipe: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ensemble bundle's manifest (without its OOD guard, fitted on the finished model)."""
    metrics: dict[str, Any] = {"val": val.metrics} if val.metrics is not None else {}
    if out_of_fold is not None:
        metrics["out_of_fold"] = out_of_fold
    return {
        "model": {
            "arch": "ensemble",
            "kwargs": _ensemble_kwargs(members, method),
            "in_channels": base.spec.channels,
            "n_classes": len(base.classes),
            "spatial_dims": base.spec.spatial_dims,
        },
        "classes": base.classes,
        "task": _task(base),  # members share it (_check_compatible); the fused grades are a distribution too
        **({"thresholds": val.thresholds} if val.thresholds else {}),
        "preprocess": base.spec.to_dict(),
        "input": base.manifest.get(
            "input", {"shape": list(base.spec.input_shape), "dtype": "float32", "value_range": [0.0, 1.0]}
        ),
        "recipe": {"kind": "ensemble", "method": method, "fusion_seconds": seconds, **(recipe or {})},
        "data": {
            "source": Path(splits.samples.source).name,
            "kind": splits.samples.kind,
            "fingerprint": splits.prepared.fingerprint,
            "counts": splits.combined.summary(),
            "n_unreadable": len(splits.prepared.errors),
            # How the members read a CSV (a split file, other columns): export reads it the same way.
            **({"manifest_options": splits.options} if splits.options else {}),
        },
        "metrics": metrics,
        "ensemble": fusion,
        "history": [],
        "calibration": val.finding_cal if val.finding_cal is not None else val.cal.to_dict(),
    }


def _save(
    out: str | Path,
    model: Ensemble,
    manifest: dict[str, Any],
    splits: _Splits,
    fit: _FitSet,
    *,
    seed: int,
) -> Path:
    """Fit the ensemble's OOD guard on the last member's training and validation rows, then write the bundle
    with the union of the members' training hashes and signatures."""
    union_hashes = sorted(set().union(*splits.train_hashes))
    prepared = splits.prepared
    train_rows = splits.is_train[-1] & splits.readable
    # Multi-label: (N, L) findings, whose class means are per set of findings (medclf.ood).
    detector = _fit_ood(
        model, prepared.tensors, train_rows, fit.own_val[-1], splits.labels, seed, splits.samples.classes
    )
    manifest["ood"] = detector.manifest()
    union_rows = np.flatnonzero(splits.is_train.any(axis=0) & prepared.ok)
    signatures = aligned_signatures(union_hashes, prepared.hashes, prepared.scan.signatures, union_rows)
    return save_bundle(
        out,
        model=model,
        manifest=manifest,
        extra_files={
            "train_hashes.json": json.dumps(union_hashes),
            TRAIN_SIGNATURES: pack_signatures(signatures),
            MODEL_CARD: model_card(manifest),
        },
        writers={OOD_FILE: detector.save},
    )


def member_validation_splits(samples: SampleSet, bundle: Bundle) -> list[str]:
    """The splits ``bundle`` was trained with, rebuilt from the seed and fraction (or fold) in its recipe."""
    recipe = Manifest.from_dict(bundle.manifest).recipe
    if recipe.is_ensemble:
        raise ConfigError(f"{bundle.path}: is an ensemble; fuse its members instead of nesting ensembles")
    return list(recipe.rebuild_splits(samples).splits)


def fit_weights(true_class_probs: np.ndarray) -> np.ndarray:
    """Weights on the simplex minimising the log-loss of ``sum_i w_i p_i``.

    ``true_class_probs``: ``(M, N)``, each member's probability of the true class (the mixture's log-loss
    depends on nothing else). Convex in ``w``; solved with SLSQP from the uniform mixture.
    """
    from scipy.optimize import minimize

    p = np.clip(np.asarray(true_class_probs, dtype=np.float64).T, 1e-12, None)  # (N, M)
    m = p.shape[1]

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        mix = np.clip(p @ w, 1e-300, None)
        return float(-np.log(mix).mean()), -(p / mix[:, None]).mean(axis=0)

    res = minimize(
        loss,
        np.full(m, 1.0 / m),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"ftol": 1e-10, "maxiter": 500},
    )
    w = np.clip(res.x, 0.0, None)
    if not np.isfinite(w).all() or w.sum() <= 0:
        return np.full(m, 1.0 / m)
    return w / w.sum()


def fit_stacking(
    member_log_probs: np.ndarray, labels: np.ndarray, *, n_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on the concatenated member log-probabilities ``(M, N, K)``.

    Returns the weight ``(K, M*K)`` and bias ``(K,)`` of the equivalent ``nn.Linear`` (for two classes
    scikit-learn fits class 1's logit only; class 0's row is zero, which gives the same softmax).
    """
    from sklearn.linear_model import LogisticRegression

    m, n, k = member_log_probs.shape
    y = np.asarray(labels, dtype=np.int64)
    if len(np.unique(y)) != n_classes:
        raise DataError(
            f"stacking needs every class in the shared validation samples; found {len(np.unique(y))} of {n_classes}"
        )
    features = np.maximum(member_log_probs, LOG_FLOOR).transpose(1, 0, 2).reshape(n, m * k)
    clf = LogisticRegression(C=STACKING_C, max_iter=5000, random_state=seed)
    clf.fit(features, y)
    coef, intercept = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
    if n_classes == 2:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]], dtype=np.float32)
    return coef, intercept


def _fit_mean(model: Ensemble, lp: np.ndarray | None, y: np.ndarray, seed: int) -> dict[str, Any]:
    return {}  # equal weights, set when the module is built


def _fit_weighted(model: Ensemble, lp: np.ndarray | None, y: np.ndarray, seed: int) -> dict[str, Any]:
    assert lp is not None
    model.weights.copy_(torch.from_numpy(fit_weights(np.exp(lp[:, np.arange(len(y)), y]))))
    return {}


def _fit_stacked(model: Ensemble, lp: np.ndarray | None, y: np.ndarray, seed: int) -> dict[str, Any]:
    assert lp is not None
    coef, intercept = fit_stacking(lp, y, n_classes=model.n_classes, seed=seed)
    model.stack.weight.copy_(torch.from_numpy(coef))
    model.stack.bias.copy_(torch.from_numpy(intercept))
    return {"C": STACKING_C, "coef": coef.tolist(), "intercept": intercept.tolist()}


# Fusion method -> what fits its parameters on the shared validation log-probabilities (M, N, K).
_FITTERS = {"mean": _fit_mean, "weighted": _fit_weighted, "stacking": _fit_stacked}


# --------------------------------------------------------------------------------------------- helpers


def _check_compatible(members: list[Bundle]) -> None:
    if len(members) < 2:
        raise ConfigError("an ensemble needs at least two bundles")
    first = members[0]
    seen: dict[str, Path] = {}
    for b in members:
        if b.sha256 in seen:
            raise ConfigError(f"{b.path} and {seen[b.sha256]} are the same bundle: give distinct members")
        seen[b.sha256] = b.path
        if b.classes != first.classes:
            raise ConfigError(
                f"members must share their classes, in the same order: {first.path} has {first.classes}, "
                f"{b.path} has {b.classes}"
            )
        if _task(b) != _task(first):
            raise ConfigError(
                f"members must share their task: {first.path} is {_task(first)}, {b.path} is {_task(b)}"
            )
        a = {k: v for k, v in first.spec.to_dict().items() if k != "size"}
        c = {k: v for k, v in b.spec.to_dict().items() if k != "size"}
        if a != c:
            diff = sorted(k for k in a if a[k] != c.get(k))
            raise ConfigError(
                f"members must share their preprocessing except the input size; {b.path} differs from "
                f"{first.path} in: {', '.join(diff)}"
            )


def _task(b: Bundle) -> str:
    return Manifest.from_dict(b.manifest).task


def _ensemble_kwargs(members: list[Bundle], method: str) -> dict[str, Any]:
    # Multi-label members fuse per-finding sigmoids (said only then: other ensembles' kwargs are unchanged).
    extra = {"multilabel": True} if _task(members[0]) == "multilabel" else {}
    return {
        **extra,
        "members": [
            {
                "arch": b.arch,
                "kwargs": b.manifest["model"].get("kwargs", {}),
                "in_channels": b.manifest["model"]["in_channels"],
                "n_classes": b.manifest["model"]["n_classes"],
                "spatial_dims": b.manifest["model"]["spatial_dims"],
                "size": list(b.spec.size),
                "temperature": b.temperature,
                **_finding_temperatures(b),
            }
            for b in members
        ],
        "method": method,
    }


def _finding_temperatures(b: Bundle) -> dict[str, Any]:
    """``temperatures`` of a multi-label member that has them (said only then: other members' records and
    ensemble arguments are unchanged)."""
    per = b.finding_temperatures
    return {} if per is None else {"temperatures": list(per)}


def _build(members: list[Bundle], method: str) -> Ensemble:
    kw = _ensemble_kwargs(members, method)
    m0 = members[0].manifest["model"]
    model = Ensemble(m0["in_channels"], m0["n_classes"], m0["spatial_dims"], **kw)
    for net, b in zip(model.members, members, strict=True):
        net.load_state_dict(b.model.state_dict())
    return model.eval()


def _fit_ood(
    model: Ensemble,
    tensors: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    labels: np.ndarray,
    seed: int,
    label_names: list[str],
) -> OODDetector:
    """The ensemble's out-of-distribution guard (:mod:`medclf.ood`), fitted like a single model's on the
    features its graph exposes (the last member's penultimate features; the stacked log-probabilities for
    ``stacking``) and the input statistics, over the training and validation rows of that last member.
    Fewer training rows than for one model: every member runs on each."""
    rng = np.random.default_rng(seed)
    train_idx = np.flatnonzero(train_rows)
    fit_idx = np.sort(rng.choice(train_idx, size=min(len(train_idx), OOD_FIT_SAMPLES), replace=False))
    val_idx = np.flatnonzero(val_rows)
    fit_x = np.asarray(tensors[fit_idx], dtype=np.float32)
    val_x = np.asarray(tensors[val_idx], dtype=np.float32)
    return fit_detector(
        penultimate_features(model, fit_x),
        labels[fit_idx],
        penultimate_features(model, val_x),
        train_inputs=fit_x,
        val_inputs=val_x,
        seed=seed,
        label_names=label_names,
    )


def _train_hashes(b: Bundle) -> set[str]:
    if "train_hashes.json" not in b.manifest.get("files", {}):
        raise BundleError(f"{b.path}: has no train_hashes.json, so its training data cannot be checked")
    return set(json.loads((b.path / "train_hashes.json").read_text()))


@torch.no_grad()
def _member_log_probs(model: Ensemble, j: int, tensors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Member ``j``'s log-probabilities ``(N, K)`` on the marked rows (NaN elsewhere)."""
    idx = np.flatnonzero(rows)
    out = np.full((len(tensors), model.n_classes), np.nan)
    for start in range(0, len(idx), _BATCH):
        part = idx[start : start + _BATCH]
        x = torch.from_numpy(np.asarray(tensors[part], dtype=np.float32))
        out[part] = model.member_log_prob(j, x).double().numpy()
    return out


def _findings_metrics(
    y: np.ndarray, fused: np.ndarray, classes: list[str], calibrate: bool, seed: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Multi-label validation metrics of the fused logits through per-finding temperatures (``calibrate``)
    fitted on these same samples, at per-finding thresholds chosen there too (Youden); those thresholds and
    the calibration section as the bundle records them (None without ``calibrate``)."""
    from medclf.metrics.multilabel import choose_thresholds, multilabel_metrics

    fits = fit_finding_temperatures(fused, y) if calibrate else None
    probs = probabilities(fused, [f.temperature for f in fits] if fits else 1.0, "multilabel")
    t, notes = choose_thresholds(y, probs)
    m = multilabel_metrics(y, probs, classes, thresholds=t, n_bootstrap=200, seed=seed)
    m["notes"] = [*notes, *m["notes"]]
    val = {"n": len(y), "auc": m["macro_auc"], "macro_auc": m["macro_auc"], "map": m["map"], "multilabel": m}
    val["note"] = (
        "the per-finding thresholds"
        + (" and temperatures" if fits else "")
        + " were chosen on these same samples"
    )
    calibration = None
    if fits:
        calibration = finding_calibration_record(classes, fits, fitted_on="validation shared by the members")
        for name, fit in zip(classes, fits, strict=True):
            m["per_label"][name].update(ece_uncalibrated=fit.ece_before, temperature=fit.temperature)
        val.update(
            ece=calibration["ece_after"],
            ece_uncalibrated=calibration["ece_before"],
            temperatures=calibration["temperatures"],
        )
    record = {
        "rule": "youden",
        "fitted_on": "validation shared by the members",
        "labels": dict(zip(classes, map(float, t), strict=True)),
    }
    return val, record, calibration


def _mean_thresholds(members: list[Bundle], classes: list[str]) -> dict[str, Any] | None:
    """Each finding's threshold as the mean of the members' (0.5 for a member without one)."""
    per_member = [(b.manifest.get("thresholds") or {}).get("labels") or {} for b in members]
    return {
        "rule": "mean of the members' thresholds (too few shared validation samples to choose them)",
        "fitted_on": "the members' validation splits",
        "labels": {c: float(np.mean([t.get(c, 0.5) for t in per_member])) for c in classes},
    }


def _metrics(
    y: np.ndarray,
    log_probs: np.ndarray,
    classes: list[str],
    seed: int,
    thresholds: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    if len(y) == 0:
        return None
    if y.ndim == 2:  # multi-label: per-finding sigmoids, decided at ``thresholds`` (0.5 without)
        from medclf.metrics.multilabel import multilabel_metrics

        t = [thresholds["labels"][c] for c in classes] if thresholds else None
        m = multilabel_metrics(y, np.exp(log_probs), classes, thresholds=t, n_bootstrap=200, seed=seed)
        return {"n": len(y), "auc": m["macro_auc"], "map": m["map"], "multilabel": m}
    return compute_metrics(y, np.exp(log_probs), classes, n_bootstrap=200, seed=seed)


def _out_of_fold_predictions(
    members: list[Bundle], own_val: list[np.ndarray], log_probs: dict[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | None:
    """K-fold members: the rows that exactly one member validated on (each training sample of the folds),
    and that member's log-probabilities there; None for other members or when there are no such rows."""
    folds = [b.manifest.get("recipe", {}).get("val_fold") for b in members]
    if not all(folds):
        return None
    rows = np.flatnonzero(np.sum(own_val, axis=0) == 1)
    if len(rows) == 0:
        return None
    owner = np.argmax(np.array(own_val)[:, rows], axis=0)
    return rows, np.stack([log_probs[int(j)][i] for i, j in zip(rows, owner, strict=True)])


def _oof_thresholds(
    labels: np.ndarray, oof: tuple[np.ndarray, np.ndarray] | None, classes: list[str]
) -> dict[str, Any] | None:
    """Multi-label K-fold members without shared validation samples: each finding's threshold chosen on the
    out-of-fold probabilities (Youden, as one model's on its validation split): every training sample scored
    by the member that did not train on it, the closest to unseen data that K-fold bagging has."""
    if oof is None:
        return None
    from medclf.metrics.multilabel import choose_thresholds

    rows, lp = oof
    t, notes = choose_thresholds(labels[rows], np.exp(lp))
    record: dict[str, Any] = {
        "rule": "youden",
        "fitted_on": "out-of-fold predictions (each training sample scored by the member that did not train on it)",
        "labels": dict(zip(classes, map(float, t), strict=True)),
    }
    if notes:
        record["notes"] = notes
    return record


def _out_of_fold(
    oof: tuple[np.ndarray, np.ndarray] | None,
    labels: np.ndarray,
    classes: list[str],
    seed: int,
    thresholds: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """K-fold members: metrics of each training sample predicted by the member that did not train on it
    (multi-label findings decided at the ensemble's thresholds)."""
    if oof is None:
        return None
    rows, lp = oof
    m = _metrics(labels[rows], lp, classes, seed, thresholds)
    if m is not None:
        m["note"] = (
            "out-of-fold: every training sample scored by the one member that validated on it; an estimate "
            "for a single member, not for the ensemble"
        )
        if thresholds and str(thresholds.get("fitted_on", "")).startswith("out-of-fold"):
            m["note"] += "; the per-finding thresholds were chosen on these same samples"
    return m


def _resampling_note(members: list[Bundle], base: Bundle) -> str | None:
    smaller = [str(b.path) for b in members if tuple(b.spec.size) != tuple(base.spec.size)]
    if not smaller:
        return None
    return (
        f"input {list(base.spec.size)}; members at smaller sizes get an anti-aliased resample of it "
        f"({', '.join(smaller)})"
    )


def _print_summary(
    path: Path,
    member_metrics: list[dict[str, Any] | None],
    member_own: list[dict[str, Any] | None],
    val: dict[str, Any] | None,
    weights: list[float] | None,
    cal: TemperatureFit,
) -> None:
    rep = reporting.current()
    for j, (m, own) in enumerate(zip(member_metrics, member_own, strict=True)):
        shown = m or own
        where = "shared validation" if m else "its own validation"
        w = f"  weight {weights[j]:.3f}" if weights else ""
        if shown:
            rep.print(
                f"  member {j}: AUC {_f(shown.get('auc'))}  accuracy {_f(shown.get('accuracy'))} ({where}){w}"
            )
    if val:
        per = val.get("temperatures")  # multi-label: one per finding, the ECE a mean over findings
        t = ", ".join(f"{k} {v:.3g}" for k, v in per.items()) if per else f"{cal.temperature:.3g}"
        rep.print(
            f"  ensemble: AUC {_f(val.get('auc'))}  accuracy {_f(val.get('accuracy'))}  "
            f"ECE {_f(val.get('ece_uncalibrated'))} -> {_f(val.get('ece'))} (T = {t})"
        )
    rep.print(f"[bold green]Ensemble bundle written[/] to {path}")


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"
