"""``medclf recalibrate``: fit a bundle's temperature and an operating point on a labelled sample from a site.

A model moved to a new site (scanner, protocol, population) keeps its ranking of images better than its
probabilities: its confidence drifts, and a threshold chosen elsewhere no longer gives the sensitivity it
promised. On a small labelled sample from the site this flow

1. removes copies of the model's training images (exact by hash, near by the signatures the bundle
   carries), as every evaluation does;
2. refits the temperature (minimum log-loss, :mod:`.calibration`; on the class map's groups when the site's
   labels are groups);
3. fits a threshold on the positive group's probability: the highest one whose sensitivity on the sample
   reaches ``--sensitivity``, or the one maximising Youden's J;

and writes a **new** sealed bundle (the source is never touched) with ``operating_point`` and the new
``calibration`` in its manifest: what was fitted, on what (a content hash of the images and labels used),
and the sensitivity/specificity it achieved on the sample with exact 95 % intervals. Those figures are
measured on the sample the threshold was fitted on, so they are optimistic: confirm them with
``medclf evaluate NEW OTHER_SITE_DATA`` on images the fit never saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_softmax, logsumexp

from medclf import reporting
from medclf.bundle import WEIGHTS, Bundle, save_bundle
from medclf.data.cache import PreparedData, prepare_for_bundle
from medclf.data.samples import SampleSet
from medclf.data.sources import load_source
from medclf.errors import ConfigError, DataError
from medclf.evaluation.classmap import ClassMap, parse_class_map
from medclf.evaluation.operating import binary_figures, fit_threshold
from medclf.metrics.calibration import (
    TemperatureFit,
    apply_temperature,
    fit_temperature,
    fit_temperature_by,
    log_probs,
)
from medclf.model_card import MODEL_CARD, model_card
from medclf.operating_point import METHODS, OperatingPoint
from medclf.predictor import Predictor, as_predictor

__all__ = ["MIN_PER_SIDE", "fit_grouped_temperature", "recalibrate"]

# Fewer positive or negative site samples than this cannot place a threshold usefully (one image moves
# the sensitivity by 5 points at 20).
MIN_PER_SIDE = 20


def recalibrate(
    bundle: str | Path | Bundle | Predictor,
    data: str | Path,
    out: str | Path,
    *,
    positive: str | None = None,
    sensitivity: float | None = None,
    class_map: str | Mapping[str, Sequence[str]] | None = None,
    split: str | None = None,
    engine: str = "auto",
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the temperature and an operating point of ``bundle`` on the labelled site sample ``data`` and
    write a new bundle to ``out``. Returns the ``operating_point`` record written.

    ``positive``: the class, or the ``class_map`` group, a positive decision means (default: class 1 of a
    two-class model). ``sensitivity``: the target sensitivity (default: Youden's J). ``split``: use only that
    split of ``data`` (default: every labelled sample). ``engine``: what runs the model, as for ``predict``.
    Messages go to the active reporter (:mod:`medclf.reporting`).
    """
    b = as_predictor(bundle)
    out = Path(out)
    _check_request(b, bundle, out, sensitivity)
    engine = b.engine(engine)
    cmap = parse_class_map(class_map, b.classes) if class_map is not None else None
    point_classes, negative = _positive_group(b.classes, cmap, positive)
    positive = positive or point_classes[0]

    site = _read_site(b, data, split, cmap, cache_dir=cache_dir, workers=workers, progress=progress)
    raw = b.predict_tensors(
        np.asarray(site.prepared.tensors[site.rows]), batch_size=128, engine=engine, calibrated=False
    )
    y = site.labels[site.rows]
    z = log_probs(raw)
    point = OperatingPoint(positive, point_classes, 0.0, "youden", negative)
    temp, truth = _temperature_and_truth(b, site.by_class, cmap, point, z, y)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos < MIN_PER_SIDE or n_neg < MIN_PER_SIDE:
        raise DataError(
            f"{data}: {n_pos} positive ({positive}) and {n_neg} negative usable samples (after removing "
            f"{int(site.copies.sum())} copies of training images and {int((~site.prepared.ok).sum())} "
            f"unreadable files); recalibration needs at least {MIN_PER_SIDE} of each"
        )
    note = temp.note
    temperature = temp.temperature
    if note and temperature == 1.0 and b.temperature != 1.0:
        # Nothing to fit against (e.g. no errors on the sample): keep the bundle's own temperature.
        temperature, note = b.temperature, f"{note}; the bundle's temperature {b.temperature:.4g} was kept"
    probs = apply_temperature(z, temperature)
    score = point.scores(probs, point.columns(b.classes))
    threshold = fit_threshold(truth, score, sensitivity=sensitivity)
    figures = binary_figures(truth, score, threshold)
    method = "sensitivity" if sensitivity is not None else "youden"
    record = site.record(data, split, cmap)
    fit = _fit_record(b, method, figures, engine, temperature, record)
    point = OperatingPoint(
        positive=positive,
        classes=point_classes,
        threshold=threshold,
        method=method,
        negative=negative,
        target=sensitivity,
        fit=fit,
    )
    calibration = {
        **temp.to_dict(),
        "temperature": temperature,
        "note": note,
        "fitted_on": f"site sample {record['source']} (medclf recalibrate), n={len(site.rows)}",
        "labels": record["labels"],
        "previous": b.manifest.get("calibration"),
    }
    path = _write_bundle(b, out, calibration, point, record)
    _print_summary(path, point, figures, temp, temperature, b.temperature, record)
    return point.to_manifest()


