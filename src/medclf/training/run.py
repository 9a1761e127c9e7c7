"""One training run (``_train_one``): data -> plan -> cached tensors -> the loop -> a verified bundle."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from medclf import augment as augment_mod
from medclf import sanity
from medclf import threads as threads_mod
from medclf.budget import Budget
from medclf.bundle import save_bundle
from medclf.data.cache import prepare
from medclf.data.references import TRAIN_SIGNATURES, aligned_signatures, pack_signatures
from medclf.data.sources import load_source
from medclf.data.splits import ensure_validation, fold_split
from medclf.distributed import from_env
from medclf.errors import ConfigError, DataError
from medclf.evaluation.calibration import apply_temperature, fit_temperature_from_probs, log_probs
from medclf.evaluation.metrics import compute_metrics
from medclf.mitigation import shortcut_step
from medclf.model_card import MODEL_CARD, model_card
from medclf.ood import OOD_FILE
from medclf.planner import (
    Plan,
    fingerprint,
)
from medclf.training.checkpoint import CHECKPOINT_SUFFIX, _load_checkpoint_state
from medclf.training.config import TrainConfig, resolve_device
from medclf.training.finish import OOD_FIT_SAMPLES, _fit_ood
from medclf.training.loop import _Loop
from medclf.training.planning import _plan, _plan_like
from medclf.training.progress import _print_plan


@dataclass
class TrainResult:
    bundle: Path
    plan: Plan
    history: list[dict[str, float]]
    val_metrics: dict[str, Any]
    best_epoch: int
    seconds: float
    n_val_copies_removed: int
    unreadable: list[dict[str, str]] = field(default_factory=list)
    # "completed" (all planned epochs), "early_stop" or "time_budget"
    stop_reason: str = "completed"
    # With seed bagging (--members, or the time left after an early stop): the members' bundles.
    members: list[Path] = field(default_factory=list)
    # The sanity gate's verdict (medclf.sanity) as in bundle.json; None on ranks other than 0.
    sanity: dict[str, Any] | None = None
    # What the gate compared with (majority class, thumbnail baseline), kept for a fused ensemble's verdict.
    references: dict[str, Any] | None = None
    # The schedule as it ran: mode, planned and run epochs, whether the learning rate annealed.
    schedule: dict[str, Any] | None = None
    # Why the leftover-budget members were not fused (the best single member was kept), if they were not.
    leftover_failure: str | None = None


def _train_one(
    data: str | Path,
    out: str | Path,
    *,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    epoch_callback: Callable[[dict[str, Any], nn.Module, Plan], dict[str, Any] | None] | None = None,
    val_fold: tuple[int, int] | None = None,
    budget: Budget | None = None,
    base_plan: Plan | None = None,
    **settings: Any,
) -> TrainResult:
    """Train one classifier on ``data`` and write a bundle to ``out``.

    ``settings`` override fields of ``config`` (e.g. ``epochs=5, arch="resnet18"``; ``time_budget`` may be
    a string such as ``"10m"``). With ``resume=True`` training continues from ``<out>.ckpt`` with the plan
    saved there. ``epoch_callback(row, model, plan)``, when given, runs after every epoch with that epoch's
    history row and the model being selected (EMA when enabled); a dict it returns is merged into the row
    (benchmarks use it to record test scores against wall time; it never influences training).
    ``val_fold=(k, K)`` validates on fold ``k`` of ``K`` of the training split instead of a random
    fraction (K-fold bagging: :func:`medclf.folds.train_folds`). The bundle's temperature is fitted on
    the validation predictions of the selected model (:mod:`medclf.evaluation.calibration`).

    ``budget`` (default: ``config.time_budget`` from now) is the clock everything here draws on: planning,
    decoding, the epochs, the OOD fit and writing the bundle. ``base_plan`` skips planning and trains that
    plan (same preprocessing, network and recipe) with the epochs that fit this budget at its measured pace:
    the leftover-budget members use the first member's plan, so that they can be fused with it.
    """
    cfg = (config or TrainConfig()).updated(settings)
    budget = budget or Budget(cfg.time_budget)
    t_start = budget.start
    console = console or Console(stderr=True, soft_wrap=True)
    out = Path(out)
    ckpt_dir = out.with_name(out.name + CHECKPOINT_SUFFIX)
    device = resolve_device(cfg.device)
    # Under torchrun: join the process group; only rank 0 plans, prints and writes (medclf.distributed).
    dist, device = from_env(device)
    if not dist.is_main:
        console, progress = Console(stderr=True, quiet=True), False
    _seed_everything(cfg.seed)

    samples = load_source(data, default_split="train")
    if not samples.has_split("train"):
        raise DataError(f"{data}: no training split found")
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    if val_fold is not None:
        samples = fold_split(samples, *val_fold, seed=split_seed)
    else:
        samples = ensure_validation(samples, fraction=cfg.val_fraction, seed=split_seed)
    state = _load_checkpoint_state(ckpt_dir) if resume else None
    if resume and state is None:
        raise ConfigError(f"--resume: no checkpoint at {ckpt_dir} (nothing to resume)")
    # A resumed run keeps the thread count it started with: same seed and threads, same weights.
    resumed_threads = state["plan"].get("threads") if state and not cfg.threads else None
    policy = threads_mod.apply(
        cfg.threads or resumed_threads, source="checkpoint" if resumed_threads else "--threads"
    )

    t_fp = time.perf_counter()
    fp = fingerprint(samples, seed=cfg.seed)
    probe_s = (time.perf_counter() - t_fp) / max(fp.n_probed, 1)
    n_train = len(samples.indices("train"))
    if state is not None:
        plan = Plan.from_dict(state["plan"])
        console.print(f"[bold]Resuming[/] after epoch {state['epoch'] + 1} of {plan.epochs} ({ckpt_dir})")
    elif base_plan is not None:
        plan = _plan_like(base_plan, cfg, budget)
    else:
        plan = _plan(samples, fp, n_train, cfg, budget, probe_s, policy, dist, device)
    plan.threads = policy.torch_threads
    if dist.enabled:
        plan = Plan.from_dict(dist.broadcast_json(plan.to_dict()))
    _print_plan(console, plan, fp, samples, policy)

    # On each machine local rank 0 decodes into the disk cache while the others wait, then they open it.
    if dist.enabled and not dist.is_local_main:
        dist.barrier()
    prepared = prepare(
        samples, plan.spec, cache_dir=cfg.cache_dir, workers=cfg.workers, progress=progress, console=console
    )
    if dist.enabled and dist.is_local_main:
        dist.barrier()
    train_idx = np.flatnonzero(prepared.ok & (np.array(samples.splits) == "train") & (samples.labels >= 0))
    val_mask = prepared.ok & (np.array(samples.splits) == "val") & (samples.labels >= 0)
    n_copies = int((val_mask & prepared.train_copy).sum())
    if not cfg.include_train_copies:
        val_mask &= ~prepared.train_copy
    val_idx = np.flatnonzero(val_mask)
    if prepared.errors:
        console.print(f"[yellow]{len(prepared.errors)} unreadable file(s) left out[/] (see `medclf audit`)")
    if n_copies:
        verb = "kept in" if cfg.include_train_copies else "left out of"
        console.print(f"{n_copies} validation sample(s) copy a training sample: {verb} model selection")
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(
            "after removing unreadable files and copies, no training or validation samples remain"
        )
    present = np.unique(samples.labels[train_idx])
    if len(present) < 2:
        raise DataError("the training split holds a single class: nothing to learn")

    # Shortcut check on the training split (cues from the decoding pass); may switch the mitigation on.
    shortcut_section, sample_weights = shortcut_step(
        plan, samples, prepared.scan, train_idx, mode=cfg.shortcut_mitigation, decide=state is None,
        seed=cfg.seed, workers=cfg.workers or 1, console=console if dist.is_main else Console(quiet=True),
    )  # fmt: skip

    # What follows the last epoch must fit the budget too: features for the OOD guard, the temperature,
    # the sanity gate's baseline and writing the bundle (medclf.budget prices it).
    budget.reserve_finishing(min(len(train_idx), OOD_FIT_SAMPLES) + len(val_idx), plan.throughput)
    # Re-fit the epoch count to the time that is really left (decoding may have been faster or cached).
    if state is None and not cfg.epochs and plan.epoch_seconds:
        fit = int(budget.epoch_seconds() // plan.epoch_seconds)
        plan.epochs = max(1, min(plan.epochs, fit)) if fit < plan.epochs else plan.epochs
    plan.epochs = int(dist.broadcast_json(plan.epochs))  # a clock decided it: rank 0's count for all

    # With a time budget and planner-chosen epochs the schedule follows the clock (medclf.schedule).
    clock_driven = not cfg.epochs
    loop = _Loop(
        plan,
        samples,
        prepared,
        train_idx,
        val_idx,
        cfg,
        device,
        ckpt_dir,
        console,
        progress,
        dist=dist,
        clock_driven=clock_driven,
        clock=budget.clock,
    )
    loop.epoch_callback = epoch_callback
    loop.t_start = t_start
    loop.sample_weights = None if sample_weights is None else torch.from_numpy(sample_weights)
    if clock_driven and policy.source == "measured":
        loop.load_monitor = threads_mod.LoadMonitor()
    history, best_epoch, val_probs = loop.run(state, budget.work_deadline() if clock_driven else None)
    schedule = loop.schedule_record()
    if not dist.is_main:  # rank 0 calibrates and writes the bundle; wait until it is there
        dist.barrier()
        dist.close()
        return TrainResult(
            bundle=out,
            plan=plan,
            history=history,
            val_metrics={},
            best_epoch=best_epoch,
            seconds=budget.elapsed(),
            n_val_copies_removed=n_copies,
            unreadable=prepared.errors,
        )

    val_y = samples.labels[val_idx]
    calibration = fit_temperature_from_probs(val_probs, val_y)
    val_probs = apply_temperature(log_probs(val_probs), calibration.temperature)
    val_metrics = compute_metrics(val_y, val_probs, samples.classes, n_bootstrap=200, seed=cfg.seed)
    val_metrics.update(ece_uncalibrated=calibration.ece_before, temperature=calibration.temperature)
    val_metrics["n_removed_duplicates"] = n_copies if not cfg.include_train_copies else 0
    references = sanity.baselines(
        prepared.tensors, train_idx, val_idx, samples.labels, samples.classes, seed=cfg.seed
    )
    verdict = sanity.judge(val_metrics, references, schedule).to_dict()
    train_hashes = sorted({prepared.hashes[i] for i in train_idx})
    manifest = {
        "model": {
            "arch": plan.arch,
            "kwargs": plan.arch_kwargs,
            "in_channels": plan.spec.channels,
            "n_classes": len(samples.classes),
            "spatial_dims": plan.spec.spatial_dims,
        },
        "classes": samples.classes,
        "preprocess": plan.spec.to_dict(),
        "input": {"shape": list(plan.spec.input_shape), "dtype": "float32", "value_range": [0.0, 1.0]},
        "recipe": {
            **plan.to_dict(),
            "seed": cfg.seed,
            "split_seed": split_seed,
            "val_fraction": cfg.val_fraction,
            "val_fold": list(val_fold) if val_fold is not None else None,
            "time_budget_s": cfg.time_budget,
            "device": device,
            "world_size": dist.world_size,
            "streamed": loop.streaming,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "seconds": round(budget.elapsed(), 1),
            "augmentation": augment_mod.describe(plan.augment),
            "schedule": schedule,
            "cpu": policy.to_dict(),
        },
        "data": {
            "source": Path(samples.source).name,
            "kind": samples.kind,
            "fingerprint": prepared.fingerprint,
            "counts": samples.summary(),
            "fingerprint_stats": fp.to_dict(),
            "n_unreadable": len(prepared.errors),
            "n_val_train_copies": n_copies,
            "val_train_copies_excluded": not cfg.include_train_copies,
        },
        "metrics": {"val": val_metrics},
        "history": history,
        "calibration": calibration.to_dict(),
        "sanity": verdict,
        "shortcuts": shortcut_section,
    }
    best = loop.best_model()
    detector = _fit_ood(best, prepared.tensors, train_idx, val_idx, samples.labels, cfg.seed, loop.eval_batch)
    manifest["ood"] = detector.manifest()
    bundle = save_bundle(
        out,
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
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dist.barrier()
    dist.close()
    seconds = budget.elapsed()
    console.print(
        f"[bold green]Bundle written[/] to {bundle}  (val AUC {_fmt(val_metrics.get('auc'))}, "
        f"accuracy {_fmt(val_metrics.get('accuracy'))}, best epoch {best_epoch}, {seconds / 60:.1f} min)"
    )
    return TrainResult(
        bundle=bundle,
        plan=plan,
        history=history,
        val_metrics=val_metrics,
        best_epoch=best_epoch,
        seconds=seconds,
        n_val_copies_removed=n_copies,
        unreadable=prepared.errors,
        stop_reason=loop.stop_reason,
        sanity=verdict,
        references=references,
        schedule=schedule,
    )


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    # Deterministic oneDNN/ATen kernels on CPU for a given seed and thread count.
    torch.use_deterministic_algorithms(True, warn_only=True)
