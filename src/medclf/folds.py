"""Bagging: :func:`train` (one model; when the planner set the epochs and validation stopped the run early,
the time left trains more members with other seeds, fused by their mean), K-fold bagging
(:func:`train_folds`) and seed bagging (:func:`train_members`), all on one :class:`Bag`: the members'
folder, their settings and shares of one :class:`~medclf.budget.Budget`, their fusion and the clean-up.

K-fold bagging (``medclf train DATA --folds K``): run ``k`` validates (model selection, early stopping,
temperature) on fold ``k`` of the training split (stratified by class, or for multi-label findings
iteratively on every finding at once; grouped by patient when ids exist;
:func:`medclf.data.splits.fold_split`) and trains on the other folds. A validation split the dataset already
has stays out of every run's training, so it is shared by all members: fusion weights, a stacking
meta-learner and the ensemble's temperature can be fitted there. Without one, the members share no
validation samples and are fused by their mean (weighting them on their out-of-fold predictions would not be
honest: every member has trained on the other folds). Multi-label members are always fused by the mean of
their per-finding probabilities; each finding's threshold is chosen on the shared validation split, or
without one on the out-of-fold probabilities (:func:`medclf.fusion.ensemble`).

The time budget is split across the runs as they go (each gets an equal share of what is left). The first
run's plan (architecture, input size, batch size, learning rate, augmentation, denoising) is kept for the
others, so every member sees the same inputs. Members are written to ``<out>.folds/`` and removed once
the ensemble bundle exists; ``resume=True`` reuses finished members and resumes an interrupted one.

Seed bagging (``medclf train DATA --members K``, :func:`train_members`) is the same orchestration with
another kind of diversity: every member trains on the whole training split and validates on the same
validation split (carved with the first seed), but with its own training seed (initial weights, batch
order, augmentation). Sharing the validation split lets ``weighted`` and ``stacking`` be fitted there.

The leftover-budget bag after an early stop (:func:`use_leftover_budget`) trains its members on the first
member's plan, and never costs the first model: when a member or the fusion fails, the best single member
becomes the bundle.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medclf import fusion, reporting, sanity
from medclf.budget import MIN_RUN_S, Budget, member_seconds
from medclf.bundle import WEIGHTS, Bundle, load_bundle, save_bundle, update_bundle
from medclf.data.samples import SampleSet
from medclf.data.sources import load_source
from medclf.data.splits import fold_split
from medclf.errors import ConfigError, MedclfError
from medclf.fusion import METHODS, EnsembleResult
from medclf.planner import Plan
from medclf.preprocess import PreprocessSpec
from medclf.training.checkpoint import checkpoint_dir
from medclf.training.config import TrainConfig, TrainResult
from medclf.training.loop import EpochCallback
from medclf.training.run import check_one_model, train_one

__all__ = ["FOLDS_SUFFIX", "train", "train_folds", "train_members"]


FOLDS_SUFFIX = ".folds"
# At most this many members in all, the first included.
MAX_LEFTOVER_MEMBERS = 5


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
    """Train a classifier on ``data`` and write a bundle to ``out`` (``medclf.train``).

    When the planner sets the epochs (no ``epochs`` given) and validation stops the run early, the time
    left in the budget trains more members with other seeds, and ``out`` becomes their mean ensemble
    (``members=1`` turns this off; ``medclf.train_members`` asks for K members outright). Everything else
    is :func:`medclf.training.train_one`'s. The sanity gate's verdict (:mod:`medclf.sanity`) is
    reported at the end and returned in ``TrainResult.sanity``. Messages and progress go to the active
    reporter (:mod:`medclf.reporting`), here and in :func:`train_folds` and :func:`train_members`.
    """
    cfg = (config or TrainConfig()).updated(settings)
    budget = Budget(cfg.time_budget)
    check_one_model(cfg)
    first = train_one(
        data,
        out,
        config=cfg,
        resume=resume,
        progress=progress,
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
    result = use_leftover_budget(first, data, Path(out), cfg, budget, progress) if auto else first
    if result.sanity is not None:
        sanity.render(result.sanity)
    return result


def _fusable(data: str | Path, cfg: TrainConfig, method: str) -> SampleSet:
    """``data``, read once before any member trains, so that a fusion the data cannot have is refused
    first."""
    samples = load_source(data, default_split="train", task=cfg.task, manifest=cfg.manifest)
    if method != "mean" and samples.task == "multilabel":
        raise ConfigError(
            "multi-label members are fused by the mean of their per-finding probabilities: use --fusion mean"
        )
    return samples


def train_folds(
    data: str | Path,
    out: str | Path,
    *,
    folds: int,
    method: str = "mean",
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    **settings: Any,
) -> EnsembleResult:
    """Train ``folds`` members on complementary folds of ``data`` and fuse them into a bundle at ``out``.

    ``settings`` override fields of ``config`` as in :func:`train`; the time budget covers
    all runs and the fusion. ``method``: ``mean``, or ``weighted`` / ``stacking`` when the dataset has a
    validation split of its own.
    """
    cfg = (config or TrainConfig()).updated(settings)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    samples = _fusable(data, cfg, method)
    if method != "mean" and not samples.has_split("val"):
        raise ConfigError(
            f"--fusion {method} is fitted on validation samples that no member trained on; {data} has no "
            "validation split of its own, so K-fold members share none: use --fusion mean"
        )
    fold_split(samples, 0, folds, seed=cfg.seed if cfg.split_seed is None else cfg.split_seed)
    return _train_bag(
        data, out, n=folds, mode="folds", method=method, cfg=cfg, resume=resume, progress=progress
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
    **settings: Any,
) -> EnsembleResult:
    """Seed bagging: ``members`` runs on the whole training split with training seeds ``seed``,
    ``seed + 1``, ..., one shared validation split, fused into a bundle at ``out`` (see the module doc)."""
    cfg = (config or TrainConfig()).updated(settings)
    if members < 2:
        raise ConfigError(f"--members must be at least 2, got {members}")
    _fusable(data, cfg, method)
    return _train_bag(
        data, out, n=members, mode="seeds", method=method, cfg=cfg, resume=resume, progress=progress
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
) -> EnsembleResult:
    budget = Budget(cfg.time_budget)
    budget.reserve_bag_fusion()
    rep = reporting.current()
    if method not in METHODS:
        raise ConfigError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
    bag = Bag(data, out, cfg, budget, progress=progress)
    noun = "Fold" if mode == "folds" else "Member"
    pinned: dict[str, Any] = {}
    members: list[Path] = []
    runs: list[dict[str, Any]] = []
    for k in range(n):
        member = bag.work / (f"fold-{k}" if mode == "folds" else f"member-{k}")
        finished = _finished(member) if resume else None
        if finished is not None:
            rep.print(f"[bold]{noun} {k + 1}/{n}[/]: reusing the finished member {member}")
            pinned = pinned or _pin(cfg, finished.manifest.get("recipe", {}), finished.spec)
            members.append(member)
            continue
        share = budget.share(n - k)
        if share <= 0 and not cfg.epochs:
            raise ConfigError(
                f"the time budget ({cfg.time_budget:.0f} s) ran out after {k} of {n} runs; give a larger "
                f"--time-budget or fewer --{mode if mode == 'folds' else 'members'}"
            )
        rep.print(f"[bold]{noun} {k + 1}/{n}[/] (time budget {share:.0f} s)")
        result = train(
            data,
            member,
            config=bag.member_config(k, share, seeds=mode == "seeds", pinned=pinned),
            resume=resume and checkpoint_dir(member).exists(),
            progress=progress,
            val_fold=(k, n) if mode == "folds" else None,
        )
        pinned = pinned or _pin(cfg, result.plan.to_dict(), result.plan.spec)
        members.append(result.bundle)
        runs.append(_run_record(k, mode, cfg.seed, result))
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


def _run_record(k: int, mode: str, seed: int, result: TrainResult) -> dict[str, Any]:
    """What the ensemble's recipe keeps of one member's run: its seed, time and epochs, and the fine-tuning
    schedule it followed (the members' own recipes are removed with their folder)."""
    return {
        "fold" if mode == "folds" else "member": k,
        "seed": seed + k if mode == "seeds" else seed,
        "seconds": round(result.seconds, 1),
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "linear_probe": result.plan.linear_probe,
        "backbone_lr": result.plan.backbone_lr,
    }


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


class Bag:
    """Members of the ensemble bundle ``out``, trained under ``cfg`` on ``data`` within ``budget``."""

    def __init__(
        self,
        data: str | Path,
        out: str | Path,
        cfg: TrainConfig,
        budget: Budget,
        *,
        progress: bool,
    ) -> None:
        self.data, self.out, self.cfg, self.budget = data, Path(out), cfg, budget
        self.progress = progress
        self.work = self.out.with_name(self.out.name + FOLDS_SUFFIX)  # the members, until they are fused

    def member_config(
        self, k: int, share: float, *, seeds: bool, pinned: dict[str, Any] | None = None
    ) -> TrainConfig:
        """Member ``k``'s settings: one model within ``share`` seconds, with the first member's ``pinned``
        choices; for seed bagging, a training seed of its own on the first member's validation split."""
        settings: dict[str, Any] = {"time_budget": max(share, MIN_RUN_S), "members": 1, **(pinned or {})}
        if seeds:
            split_seed = self.cfg.seed if self.cfg.split_seed is None else self.cfg.split_seed
            settings.update(seed=self.cfg.seed + k, split_seed=split_seed)
        return self.cfg.updated(settings)

    def fuse(self, members: list[Path], method: str, recipe: dict[str, Any]) -> fusion.EnsembleResult:
        """Fuse ``members`` by ``method`` into the bundle (:func:`medclf.fusion.ensemble`)."""
        return fusion.ensemble(
            members,
            self.out,
            data=self.data,
            method=method,
            cache_dir=self.cfg.cache_dir,
            workers=self.cfg.workers,
            progress=self.progress,
            seed=self.cfg.seed,
            recipe=recipe,
        )

    def clean(self) -> None:
        """Remove the members' folder (unless ``keep_checkpoints``)."""
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(self.work, ignore_errors=True)


def use_leftover_budget(
    first: TrainResult,
    data: str | Path,
    out: Path,
    cfg: TrainConfig,
    budget: Budget,
    progress: bool,
) -> TrainResult:
    """When training stopped early, spend the rest of the time budget on more members (other seeds, the
    same validation split and plan) and fuse them by their mean: small datasets converge in a fraction of
    the budget, and their noisy validation split makes one model a lottery ticket.

    This never costs the first model: ``out`` keeps its bundle until the fused one replaces it (atomically),
    every extra member trains on the first member's plan (same preprocessing, dimensions and channels), and
    when a member or the fusion fails for any reason the best single member becomes the bundle and the
    failure is reported (:mod:`medclf.reporting`, ``bundle.json`` ``leftover``, ``TrainResult.leftover_failure``)."""
    left = budget.left()
    per_member = leftover_member_seconds(first.history, first.best_epoch)
    budget.reserve_leftover_fusion()
    n_more = min(MAX_LEFTOVER_MEMBERS - 1, int(budget.available() // per_member))
    if n_more < 1:
        return first
    bag = Bag(data, out, cfg, budget, progress=progress)
    shutil.rmtree(bag.work, ignore_errors=True)
    bag.work.mkdir(parents=True)
    members = [bag.work / "member-0"]
    shutil.copytree(out, members[0])
    reporting.current().print(
        f"[bold]Early stop left {left / 60:.1f} min of the budget[/]: training {n_more} more member(s) with "
        "other seeds on the same validation split, then fusing them by their mean (seed bagging)"
    )
    more, failure = _train_more(bag, first, n_more)
    members += more
    fused = None
    if len(members) >= 2:
        recipe = {
            "bagging": "seeds (time left after an early stop)",
            "members": len(members),
            "seed": cfg.seed,
        }
        try:
            fused = bag.fuse(members, "mean", recipe)
        except Exception as exc:
            failure = (
                failure + "; " if failure else ""
            ) + f"fusing {len(members)} members failed: {_one_line(exc)}"
    if fused is None:
        result = _keep_best_member(first, members, out, failure or "no extra member finished")
    else:
        result = _fused(first, fused, members, failure, out, cfg)
    bag.clean()
    return replace(result, seconds=budget.elapsed())


def leftover_member_seconds(history: list[dict[str, Any]], best_epoch: int) -> float:
    """What one extra member costs: the time the first member took to reach its best epoch, plus headroom.

    Later members skip decoding (cached) and planning, and their schedules follow their own share of the
    clock, so a member given this much anneals within as many epochs as the first needed for its best
    model. (Pricing a member at the first run's whole training time, patience included, fitted none after
    a late early stop: BreastMNIST, 10 min, a busy CPU, left 280 s unused.)"""
    return member_seconds(sum(h["seconds"] for h in history[: max(best_epoch, 1)]))


def _train_more(bag: Bag, first: TrainResult, n_more: int) -> tuple[list[Path], str | None]:
    """Members 2 to ``n_more + 1``, each with an equal share of what is left; the members that finished,
    and why the next one did not (None: all did)."""
    # The first member's measured pace decides the others' epochs.
    base = Plan.from_dict(first.plan.to_dict())
    if first.history:
        base.epoch_seconds = float(np.mean([h["seconds"] for h in first.history]))
    members: list[Path] = []
    for k in range(1, n_more + 1):
        member = bag.work / f"member-{k}"
        share = bag.budget.share(n_more + 1 - k)
        try:
            train_one(
                bag.data,
                member,
                config=bag.member_config(k, share, seeds=True),
                progress=bag.progress,
                budget=bag.budget.child(max(share, MIN_RUN_S)),
                base_plan=base,
            )
        except Exception as exc:  # the members trained so far (and the first bundle) stay
            return members, f"member {k + 1} failed: {_one_line(exc)}"
        members.append(member)
    return members, None


def _fused(
    first: TrainResult,
    fused: EnsembleResult,
    members: list[Path],
    failure: str | None,
    out: Path,
    cfg: TrainConfig,
) -> TrainResult:
    """The result of a fused leftover bag: the sanity verdict judged again and the first member's run
    recorded in the bundle."""
    verdict = sanity.judge(fused.val_metrics or first.val_metrics, first.references or {}, first.schedule)
    # The first member's run, which the fused bundle's own record (an ensemble) does not hold.
    leftover = {
        "members": len(members),
        "failure": failure,
        "first_member": {
            "schedule": first.schedule,
            "epoch_seconds": [h["seconds"] for h in first.history],
            # Every member's fine-tuning schedule (the members share the first one's plan).
            "linear_probe": first.plan.linear_probe,
            "backbone_lr": first.plan.backbone_lr,
        },
    }
    update_bundle(out, {"sanity": verdict.to_dict(), "leftover": leftover})
    return replace(
        first,
        bundle=fused.bundle,
        val_metrics=fused.val_metrics or first.val_metrics,
        members=members if cfg.keep_checkpoints else [],
        sanity=verdict.to_dict(),
        leftover_failure=failure,
    )


def _keep_best_member(first: TrainResult, members: list[Path], out: Path, failure: str) -> TrainResult:
    """The fallback when the leftover members cannot be fused: the member with the best validation AUC
    (then accuracy) becomes the bundle at ``out``, which records why (``leftover``)."""

    def score(path: Path) -> tuple[float, float]:
        val = load_bundle(path).manifest.get("metrics", {}).get("val", {})
        return (val.get("auc") or -1.0, val.get("accuracy") or -1.0)

    best = max(members, key=score)
    reporting.current().print(
        f"[bold yellow]warning:[/] the leftover-budget ensemble was not made ({failure}); keeping the best "
        f"single member ({best.name}, of {len(members)}) as the bundle"
    )
    b = load_bundle(best)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "self_sha256")}
    manifest["leftover"] = {"members": len(members), "failure": failure, "kept": best.name}
    extra = {name: b.path / name for name in b.manifest["files"] if name != WEIGHTS}
    save_bundle(out, model=b.model, manifest=manifest, extra_files=extra)
    return replace(
        first,
        val_metrics=manifest.get("metrics", {}).get("val", first.val_metrics),
        best_epoch=int(manifest.get("recipe", {}).get("best_epoch", first.best_epoch)),
        history=manifest.get("history", first.history),
        sanity=manifest.get("sanity", first.sanity),
        leftover_failure=failure,
    )


def _one_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, MedclfError) else f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:300]
