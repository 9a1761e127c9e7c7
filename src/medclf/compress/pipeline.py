"""``medclf export``: one bundle in, a smaller or faster one out, and proof that it still answers the same.

Steps run in this order, each optional: distillation into a student, structured pruning (+ fine-tune),
ONNX export (+ parity check against PyTorch), int8 quantisation (+ validation check). Every step records
what it did and the validation accuracy/AUC before and after under ``compression`` in ``bundle.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medclf import reporting
from medclf.budget import parse_duration
from medclf.bundle import WEIGHTS, Bundle, save_bundle
from medclf.compress.data import TrainingData, load_training_data, val_scores
from medclf.compress.distill import (
    DEFAULT_KD_WEIGHT,
    DEFAULT_TEMPERATURE,
    check_teacher,
    kd_loss_hook,
    planned_student_kwargs,
)
from medclf.compress.finetune import FinetuneResult, finetune, plan_from_manifest
from medclf.compress.onnx_export import PARITY_TOLERANCE, check_parity, export_onnx
from medclf.compress.prune import n_params, prune_model
from medclf.compress.quantize import quantize_int8
from medclf.engines import ONNX_FP32, ONNX_INT8, OnnxRunner, TorchRunner, probabilities, resolve_engine
from medclf.errors import BundleError, ConfigError
from medclf.metrics.classification import compute_metrics
from medclf.model_card import MODEL_CARD, model_card

# The source bundle is run here (validation scores, its OOD guard), so it is held as a Predictor.
from medclf.predictor import Predictor, as_predictor

# Files of the source bundle that stay true for the compressed one (the training data did not change).
CARRIED_FILES = ("train_hashes.json", "train_signatures.safetensors")
PRUNE_CALIBRATION_SAMPLES = 512  # training images that rank channels and re-estimate batch-norm statistics
OOD_FIT_SAMPLES = 4000  # training samples whose features fit a refitted out-of-distribution guard
# A fresh student learns from soft targets more slowly than its teacher learned from labels and keeps gaining
# long after (Beyer et al., "Knowledge distillation: a good teacher is patient and consistent", CVPR 2022):
# the brain student's best epoch was its last with the teacher's epoch count, 2.0 points behind.
FRESH_STUDENT_EPOCHS = 1.5  # x the teacher's epochs
TUNE_EPOCHS = 0.25  # x the source's epochs, when starting from its own (pruned or distilled-into) weights


@dataclass
class ExportResult:
    bundle: Path
    compression: dict[str, Any]


def default_epochs(manifest: dict[str, Any], planned: int, *, fresh: bool) -> int:
    """Epochs of distillation (``fresh``: a randomly initialised student) or of fine-tuning, when not given.

    Scaled from the epochs the source bundle actually trained (its plan's when not recorded).
    """
    source_epochs = int(manifest.get("recipe", {}).get("epochs_run") or planned)
    if fresh:
        return math.ceil(FRESH_STUDENT_EPOCHS * source_epochs)
    return max(2, int(TUNE_EPOCHS * source_epochs))


@dataclass
class _Tuning:
    """How a distillation or fine-tune run is set (``None``: derived from the source's recipe)."""

    epochs: int | None
    lr: float | None
    budget: float | None
    seed: int
    progress: bool


@dataclass
class _Work:
    """What the export steps hand on to each other: the network as it stands and what describes it."""

    src: Predictor
    td: TrainingData | None
    val_x: np.ndarray | None
    model: nn.Module
    arch: str
    kwargs: dict[str, Any]
    temperature: float | tuple[float, ...]  # a multi-label bundle's: one per finding
    task: str = "multiclass"
    thresholds: np.ndarray | None = None  # a multi-label bundle's per-finding operating points
    steps: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, float]] | None = None

    def scores(self, probs: np.ndarray) -> dict[str, Any]:
        assert self.td is not None
        return val_scores(self.td.val_y, probs, self.src.classes, self.thresholds)

    def val_scores_of(self, model: nn.Module, temperature: float | tuple[float, ...] = 1.0) -> dict[str, Any]:
        assert self.val_x is not None
        return self.scores(_torch_probs(model, self.val_x, temperature, self.task))


