"""One training run (:func:`train_one`, and :func:`train`, which also reports the sanity gate's verdict): data
-> plan -> cached tensors -> the loop -> a verified bundle. What it shows goes to the active reporter
(:mod:`medclf.reporting`).

Its three stages live next to it: :mod:`~medclf.training.setup` (everything before the first epoch),
:mod:`~medclf.training.loop` (the epochs) and :mod:`~medclf.training.finish` (calibration, the OOD guard
and the bundle).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from medclf import reporting, sanity
from medclf.budget import Budget
from medclf.bundle import check_out
from medclf.distributed import from_env
from medclf.errors import ConfigError
from medclf.planner import Plan
from medclf.tracking_hook import traced
from medclf.training.config import TrainConfig, TrainResult, resolve_device
from medclf.training.finish import finish
from medclf.training.loop import EpochCallback, Loop, LoopHooks
from medclf.training.setup import RunContext, set_up


def train(
    data: str | Path,
    out: str | Path,
    *,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    epoch_callback: EpochCallback | None = None,
    val_fold: tuple[int, int] | None = None,
    **settings: Any,
) -> TrainResult:
    """Train one classifier on ``data``, write its bundle to ``out`` (:func:`train_one`) and report the
    sanity gate's verdict (:mod:`medclf.sanity`), also returned in ``TrainResult.sanity``.

    One model, always: ``medclf.train`` (:func:`medclf.folds.train`) is this plus, when the planner set the
    epochs and validation stopped the run early, more members from the time left, fused by their mean.
    """
    cfg = (config or TrainConfig()).updated(settings)
    check_one_model(cfg)
    result = train_one(
        data,
        out,
        config=cfg,
        resume=resume,
        progress=progress,
        epoch_callback=epoch_callback,
        val_fold=val_fold,
    )
    if result.sanity is not None:
        sanity.render(result.sanity)
    return result


def check_one_model(cfg: TrainConfig) -> None:
    """Refuse ``members`` other than 1 (one model) or None (decide): K members are train_members's."""
    if cfg.members is not None and cfg.members != 1:
        raise ConfigError(
            "train() makes one model (members=1) or decides itself (None); use train_members(K)"
        )


@traced("train")  # MLflow, when the job is tracked (medclf.tracking)
def train_one(
    data: str | Path,
    out: str | Path,
    *,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    epoch_callback: EpochCallback | None = None,
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
    fraction (K-fold bagging: :func:`medclf.folds.train_folds`). The bundle's temperature is
    fitted on the validation predictions of the selected model (:mod:`medclf.metrics.calibration`).

    ``budget`` (default: ``config.time_budget`` from now) is the clock everything here draws on: planning,
    decoding, the epochs, the OOD fit and writing the bundle. ``base_plan`` skips planning and trains that
    plan (same preprocessing, network and recipe) with the epochs that fit this budget at its measured pace:
    the leftover-budget members use the first member's plan, so that they can be fused with it.
    """
    cfg = (config or TrainConfig()).updated(settings)
    check_out(out, [data])  # before any work: a refusal after the run would leave its checkpoint behind
    budget = budget or Budget(cfg.time_budget)
    # Under torchrun: join the process group; only rank 0 plans, reports and writes (medclf.distributed).
    dist, device = from_env(resolve_device(cfg.device))
    with contextlib.ExitStack() as scope:
        if not dist.is_main:
            scope.enter_context(reporting.use(reporting.SilentReporter()))
        _seed_everything(cfg.seed)
        ctx = RunContext(cfg, Path(out), budget, dist, device, progress and dist.is_main, val_fold)
        return _run(ctx, data, resume, base_plan, epoch_callback)


def _run(
    ctx: RunContext,
    data: str | Path,
    resume: bool,
    base_plan: Plan | None,
    epoch_callback: EpochCallback | None,
) -> TrainResult:
    """The run :func:`train_one` set up the context of: set-up, epochs, bundle."""
    cfg, budget, dist = ctx.cfg, ctx.budget, ctx.dist
    setup = set_up(ctx, data, resume=resume, base_plan=base_plan)

    # With a time budget and planner-chosen epochs the schedule follows the clock (medclf.schedule).
    clock_driven = not cfg.epochs
    loop = Loop(
        setup.plan,
        setup.loop_data(),
        cfg,
        device=ctx.device,
        progress=ctx.progress,
        ckpt_dir=ctx.ckpt_dir,
        dist=dist,
        budget=budget,
        clock_driven=clock_driven,
        follow_load=clock_driven and setup.policy.source == "measured",
        hooks=LoopHooks(on_epoch=epoch_callback),
    )
    history, best_epoch, val_probs = loop.run(setup.state, budget.work_deadline() if clock_driven else None)
    if not dist.is_main:  # rank 0 calibrates and writes the bundle; wait until it is there
        dist.barrier()
        dist.close()
        return TrainResult(
            bundle=ctx.out,
            plan=setup.plan,
            history=history,
            val_metrics={},
            best_epoch=best_epoch,
            seconds=budget.elapsed(),
            n_val_copies_removed=setup.n_copies,
            unreadable=setup.prepared.errors,
        )
    return finish(ctx, setup, loop, history, best_epoch, val_probs)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    # Deterministic oneDNN/ATen kernels on CPU for a given seed and thread count.
    torch.use_deterministic_algorithms(True, warn_only=True)
