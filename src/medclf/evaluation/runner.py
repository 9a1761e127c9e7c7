"""``medclf evaluate``: a bundle on a dataset split -> metrics.json, predictions.csv, plots, report.html.

Headline figures leave out every sample of the split that copies a training sample (exact bytes, or the
same picture re-encoded/resized: see :mod:`medclf.data.audit`); the same figures on the whole split, as
published protocols compute them, are kept under ``all_samples``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from medclf.bundle import Bundle, load_bundle
from medclf.data.cache import prepare
from medclf.data.samples import SampleSet
from medclf.data.sources import load_source
from medclf.errors import DataError
from medclf.evaluation.metrics import compute_metrics, expected_calibration_error
from medclf.evaluation.plots import plot_augmentation_gallery, plot_confusion, plot_reliability, plot_roc
from medclf.evaluation.report import write_report
from medclf.tta import describe as describe_tta

PROTOCOL = (
    "Headline metrics use the split minus every sample that is an exact or near copy (re-encoded or "
    "resized) of a training sample; 'all_samples' holds the same metrics on the whole split."
)


def evaluate(
    bundle: str | Path | Bundle,
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
    console: Console | None = None,
    engine: str = "auto",
    tta: bool | str | Sequence[str] | None = None,
    robustness: bool = False,
) -> dict[str, Any]:
    """Evaluate ``bundle`` on ``split`` of ``data``; write the outputs to ``out`` and return the metrics.

    ``robustness``: also measure accuracy under FGSM and PGD attacks (:mod:`.robustness`) on the
    headline samples, into ``metrics["robustness"]`` and a section of the report.

    ``engine`` picks what runs the model (see :mod:`medclf.engines`; ``auto``: the bundle's ONNX model
    when it has one); the metrics record which one ran. ``tta``: test-time augmentation (see
    :mod:`medclf.tta`), recorded in the metrics. ``ece_uncalibrated`` is the ECE of the same predictions
    without the bundle's temperature."""
    console = console or Console(stderr=True, soft_wrap=True)
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    engine = b.engine(engine)
    views = b.tta_views(tta)
    samples = load_source(data, default_split="test")
    if not samples.has_split(split):
        have = ", ".join(sorted(set(samples.splits)))
        raise DataError(f"{data}: no {split!r} split (it has: {have}); choose one with --split")
    # Decode the whole dataset (not just train + split): the cache key then matches training's, so a
    # dataset already seen by `train` is not decoded again.
    labels = _map_labels(samples, b.classes, data)
    train_hashes = _bundle_train_hashes(b)
    prepared = prepare(
        samples,
        b.spec,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
        console=console,
        extra_train_hashes=train_hashes,
    )
    in_split = np.array([s == split for s in samples.splits])
    idx = np.flatnonzero(in_split)
    usable = idx[prepared.ok[idx] & (labels[idx] >= 0)]
    probs = np.full((len(samples), len(b.classes)), np.nan)
    uncalibrated = probs.copy()
    if len(usable):
        x = np.asarray(prepared.tensors[usable])
        probs[usable] = b.predict_tensors(x, batch_size=128, engine=engine, tta=views)
        uncalibrated[usable] = (
            b.predict_tensors(x, batch_size=128, engine=engine, tta=views, calibrated=False)
            if b.temperature != 1.0
            else probs[usable]
        )
    extra: dict[str, Any] = {"bundle_sha256": b.sha256, "engine": engine, "tta": describe_tta(views)}
    sections = _report_sections(b, prepared.errors, data, split)
    if robustness and len(usable):
        from medclf.evaluation.robustness import robustness_report

        rows = usable if include_train_copies else usable[~prepared.train_copy[usable]]
        console.print(f"Adversarial robustness (FGSM, PGD) on {min(len(rows), 512)} samples...")
        report = robustness_report(b.model, np.asarray(prepared.tensors[rows]), labels[rows], seed=seed)
        extra["robustness"] = report
        sections["Adversarial robustness (white-box FGSM / PGD, L-inf)"] = [
            {
                "eps (8-bit grey levels)": a["eps_8bit_levels"],
                "clean accuracy": f"{report['clean_accuracy']:.3f}",
                "FGSM accuracy": f"{a['fgsm_accuracy']:.3f}",
                f"PGD-{report['pgd_steps']} accuracy": f"{a['pgd_accuracy']:.3f}",
            }
            for a in report["attacks"]
        ]
    return write_evaluation(
        out,
        samples=samples,
        labels=labels,
        probs=probs,
        ok=prepared.ok,
        train_copy=prepared.train_copy,
        errors=[str(m or "unreadable") for m in prepared.scan.messages],
        split=split,
        classes=b.classes,
        include_train_copies=include_train_copies,
        n_bootstrap=n_bootstrap,
        seed=seed,
        title=f"medclf evaluation: {Path(str(data)).name} / {split}",
        sections=sections,
        extra=extra,
        console=console,
        uncalibrated_probs=uncalibrated,
        temperature=b.temperature,
        extra_figures=_augmentation_gallery(b, samples, prepared, Path(out)),
    )


