"""``medclf evaluate``: a bundle on a dataset split -> metrics.json, predictions.csv, plots, report.html.

Headline figures leave out every sample of the split that copies a training sample (exact bytes, or the
same picture re-encoded/resized: see :mod:`medclf.data.signatures`); the same figures on the whole split, as
published protocols compute them, are kept under ``all_samples``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medclf import reporting
from medclf.bundle import Bundle
from medclf.data.cache import AgainstBundle, PreparedData, prepare_for_bundle
from medclf.data.samples import SampleSet
from medclf.data.sources import load_source
from medclf.errors import ConfigError, DataError
from medclf.evaluation.classmap import ClassMap, parse_class_map
from medclf.evaluation.plots import plot_augmentation_gallery, plot_confusion, plot_reliability, plot_roc
from medclf.evaluation.protocol import PROTOCOL, output_folder, protocol_fields, split_rows, write_metrics
from medclf.evaluation.report import write_report
from medclf.evaluation.subgroups import MIN_GROUP_N
from medclf.metrics.classification import compute_metrics, expected_calibration_error
from medclf.metrics.ordinal import ordinal_metrics
from medclf.operating_point import OperatingPoint
from medclf.predictor import Predictor, as_predictor
from medclf.tta import describe as describe_tta

__all__ = ["PROTOCOL", "evaluate", "write_evaluation"]

_ATTACKS = "Adversarial robustness (white-box FGSM / PGD, L-inf)"  # the report's section


def evaluate(
    bundle: str | Path | Bundle | Predictor,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    include_train_copies: bool = False,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = True,
    engine: str = "auto",
    tta: bool | str | Sequence[str] | None = None,
    robustness: bool = False,
    by: str | Sequence[str] | None = None,
    class_map: str | Mapping[str, Sequence[str]] | ClassMap | None = None,
    operating_point: bool | None = None,
    min_group_n: int = MIN_GROUP_N,
    manifest: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``bundle`` on ``split`` of ``data``; write the outputs to ``out`` and return the metrics.

    ``by``: grouping keys (``"site,sex"`` or a list) for subgroup evaluation (:mod:`.subgroups`): manifest
    columns, acquisition keys (``size``, ``format``, ...) or DICOM keywords; by default the keys the
    bundle's shortcut audit flagged, if any. ``class_map``: score the model on groups of its classes
    (``'tumour=glioma,meningioma,pituitary;normal=notumor'``, :mod:`.classmap`); the data's labels are
    group names or model classes. ``operating_point``: report sensitivity/specificity at the bundle's
    operating point (``medclf recalibrate``); None: when the bundle has one.

    ``robustness``: also measure accuracy under FGSM and PGD attacks (:mod:`.robustness`) on the
    headline samples, into ``metrics["robustness"]`` and a section of the report.

    ``engine`` picks what runs the model (see :mod:`medclf.engines`; ``auto``: the bundle's ONNX model
    when it has one); the metrics record which one ran. ``tta``: test-time augmentation (see
    :mod:`medclf.tta`), recorded in the metrics. ``ece_uncalibrated`` is the ECE of the same predictions
    without the bundle's temperature."""
    b = as_predictor(bundle)
    engine = b.engine(engine)
    views = b.tta_views(tta)
    samples = _load_split(data, split, manifest)
    if _is_findings(b, samples, data):
        from medclf.evaluation.findings import evaluate_findings

        return evaluate_findings(
            b, samples, data, out, split=split, include_train_copies=include_train_copies, cache_dir=cache_dir,
            workers=workers, n_bootstrap=n_bootstrap, seed=seed, progress=progress,
            engine=engine, views=views,
        )  # fmt: skip
    target = _target(b, samples, data, class_map, robustness, operating_point)
    idx = np.flatnonzero(np.array([s == split for s in samples.splits]))
    groups = _subgroup_labels(b, samples, idx, by, workers)
    found = _decode(b, samples, cache_dir=cache_dir, workers=workers, progress=progress)
    prepared = found.prepared
    usable = idx[prepared.ok[idx] & (target.labels[idx] >= 0)]
    probs, uncalibrated = _predict(b, prepared, usable, len(samples), target.cmap, engine=engine, views=views)
    extra = _provenance(b, found, samples, target.cmap, usable, engine, views, include_train_copies)
    sections = _report_sections(b, prepared.errors, data, split)
    if target.cmap is not None:
        sections["Class map (external validation)"] = _class_map_section(target.cmap, extra)
    if robustness and len(usable):
        rows = usable if include_train_copies else usable[~prepared.train_copy[usable]]
        extra["robustness"], sections[_ATTACKS] = _robustness(b, prepared, target.labels, rows, seed)
    return write_evaluation(
        out, samples=samples, labels=target.labels, probs=probs, ok=prepared.ok,
        train_copy=prepared.train_copy, errors=[str(m or "unreadable") for m in prepared.scan.messages],
        split=split, classes=target.classes, include_train_copies=include_train_copies,
        n_bootstrap=n_bootstrap, seed=seed, title=f"medclf evaluation: {Path(str(data)).name} / {split}",
        subgroups=groups, patient_ids=samples.patient_ids, operating_point=target.point,
        min_group_n=min_group_n, sections=sections, extra=extra,
        uncalibrated_probs=uncalibrated, temperature=b.temperature, grades=_grading(b, samples, target.cmap),
        extra_figures=_augmentation_gallery(b, samples, prepared, Path(out)),
    )  # fmt: skip


