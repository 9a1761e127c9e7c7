"""After the last epoch (:func:`finish`): the temperature, validation metrics and sanity verdict of the
selected model, its out-of-distribution guard, and the bundle, manifest and model card written from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from medclf import augment as augment_mod
from medclf import reporting, sanity
from medclf.bundle import save_bundle
from medclf.data.references import TRAIN_SIGNATURES, aligned_signatures, pack_signatures
from medclf.engines import probabilities
from medclf.metrics.calibration import (
    TemperatureFit,
    apply_temperature,
    finding_calibration_record,
    fit_finding_temperatures,
    fit_temperature_from_probs,
    log_probs,
)
from medclf.metrics.classification import compute_metrics
from medclf.metrics.multilabel import choose_thresholds, multilabel_metrics
from medclf.metrics.ordinal import ordinal_metrics
from medclf.model_card import MODEL_CARD, model_card
from medclf.ood import OOD_FILE
from medclf.training.config import TrainResult
from medclf.training.loop import Loop
from medclf.training.ood_guard import fit_ood
from medclf.training.setup import RunContext, RunSetup


def finish(
    ctx: RunContext,
    setup: RunSetup,
    loop: Loop,
    history: list[dict[str, float]],
    best_epoch: int,
    val_probs: np.ndarray,
) -> TrainResult:
    """Calibrate and judge the selected model on the validation split and write its bundle (rank 0)."""
    cfg, samples, prepared = ctx.cfg, setup.samples, setup.prepared
    schedule = loop.schedule_record()
    val_y = samples.labels[setup.val_idx]
    if samples.task == "multilabel":  # calibrated on the selected model's logits, not on these sigmoids
        return _finish_multilabel(ctx, setup, loop, history, best_epoch, schedule)
    calibration = fit_temperature_from_probs(val_probs, val_y)
    val_probs = apply_temperature(log_probs(val_probs), calibration.temperature)
    val_metrics = compute_metrics(val_y, val_probs, samples.classes, n_bootstrap=200, seed=cfg.seed)
    val_metrics.update(ece_uncalibrated=calibration.ece_before, temperature=calibration.temperature)
    val_metrics["n_removed_duplicates"] = setup.n_copies if not cfg.include_train_copies else 0
    if samples.task == "ordinal":
        val_metrics["ordinal"] = ordinal_metrics(
            val_y, val_probs, samples.classes, n_bootstrap=200, seed=cfg.seed
        )
    references = sanity.baselines(
        prepared.tensors, setup.train_idx, setup.val_idx, samples.labels, samples.classes, seed=cfg.seed
    )
    verdict = sanity.judge(val_metrics, references, schedule).to_dict()
    train_hashes = sorted({prepared.hashes[i] for i in setup.train_idx})
    manifest = _manifest(ctx, setup, loop, history, best_epoch, schedule)
    manifest.update(
        metrics={"val": val_metrics},
        history=history,
        calibration=calibration.to_dict(),
        sanity=verdict,
        shortcuts=setup.shortcuts,
    )
    bundle = _write(ctx, setup, loop, manifest, train_hashes)
    return _result(ctx, setup, loop, history, best_epoch, bundle, val_metrics, verdict, references, schedule)


def _result(
    ctx: RunContext,
    setup: RunSetup,
    loop: Loop,
    history: list[dict[str, float]],
    best_epoch: int,
    bundle: Path,
    val_metrics: dict[str, Any],
    verdict: dict[str, Any],
    references: dict[str, Any],
    schedule: dict[str, Any],
) -> TrainResult:
    prepared = setup.prepared
    seconds = ctx.budget.elapsed()
    reporting.current().print(
        f"[bold green]Bundle written[/] to {bundle}  (val AUC {_fmt(val_metrics.get('auc'))}, "
        f"accuracy {_fmt(val_metrics.get('accuracy'))}, best epoch {best_epoch}, {seconds / 60:.1f} min)"
    )
    return TrainResult(
        bundle=bundle,
        plan=setup.plan,
        history=history,
        val_metrics=val_metrics,
        best_epoch=best_epoch,
        seconds=seconds,
        n_val_copies_removed=setup.n_copies,
        unreadable=prepared.errors,
        stop_reason=loop.stop_reason,
        sanity=verdict,
        references=references,
        schedule=schedule,
    )


def _finish_multilabel(
    ctx: RunContext,
    setup: RunSetup,
    loop: Loop,
    history: list[dict[str, float]],
    best_epoch: int,
    schedule: dict[str, Any],
) -> TrainResult:
    """Multi-label findings: a temperature per finding (:func:`_calibrate_findings`), each finding's operating
    threshold chosen on the calibrated validation probabilities (Youden's J), the validation metrics at those
    thresholds (per finding with its ECE before and after scaling, macro/micro AUC, mAP, patient-resampled
    intervals), and the bundle with the thresholds next to its task."""
    cfg, samples = ctx.cfg, setup.samples
    val_y = samples.labels[setup.val_idx]
    fits, val_probs = _calibrate_findings(loop, val_y, samples.classes)
    thresholds, notes = choose_thresholds(val_y, val_probs)
    pids = [samples.patient_ids[i] for i in setup.val_idx]
    detail = multilabel_metrics(
        val_y,
        val_probs,
        samples.classes,
        thresholds=thresholds,
        patient_ids=pids if any(p is not None for p in pids) else None,
        n_bootstrap=200,
        seed=cfg.seed,
    )
    detail["notes"] = [*notes, *detail["notes"]]
    calibration = finding_calibration_record(samples.classes, fits)
    for name, fit in zip(samples.classes, fits, strict=True):
        detail["per_label"][name].update(ece_uncalibrated=fit.ece_before, temperature=fit.temperature)
    val_metrics: dict[str, Any] = {
        "n": len(val_y),
        "auc": detail["macro_auc"],
        "macro_auc": detail["macro_auc"],
        "micro_auc": detail["micro_auc"],
        "map": detail["map"],
        # As the multi-class path reports them: the ECE (here the mean of the findings') after and before
        # the temperatures.
        "ece": calibration["ece_after"],
        "ece_uncalibrated": calibration["ece_before"],
        "temperatures": calibration["temperatures"],
        "multilabel": detail,
        "n_removed_duplicates": setup.n_copies if not cfg.include_train_copies else 0,
    }
    # The gate's references (majority class, thumbnail regression) are single-label: only the schedule and
    # the macro AUC are judged.
    references: dict[str, Any] = {"majority": {}, "baseline": None}
    verdict = sanity.judge({"auc": detail["macro_auc"], "n": len(val_y)}, references, schedule).to_dict()
    train_hashes = sorted({setup.prepared.hashes[i] for i in setup.train_idx})
    manifest = _manifest(ctx, setup, loop, history, best_epoch, schedule)
    manifest["recipe"]["multilabel_loss"] = cfg.multilabel_loss
    # Each finding's operating threshold, next to the task (what predict's decisions use).
    keys = list(manifest)
    manifest = (
        {k: manifest[k] for k in keys[: keys.index("task") + 1]}
        | {
            "thresholds": {
                "rule": "youden",
                "fitted_on": "validation",
                "labels": dict(zip(samples.classes, map(float, thresholds), strict=True)),
            }
        }
        | {k: manifest[k] for k in keys[keys.index("task") + 1 :]}
    )
    manifest.update(
        metrics={"val": val_metrics},
        history=history,
        calibration=calibration,
        sanity=verdict,
        shortcuts=setup.shortcuts,
    )
    bundle = _write(ctx, setup, loop, manifest, train_hashes)
    return _result(ctx, setup, loop, history, best_epoch, bundle, val_metrics, verdict, references, schedule)


def _calibrate_findings(
    loop: Loop, val_y: np.ndarray, findings: list[str]
) -> tuple[list[TemperatureFit], np.ndarray]:
    """A temperature per finding, fitted on the selected model's validation logits, and the validation
    probabilities through them (computed as every engine computes them); the fits are reported."""
    logits = loop.val_logits()
    fits = fit_finding_temperatures(logits, val_y)
    probs = probabilities(logits, [f.temperature for f in fits], "multilabel")
    reporting.current().print(
        "Temperature per finding (validation ECE before -> after): "
        + ", ".join(
            f"{name} {fit.temperature:.3g} ({_fmt(fit.ece_before)} -> {_fmt(fit.ece_after)})"
            for name, fit in zip(findings, fits, strict=True)
        )
    )
    return fits, probs


def _manifest(
    ctx: RunContext,
    setup: RunSetup,
    loop: Loop,
    history: list[dict[str, float]],
    best_epoch: int,
    schedule: dict[str, Any],
) -> dict[str, Any]:
    """The bundle manifest's model, classes, preprocessing, input, recipe and data sections."""
    cfg, plan, samples, prepared = ctx.cfg, setup.plan, setup.samples, setup.prepared
    return {
        "model": {
            "arch": plan.arch,
            "kwargs": plan.arch_kwargs,
            "in_channels": plan.spec.channels,
            "n_classes": len(samples.classes),
            "spatial_dims": plan.spec.spatial_dims,
        },
        "classes": samples.classes,
        "task": samples.task,
        "preprocess": plan.spec.to_dict(),
        "input": {"shape": list(plan.spec.input_shape), "dtype": "float32", "value_range": [0.0, 1.0]},
        "recipe": {
            **plan.to_dict(),
            "seed": cfg.seed,
            "split_seed": ctx.split_seed,
            "val_fraction": cfg.val_fraction,
            "val_fold": list(ctx.val_fold) if ctx.val_fold is not None else None,
            "time_budget_s": cfg.time_budget,
            "device": ctx.device,
            "world_size": ctx.dist.world_size,
            "streamed": loop.rows.streaming,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "seconds": round(ctx.budget.elapsed(), 1),
            "augmentation": augment_mod.describe(plan.augment),
            "schedule": schedule,
            "cpu": setup.policy.to_dict(),
        },
        "data": {
            "source": Path(samples.source).name,
            "kind": samples.kind,
            "fingerprint": prepared.fingerprint,
            "counts": samples.summary(),
            "fingerprint_stats": setup.fp.to_dict(),
            "n_unreadable": len(prepared.errors),
            "n_val_train_copies": setup.n_copies,
            "val_train_copies_excluded": not cfg.include_train_copies,
            # How a CSV was read (a split file, other column names), so export reads it the same way.
            **({"manifest_options": cfg.manifest} if cfg.manifest else {}),
        },
    }


def _write(
    ctx: RunContext, setup: RunSetup, loop: Loop, manifest: dict[str, Any], train_hashes: list[str]
) -> Path:
    """Fit the OOD guard of the selected model, write the bundle, drop the checkpoint (unless kept)."""
    prepared, train_idx = setup.prepared, setup.train_idx
    best = loop.best_model()
    samples = setup.samples
    detector = fit_ood(
        best,
        prepared.tensors,
        train_idx,
        setup.val_idx,
        samples.labels,  # multi-label: (N, L) findings, whose class means are per set of findings
        ctx.cfg.seed,
        loop.rows.eval_batch,
        label_names=samples.classes,
    )
    manifest["ood"] = detector.manifest()
    bundle = save_bundle(
        ctx.out,
        model=best,
        manifest=manifest,
        extra_files={
            "train_hashes.json": json.dumps(train_hashes),
            MODEL_CARD: model_card(manifest),
            # Near copies of training images, recognisable by external evaluation without the data.
            TRAIN_SIGNATURES: pack_signatures(
                aligned_signatures(train_hashes, prepared.hashes, prepared.scan.signatures, train_idx)
            ),
        },
        writers={OOD_FILE: detector.save},
    )
    if not ctx.cfg.keep_checkpoints:
        shutil.rmtree(ctx.ckpt_dir, ignore_errors=True)
    ctx.dist.barrier()
    ctx.dist.close()
    return bundle


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"