def _check_request(
    b: Predictor, bundle: str | Path | Bundle | Predictor, out: Path, sensitivity: float | None
) -> None:
    """Refuse, before any data is read, what recalibration cannot do."""
    if b.manifest.get("task") == "multilabel":  # its operating points are per finding, chosen in training
        raise ConfigError(
            "recalibrate fits one temperature and one operating point: not for multi-label bundles"
        )
    if out.resolve() == b.path.resolve() or (
        isinstance(bundle, (str, Path)) and out.resolve() == Path(bundle).resolve()
    ):
        raise ConfigError(
            f"--out {out} is the source bundle: recalibration writes a new bundle, never over its source"
        )
    if sensitivity is not None and not 0 < sensitivity <= 1:
        raise ConfigError(f"--sensitivity must lie in (0, 1], got {sensitivity}")


def _temperature_and_truth(
    b: Predictor, by_class: bool, cmap: ClassMap | None, point: OperatingPoint, z: np.ndarray, y: np.ndarray
) -> tuple[TemperatureFit, np.ndarray]:
    """The temperature fitted on the site's labels (model classes, or class-map groups) and which samples
    are positive for ``point``."""
    if by_class:
        return fit_temperature(z, y), np.isin(y, point.columns(b.classes))
    assert cmap is not None
    return fit_grouped_temperature(z, y, cmap.matrix()), np.isin(y, point.columns(cmap.names, cmap.groups))


def _fit_record(
    b: Predictor,
    method: str,
    figures: dict[str, Any],
    engine: str,
    temperature: float,
    site: dict[str, Any],
) -> dict[str, Any]:
    """What the operating point records about its fit."""
    return {
        "method_description": METHODS[method],
        "achieved": figures,
        "engine": engine,
        "temperature": temperature,
        "site": site,
        "source_bundle_sha256": b.sha256,
        "caution": "figures measured on the sample the threshold was fitted on: optimistic; confirm them "
        "with medclf evaluate on other images from the site",
    }


