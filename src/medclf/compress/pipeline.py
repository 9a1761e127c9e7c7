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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from medclf.budget import parse_duration
from medclf.bundle import WEIGHTS, save_bundle
from medclf.compress.data import TrainingData, load_training_data, val_scores
from medclf.compress.distill import (
    DEFAULT_KD_WEIGHT,
    DEFAULT_TEMPERATURE,
    check_teacher,
    kd_loss_hook,
    planned_student_kwargs,
)
from medclf.compress.finetune import finetune, plan_from_manifest
from medclf.compress.onnx_export import PARITY_TOLERANCE, check_parity, export_onnx
from medclf.compress.prune import n_params, prune_model
from medclf.compress.quantize import quantize_int8
from medclf.engines import ONNX_FP32, ONNX_INT8, OnnxRunner, TorchRunner, probabilities, resolve_engine
from medclf.errors import BundleError, ConfigError
from medclf.evaluation.metrics import compute_metrics
from medclf.model_card import MODEL_CARD, model_card

# The source bundle is run here (validation scores, its OOD guard), so it is held as a Predictor; under this
# module's old names until its own rework (issue 23: import lines only while training/ is being split).
from medclf.predictor import Predictor as Bundle
from medclf.predictor import as_predictor as load_bundle

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


def export_bundle(
    bundle: str | Path | Bundle,
    out: str | Path,
    *,
    data: str | Path | None = None,
    onnx: bool = False,
    int8: bool = False,
    prune: float | None = None,
    distill_from: str | Path | Bundle | None = None,
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
    console: Console | None = None,
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
    rate for a fresh student: see ``FRESH_STUDENT_EPOCHS``).
    """
    console = console or Console(stderr=True, soft_wrap=True)
    t_start = time.perf_counter()
    src = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    distill = student is not None or distill_from is not None
    task = str(src.manifest.get("task", "multiclass"))
    if task == "multilabel" and (prune or distill):
        raise ConfigError(
            "pruning and distillation of a multi-label bundle are not supported; use --onnx/--int8"
        )
    thresholds_of = (src.manifest.get("thresholds") or {}).get("labels")
    thresholds = np.array([float(thresholds_of[c]) for c in src.classes]) if thresholds_of else None
    if not (onnx or int8 or prune or distill):
        raise ConfigError("nothing to do: give --onnx, --int8, --prune AMOUNT or --distill-from/--student")
    if (int8 or prune or distill) and data is None:
        raise ConfigError("--int8, --prune and distillation need the training data: give --data DATA")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {epochs})")
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr must be greater than 0 (got {lr})")
    budget = parse_duration(time_budget) if time_budget is not None else None
    td = (
        load_training_data(
            src, data, cache_dir=cache_dir, workers=workers, progress=progress, console=console
        )
        if data is not None
        else None
    )
    val_x = td.tensors(td.val_idx) if td is not None else None
    classes = src.classes

    def scores(probs: np.ndarray) -> dict[str, Any]:
        assert td is not None
        return val_scores(td.val_y, probs, classes, thresholds)

    m = src.manifest["model"]
    arch, kwargs = str(m["arch"]), dict(m.get("kwargs", {}))
    model: nn.Module = src.model
    temperature = src.temperature
    steps: list[dict[str, Any]] = []
    history: list[dict[str, float]] | None = None
    before = scores(src.predict_tensors(val_x, engine="torch")) if val_x is not None else None
    if before is not None:
        acc, auc = before["accuracy"], _f(before["auc"])
        console.print(f"[bold]Source[/] {src.arch}: validation accuracy {acc:.4f}, AUC {auc}")

    if distill:
        assert td is not None and val_x is not None
        teacher = (
            distill_from
            if isinstance(distill_from, Bundle)
            else load_bundle(distill_from)
            if distill_from is not None
            else src
        )
        resize = check_teacher(teacher, src.spec, classes)
        teacher_size = tuple(teacher.spec.size) if resize else None
        if student is not None:
            s_kwargs = {**planned_student_kwargs(student, src.spec), **(student_kwargs or {})}
            s_arch, init = student, None
        else:
            s_arch, s_kwargs, init = arch, kwargs, _plain_state(src.model)
        plan = plan_from_manifest(src.manifest, arch=s_arch, arch_kwargs=s_kwargs)
        run_epochs = epochs or default_epochs(src.manifest, plan.epochs, fresh=init is None)
        run_lr = lr or (plan.lr if init is None else plan.lr / 4)
        console.print(
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
            time_budget=budget,
            loss_hook=hook,
            seed=seed,
            console=console,
            progress=progress,
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
        teacher_val = scores(teacher.predict_tensors(teacher_x, engine="torch"))
        model, arch, kwargs, history = ft.model, s_arch, s_kwargs, ft.history
        after = scores(_torch_probs(model, val_x, 1.0))
        steps.append(
            {
                "step": "distill",
                "teacher": {
                    "path": str(teacher.path),
                    "sha256": teacher.sha256,
                    "arch": teacher.arch,
                    "params": n_params(teacher.model),
                    "val": teacher_val,
                },
                "student": {
                    "arch": arch,
                    "kwargs": kwargs,
                    "params": n_params(model),
                    "initialised_from": ("the source bundle" if init is not None else "random"),
                },
                "size_ratio": round(n_params(teacher.model) / max(n_params(model), 1), 2),
                "loss": "(1 - w) * CE + w * T^2 * KL(teacher || student)",
                "temperature": kd_temperature,
                "kd_weight": kd_weight,
                "epochs": len(ft.history),
                "best_epoch": ft.best_epoch,
                "lr": run_lr,
                "seconds": round(ft.seconds, 1),
                "val_after": after,
            }
        )
        console.print(
            f"  student {n_params(model):,} parameters ({steps[-1]['size_ratio']}x fewer than the teacher): "
            f"validation accuracy {after['accuracy']:.4f} (teacher {teacher_val['accuracy']:.4f})"
        )
        temperature = 1.0

    if prune:
        assert td is not None and val_x is not None
        pr = prune_model(
            model,
            float(prune),
            arch=arch,
            in_channels=int(m["in_channels"]),
            n_classes=int(m["n_classes"]),
            spatial_dims=int(m["spatial_dims"]),
            arch_kwargs=kwargs,
            calibration=td.tensors(td.stratified(td.train_idx, PRUNE_CALIBRATION_SAMPLES, seed)),
        )
        right_after = scores(_torch_probs(pr.model, val_x, 1.0))
        plan = plan_from_manifest(src.manifest, arch=arch, arch_kwargs=pr.arch_kwargs)
        run_epochs = epochs or default_epochs(src.manifest, plan.epochs, fresh=False)
        run_lr = lr or plan.lr / 4
        console.print(
            f"[bold]Pruned[/] {prune:.0%} of the channels: {pr.params_before:,} -> {pr.params_after:,} "
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
            time_budget=budget,
            seed=seed,
            console=console,
            progress=progress,
        )
        model, kwargs, history = ft.model, pr.arch_kwargs, ft.history
        after = scores(_torch_probs(model, val_x, 1.0))
        steps.append(
            {
                "step": "prune",
                "amount": float(prune),
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
        console.print(
            f"  after fine-tuning: validation accuracy {after['accuracy']:.4f}, AUC {_f(after['auc'])}"
        )
        temperature = 1.0

    model = model.eval()
    changed = model is not src.model
    work = Path(tempfile.mkdtemp(prefix="medclf-export-"))
    extra: dict[str, bytes | str | Path] = {
        name: src.path / name for name in CARRIED_FILES if name in src.manifest.get("files", {})
    }
    fp32_probs: np.ndarray | None = None
    try:
        if onnx or int8:
            onnx_path = work / ONNX_FP32
            info = export_onnx(model, src.spec.input_shape, onnx_path)
            if val_x is not None:
                assert td is not None
                check_x = td.tensors(td.stratified(td.val_idx, parity_samples, seed))
                samples_note = f"validation samples (n={len(check_x)})"
            else:
                check_x = np.random.default_rng(seed).random(
                    (parity_samples, *src.spec.input_shape), dtype=np.float32
                )
                samples_note = f"random inputs in [0, 1] (n={parity_samples}; no --data given)"
            parity = check_parity(model, onnx_path, check_x, temperature=temperature, task=task)
            parity["samples"] = samples_note
            if parity["max_abs_prob_diff"] > PARITY_TOLERANCE:
                raise BundleError(
                    f"ONNX export disagrees with PyTorch: max probability difference "
                    f"{parity['max_abs_prob_diff']:.2e} > {PARITY_TOLERANCE:g}; not writing the bundle"
                )
            step: dict[str, Any] = {
                "step": "onnx",
                **info,
                "parity": parity,
                "file_bytes": onnx_path.stat().st_size,
            }
            console.print(
                f"[bold]ONNX[/] ({info['exporter']} exporter, opset {info['opset']}): "
                "max |p_onnx - p_torch| = "
                f"{parity['max_abs_prob_diff']:.1e} on {samples_note}"
            )
            if val_x is not None:
                fp32_probs = probabilities(_batched(OnnxRunner(onnx_path), val_x), temperature, task)
                step["val_after"] = scores(fp32_probs)
            steps.append(step)
            extra[ONNX_FP32] = onnx_path
        if int8:
            assert td is not None and val_x is not None and fp32_probs is not None
            int8_path = work / ONNX_INT8
            calib = td.tensors(td.stratified(td.train_idx, calibration_samples, seed))
            qinfo = quantize_int8(work / ONNX_FP32, int8_path, calib, fmt=int8_format)
            int8_probs = probabilities(_batched(OnnxRunner(int8_path), val_x), temperature, task)
            fp32_val, int8_val = scores(fp32_probs), scores(int8_probs)
            steps.append(
                {
                    "step": "int8",
                    **qinfo,
                    "file_bytes": int8_path.stat().st_size,
                    "size_ratio_vs_fp32": round(
                        (work / ONNX_FP32).stat().st_size / int8_path.stat().st_size, 2
                    ),
                    "val_before": fp32_val,
                    "val_after": int8_val,
                    "accuracy_drop": round(fp32_val["accuracy"] - int8_val["accuracy"], 6),
                    "agreement_with_fp32": float((fp32_probs.argmax(1) == int8_probs.argmax(1)).mean()),
                    "max_abs_prob_diff_vs_fp32": float(np.abs(fp32_probs - int8_probs).max()),
                }
            )
            if task == "multilabel":  # the same decision per finding, at the bundle's thresholds
                t = thresholds if thresholds is not None else np.full(len(classes), 0.5)
                same = (fp32_probs >= t) == (int8_probs >= t)
                steps[-1]["agreement_with_fp32"] = float(same.mean())
                steps[-1]["agreement_per_finding_with_fp32"] = dict(
                    zip(classes, map(float, same.mean(axis=0)), strict=True)
                )
            console.print(
                f"[bold]int8[/] ({qinfo['format']}, {qinfo['weights']}, calibrated on {len(calib)} training "
                f"samples): validation accuracy {fp32_val['accuracy']:.4f} -> {int8_val['accuracy']:.4f}, "
                f"file {steps[-1]['size_ratio_vs_fp32']}x smaller"
            )
            extra[ONNX_INT8] = int8_path

        manifest = _manifest(src, model, arch, kwargs, changed, history, td, temperature)
        writers, ood_record = _ood(src, model, changed, td, val_x, extra, manifest, seed)
        val_after = {}
        if val_x is not None:
            val_after = {"torch": scores(_torch_probs(model, val_x, temperature, task))}
            for s in steps:
                if s["step"] in ("onnx", "int8"):
                    val_after[f"onnx-{'fp32' if s['step'] == 'onnx' else 'int8'}"] = s["val_after"]
        files = {WEIGHTS: None, **{k: None for k in extra}}
        manifest["compression"] = {
            "source": {
                "path": str(src.path),
                "sha256": src.sha256,
                "arch": src.arch,
                "params": n_params(src.model),
                "weights_bytes": src.file(WEIGHTS).stat().st_size,
            },
            "steps": steps,
            "params": n_params(model),
            "val_before": before,
            "val_after": val_after,
            "data_same_as_training": td.same_as_training if td is not None else None,
            "default_engine": resolve_engine(files, "auto"),
            "seconds": round(time.perf_counter() - t_start, 1),
            **({"ood": ood_record} if ood_record else {}),
            **({"previous": src.manifest["compression"]} if "compression" in src.manifest else {}),
        }
        extra[MODEL_CARD] = model_card(manifest)  # the source's card describes another model
        path = save_bundle(out, model=model, manifest=manifest, extra_files=extra, writers=writers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.print(
        f"[bold green]Bundle written[/] to {path} "
        f"(default engine: {manifest['compression']['default_engine']})"
    )
    return ExportResult(bundle=path, compression=manifest["compression"])


def _manifest(
    src: Bundle,
    model: nn.Module,
    arch: str,
    kwargs: dict[str, Any],
    changed: bool,
    history: list[dict[str, float]] | None,
    td: TrainingData | None,
    temperature: float,
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
    src: Bundle,
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


def _torch_probs(model: nn.Module, x: np.ndarray, temperature: float, task: str = "multiclass") -> np.ndarray:
    return probabilities(_batched(TorchRunner(model), x), temperature, task)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
