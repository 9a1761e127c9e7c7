"""K-fold bagging (``medclf train DATA --folds K``): K training runs fused into one ensemble bundle.

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
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from medclf.bundle import Bundle, load_bundle
from medclf.data.sources import load_source
from medclf.errors import ConfigError, MedclfError
from medclf.fusion import METHODS, EnsembleResult, ensemble
from medclf.preprocess import PreprocessSpec
from medclf.training import CHECKPOINT_SUFFIX, TrainConfig, train

__all__ = ["train_folds", "train_members"]

FOLDS_SUFFIX = ".folds"
# Time kept back from the training runs for fusing them (validation predictions, fitting, writing).
_FUSION_RESERVE = (0.02, 5.0)  # fraction of the budget, plus seconds


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
    t_start = time.perf_counter()
    console = console or Console(stderr=True, soft_wrap=True)
    if method not in METHODS:
        raise ConfigError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    folds = n
    noun = "Fold" if mode == "folds" else "Member"
    out = Path(out)
    work = out.with_name(out.name + FOLDS_SUFFIX)
    deadline = t_start + cfg.time_budget
    reserve = _FUSION_RESERVE[0] * cfg.time_budget + _FUSION_RESERVE[1]
    pinned: dict[str, Any] = {}
    members: list[Path] = []
    runs: list[dict[str, Any]] = []
    for k in range(folds):
        fold_out = work / (f"fold-{k}" if mode == "folds" else f"member-{k}")
        finished = _finished(fold_out) if resume else None
        if finished is not None:
            console.print(f"[bold]{noun} {k + 1}/{folds}[/]: reusing the finished member {fold_out}")
            recipe = finished.manifest.get("recipe", {})
            pinned = pinned or _pin(cfg, recipe, finished.spec)
            members.append(fold_out)
            continue
        budget = (deadline - time.perf_counter() - reserve) / (folds - k)
        if budget <= 0 and not cfg.epochs:
            raise ConfigError(
                f"the time budget ({cfg.time_budget:.0f} s) ran out after {k} of {folds} runs; give a larger "
                f"--time-budget or fewer --{mode if mode == 'folds' else 'members'}"
            )
        console.print(f"[bold]{noun} {k + 1}/{folds}[/] (time budget {budget:.0f} s)")
        ckpt = fold_out.with_name(fold_out.name + CHECKPOINT_SUFFIX)
        run_settings: dict[str, Any] = {"time_budget": max(budget, 1.0), "members": 1, **pinned}
        if mode == "seeds":
            run_settings.update(
                seed=cfg.seed + k, split_seed=cfg.seed if cfg.split_seed is None else cfg.split_seed
            )
        result = train(
            data,
            fold_out,
            config=cfg.updated(run_settings),
            resume=resume and ckpt.exists(),
            progress=progress,
            console=console,
            val_fold=(k, folds) if mode == "folds" else None,
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
    fused = ensemble(
        members,
        out,
        data=data,
        method=method,
        cache_dir=cfg.cache_dir,
        workers=cfg.workers,
        progress=progress,
        console=console,
        seed=cfg.seed,
        recipe={
            "bagging": mode,
            "folds" if mode == "folds" else "members": folds,
            "seed": cfg.seed,
            "time_budget_s": cfg.time_budget,
            "runs": runs,
            "training_seconds": round(time.perf_counter() - t_start, 1),
        },
    )
    if not cfg.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
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
