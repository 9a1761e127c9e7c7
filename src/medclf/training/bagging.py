"""The ways to train (:func:`train`, :func:`train_folds`, :func:`train_members`), and the bagging they share.

:func:`train` makes one model; when the planner set the epochs and validation stopped the run early, the
time left trains more members with other seeds (:mod:`~medclf.training.leftover`), fused by their mean.

K-fold bagging (``medclf train DATA --folds K``): K training runs fused into one ensemble bundle.

Run ``k`` validates (model selection, early stopping, temperature) on fold ``k`` of the training split
(stratified, grouped by patient when ids exist; :func:`medclf.data.splits.fold_split`) and trains on the
other folds. A validation split the dataset already has stays out of every run's training, so it is
shared by all members: fusion weights, a stacking meta-learner and the ensemble's temperature can be fitted
there. Without one, the members share no validation samples and are fused by their mean (weighting them on
their out-of-fold predictions would not be honest: every member has trained on the other folds).

The time budget is split across the runs as they go (each gets an equal share of what is left). The first
run's plan (architecture, input size, batch size, learning rate, augmentation, denoising) is kept for the
others, so every member sees the same inputs. Members are written to ``<out>.folds/`` and removed once
the ensemble bundle exists; ``resume=True`` reuses finished members and resumes an interrupted one.

Seed bagging (``medclf train DATA --members K``, :func:`train_members`) is the same orchestration with
another kind of diversity: every member trains on the whole training split and validates on the same
validation split (carved with the first seed), but with its own training seed (initial weights, batch
order, augmentation). Sharing the validation split lets ``weighted`` and ``stacking`` be fitted there.

All three draw on one :class:`~medclf.budget.Budget` and share a :class:`~medclf.training.bag.Bag`: the
members' folder, their settings and budget shares, their fusion and the clean-up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console

from medclf import sanity
from medclf.budget import Budget
from medclf.bundle import Bundle, load_bundle
from medclf.data.sources import load_source
from medclf.errors import ConfigError, MedclfError
from medclf.fusion import METHODS, EnsembleResult
from medclf.preprocess import PreprocessSpec
from medclf.training.bag import Bag
from medclf.training.checkpoint import checkpoint_dir
from medclf.training.config import TrainConfig, TrainResult
from medclf.training.leftover import use_leftover_budget
from medclf.training.loop import EpochCallback
from medclf.training.run import train_one

__all__ = ["train", "train_folds", "train_members"]


def train(
    data: str | Path,
    out: str | Path,
    *,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    epoch_callback: EpochCallback | None = None,
    val_fold: tuple[int, int] | None = None,
    **settings: Any,
) -> TrainResult:
    """Train a classifier on ``data`` and write a bundle to ``out``.

    When the planner sets the epochs (no ``epochs`` given) and validation stops the run early, the time
    left in the budget trains more members with other seeds, and ``out`` becomes their mean ensemble
    (``members=1`` turns this off; ``medclf.train_members`` asks for K members outright). Everything else
    is :func:`~medclf.training.run.train_one`'s. The sanity gate's verdict (:mod:`medclf.sanity`) is
    printed at the end and returned in ``TrainResult.sanity``.
    """
    cfg = (config or TrainConfig()).updated(settings)
    budget = Budget(cfg.time_budget)
    if cfg.members is not None and cfg.members != 1:
        raise ConfigError(
            "train() makes one model (members=1) or decides itself (None); use train_members(K)"
        )
    console = console or Console(stderr=True, soft_wrap=True)
    first = train_one(
        data,
        out,
        config=cfg,
        resume=resume,
        progress=progress,
        console=console,
        epoch_callback=epoch_callback,
        val_fold=val_fold,
        budget=budget,
    )
    auto = (
        cfg.members is None
        and cfg.epochs is None
        and val_fold is None
        and not resume
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
        and first.stop_reason == "early_stop"
    )
    result = use_leftover_budget(first, data, Path(out), cfg, budget, progress, console) if auto else first
    if result.sanity is not None:
        sanity.render(result.sanity, console)
    return result


def train_folds(
    data: str | Path,
    out: str | Path,
    *,
    folds: int,
    method: str = "mean",
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    **settings: Any,
) -> EnsembleResult:
    """Train ``folds`` members on complementary folds of ``data`` and fuse them into a bundle at ``out``.

    ``settings`` override fields of ``config`` as in :func:`medclf.training.train`; the time budget covers
    all runs and the fusion. ``method``: ``mean``, or ``weighted`` / ``stacking`` when the dataset has a
    validation split of its own.
    """
    cfg = (config or TrainConfig()).updated(settings)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if method != "mean" and not load_source(data, default_split="train").has_split("val"):
        raise ConfigError(
            f"--fusion {method} is fitted on validation samples that no member trained on; {data} has no "
            "validation split of its own, so K-fold members share none: use --fusion mean"
        )
    return _train_bag(
        data,
        out,
        n=folds,
        mode="folds",
        method=method,
        cfg=cfg,
        resume=resume,
        progress=progress,
        console=console,
    )


def train_members(
    data: str | Path,
    out: str | Path,
    *,
    members: int,
    method: str = "mean",
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    **settings: Any,
) -> EnsembleResult:
    """Seed bagging: ``members`` runs on the whole training split with training seeds ``seed``,
    ``seed + 1``, ..., one shared validation split, fused into a bundle at ``out`` (see the module doc)."""
    cfg = (config or TrainConfig()).updated(settings)
    if members < 2:
        raise ConfigError(f"--members must be at least 2, got {members}")
    return _train_bag(
        data,
        out,
        n=members,
        mode="seeds",
        method=method,
        cfg=cfg,
        resume=resume,
        progress=progress,
        console=console,
    )


def _train_bag(
    data: str | Path,
    out: str | Path,
    *,
    n: int,
    mode: str,
    method: str,
    cfg: TrainConfig,
    resume: bool,
    progress: bool,
    console: Console | None,
) -> EnsembleResult:
    budget = Budget(cfg.time_budget)
    budget.reserve_bag_fusion()
    console = console or Console(stderr=True, soft_wrap=True)
    if method not in METHODS:
        raise ConfigError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    bag = Bag(data, out, cfg, budget, progress=progress, console=console)
    noun = "Fold" if mode == "folds" else "Member"
    pinned: dict[str, Any] = {}
    members: list[Path] = []
    runs: list[dict[str, Any]] = []
    for k in range(n):
        member = bag.work / (f"fold-{k}" if mode == "folds" else f"member-{k}")
        finished = _finished(member) if resume else None
        if finished is not None:
            console.print(f"[bold]{noun} {k + 1}/{n}[/]: reusing the finished member {member}")
            pinned = pinned or _pin(cfg, finished.manifest.get("recipe", {}), finished.spec)
            members.append(member)
            continue
        share = budget.share(n - k)
        if share <= 0 and not cfg.epochs:
            raise ConfigError(
                f"the time budget ({cfg.time_budget:.0f} s) ran out after {k} of {n} runs; give a larger "
                f"--time-budget or fewer --{mode if mode == 'folds' else 'members'}"
            )
        console.print(f"[bold]{noun} {k + 1}/{n}[/] (time budget {share:.0f} s)")
        result = train(
            data,
            member,
            config=bag.member_config(k, share, seeds=mode == "seeds", pinned=pinned),
            resume=resume and checkpoint_dir(member).exists(),
            progress=progress,
            console=console,
            val_fold=(k, n) if mode == "folds" else None,
        )
        pinned = pinned or _pin(cfg, result.plan.to_dict(), result.plan.spec)
        members.append(result.bundle)
        runs.append(
            {
                "fold" if mode == "folds" else "member": k,
                "seed": cfg.seed + k if mode == "seeds" else cfg.seed,
                "seconds": round(result.seconds, 1),
                "best_epoch": result.best_epoch,
            }
        )
    recipe = {
        "bagging": mode,
        "folds" if mode == "folds" else "members": n,
        "seed": cfg.seed,
        "time_budget_s": cfg.time_budget,
        "runs": runs,
        "training_seconds": round(budget.elapsed(), 1),
    }
    fused = bag.fuse(members, method, recipe)
    bag.clean()
    return fused


def _pin(cfg: TrainConfig, plan: dict[str, Any], spec: PreprocessSpec) -> dict[str, Any]:
    """The first run's planned choices that the user left open, for the other runs."""
    chosen = {
        "arch": plan.get("arch"),
        "size": int(spec.size[0]),
        "batch_size": plan.get("batch_size"),
        "lr": plan.get("lr"),
        "augment": plan.get("augment"),
        "denoise": spec.denoise,
        # 3D or 2.5D as the first run chose: a later run planned alone could fall back to the other, and
        # members that differ in dimensions cannot be fused (0: keep volumes 3D; no effect on 2D data).
        "slices_as_channels": int(spec.slices_as_channels or 0),
    }
    return {k: v for k, v in chosen.items() if getattr(cfg, k) is None and v is not None}


def _finished(path: Path) -> Bundle | None:
    if not path.exists():
        return None
    try:
        return load_bundle(path)
    except MedclfError:
        return None