class _Target(NamedTuple):
    """What the model is scored against: ``labels`` index ``classes`` (the model's, or a class map's groups);
    ``point``: the operating point whose decisions are scored, and the columns of its positive group."""

    cmap: ClassMap | None
    labels: np.ndarray
    classes: list[str]
    point: tuple[OperatingPoint, np.ndarray] | None


def _load_split(data: str | Path, split: str, manifest: Mapping[str, str] | None) -> SampleSet:
    """The dataset, refused when it has no ``split``."""
    samples = load_source(data, default_split="test", manifest=dict(manifest or {}))
    if not samples.has_split(split):
        have = ", ".join(sorted(set(samples.splits)))
        raise DataError(f"{data}: no {split!r} split (it has: {have}); choose one with --split")
    return samples


def _is_findings(b: Predictor, samples: SampleSet, data: str | Path) -> bool:
    """Whether the model or the data are multi-label (findings); refuses a single-label model on findings."""
    if b.manifest.get("task") != "multilabel" and samples.task != "multilabel":
        return False
    if b.manifest.get("task") != "multilabel":
        raise DataError(
            f"{data}: multi-label findings need a multi-label model; this one has one class per image"
        )
    return True


def _target(
    b: Predictor,
    samples: SampleSet,
    data: str | Path,
    class_map: str | Mapping[str, Sequence[str]] | ClassMap | None,
    robustness: bool,
    operating_point: bool | None,
) -> _Target:
    """The dataset's labels as the model is scored on them (its classes, or the class map's groups)."""
    cmap = _class_map(class_map, b.classes)
    if cmap is not None and robustness:
        raise ConfigError("--robustness attacks the model's own classes: run it without --class-map")
    labels = _map_labels(samples, b.classes, data) if cmap is None else _group_labels(samples, cmap, data)
    classes = b.classes if cmap is None else cmap.names
    return _Target(cmap, labels, classes, _operating_point(b, operating_point, classes, cmap))


def _decode(
    b: Predictor,
    samples: SampleSet,
    *,
    cache_dir: str | Path | None,
    workers: int | None,
    progress: bool,
) -> AgainstBundle:
    """The samples decoded with the bundle's spec, those that copy its training images marked ``train_copy``."""
    found = prepare_for_bundle(
        samples,
        b.spec,
        b.path,
        b.manifest.get("files", {}),
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
    )
    # Copies of the model's training images, by hash and by the signatures the bundle carries (a dataset
    # the model never saw has no train split of its own to compare against).
    found.prepared.train_copy = found.exact | found.near
    if not found.near_checked and not samples.has_split("train"):
        reporting.current().print(
            "[yellow]note:[/] this bundle carries no training signatures (made before they were stored): "
            "only exact copies of training images (same bytes) can be removed"
        )
    return found


