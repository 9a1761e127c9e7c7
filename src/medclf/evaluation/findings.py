"""``medclf evaluate`` for multi-label findings: a bundle with a sigmoid per finding on a dataset split ->
metrics.json (:func:`medclf.metrics.multilabel.multilabel_metrics` at the bundle's per-finding operating
thresholds, intervals resampled by patient where ids are known), predictions.csv, a per-finding ROC panel, a
per-finding calibration figure and report.html.

As for single-label evaluation, headline figures leave out the samples of the split that copy a training
sample; the same figures on the whole split are kept under ``all_samples``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from medclf import reporting
from medclf.data.cache import prepare_for_bundle
from medclf.data.samples import SampleSet
from medclf.errors import DataError
from medclf.evaluation.protocol import output_folder, protocol_fields, split_rows, write_metrics
from medclf.evaluation.report import write_report
from medclf.metrics.multilabel import finding_ece, multilabel_metrics
from medclf.predictor import Predictor
from medclf.tta import describe as describe_tta

__all__ = [
    "evaluate_findings",
    "finding_labels",
    "plot_findings_calibration",
    "plot_findings_roc",
    "write_findings_evaluation",
]

_DPI = 100


def finding_labels(samples: SampleSet, findings: Sequence[str], data: str | Path) -> np.ndarray:
    """The dataset's multi-hot labels as columns of the bundle's ``findings`` (matched by name; a finding the
    dataset never names is absent from every image; a row of -1 stays unknown)."""
    if samples.task != "multilabel":
        raise DataError(
            f"{data}: the model predicts findings (multi-label) but the data hold one label per image; "
            "give a manifest whose labels list findings (e.g. 'Effusion|Atelectasis')"
        )
    unknown = [c for c in samples.classes if c not in findings]
    if unknown:
        raise DataError(f"{data}: findings {unknown} are not among the model's findings {list(findings)}")
    y = np.zeros((len(samples), len(findings)), dtype=np.int64)
    for j, c in enumerate(samples.classes):
        y[:, list(findings).index(c)] = samples.labels[:, j]
    y[~samples.known] = -1
    return y


def evaluate_findings(
    b: Predictor,
    samples: SampleSet,
    data: str | Path,
    out: str | Path,
    *,
    split: str,
    include_train_copies: bool,
    cache_dir: str | Path | None,
    workers: int | None,
    n_bootstrap: int,
    seed: int,
    progress: bool,
    engine: str,
    views: Any,
) -> dict[str, Any]:
    """Evaluate the multi-label bundle ``b`` on ``split`` of ``samples``; write the outputs to ``out``."""
    findings = list(b.classes)
    labels = finding_labels(samples, findings, data)
    thresholds_of = (b.manifest.get("thresholds") or {}).get("labels")
    thresholds = None if not thresholds_of else np.array([float(thresholds_of[c]) for c in findings])
    in_split = np.array([s == split for s in samples.splits])
    idx = np.flatnonzero(in_split)
    found = prepare_for_bundle(
        samples,
        b.spec,
        b.path,
        b.manifest.get("files", {}),
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
    )
    prepared = found.prepared
    copies = (found.exact | found.near) & in_split
    usable = idx[prepared.ok[idx] & samples.known[idx]]
    probs = np.full((len(samples), len(findings)), np.nan)
    # With temperatures per finding, also the probabilities without them: each finding's ECE before scaling.
    temperatures = b.finding_temperatures
    uncalibrated = None if temperatures is None else probs.copy()
    if len(usable):
        x = np.asarray(prepared.tensors[usable])
        probs[usable] = b.predict_tensors(x, batch_size=128, engine=engine, tta=views)
        if uncalibrated is not None:
            uncalibrated[usable] = b.predict_tensors(
                x, batch_size=128, engine=engine, tta=views, calibrated=False
            )
    extra = {
        "bundle_sha256": b.sha256,
        "engine": engine,
        "tta": describe_tta(views),
        "thresholds_from": (
            f"the bundle ({b.manifest['thresholds'].get('rule', '?')} on validation)"
            if thresholds_of
            else None
        ),
    }
    return write_findings_evaluation(
        out,
        samples=samples,
        labels=labels,
        probs=probs,
        findings=findings,
        thresholds=thresholds,
        ok=prepared.ok,
        train_copy=copies,
        split=split,
        include_train_copies=include_train_copies,
        n_bootstrap=n_bootstrap,
        seed=seed,
        title=f"medclf evaluation: {Path(str(data)).name} / {split}",
        extra=extra,
        uncalibrated_probs=uncalibrated,
        temperatures=temperatures,
    )


def write_findings_evaluation(
    out: str | Path,
    *,
    samples: SampleSet,
    labels: np.ndarray,
    probs: np.ndarray,
    findings: list[str],
    thresholds: np.ndarray | None,
    ok: np.ndarray,
    train_copy: np.ndarray,
    split: str,
    include_train_copies: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    title: str = "medclf evaluation",
    sections: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    uncalibrated_probs: np.ndarray | None = None,
    temperatures: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Metrics (headline without copies of training samples, and ``all_samples``), predictions.csv, the
    per-finding figures and report.html for per-finding probabilities ``probs`` (N, K; NaN where unusable)
    against multi-hot ``labels`` (-1 rows unknown), each finding decided at its ``thresholds``. Shared by
    ``evaluate`` and the traditional baseline, so both are scored the same way. ``uncalibrated_probs`` (the
    same rows before the per-finding ``temperatures``) add each finding's ECE before scaling."""
    scorable = ok & (labels >= 0).all(axis=1)
    rows = split_rows(samples.splits, split, scorable, probs, train_copy, include_train_copies)
    metrics, all_metrics = (
        _scored(
            samples, labels, probs, findings, r, thresholds=thresholds, n_bootstrap=n_bootstrap, seed=seed
        )
        for r in (rows.clean, rows.usable)
    )
    if uncalibrated_probs is not None and temperatures is not None:
        for m, r in ((metrics, rows.clean), (all_metrics, rows.usable)):
            for j, name in enumerate(findings):
                m["per_label"][name].update(
                    ece_uncalibrated=finding_ece(labels[r, j] == 1, uncalibrated_probs[r, j])
                    if len(r)
                    else None,
                    temperature=float(temperatures[j]),
                )
    record = protocol_fields(rows, ok, include_train_copies)
    metrics.update(split=split, **(extra or {}), **record, all_samples=all_metrics)
    out = output_folder(out)
    write_metrics(out, metrics)
    _write_predictions(
        out / "predictions.csv", samples, labels, probs, thresholds, rows.copies, rows.idx, findings
    )
    write_report(
        out / "report.html",
        title=title,
        metrics=metrics,
        figures=_figures(labels[rows.clean], probs[rows.clean], findings, out),
        sections={
            "Findings": _findings_table(metrics),
            "Summary over findings": _summary(metrics),
            **(sections or {}),
        },
    )
    _print_findings(metrics, split=split, n_removed=rows.n_removed, out=out)
    return metrics