@dataclass
class _Site:
    """The labelled site sample as recalibration uses it: which rows are usable and why the others are not."""

    samples: SampleSet
    labels: np.ndarray  # model class indices (or class-map group indices); -1 unlabelled
    by_class: bool  # labels name the model's classes (else: class-map groups)
    prepared: PreparedData
    rows: np.ndarray  # readable, labelled, not a copy of a training image
    exact: np.ndarray
    near: np.ndarray
    copies: np.ndarray
    readable: np.ndarray
    near_checked: bool

    def record(self, data: str | Path, split: str | None, cmap: ClassMap | None) -> dict[str, Any]:
        """What the manifest says about the sample (a content hash, not its files)."""
        used = sorted(f"{self.prepared.hashes[i]} {int(self.labels[i])}" for i in self.rows)
        return {
            "source": Path(str(data)).name,
            "split": split,
            "content_sha256": hashlib.sha256("\n".join(used).encode()).hexdigest(),
            "n_files": len(self.samples),
            "n_used": len(self.rows),
            "n_removed_copies": int(self.copies.sum()),
            "n_removed_exact": int((self.exact & self.readable).sum()),
            "n_removed_near": int((self.near & ~self.exact & self.readable).sum()),
            "n_unreadable": int((~self.prepared.ok).sum()),
            "near_copies_checked": self.near_checked,
            "labels": "model classes" if self.by_class else "class-map groups",
            "class_map": cmap.to_dict() if cmap is not None else None,
        }


def _read_site(
    b: Predictor,
    data: str | Path,
    split: str | None,
    cmap: ClassMap | None,
    *,
    cache_dir: str | Path | None,
    workers: int | None,
    progress: bool,
) -> _Site:
    """Load and decode the site sample, map its labels onto the model's classes (or the class map's groups)
    and leave out unreadable files and copies of the bundle's training images."""
    samples = load_source(data, default_split="test")
    if split is not None:
        if not samples.has_split(split):
            have = ", ".join(sorted(set(samples.splits)))
            raise DataError(f"{data}: no {split!r} split (it has: {have})")
        samples = samples.subset(samples.indices(split))
    # Every image is a site sample: none of them is the model's training data, whatever its split folder says.
    samples = samples.with_splits(["test"] * len(samples))
    by_class = all(c in b.classes for c in samples.classes)
    if by_class:
        lut = np.array([b.classes.index(c) for c in samples.classes], dtype=np.int64)
    elif cmap is not None:
        lut = cmap.label_lookup(samples.classes, where=str(data))
    else:
        unknown = [c for c in samples.classes if c not in b.classes]
        raise DataError(
            f"{data}: labels {unknown} are not model classes {b.classes}; give --class-map when the site's "
            "labels group the model's classes"
        )
    labels = np.where(samples.labels >= 0, lut[np.maximum(samples.labels, 0)], -1)

    found = prepare_for_bundle(
        samples,
        b.spec,
        b.path,
        b.manifest.get("files", {}),
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
    )
    prepared, exact, near = found.prepared, found.exact, found.near
    readable = prepared.ok & (labels >= 0)
    copies = (exact | near) & readable
    if not found.near_checked:
        reporting.current().print(
            "[yellow]note:[/] the bundle carries no training signatures: only exact copies removed"
        )
    return _Site(
        samples=samples,
        labels=labels,
        by_class=by_class,
        prepared=prepared,
        rows=np.flatnonzero(readable & ~copies),
        exact=exact,
        near=near,
        copies=copies,
        readable=readable,
        near_checked=found.near_checked,
    )


def _write_bundle(
    b: Predictor, out: Path, calibration: dict[str, Any], point: OperatingPoint, site: dict[str, Any]
) -> Path:
    """The source bundle with the new calibration and operating point, as a new sealed bundle."""
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "self_sha256")}
    manifest.update(
        calibration={k: v for k, v in calibration.items() if v is not None},
        operating_point=point.to_manifest(),
        recalibration={"source_bundle_sha256": b.sha256, "source_bundle": str(b.path), "site": site},
    )
    keep: dict[str, Path | str] = {name: b.path / name for name in b.manifest["files"] if name != WEIGHTS}
    keep[MODEL_CARD] = model_card(manifest)  # with the operating point and the new calibration
    return save_bundle(out, model=b.model, manifest=manifest, extra_files=keep)