def _predict(
    b: Predictor,
    prepared: PreparedData,
    usable: np.ndarray,
    n_samples: int,
    cmap: ClassMap | None,
    *,
    engine: str,
    views: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of the ``usable`` rows (NaN elsewhere), with and without the bundle's temperature;
    summed into the class map's groups when there is one."""
    probs = np.full((n_samples, len(b.classes)), np.nan)
    uncalibrated = probs.copy()
    if len(usable):
        x = np.asarray(prepared.tensors[usable])
        probs[usable] = b.predict_tensors(x, batch_size=128, engine=engine, tta=views)
        uncalibrated[usable] = (
            b.predict_tensors(x, batch_size=128, engine=engine, tta=views, calibrated=False)
            if b.temperature != 1.0
            else probs[usable]
        )
    if cmap is not None:  # a group's probability is the sum of its classes'
        probs, uncalibrated = cmap.apply(probs), cmap.apply(uncalibrated)
    return probs, uncalibrated


def _provenance(
    b: Predictor,
    found: AgainstBundle,
    samples: SampleSet,
    cmap: ClassMap | None,
    usable: np.ndarray,
    engine: str,
    views: Any,
    include_train_copies: bool,
) -> dict[str, Any]:
    """What metrics.json records of the model, how it ran, the copies of its training images removed from
    the ``usable`` rows, and warnings from its training (also printed)."""
    exact, near = found.exact[usable], found.near[usable]
    extra: dict[str, Any] = {
        "bundle_sha256": b.sha256,
        "engine": engine,
        "tta": describe_tta(views),
        "n_removed_exact": 0 if include_train_copies else int(exact.sum()),
        "n_removed_near": 0 if include_train_copies else int((near & ~exact).sum()),
        "near_copies_checked": found.near_checked or samples.has_split("train"),
    }
    if cmap is not None:
        extra["class_map"] = cmap.to_dict()
        extra["model_classes"] = list(b.classes)
    gate = b.manifest.get("sanity")
    if gate and not gate.get("passed", True):
        # The training run's sanity gate failed (medclf.sanity): the report shows why, at the top.
        extra["training_warnings"] = list(gate.get("warnings", []))
        for w in extra["training_warnings"]:
            reporting.current().print(f"[bold red]warning:[/] this model's training: {w}", highlight=False)
    return extra


def _class_map_section(cmap: ClassMap, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "groups": cmap.describe(),
        "group probability": "sum of the probabilities of the group's model classes",
        "copies of training images removed": (
            f"{extra['n_removed_exact']} exact (same bytes), {extra['n_removed_near']} near (same picture "
            "re-encoded or resized)" + ("" if extra["near_copies_checked"] else "; near copies not checked")
        ),
    }


def _robustness(
    b: Predictor, prepared: PreparedData, labels: np.ndarray, rows: np.ndarray, seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy under FGSM and PGD attacks on ``rows``: the record for metrics.json and the report's table."""
    from medclf.evaluation.robustness import robustness_report

    reporting.current().print(f"Adversarial robustness (FGSM, PGD) on {min(len(rows), 512)} samples...")
    report = robustness_report(b.model, np.asarray(prepared.tensors[rows]), labels[rows], seed=seed)
    table = [
        {
            "eps (8-bit grey levels)": a["eps_8bit_levels"],
            "clean accuracy": f"{report['clean_accuracy']:.3f}",
            "FGSM accuracy": f"{a['fgsm_accuracy']:.3f}",
            f"PGD-{report['pgd_steps']} accuracy": f"{a['pgd_accuracy']:.3f}",
        }
        for a in report["attacks"]
    ]
    return report, table


def _augmentation_gallery(b: Predictor, samples: SampleSet, prepared: Any, out: Path) -> dict[str, Path]:
    """A few training inputs and what the bundle's augmentation preset made of them, when both are known."""
    import torch

    from medclf.augment import gallery, list_presets

    preset = b.manifest.get("recipe", {}).get("augment")
    train = np.flatnonzero(prepared.ok & (np.array(samples.splits) == "train"))
    if preset not in list_presets() or preset == "none" or len(train) == 0:
        return {}
    pick = train[np.linspace(0, len(train) - 1, num=min(4, len(train))).astype(int)]
    x = torch.from_numpy(np.asarray(prepared.tensors[pick], dtype=np.float32))
    original, views = gallery(x, preset, n_views=4, seed=0)
    title = f"Augmentation gallery: training inputs and '{preset}' views (what the model was trained on)"
    path = plot_augmentation_gallery(
        original.numpy(), [v.numpy() for v in views], preset, out / "augment.png"
    )
    return {title: path}


def write_evaluation(
    out: str | Path,
    *,
    samples: SampleSet,
    labels: np.ndarray,
    probs: np.ndarray,
    ok: np.ndarray,
    train_copy: np.ndarray,
    errors: list[str],
    split: str,
    classes: list[str],
    include_train_copies: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    title: str = "medclf evaluation",
    sections: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    uncalibrated_probs: np.ndarray | None = None,
    temperature: float | None = None,
    extra_figures: dict[str, Path] | None = None,
    subgroups: Mapping[str, Sequence[str]] | None = None,
    patient_ids: Sequence[str | None] | None = None,
    operating_point: tuple[OperatingPoint, np.ndarray] | None = None,
    min_group_n: int = MIN_GROUP_N,
    grades: str | None = None,
) -> dict[str, Any]:
    """Metrics (headline without copies of training samples, and ``all_samples``), predictions.csv, plots
    and report.html for class probabilities ``probs`` (rows for every sample; NaN where unusable).

    ``subgroups``: key -> the group of every sample, for a subgroup analysis of the headline samples
    (``metrics["subgroups"]``, a forest plot and warnings); ``patient_ids`` make its bootstrap resample
    patients. ``operating_point``: a bundle's operating point and the columns of ``probs`` that sum to its
    positive group: sensitivity/specificity at it go to ``metrics["operating_point"]``. ``grades``: the classes
    are ordinal grades; score them as such (``metrics["ordinal"]``, :mod:`.ordinal`) with this decision rule
    (``median``: an ordinal model; ``argmax``: a multi-class model on graded data).

    Shared by ``evaluate`` and by anything else that produces probabilities (baselines, ensembles), so every
    method is scored and reported the same way. ``uncalibrated_probs`` (same rows, before temperature
    scaling by ``temperature``) adds ``ece_uncalibrated`` and ``temperature`` to the metrics and a second
    curve to the reliability diagram.
    """
    rows = split_rows(samples.splits, split, ok & (labels >= 0), probs, train_copy, include_train_copies)
    metrics, all_metrics = (
        _scored(labels, probs, classes, r, n_bootstrap, seed, uncalibrated_probs, temperature)
        for r in (rows.clean, rows.usable)
    )
    record = protocol_fields(rows, ok, include_train_copies)
    metrics.update(split=split, **record, **(extra or {}), all_samples=all_metrics)
    out = output_folder(out)
    sections, extra_figures = dict(sections or {}), dict(extra_figures or {})
    y, p = labels[rows.clean], probs[rows.clean]
    if operating_point is not None:
        metrics["operating_point"], sections["Operating point"] = _at_operating_point(operating_point, y, p)
    if grades is not None:
        metrics["ordinal"] = ordinal_metrics(
            y, p, classes, patient_ids=_rows_of(patient_ids, rows.clean), n_bootstrap=n_bootstrap, seed=seed,
            decision=grades,
        )  # fmt: skip
        sections["Grades"] = _grades_section(metrics["ordinal"])
    if subgroups:
        _add_subgroups(
            metrics, sections, extra_figures, subgroups, labels, probs, classes, rows.clean, patient_ids, out,
            n_bootstrap=n_bootstrap, seed=seed, min_n=min_group_n,
        )  # fmt: skip
    write_metrics(out, metrics)
    _write_predictions(
        out / "predictions.csv", samples, labels, probs, ok, train_copy, errors, rows.idx, classes
    )
    figures = _figures(labels, probs, uncalibrated_probs, rows.clean, classes, metrics, out, temperature)
    figures.update(extra_figures)
    write_report(out / "report.html", title=title, metrics=metrics, figures=figures, sections=sections)
    _print_evaluation(metrics, all_metrics, split=split, n_removed=rows.n_removed, out=out)
    return metrics


def _scored(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    rows: np.ndarray,
    n_bootstrap: int,
    seed: int,
    uncalibrated_probs: np.ndarray | None,
    temperature: float | None,
) -> dict[str, Any]:
    """The metrics of ``rows``; given their probabilities before temperature scaling, also the ECE of those
    and the temperature."""
    m = compute_metrics(labels[rows], probs[rows], classes, n_bootstrap=n_bootstrap, seed=seed)
    if uncalibrated_probs is not None:
        m["ece_uncalibrated"] = expected_calibration_error(labels[rows], uncalibrated_probs[rows])
        m["temperature"] = float(temperature if temperature is not None else 1.0)
    return m


def _at_operating_point(
    operating_point: tuple[OperatingPoint, np.ndarray], y: np.ndarray, probs: np.ndarray
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sensitivity, specificity (and more) of the point's decisions: the record for metrics.json and the
    report's section."""
    from medclf.evaluation.operating import binary_figures

    point, columns = operating_point
    found = binary_figures(np.isin(y, columns), point.scores(probs, columns), point.threshold)
    return {**point.to_manifest(), "evaluated": found}, _operating_point_section(point, found)


def _add_subgroups(
    metrics: dict[str, Any],
    sections: dict[str, Any],
    figures: dict[str, Path],
    subgroups: Mapping[str, Sequence[str]],
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    rows: np.ndarray,
    patient_ids: Sequence[str | None] | None,
    out: Path,
    *,
    n_bootstrap: int,
    seed: int,
    min_n: int,
) -> None:
    """A subgroup analysis of ``rows`` per key: into ``metrics["subgroups"]`` (its warnings into the notes),
    the report's sections and a forest plot in ``out``."""
    from medclf.evaluation.subgroups import plot_forest, subgroup_analysis

    ids = [patient_ids[i] for i in rows] if patient_ids is not None else None
    has_ids = ids is not None and any(pid not in (None, "") for pid in ids)
    metrics["subgroups"] = {}
    for key, values in subgroups.items():
        analysis = subgroup_analysis(
            labels[rows],
            probs[rows],
            classes,
            [values[i] for i in rows],
            key=key,
            patient_ids=ids if has_ids else None,
            n_bootstrap=n_bootstrap,
            seed=seed,
            min_n=min_n,
        )
        metrics["subgroups"][key] = analysis
        metrics["notes"] = [*metrics.get("notes", []), *analysis["warnings"]]
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in key)
        figures[f"Subgroups by {key} (forest plot)"] = plot_forest(analysis, out / f"subgroups_{safe}.png")
        sections.update(_subgroup_sections(analysis))


def _figures(
    labels: np.ndarray,
    probs: np.ndarray,
    uncalibrated_probs: np.ndarray | None,
    rows: np.ndarray,
    classes: list[str],
    metrics: dict[str, Any],
    out: Path,
    temperature: float | None,
) -> dict[str, Path]:
    """ROC curves, confusion matrix and reliability diagram of the headline samples (``rows``), in ``out``."""
    return {
        "ROC curves": plot_roc(labels[rows], probs[rows], classes, out / "roc.png"),
        "Confusion matrix": plot_confusion(metrics["confusion_matrix"], classes, out / "confusion.png"),
        "Reliability diagram": plot_reliability(
            labels[rows],
            probs[rows],
            out / "reliability.png",
            uncalibrated_probs=None if uncalibrated_probs is None else uncalibrated_probs[rows],
            temperature=temperature,
        ),
    }


def _print_evaluation(
    metrics: dict[str, Any],
    all_metrics: dict[str, Any],
    *,
    split: str,
    n_removed: int,
    out: Path,
) -> None:
    """The summary (to the active reporter): headline and whole-split figures, grades, subgroups, operating
    point."""
    rep = reporting.current()
    rep.print(
        f"[bold]{split}[/] n={metrics['n']} (removed {n_removed} copies of training samples)  "
        f"accuracy {metrics['accuracy']:.4f} {_ci(metrics, 'accuracy')}  AUC {_f(metrics['auc'])} {_ci(metrics, 'auc')}"
    )
    rep.print(
        f"  all samples (n={all_metrics['n']}): accuracy {all_metrics['accuracy']:.4f}  AUC {_f(all_metrics['auc'])}"
    )
    if "ordinal" in metrics:
        g = metrics["ordinal"]
        rep.print(
            f"  grades ({g['decision_rule']}): accuracy {g['accuracy']:.4f}  MAE {g['mae']:.3f} "
            f"{_ci_pair(g['ci']['mae'])}  QWK {_f(g['qwk'])} {_ci_pair(g['ci']['qwk'])}  within one grade "
            f"{g['within_one_accuracy']:.4f}"
        )
    _print_subgroups(metrics.get("subgroups", {}))
    if "operating_point" in metrics:
        op = metrics["operating_point"]
        e = op["evaluated"]
        rep.print(f"Operating point: {op['rule']}")
        rep.print(
            f"  sensitivity {_f(e['sensitivity'])} {_ci_pair(e['ci']['sensitivity'])}  "
            f"specificity {_f(e['specificity'])} {_ci_pair(e['ci']['specificity'])}  "
            f"(n={e['n_positive']} {op['positive']}, {e['n_negative']} {op['negative']})"
        )
    rep.print(f"Report: {out / 'report.html'}")


def _print_subgroups(analyses: dict[str, Any]) -> None:
    rep = reporting.current()
    for key, analysis in analyses.items():
        gap = analysis.get("largest_gap")
        groups_text = ", ".join(f"{g['group']} (n={g['n']})" for g in analysis["groups"])
        rep.print(f"Subgroups by {key}: {groups_text}")
        if gap:
            what = gap["metric"] if gap["class"] is None else f"{gap['metric']} of {gap['class']}"
            rep.print(
                f"  largest gap: {what} {gap['best']:.3f} ({gap['best_group']}) vs {gap['worst']:.3f} "
                f"({gap['worst_group']}), {gap['gap']:.3f}"
            )
        for w in analysis["warnings"]:
            rep.print(f"  [yellow]warning:[/] {w}", highlight=False)


def _grading(b: Predictor, samples: SampleSet, cmap: ClassMap | None) -> str | None:
    """How to score grades: an ordinal bundle by its median grade, a multi-class one on graded data by its
    argmax; None when the classes are not grades (or are regrouped by a class map)."""
    if cmap is not None:
        return None
    if b.manifest.get("task") == "ordinal":
        return "median"
    return "argmax" if samples.task == "ordinal" and len(b.classes) >= 3 else None


def _rows_of(patient_ids: Sequence[str | None] | None, rows: np.ndarray) -> list[str | None] | None:
    if patient_ids is None or not any(p not in (None, "") for p in patient_ids):
        return None
    return [patient_ids[i] for i in rows]


def _grades_section(g: dict[str, Any]) -> dict[str, Any]:
    """The report's table of ordinal figures with their intervals."""
    ci = g["ci"]
    return {
        "decision": g["decision_rule"],
        "accuracy": _fmt_ci(g["accuracy"], ci.get("accuracy")),
        "MAE (grades)": _fmt_ci(g["mae"], ci.get("mae")),
        "quadratic weighted kappa": _fmt_ci(g["qwk"], ci.get("qwk")),
        "within one grade": _fmt_ci(g["within_one_accuracy"], ci.get("within_one_accuracy")),
        "MedMNIST AUC / ACC (argmax)": f"{_f(g['auc'])} / {_f(g['argmax_accuracy'])}",
        "resampled by": g["ci"]["unit"],
    }


def _ci_pair(iv: list[float] | None) -> str:
    return f"[{iv[0]:.4f}, {iv[1]:.4f}]" if iv else ""


def _fmt_ci(v: float | None, iv: list[float] | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} ({iv[0]:.3f}-{iv[1]:.3f})" if iv else f"{v:.3f}"


def _subgroup_sections(analysis: dict[str, Any]) -> dict[str, Any]:
    """Report tables of one key's subgroup analysis: estimates per group, then the tests."""
    key = analysis["key"]
    rows = []
    for g in [analysis["overall"], *analysis["groups"]]:
        row: dict[str, Any] = {
            "group": g["group"],
            "n": g["n"],
            "tested": "reference" if g is analysis["overall"] else g["tested"],
            "accuracy": _fmt_ci(g["accuracy"], g["ci"]["accuracy"]),
            "AUC": _fmt_ci(g["auc"], g["ci"]["auc"]),
        }
        for cls, pc in g["per_class"].items():
            ci = g["ci"]["per_class"][cls]
            row[f"sens. {cls}"] = _fmt_ci(pc["sensitivity"], ci["sensitivity"])
            row[f"spec. {cls}"] = _fmt_ci(pc["specificity"], ci["specificity"])
        if g is not analysis["overall"]:
            row["significantly worse in"] = ", ".join(g.get("significantly_worse", [])) or "-"
        rows.append(row)
    gap = analysis.get("largest_gap")
    text = f"{analysis['ci_method']}. Test: {analysis['test_method']}" + "".join(
        f" Pooled into {name}: {', '.join(values)}." for name, values in analysis["pooled"].items()
    )
    if gap:
        what = gap["metric"] if gap["class"] is None else f"{gap['metric']} of {gap['class']}"
        text += (
            f" Largest gap: {what}, {gap['best']:.3f} in {gap['best_group']} vs {gap['worst']:.3f} in "
            f"{gap['worst_group']} ({gap['gap']:.3f})."
        )
    tests = [
        {
            "group": t["group"],
            "metric": t["metric"] if t["class"] is None else f"{t['metric']} of {t['class']}",
            "group value": t["value"],
            "rest": t["rest"],
            "difference": t["difference"],
            "p (one-sided)": t["p_value"],
            "p (Holm)": t["p_holm"],
            "significantly worse": t["significantly_worse"],
        }
        for t in analysis["tests"]
    ]
    out: dict[str, Any] = {f"Subgroups by {key}": rows, f"Subgroups by {key}: method": text}
    if tests:
        out[f"Subgroups by {key}: tests (group vs the other samples)"] = tests
    return out


def _operating_point_section(point: OperatingPoint, found: dict[str, Any]) -> dict[str, Any]:
    ci = found["ci"]
    site = point.fit.get("achieved") or {}
    return {
        "decision rule": point.rule,
        "positive group": f"{point.positive} ({', '.join(point.classes)})",
        f"sensitivity (n={found['n_positive']})": _fmt_ci(found["sensitivity"], ci["sensitivity"]),
        f"specificity (n={found['n_negative']})": _fmt_ci(found["specificity"], ci["specificity"]),
        "PPV": _fmt_ci(found["ppv"], ci["ppv"]),
        "NPV": _fmt_ci(found["npv"], ci["npv"]),
        "TP / FN / TN / FP": f"{found['tp']} / {found['fn']} / {found['tn']} / {found['fp']}",
        "intervals": found["ci_method"],
        "fitted on (site sample)": (
            f"n={site.get('n')}: sensitivity {_fmt_ci(site.get('sensitivity'), (site.get('ci') or {}).get('sensitivity'))}, "
            f"specificity {_fmt_ci(site.get('specificity'), (site.get('ci') or {}).get('specificity'))}"
            if site
            else "-"
        ),
    }


def _class_map(
    class_map: str | Mapping[str, Sequence[str]] | ClassMap | None, classes: list[str]
) -> ClassMap | None:
    if class_map is None or isinstance(class_map, ClassMap):
        return class_map
    return parse_class_map(class_map, classes)


def _group_labels(samples: SampleSet, cmap: ClassMap, data: str | Path) -> np.ndarray:
    """The dataset's labels as indices into the class map's groups."""
    lut = cmap.label_lookup(samples.classes, where=str(data))
    return np.where(samples.labels >= 0, lut[np.maximum(samples.labels, 0)], -1)


def _operating_point(
    b: Predictor, wanted: bool | None, classes: list[str], cmap: ClassMap | None
) -> tuple[OperatingPoint, np.ndarray] | None:
    """The bundle's operating point and the evaluated columns that sum to its positive group."""
    if wanted is False:
        return None
    point = OperatingPoint.from_manifest(b.manifest)
    if point is None:
        if wanted:
            raise ConfigError(
                f"{b.path}: the bundle has no operating point (medclf recalibrate fits one on a site sample)"
            )
        return None
    try:
        return point, point.columns(classes, cmap.groups if cmap is not None else None)
    except ConfigError:
        if wanted:
            raise
        return None


def _subgroup_keys(b: Predictor, by: str | Sequence[str] | None) -> tuple[list[str], bool]:
    """The keys asked for, or (``by`` None) those the bundle's shortcut audit flagged; and whether asked."""
    if by is not None:
        items = by.split(",") if isinstance(by, str) else list(by)
        keys = [k.strip() for k in items if k.strip()]
        if not keys:
            raise ConfigError("--by needs at least one key, e.g. --by size or --by site,sex")
        return list(dict.fromkeys(keys)), True
    flagged = (b.manifest.get("shortcuts") or {}).get("flagged_keys") or []
    return [str(k) for k in flagged], False


def _subgroup_labels(
    b: Predictor,
    samples: SampleSet,
    idx: np.ndarray,
    by: str | Sequence[str] | None,
    workers: int | None,
) -> dict[str, list[str]]:
    """key -> the group of every sample (read for the evaluated split only; "" elsewhere)."""
    from medclf.data.acquisition import GROUP_KEYS, check_key, sample_cues, sample_groups

    keys, asked = _subgroup_keys(b, by)
    usable = []
    for key in keys:
        try:
            check_key(samples, key)
        except ConfigError:
            if asked:
                raise
            reporting.current().print(
                f"[yellow]note:[/] the shortcut audit flagged {key!r}, which this dataset lacks: not analysed"
            )
            continue
        usable.append(key)
    if not usable:
        return {}
    if not asked:
        reporting.current().print(
            f"Subgroups: the keys the bundle's shortcut audit flagged: {', '.join(usable)}"
        )
    part = samples.subset(idx)
    procs = workers or min(4, os.cpu_count() or 1)  # header reads, in as many processes as decoding uses
    cues = (
        sample_cues(part, workers=procs)
        if any(k in GROUP_KEYS and k not in part.metadata for k in usable)
        else None
    )
    out: dict[str, list[str]] = {}
    for key in usable:
        values = sample_groups(part, key, workers=procs, cues=cues if key in GROUP_KEYS else None)
        full = [""] * len(samples)
        for i, v in zip(idx, values, strict=True):
            full[int(i)] = v
        out[key] = full
    return out


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _ci(m: dict[str, Any], key: str) -> str:
    ci = m.get("ci", {}).get(key)
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci and ci[0] is not None else ""


def _map_labels(samples: SampleSet, classes: list[str], data: str | Path) -> np.ndarray:
    """The dataset's labels as indices into the bundle's classes (matched by name)."""
    unknown = [c for c in samples.classes if c not in classes]
    if unknown:
        raise DataError(
            f"{data}: classes {unknown} are not among the model's classes {classes}; "
            "class folders / labels must use the model's class names"
        )
    lut = np.array([classes.index(c) for c in samples.classes], dtype=np.int64)
    return np.where(samples.labels >= 0, lut[np.maximum(samples.labels, 0)], -1)


def _write_predictions(
    path: Path,
    samples: SampleSet,
    labels: np.ndarray,
    probs: np.ndarray,
    ok: np.ndarray,
    train_copy: np.ndarray,
    errors: list[str],
    idx: np.ndarray,
    classes: list[str],
) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "predicted", "train_copy", *[f"prob_{c}" for c in classes], "error"])
        for i in idx:
            label = classes[labels[i]] if labels[i] >= 0 else ""
            if ok[i] and not np.isnan(probs[i]).any():
                pred = classes[int(np.argmax(probs[i]))]
                row_probs = [f"{p:.6f}" for p in probs[i]]
                err = ""
            else:
                pred, row_probs = "", [""] * len(classes)
                err = errors[i]
            w.writerow([samples.display_ref(int(i)), label, pred, bool(train_copy[i]), *row_probs, err])