def _figures(y: np.ndarray, probs: np.ndarray, findings: list[str], out: Path) -> dict[str, Path]:
    """The report's figures of the headline samples: caption -> file in ``out``."""
    return {
        "ROC curve per finding": plot_findings_roc(y, probs, findings, out / "roc.png"),
        "Calibration per finding": plot_findings_calibration(y, probs, findings, out / "calibration.png"),
    }


def _print_findings(metrics: dict[str, Any], *, split: str, n_removed: int, out: Path) -> None:
    """The summary (to the active reporter): the headline over findings, then each finding."""
    rep = reporting.current()
    ci = metrics["ci"]
    rep.print(
        f"[bold]{split}[/] n={metrics['n']} (removed {n_removed} copies of training samples)  macro AUC "
        f"{_f(metrics['macro_auc'])} {_pair(ci.get('macro_auc'))}  micro AUC {_f(metrics['micro_auc'])}  "
        f"mAP {_f(metrics['map'])} {_pair(ci.get('map'))}  (intervals resampled by {ci['unit']})"
    )
    for name, e in metrics["per_label"].items():
        rep.print(
            f"  {name}: n+ {e['n_positive']}  AUC {_f(e['auc'])} {_pair(e['ci']['auc'])}  AP {_f(e['ap'])}  "
            f"sens {_f(e['sensitivity'])} spec {_f(e['specificity'])} at {e['threshold']:.3f}"
        )
    rep.print(f"Report: {out / 'report.html'}")