def fit_grouped_temperature(
    logits: np.ndarray, group_labels: np.ndarray, membership: np.ndarray
) -> TemperatureFit:
    """The temperature minimising the log-loss of **grouped** probabilities: ``P(group) = sum over its
    classes of softmax(logits / T)``, for labels that name groups of the model's classes (a class map).

    ``membership``: the (classes, groups) 0/1 matrix of :meth:`ClassMap.matrix`. Same bounds and degenerate
    cases as :func:`~medclf.metrics.calibration.fit_temperature`."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(group_labels, dtype=np.int64)
    member = np.asarray(membership, dtype=bool).T[y]  # (N, classes): the classes of each sample's group

    def nll(t: float) -> float:
        lp = np.where(member, log_softmax(z / t, axis=1), -np.inf)
        return float(-logsumexp(lp, axis=1).mean())

    def grouped(t: float) -> np.ndarray:
        return apply_temperature(z, t) @ np.asarray(membership, dtype=np.float64)

    return fit_temperature_by(
        y,
        nll,
        grouped,
        no_errors="no errors on the grouped labels",
        method="temperature scaling (minimum log-loss of the class-map groups' probabilities)",
    )


def _positive_group(
    classes: Sequence[str], cmap: ClassMap | None, positive: str | None
) -> tuple[tuple[str, ...], str]:
    """The model classes of the positive group, and the name of a negative decision."""
    if positive is None:
        if len(classes) == 2 and cmap is None:
            return (classes[1],), classes[0]
        choices = list(cmap.groups) if cmap is not None else list(classes)
        raise ConfigError(
            f"--positive is required: name the class or class-map group to detect ({', '.join(choices)})"
        )
    if cmap is not None and positive in cmap.groups:
        others = [g for g in cmap.groups if g != positive]
        return cmap.groups[positive], others[0] if len(others) == 1 else f"not {positive}"
    if positive in classes:
        others = [c for c in classes if c != positive]
        return (positive,), others[0] if len(others) == 1 else f"not {positive}"
    choices = [*(cmap.groups if cmap is not None else []), *classes]
    raise ConfigError(
        f"--positive {positive!r} is neither a model class nor a class-map group ({', '.join(choices)})"
    )


def _print_summary(
    path: Path,
    point: OperatingPoint,
    figures: dict[str, Any],
    temp: TemperatureFit,
    temperature: float,
    previous: float,
    site: dict[str, Any],
) -> None:
    ci = figures["ci"]
    rep = reporting.current()

    def f(key: str) -> str:
        v, iv = figures[key], ci[key]
        return "n/a" if v is None else f"{v:.3f} [{iv[0]:.3f}, {iv[1]:.3f}]"

    rep.print(
        f"Site sample: {site['n_used']} images used ({figures['n_positive']} {point.positive}, "
        f"{figures['n_negative']} {point.negative}); removed {site['n_removed_copies']} copies of training "
        f"images ({site['n_removed_exact']} exact, {site['n_removed_near']} near), {site['n_unreadable']} unreadable"
    )
    rep.print(f"Temperature {previous:.4g} -> {temperature:.4g}" + (f" ({temp.note})" if temp.note else ""))
    rep.print(f"Operating point: {point.rule}")
    rep.print(
        f"  on the site sample: sensitivity {f('sensitivity')}, specificity {f('specificity')} (95% exact CIs)"
    )
    if point.target is not None and ci["sensitivity"] and ci["sensitivity"][0] < point.target:
        rep.print(
            f"  [yellow]note:[/] the interval's lower end {ci['sensitivity'][0]:.3f} is below the target "
            f"{point.target:g}: a larger site sample would pin the sensitivity down"
        )
    rep.print(f"[bold green]Bundle written[/] to {path}")