def _report_sections(
    b: Predictor, errors: list[dict[str, str]], data: str | Path, split: str
) -> dict[str, Any]:
    recipe = b.manifest.get("recipe", {})
    sections: dict[str, Any] = {
        "Model": {
            "bundle": str(b.path),
            "bundle sha256": b.sha256,
            "architecture": _architecture(b),
            "classes": ", ".join(b.classes),
            "input": str(b.spec.input_shape),
            "trained": b.manifest.get("created", ""),
            "epochs run / best": f"{recipe.get('epochs_run')} / {recipe.get('best_epoch')}",
            "training time (s)": recipe.get("seconds"),
        },
        "Preprocessing": b.spec.to_dict(),
        "Evaluation protocol": PROTOCOL + f" Data: {data}, split: {split}.",
    }
    schedule = recipe.get("schedule")
    if schedule:
        sections["Model"]["schedule"] = (
            f"{schedule.get('mode')}: {schedule.get('epochs_run')} of {schedule.get('planned_epochs')} planned "
            f"epochs, {'annealed' if schedule.get('completed') else 'not annealed'} "
            f"(stop: {schedule.get('stop_reason')})"
        )
    gate = b.manifest.get("sanity")
    if gate:
        base = gate.get("baseline") or {}
        sections["Sanity gate (validation)"] = {
            "verdict": "passed" if gate.get("passed") else "FAILED",
            "model accuracy / AUC": f"{_f(gate['model'].get('accuracy'))} / {_f(gate['model'].get('auc'))}",
            f"majority class ('{gate['majority'].get('class')}') accuracy": _f(
                gate["majority"].get("accuracy")
            ),
            f"baseline ({base.get('method', 'n/a')}) accuracy / AUC": (
                f"{_f(base.get('accuracy'))} / {_f(base.get('auc'))}"
            ),
        }
    val = b.manifest.get("metrics", {}).get("val", {})
    if val:
        sections["Validation (model selection)"] = {
            "n": val.get("n"),
            "accuracy": val.get("accuracy"),
            "AUC": val.get("auc"),
            "copies of training samples left out": val.get("n_removed_duplicates"),
        }
    fusion = b.manifest.get("ensemble")
    if fusion:
        sections["Ensemble members"] = [
            {
                "member": j,
                "architecture": m.get("arch"),
                "input": m.get("size"),
                "temperature": m.get("temperature"),
                "weight": (fusion.get("weights") or [None] * (j + 1))[j],
                "validation AUC": (m.get("val") or {}).get("auc"),
                "sha256": m.get("sha256"),
            }
            for j, m in enumerate(fusion.get("members", []))
        ]
    if "shortcuts" in b.manifest:
        from medclf.model_card import shortcut_lines

        lines = shortcut_lines(b.manifest["shortcuts"])
        sections["Shortcut check (training data)"] = [x.removeprefix("- ").replace("**", "") for x in lines]
    calibration = b.manifest.get("calibration", {})
    sections["Calibration (temperature scaling)"] = {
        k: v for k, v in calibration.items() if k in ("temperature", "n", "ece_before", "ece_after", "note")
    }
    if errors:
        sections["Unreadable files (left out)"] = errors[:50]
    return sections


def _architecture(b: Predictor) -> str:
    fusion = b.manifest.get("ensemble")
    if fusion:
        members = ", ".join(str(m.get("arch")) for m in fusion.get("members", []))
        return f"ensemble ({fusion.get('method')}) of {len(fusion.get('members', []))}: {members}"
    return f"{b.arch} {b.manifest['model'].get('kwargs', {})}"