def _scored(
    samples: SampleSet,
    labels: np.ndarray,
    probs: np.ndarray,
    findings: list[str],
    rows: np.ndarray,
    *,
    thresholds: np.ndarray | None,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """The multi-label metrics of ``rows``, intervals resampled by patient when the samples name patients."""
    has_ids = any(p not in (None, "") for p in samples.patient_ids)
    return _with_headline(
        multilabel_metrics(
            labels[rows],
            probs[rows],
            findings,
            thresholds=thresholds,
            patient_ids=[samples.patient_ids[i] for i in rows] if has_ids else None,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
    )


def _with_headline(m: dict[str, Any]) -> dict[str, Any]:
    """The report's headline reads ``auc``: the macro AUC over findings, with its interval."""
    m["auc"] = m["macro_auc"]
    m["ci"]["auc"] = m["ci"].get("macro_auc")
    m["auc_definition"] = "macro average of the per-finding ROC AUCs (findings with positives and negatives)"
    m["decision_rule"] = m.get("decision_rule")
    return m


def _findings_table(m: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, e in m["per_label"].items():
        ci = e["ci"]
        rows.append(
            {
                "finding": name,
                "positives (n)": str(e["n_positive"]),
                "AUC": f"{_f(e['auc'])} {_pair(ci['auc'])}",
                "AP": f"{_f(e['ap'])} {_pair(ci['ap'])}",
                "threshold": f"{e['threshold']:.3f}",
                "sensitivity": f"{_f(e['sensitivity'])} {_pair(ci['sensitivity'])}",
                "specificity": f"{_f(e['specificity'])} {_pair(ci['specificity'])}",
                "ECE": _f(e["ece"]),
                # With temperatures per finding: the ECE without this finding's, and the temperature.
                **(
                    {
                        "ECE before scaling": _f(e["ece_uncalibrated"]),
                        "temperature": f"{e['temperature']:.3g}",
                    }
                    if "temperature" in e
                    else {}
                ),
            }
        )
    return rows


def _summary(m: dict[str, Any]) -> dict[str, str]:
    ci = m["ci"]
    return {
        "macro AUC": f"{_f(m['macro_auc'])} {_pair(ci.get('macro_auc'))}",
        "micro AUC": _f(m["micro_auc"]),
        "mAP": f"{_f(m['map'])} {_pair(ci.get('map'))}",
        "subset accuracy (all findings right)": _f(m["subset_accuracy"]),
        "Hamming loss": _f(m["hamming_loss"]),
        "operating thresholds": m.get("thresholds_from") or "0.5 (the bundle has none)",
        "intervals": f"{100 * ci['level']:g}% percentile bootstrap, {ci['n_bootstrap']} resamples by {ci['unit']}",
    }


def _write_predictions(
    path: Path,
    samples: SampleSet,
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | None,
    copies: np.ndarray,
    idx: np.ndarray,
    findings: list[str],
) -> None:
    t = np.full(len(findings), 0.5) if thresholds is None else thresholds
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "findings", "predicted", "train_copy", *[f"prob_{c}" for c in findings]])
        for i in idx:
            true = (
                "" if labels[i, 0] < 0 else "|".join(c for c, v in zip(findings, labels[i], strict=True) if v)
            )
            if np.isnan(probs[i]).any():
                pred, row = "", [""] * len(findings)
            else:
                pred = "|".join(c for c, p, th in zip(findings, probs[i], t, strict=True) if p >= th)
                row = [f"{p:.6f}" for p in probs[i]]
            w.writerow([samples.display_ref(int(i)), true, pred, bool(copies[i]), *row])


def _grid(n: int) -> tuple[Figure, list[Any]]:
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, k + 1) for k in range(n)]
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})  # reproducible bytes
    return path


def plot_findings_roc(y: np.ndarray, probs: np.ndarray, findings: Sequence[str], path: str | Path) -> Path:
    """One small ROC panel per finding, its AUC and number of positives in the title."""
    from sklearn.metrics import roc_auc_score

    fig, axes = _grid(len(findings))
    for j, (ax, name) in enumerate(zip(axes, findings, strict=True)):
        pos = y[:, j] == 1
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6")
        if pos.any() and not pos.all():
            fpr, tpr, _ = roc_curve(pos, probs[:, j])
            ax.plot(fpr, tpr, lw=2)
            title = f"{name}\nAUC {roc_auc_score(pos, probs[:, j]):.3f} (n+ {int(pos.sum())})"
        else:
            title = f"{name}\nno {'positives' if not pos.any() else 'negatives'}: no curve"
        ax.set_title(title, fontsize=9).set_parse_math(False)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.supxlabel("1 - specificity")
    fig.supylabel("sensitivity")
    return _save(fig, path)


def plot_findings_calibration(
    y: np.ndarray, probs: np.ndarray, findings: Sequence[str], path: str | Path, *, n_bins: int = 10
) -> Path:
    """Reliability per finding: observed frequency against mean predicted probability in equal-width bins
    (marker area ~ images in the bin)."""
    fig, axes = _grid(len(findings))
    edges = np.linspace(0, 1, n_bins + 1)
    for j, (ax, name) in enumerate(zip(axes, findings, strict=True)):
        p, pos = probs[:, j], y[:, j] == 1
        which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
        counts = np.bincount(which, minlength=n_bins)
        filled = counts > 0
        mean_p = np.bincount(which, weights=p, minlength=n_bins)[filled] / counts[filled]
        freq = np.bincount(which, weights=pos.astype(float), minlength=n_bins)[filled] / counts[filled]
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6")
        ax.plot(mean_p, freq, lw=1.5)
        ax.scatter(mean_p, freq, s=10 + 90 * counts[filled] / max(counts.max(), 1), zorder=3)
        ax.set_title(f"{name} (n+ {int(pos.sum())})", fontsize=9).set_parse_math(False)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.supxlabel("mean predicted probability")
    fig.supylabel("observed frequency")
    return _save(fig, path)


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _pair(iv: Any) -> str:
    if not iv or iv[0] is None or iv[1] is None:
        return ""
    return f"({iv[0]:.3f}-{iv[1]:.3f})"