def _augmentation_gallery(b: Bundle, samples: SampleSet, prepared: Any, out: Path) -> dict[str, Path]:
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
    console: Console | None = None,
    uncalibrated_probs: np.ndarray | None = None,
    temperature: float | None = None,
    extra_figures: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Metrics (headline without copies of training samples, and ``all_samples``), predictions.csv, plots
    and report.html for class probabilities ``probs`` (rows for every sample; NaN where unusable).

    Shared by ``evaluate`` and by anything else that produces probabilities (baselines, ensembles), so every
    method is scored and reported the same way. ``uncalibrated_probs`` (same rows, before temperature
    scaling by ``temperature``) adds ``ece_uncalibrated`` and ``temperature`` to the metrics and a second
    curve to the reliability diagram.
    """
    console = console or Console(stderr=True, soft_wrap=True)
    in_split = np.array([s == split for s in samples.splits])
    idx = np.flatnonzero(in_split)
    usable = idx[ok[idx] & (labels[idx] >= 0) & ~np.isnan(probs[idx]).any(axis=1)]
    copies = train_copy & in_split
    clean = usable if include_train_copies else usable[~copies[usable]]
    if len(clean) == 0:
        raise DataError(f"no usable samples in split {split!r} after removing unreadable files and copies")
    metrics = compute_metrics(labels[clean], probs[clean], classes, n_bootstrap=n_bootstrap, seed=seed)
    all_metrics = compute_metrics(labels[usable], probs[usable], classes, n_bootstrap=n_bootstrap, seed=seed)
    n_removed = 0 if include_train_copies else int(copies[usable].sum())
    if uncalibrated_probs is not None:
        for m, rows in ((metrics, clean), (all_metrics, usable)):
            m["ece_uncalibrated"] = expected_calibration_error(labels[rows], uncalibrated_probs[rows])
            m["temperature"] = float(temperature if temperature is not None else 1.0)
    metrics.update(
        split=split,
        n_removed_duplicates=n_removed,
        n_train_copies_in_split=int(copies[idx].sum()),
        n_unreadable=int((~ok[idx]).sum()),
        protocol=PROTOCOL if not include_train_copies else "all samples of the split (copies kept)",
        **(extra or {}),
        all_samples=all_metrics,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_predictions(out / "predictions.csv", samples, labels, probs, ok, train_copy, errors, idx, classes)
    figures = {
        "ROC curves": plot_roc(labels[clean], probs[clean], classes, out / "roc.png"),
        "Confusion matrix": plot_confusion(metrics["confusion_matrix"], classes, out / "confusion.png"),
        "Reliability diagram": plot_reliability(
            labels[clean],
            probs[clean],
            out / "reliability.png",
            uncalibrated_probs=None if uncalibrated_probs is None else uncalibrated_probs[clean],
            temperature=temperature,
        ),
        **(extra_figures or {}),
    }
    write_report(out / "report.html", title=title, metrics=metrics, figures=figures, sections=sections)
    console.print(
        f"[bold]{split}[/] n={metrics['n']} (removed {n_removed} copies of training samples)  "
        f"accuracy {metrics['accuracy']:.4f} {_ci(metrics, 'accuracy')}  AUC {_f(metrics['auc'])} {_ci(metrics, 'auc')}"
    )
    console.print(
        f"  all samples (n={all_metrics['n']}): accuracy {all_metrics['accuracy']:.4f}  AUC {_f(all_metrics['auc'])}"
    )
    console.print(f"Report: {out / 'report.html'}")
    return metrics


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


def _bundle_train_hashes(b: Bundle) -> set[str]:
    if "train_hashes.json" not in b.manifest.get("files", {}):
        return set()
    return set(json.loads((b.path / "train_hashes.json").read_text()))


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


def _report_sections(b: Bundle, errors: list[dict[str, str]], data: str | Path, split: str) -> dict[str, Any]:
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


def _architecture(b: Bundle) -> str:
    fusion = b.manifest.get("ensemble")
    if fusion:
        members = ", ".join(str(m.get("arch")) for m in fusion.get("members", []))
        return f"ensemble ({fusion.get('method')}) of {len(fusion.get('members', []))}: {members}"
    return f"{b.arch} {b.manifest['model'].get('kwargs', {})}"
