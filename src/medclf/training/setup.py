"""Everything a run does before its first epoch (:func:`set_up`): the data and its validation split, the
checkpoint to resume, the thread policy, the plan, the cache pass, the shortcut check, and the epochs that
the time left allows."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclf import reporting
from medclf import threads as threads_mod
from medclf.budget import Budget
from medclf.data.cache import PreparedData, prepare
from medclf.data.samples import SampleSet
from medclf.data.sources import infer_task, load_source
from medclf.data.splits import ensure_validation, fold_split
from medclf.distributed import DistContext
from medclf.errors import ConfigError, DataError
from medclf.mitigation import shortcut_step
from medclf.planner import Fingerprint, Plan, fingerprint
from medclf.training.checkpoint import checkpoint_dir, load_state
from medclf.training.config import TrainConfig
from medclf.training.ood_guard import OOD_FIT_SAMPLES
from medclf.training.planning import new_plan, plan_like
from medclf.training.progress import print_plan
from medclf.training.rows import LoopData


@dataclass
class RunContext:
    """What a run is told: its settings, output, clock, processes and device, and whether it shows progress
    (where it reports: :func:`medclf.reporting.current`)."""

    cfg: TrainConfig
    out: Path
    budget: Budget
    dist: DistContext
    device: str
    progress: bool
    # Validate on fold k of K of the training split instead of a random fraction (K-fold bagging).
    val_fold: tuple[int, int] | None = None

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint_dir(self.out)

    @property
    def split_seed(self) -> int:
        """The seed of the validation split (and folds): the training seed unless given apart."""
        return self.cfg.seed if self.cfg.split_seed is None else self.cfg.split_seed


@dataclass
class RunSetup:
    """What a run found before its first epoch."""

    samples: SampleSet
    state: dict[str, Any] | None  # the checkpoint resumed from (None: a new run)
    policy: threads_mod.ThreadPolicy
    fp: Fingerprint
    plan: Plan
    prepared: PreparedData
    train_idx: np.ndarray
    val_idx: np.ndarray
    n_copies: int  # validation samples that copy a training sample
    shortcuts: dict[str, Any]  # the shortcut check's section of the bundle
    sample_weights: np.ndarray | None  # the shortcut mitigation's, when it is on

    def loop_data(self) -> LoopData:
        return LoopData(self.samples, self.prepared, self.train_idx, self.val_idx, self.sample_weights)


def set_up(ctx: RunContext, data: str | Path, *, resume: bool, base_plan: Plan | None) -> RunSetup:
    """Set the run up on ``data``: resume ``ctx.ckpt_dir`` (``resume``), take ``base_plan`` with the epochs
    that fit (a leftover-budget member), or plan anew."""
    cfg = ctx.cfg
    samples = load_source(data, default_split="train", task=cfg.task, manifest=cfg.manifest)
    if not samples.has_split("train"):
        raise DataError(f"{data}: no training split found")
    if ctx.val_fold is not None:
        samples = fold_split(samples, *ctx.val_fold, seed=ctx.split_seed)
    else:
        samples = ensure_validation(samples, fraction=cfg.val_fraction, seed=ctx.split_seed)
    state = load_state(ctx.ckpt_dir) if resume else None
    if resume and state is None:
        raise ConfigError(f"--resume: no checkpoint at {ctx.ckpt_dir} (nothing to resume)")
    # A resumed run keeps the thread count it started with: same seed and threads, same weights.
    resumed_threads = state["plan"].get("threads") if state and not cfg.threads else None
    policy = threads_mod.apply(
        cfg.threads or resumed_threads, source="checkpoint" if resumed_threads else "--threads"
    )
    plan, fp = _plan(ctx, samples, state, base_plan, policy)
    prepared, train_idx, val_idx, n_copies = _cache_pass(ctx, samples, plan)
    # Shortcut check on the training split (cues from the decoding pass); may switch the mitigation on.
    shortcuts, sample_weights = shortcut_step(
        plan, samples.label_set_view(), prepared.scan, train_idx, mode=cfg.shortcut_mitigation, decide=state is None,
        seed=cfg.seed, workers=cfg.workers or 1,
    )  # fmt: skip
    setup = RunSetup(
        samples, state, policy, fp, plan, prepared, train_idx, val_idx, n_copies, shortcuts, sample_weights
    )
    _fit_epochs(ctx, setup)
    return setup


def _plan(
    ctx: RunContext,
    samples: SampleSet,
    state: dict[str, Any] | None,
    base_plan: Plan | None,
    policy: threads_mod.ThreadPolicy,
) -> tuple[Plan, Fingerprint]:
    """The checkpoint's plan, ``base_plan`` for this budget, or a new plan (rank 0's for all ranks)."""
    cfg, dist = ctx.cfg, ctx.dist
    t_fp = time.perf_counter()
    fp = fingerprint(samples, seed=cfg.seed)
    probe_s = (time.perf_counter() - t_fp) / max(fp.n_probed, 1)
    n_train = len(samples.indices("train"))
    if state is not None:
        plan = Plan.from_dict(state["plan"])
        reporting.current().print(
            f"[bold]Resuming[/] after epoch {state['epoch'] + 1} of {plan.epochs} ({ctx.ckpt_dir})"
        )
    elif base_plan is not None:
        plan = plan_like(base_plan, cfg, ctx.budget)
    else:
        plan = new_plan(samples, fp, n_train, cfg, ctx.budget, probe_s, policy, dist, ctx.device)
    plan.threads = policy.torch_threads
    if state is None and base_plan is None:
        _head_for_task(plan, samples, cfg.class_weights)
    if dist.enabled:
        plan = Plan.from_dict(dist.broadcast_json(plan.to_dict()))
    print_plan(plan, fp, samples, policy)
    return plan, fp


def _head_for_task(plan: Plan, samples: SampleSet, class_weights: str | None) -> None:
    """Ordinal grades get the CORN head (:mod:`medclf.models.tasks`); the cross-entropy the loop computes on
    its grade log-probabilities is then CORN's loss. Unless ``class_weights`` says otherwise, grades are
    learnt at the training prior: a grade is judged by accuracy, MAE and kappa over the images as they come,
    and balanced weights move every decision towards the rare extreme grades."""
    if samples.task == "ordinal":
        plan.arch_kwargs = {**plan.arch_kwargs, "head": "corn"}
        why = infer_task(samples)[1] if infer_task(samples)[0] == "ordinal" else "--task ordinal"
        if class_weights is None:
            plan.class_weights = "none"
        plan.reasons.append(
            f"ordinal grades ({why}): CORN head, {len(samples.classes) - 1} conditional outputs for "
            f"{len(samples.classes)} grades, "
            + ("at the training prior" if plan.class_weights == "none" else "grades weighted as balanced")
        )
    else:
        plan.arch_kwargs = {k: v for k, v in plan.arch_kwargs.items() if k != "head"}
    if samples.task == "multilabel":
        if class_weights is not None:
            raise ConfigError(
                "--class-weights is for one class or grade per image; multi-label findings are weighted by "
                "--multilabel-loss"
            )
        plan.reasons.append(
            f"multi-label findings: {len(samples.classes)} sigmoid outputs; selection on validation macro AUC"
        )
        if plan.mix != "none":  # mixing one-hot targets assumes one class per image
            plan.reasons.append(f"batch mixing ({plan.mix}) off: its targets assume one class per image")
            plan.mix = "none"


def _cache_pass(
    ctx: RunContext, samples: SampleSet, plan: Plan
) -> tuple[PreparedData, np.ndarray, np.ndarray, int]:
    """Decode into the cache; the training and validation rows, and how many validation samples copy a
    training sample (left out of model selection unless ``--include-train-copies``)."""
    cfg, dist, rep = ctx.cfg, ctx.dist, reporting.current()
    # On each machine local rank 0 decodes into the disk cache while the others wait, then they open it.
    if dist.enabled and not dist.is_local_main:
        dist.barrier()
    prepared = prepare(
        samples,
        plan.spec,
        cache_dir=cfg.cache_dir,
        workers=cfg.workers,
        progress=ctx.progress,
    )
    if dist.enabled and dist.is_local_main:
        dist.barrier()
    train_idx = np.flatnonzero(prepared.ok & (np.array(samples.splits) == "train") & samples.known)
    val_mask = prepared.ok & (np.array(samples.splits) == "val") & samples.known
    n_copies = int((val_mask & prepared.train_copy).sum())
    if not cfg.include_train_copies:
        val_mask &= ~prepared.train_copy
    val_idx = np.flatnonzero(val_mask)
    if prepared.errors:
        rep.print(f"[yellow]{len(prepared.errors)} unreadable file(s) left out[/] (see `medclf audit`)")
    if n_copies:
        verb = "kept in" if cfg.include_train_copies else "left out of"
        rep.print(f"{n_copies} validation sample(s) copy a training sample: {verb} model selection")
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(
            "after removing unreadable files and copies, no training or validation samples remain"
        )
    if samples.task == "multilabel":
        positives = samples.labels[train_idx].sum(axis=0)
        if not ((positives > 0) & (positives < len(train_idx))).any():
            raise DataError("no finding has both positive and negative training images: nothing to learn")
        return prepared, train_idx, val_idx, n_copies
    present = np.unique(samples.labels[train_idx])
    if len(present) < 2:
        raise DataError("the training split holds a single class: nothing to learn")
    return prepared, train_idx, val_idx, n_copies


def _fit_epochs(ctx: RunContext, setup: RunSetup) -> None:
    """Reserve the work after the last epoch, then fit the plan's epochs to the time really left."""
    plan, budget = setup.plan, ctx.budget
    # What follows the last epoch must fit the budget too: features for the OOD guard, the temperature
    # (multi-label: one more validation pass, for the logits), the sanity gate's baseline and writing the
    # bundle (medclf.budget prices it).
    passes = 2 if setup.samples.task == "multilabel" else 1
    budget.reserve_finishing(
        min(len(setup.train_idx), OOD_FIT_SAMPLES) + passes * len(setup.val_idx), plan.throughput
    )
    # Re-fit the epoch count to the time that is really left (decoding may have been faster or cached).
    if setup.state is None and not ctx.cfg.epochs and plan.epoch_seconds:
        fit = int(budget.epoch_seconds() // plan.epoch_seconds)
        plan.epochs = max(1, min(plan.epochs, fit)) if fit < plan.epochs else plan.epochs
    plan.epochs = int(ctx.dist.broadcast_json(plan.epochs))  # a clock decided it: rank 0's count for all