def export_bundle(
    bundle: str | Path | Predictor | Bundle,
    out: str | Path,
    *,
    data: str | Path | None = None,
    onnx: bool = False,
    int8: bool = False,
    prune: float | None = None,
    distill_from: str | Path | Predictor | None = None,
    student: str | None = None,
    student_kwargs: dict[str, Any] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    time_budget: str | float | None = None,
    int8_format: str = "qdq",
    calibration_samples: int = 256,
    parity_samples: int = 64,
    kd_temperature: float = DEFAULT_TEMPERATURE,
    kd_weight: float = DEFAULT_KD_WEIGHT,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ExportResult:
    """Compress ``bundle`` into a new bundle at ``out``; see the module docstring for the steps.

    ``data`` is the dataset the bundle was trained on: int8 calibration, pruning's fine-tune and
    distillation train or calibrate on its training split and check on its validation split (split as
    training split it). ONNX export alone works without it, checking parity on random inputs instead.
    ``distill_from`` names the teacher (the bundle itself when only ``student`` is given); ``student`` an
    architecture for a fresh student (without it, the bundle's own network is the student), built with
    ``student_kwargs`` over what the planner picks for it at this input size (e.g. ``{"width": 12}``).
    ``epochs``/``lr``/``time_budget`` set the fine-tune or distillation run (defaults: a quarter of the
    recipe's epochs at a quarter of its learning rate after pruning; 1.5x the recipe's epochs at its
    rate for a fresh student: see ``FRESH_STUDENT_EPOCHS``). Messages and progress go to the active reporter
    (:mod:`medclf.reporting`).
    """
    rep = reporting.current()
    t_start = time.perf_counter()
    src = as_predictor(bundle)
    distill = student is not None or distill_from is not None
    _check_request(src, onnx=onnx, int8=int8, prune=prune, distill=distill, data=data, epochs=epochs, lr=lr)
    tuning = _Tuning(
        epochs=epochs,
        lr=lr,
        budget=parse_duration(time_budget) if time_budget is not None else None,
        seed=seed,
        progress=progress,
    )
    w = _start(src, data, cache_dir=cache_dir, workers=workers, progress=progress)
    before = w.scores(src.predict_tensors(w.val_x, engine="torch")) if w.val_x is not None else None
    if before is not None:
        acc, auc = before["accuracy"], _f(before["auc"])
        rep.print(f"[bold]Source[/] {src.arch}: validation accuracy {acc:.4f}, AUC {auc}")
    if distill:
        teacher = as_predictor(distill_from) if distill_from is not None else src
        _distill(w, teacher, student, student_kwargs, tuning, kd_temperature, kd_weight)
    if prune:
        _prune(w, float(prune), tuning)

    w.model = w.model.eval()
    path, manifest = _write(
        w,
        out,
        before,
        onnx=onnx,
        int8=int8,
        int8_format=int8_format,
        calibration_samples=calibration_samples,
        parity_samples=parity_samples,
        seed=seed,
        t_start=t_start,
    )
    rep.print(
        f"[bold green]Bundle written[/] to {path} "
        f"(default engine: {manifest['compression']['default_engine']})"
    )
    return ExportResult(bundle=path, compression=manifest["compression"])


def _start(
    src: Predictor,
    data: str | Path | None,
    *,
    cache_dir: str | Path | None,
    workers: int | None,
    progress: bool,
) -> _Work:
    """The work state at the source bundle, with its training data split as training split it."""
    td = (
        load_training_data(src, data, cache_dir=cache_dir, workers=workers, progress=progress)
        if data is not None
        else None
    )
    m = src.manifest["model"]
    thresholds_of = (src.manifest.get("thresholds") or {}).get("labels")
    return _Work(
        src=src,
        td=td,
        val_x=td.tensors(td.val_idx) if td is not None else None,
        model=src.model,
        arch=str(m["arch"]),
        kwargs=dict(m.get("kwargs", {})),
        temperature=src.output_temperature,
        task=str(src.manifest.get("task", "multiclass")),
        thresholds=np.array([float(thresholds_of[c]) for c in src.classes]) if thresholds_of else None,
    )


def _write(
    w: _Work,
    out: str | Path,
    before: dict[str, Any] | None,
    *,
    onnx: bool,
    int8: bool,
    int8_format: str,
    calibration_samples: int,
    parity_samples: int,
    seed: int,
    t_start: float,
) -> tuple[Path, dict[str, Any]]:
    """Export to ONNX/int8 when asked, then seal the new bundle (manifest, OOD guard, model card)."""
    src, td = w.src, w.td
    work = Path(tempfile.mkdtemp(prefix="medclf-export-"))
    extra: dict[str, bytes | str | Path] = {
        name: src.path / name for name in CARRIED_FILES if name in src.manifest.get("files", {})
    }
    try:
        if onnx or int8:
            fp32_probs = _onnx(w, work / ONNX_FP32, parity_samples, seed)
            extra[ONNX_FP32] = work / ONNX_FP32
            if int8:
                assert fp32_probs is not None
                _int8(
                    w, work / ONNX_FP32, work / ONNX_INT8, fp32_probs, calibration_samples, int8_format, seed
                )
                extra[ONNX_INT8] = work / ONNX_INT8
        changed = w.model is not src.model
        manifest = _manifest(src, w.model, w.arch, w.kwargs, changed, w.history, td, w.temperature)
        writers, ood_record = _ood(src, w.model, changed, td, w.val_x, extra, manifest, seed)
        manifest["compression"] = _compression_record(
            w, before, extra, ood_record, time.perf_counter() - t_start
        )
        extra[MODEL_CARD] = model_card(manifest)  # the source's card describes another model
        path = save_bundle(out, model=w.model, manifest=manifest, extra_files=extra, writers=writers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path, manifest


def _check_request(
    src: Predictor,
    *,
    onnx: bool,
    int8: bool,
    prune: float | None,
    distill: bool,
    data: str | Path | None,
    epochs: int | None,
    lr: float | None,
) -> None:
    """Refuse, before any data is read, what the export cannot do."""
    if src.manifest.get("task") == "multilabel" and (prune or distill):
        raise ConfigError(
            "pruning and distillation of a multi-label bundle are not supported; use --onnx/--int8"
        )
    if not (onnx or int8 or prune or distill):
        raise ConfigError("nothing to do: give --onnx, --int8, --prune AMOUNT or --distill-from/--student")
    if (int8 or prune or distill) and data is None:
        raise ConfigError("--int8, --prune and distillation need the training data: give --data DATA")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {epochs})")
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr must be greater than 0 (got {lr})")


def _distill(
    w: _Work,
    teacher: Predictor,
    student: str | None,
    student_kwargs: dict[str, Any] | None,
    tuning: _Tuning,
    kd_temperature: float,
    kd_weight: float,
) -> None:
    """Train a student (a fresh ``student`` network, or the source's own) on the teacher's soft targets."""
    src, td, val_x = w.src, w.td, w.val_x
    assert td is not None and val_x is not None
    resize = check_teacher(teacher, src.spec, src.classes)
    teacher_size = tuple(teacher.spec.size) if resize else None
    if student is not None:
        s_kwargs = {**planned_student_kwargs(student, src.spec), **(student_kwargs or {})}
        s_arch, init = student, None
    else:
        s_arch, s_kwargs, init = w.arch, w.kwargs, _plain_state(src.model)
    plan = plan_from_manifest(src.manifest, arch=s_arch, arch_kwargs=s_kwargs)
    run_epochs = tuning.epochs or default_epochs(src.manifest, plan.epochs, fresh=init is None)
    run_lr = tuning.lr or (plan.lr if init is None else plan.lr / 4)
    reporting.current().print(
        f"[bold]Distilling[/] {teacher.arch} -> {s_arch} {s_kwargs}: up to {run_epochs} epochs, "
        f"lr {run_lr:g}, T={kd_temperature:g}, KD weight {kd_weight:g}"
    )
    hook = kd_loss_hook(
        teacher.model,
        temperature=kd_temperature,
        kd_weight=kd_weight,
        teacher_size=teacher_size,
        amp=plan.amp,
        channels_last=plan.channels_last,
    )
    ft = finetune(
        plan,
        td,
        init_state=init,
        epochs=run_epochs,
        lr=run_lr,
        time_budget=tuning.budget,
        loss_hook=hook,
        seed=tuning.seed,
        progress=tuning.progress,
    )
    teacher_x = (
        torch.nn.functional.interpolate(
            torch.from_numpy(val_x),
            size=teacher_size,
            mode="bilinear" if val_x.ndim == 4 else "trilinear",
        ).numpy()
        if teacher_size is not None
        else val_x
    )
    teacher_val = w.scores(teacher.predict_tensors(teacher_x, engine="torch"))
    w.model, w.arch, w.kwargs, w.history = ft.model, s_arch, s_kwargs, ft.history
    after = w.val_scores_of(w.model)
    w.steps.append(
        _distill_record(
            w, teacher, teacher_val, after, init is not None, ft, run_lr, kd_temperature, kd_weight
        )
    )
    reporting.current().print(
        f"  student {n_params(w.model):,} parameters ({w.steps[-1]['size_ratio']}x fewer than the teacher): "
        f"validation accuracy {after['accuracy']:.4f} (teacher {teacher_val['accuracy']:.4f})"
    )
    w.temperature = 1.0


def _distill_record(
    w: _Work,
    teacher: Predictor,
    teacher_val: dict[str, Any],
    after: dict[str, Any],
    from_source: bool,
    ft: FinetuneResult,
    run_lr: float,
    kd_temperature: float,
    kd_weight: float,
) -> dict[str, Any]:
    """The ``distill`` step as the manifest records it (``w`` already holds the student)."""
    return {
        "step": "distill",
        "teacher": {
            "path": str(teacher.path),
            "sha256": teacher.sha256,
            "arch": teacher.arch,
            "params": n_params(teacher.model),
            "val": teacher_val,
        },
        "student": {
            "arch": w.arch,
            "kwargs": w.kwargs,
            "params": n_params(w.model),
            "initialised_from": ("the source bundle" if from_source else "random"),
        },
        "size_ratio": round(n_params(teacher.model) / max(n_params(w.model), 1), 2),
        "loss": "(1 - w) * CE + w * T^2 * KL(teacher || student)",
        "temperature": kd_temperature,
        "kd_weight": kd_weight,
        "epochs": len(ft.history),
        "best_epoch": ft.best_epoch,
        "lr": run_lr,
        "seconds": round(ft.seconds, 1),
        "val_after": after,
    }


def _prune(w: _Work, amount: float, tuning: _Tuning) -> None:
    """Remove ``amount`` of the channels, then fine-tune what is left."""
    src, td = w.src, w.td
    assert td is not None and w.val_x is not None
    m = src.manifest["model"]
    pr = prune_model(
        w.model,
        amount,
        arch=w.arch,
        in_channels=int(m["in_channels"]),
        n_classes=int(m["n_classes"]),
        spatial_dims=int(m["spatial_dims"]),
        arch_kwargs=w.kwargs,
        calibration=td.tensors(td.stratified(td.train_idx, PRUNE_CALIBRATION_SAMPLES, tuning.seed)),
    )
    right_after = w.val_scores_of(pr.model)
    plan = plan_from_manifest(src.manifest, arch=w.arch, arch_kwargs=pr.arch_kwargs)
    run_epochs = tuning.epochs or default_epochs(src.manifest, plan.epochs, fresh=False)
    run_lr = tuning.lr or plan.lr / 4
    reporting.current().print(
        f"[bold]Pruned[/] {amount:.0%} of the channels: {pr.params_before:,} -> {pr.params_after:,} "
        "parameters "
        f"(validation accuracy {right_after['accuracy']:.4f} before fine-tuning); "
        f"fine-tuning up to {run_epochs} epochs at lr {run_lr:g}"
    )
    ft = finetune(
        plan,
        td,
        init_state=pr.model.state_dict(),
        epochs=run_epochs,
        lr=run_lr,
        time_budget=tuning.budget,
        seed=tuning.seed,
        progress=tuning.progress,
    )
    w.model, w.kwargs, w.history = ft.model, pr.arch_kwargs, ft.history
    after = w.val_scores_of(w.model)
    w.steps.append(
        {
            "step": "prune",
            "amount": amount,
            "structured": "whole channels removed; the network is rebuilt from model.kwargs (widths)",
            "criterion": "mean |activation| x L1 norm of the reading weights, on training images; "
            "batch-norm statistics re-estimated after pruning",
            "calibration_samples": PRUNE_CALIBRATION_SAMPLES,
            "channels": {g: {"before": b, "kept": k} for g, (b, k) in pr.groups.items()},
            "params_before": pr.params_before,
            "params_after": pr.params_after,
            "val_before_finetune": right_after,
            "finetune": {
                "epochs": len(ft.history),
                "best_epoch": ft.best_epoch,
                "lr": run_lr,
                "seconds": round(ft.seconds, 1),
            },
            "val_after": after,
        }
    )
    reporting.current().print(
        f"  after fine-tuning: validation accuracy {after['accuracy']:.4f}, AUC {_f(after['auc'])}"
    )
    w.temperature = 1.0


def _onnx(w: _Work, onnx_path: Path, parity_samples: int, seed: int) -> np.ndarray | None:
    """Export the network to ONNX and prove that it answers as PyTorch does; return its validation
    probabilities (``None`` without data)."""
    src, td, val_x = w.src, w.td, w.val_x
    info = export_onnx(w.model, src.spec.input_shape, onnx_path)
    if val_x is not None:
        assert td is not None
        check_x = td.tensors(td.stratified(td.val_idx, parity_samples, seed))
        samples_note = f"validation samples (n={len(check_x)})"
    else:
        check_x = np.random.default_rng(seed).random(
            (parity_samples, *src.spec.input_shape), dtype=np.float32
        )
        samples_note = f"random inputs in [0, 1] (n={parity_samples}; no --data given)"
    parity = check_parity(w.model, onnx_path, check_x, temperature=w.temperature, task=w.task)
    parity["samples"] = samples_note
    if parity["max_abs_prob_diff"] > PARITY_TOLERANCE:
        raise BundleError(
            f"ONNX export disagrees with PyTorch: max probability difference "
            f"{parity['max_abs_prob_diff']:.2e} > {PARITY_TOLERANCE:g}; not writing the bundle"
        )
    step: dict[str, Any] = {"step": "onnx", **info, "parity": parity, "file_bytes": onnx_path.stat().st_size}
    reporting.current().print(
        f"[bold]ONNX[/] ({info['exporter']} exporter, opset {info['opset']}): "
        "max |p_onnx - p_torch| = "
        f"{parity['max_abs_prob_diff']:.1e} on {samples_note}"
    )
    fp32_probs = None
    if val_x is not None:
        fp32_probs = probabilities(_batched(OnnxRunner(onnx_path), val_x), w.temperature, w.task)
        step["val_after"] = w.scores(fp32_probs)
    w.steps.append(step)
    return fp32_probs


def _int8(
    w: _Work,
    fp32_path: Path,
    int8_path: Path,
    fp32_probs: np.ndarray,
    calibration_samples: int,
    int8_format: str,
    seed: int,
) -> None:
    """Quantise the ONNX network to int8, calibrated on training images, and compare it with fp32."""
    td, val_x = w.td, w.val_x
    assert td is not None and val_x is not None
    calib = td.tensors(td.stratified(td.train_idx, calibration_samples, seed))
    qinfo = quantize_int8(fp32_path, int8_path, calib, fmt=int8_format)
    int8_probs = probabilities(_batched(OnnxRunner(int8_path), val_x), w.temperature, w.task)
    fp32_val, int8_val = w.scores(fp32_probs), w.scores(int8_probs)
    size_ratio = round(fp32_path.stat().st_size / int8_path.stat().st_size, 2)
    w.steps.append(
        {
            "step": "int8",
            **qinfo,
            "file_bytes": int8_path.stat().st_size,
            "size_ratio_vs_fp32": size_ratio,
            "val_before": fp32_val,
            "val_after": int8_val,
            "accuracy_drop": round(fp32_val["accuracy"] - int8_val["accuracy"], 6),
            "agreement_with_fp32": float((fp32_probs.argmax(1) == int8_probs.argmax(1)).mean()),
            "max_abs_prob_diff_vs_fp32": float(np.abs(fp32_probs - int8_probs).max()),
        }
    )
    if w.task == "multilabel":  # the same decision per finding, at the bundle's thresholds
        classes = w.src.classes
        t = w.thresholds if w.thresholds is not None else np.full(len(classes), 0.5)
        same = (fp32_probs >= t) == (int8_probs >= t)
        w.steps[-1]["agreement_with_fp32"] = float(same.mean())
        w.steps[-1]["agreement_per_finding_with_fp32"] = dict(
            zip(classes, map(float, same.mean(axis=0)), strict=True)
        )
    reporting.current().print(
        f"[bold]int8[/] ({qinfo['format']}, {qinfo['weights']}, calibrated on {len(calib)} training "
        f"samples): validation accuracy {fp32_val['accuracy']:.4f} -> {int8_val['accuracy']:.4f}, "
        f"file {size_ratio}x smaller"
    )


def _compression_record(
    w: _Work,
    before: dict[str, Any] | None,
    extra: dict[str, bytes | str | Path],
    ood_record: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    """The manifest's ``compression`` section: the source, every step, and validation before and after."""
    src = w.src
    val_after = {}
    if w.val_x is not None:
        val_after = {"torch": w.val_scores_of(w.model, w.temperature)}
        for s in w.steps:
            if s["step"] in ("onnx", "int8"):
                val_after[f"onnx-{'fp32' if s['step'] == 'onnx' else 'int8'}"] = s["val_after"]
    files = {WEIGHTS: None, **{k: None for k in extra}}
    return {
        "source": {
            "path": str(src.path),
            "sha256": src.sha256,
            "arch": src.arch,
            "params": n_params(src.model),
            "weights_bytes": src.file(WEIGHTS).stat().st_size,
        },
        "steps": w.steps,
        "params": n_params(w.model),
        "val_before": before,
        "val_after": val_after,
        "data_same_as_training": w.td.same_as_training if w.td is not None else None,
        "default_engine": resolve_engine(files, "auto"),
        "seconds": round(seconds, 1),
        **({"ood": ood_record} if ood_record else {}),
        **({"previous": src.manifest["compression"]} if "compression" in src.manifest else {}),
    }


def _manifest(
    src: Predictor,
    model: nn.Module,
    arch: str,
    kwargs: dict[str, Any],
    changed: bool,
    history: list[dict[str, float]] | None,
    td: TrainingData | None,
    temperature: float | tuple[float, ...],
) -> dict[str, Any]:
    manifest = {
        k: v for k, v in src.manifest.items() if k not in ("files", "self_sha256", "created", "versions")
    }
    manifest["model"] = {**src.manifest["model"], "arch": arch, "kwargs": kwargs}
    if changed:
        # A new network: the source's test figures and calibration describe another model.
        assert td is not None
        probs = _torch_probs(model, td.tensors(td.val_idx), 1.0)
        val = compute_metrics(td.val_y, probs, src.classes, n_bootstrap=200, seed=0)
        val["n_removed_duplicates"] = (
            src.manifest.get("metrics", {}).get("val", {}).get("n_removed_duplicates", 0)
        )
        manifest["metrics"] = {"val": val}
        manifest["history"] = history or []
        manifest["calibration"] = {
            "temperature": temperature,
            "note": "reset: the network changed in compression",
        }
    return json.loads(json.dumps(manifest, default=_jsonable))


def _ood(
    src: Predictor,
    model: nn.Module,
    changed: bool,
    td: TrainingData | None,
    val_x: np.ndarray | None,
    extra: dict[str, bytes | str | Path],
    manifest: dict[str, Any],
    seed: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Keep the source's out-of-distribution guard (same network) or refit it (a new network has new
    features); record the fraction of validation samples each engine flags."""
    info = src.manifest.get("ood")
    if not info:
        return {}, None
    from medclf.ood import fit_detector, penultimate_features

    writers: dict[str, Any] = {}
    if changed:
        assert td is not None and val_x is not None
        rng = np.random.default_rng(seed)
        fit_idx = np.sort(
            rng.choice(td.train_idx, size=min(len(td.train_idx), OOD_FIT_SAMPLES), replace=False)
        )
        fit_x = td.tensors(fit_idx)
        detector = fit_detector(
            penultimate_features(model, fit_x),
            td.samples.labels[fit_idx],
            penultimate_features(model, val_x),
            train_inputs=fit_x,
            val_inputs=val_x,
            seed=seed,
        )
        manifest["ood"] = detector.manifest()
        writers[info["file"]] = detector.save
    else:
        assert src.ood is not None  # the manifest names its file, so the bundle loaded it
        detector = src.ood
        extra[info["file"]] = src.file(info["file"])
    record: dict[str, Any] = {"refit": changed}
    if val_x is not None:
        flagged = {"torch": float(detector.flags(penultimate_features(model, val_x), val_x)[0].mean())}
        for name in (ONNX_FP32, ONNX_INT8):
            if name in extra and isinstance(extra[name], Path):
                feats = OnnxRunner(extra[name]).features(val_x)
                if feats is not None:
                    engine = "onnx-int8" if name == ONNX_INT8 else "onnx-fp32"
                    flagged[engine] = float(detector.flags(feats, val_x)[0].mean())
        record["val_flagged_fraction"] = flagged
    return writers, record


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batched(run: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _torch_probs(
    model: nn.Module, x: np.ndarray, temperature: float | tuple[float, ...], task: str = "multiclass"
) -> np.ndarray:
    return probabilities(_batched(TorchRunner(model), x), temperature, task)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
