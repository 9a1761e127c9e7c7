"""Training (``medclf.train``): data -> plan -> cached tensors -> the loop -> a verified bundle.

The loop trains on preprocessed tensors cached once (decoding never repeats across epochs or runs),
augments whole batches, uses bf16 autocast and channels-last where the hardware profits, keeps an
exponential moving average of the weights, selects the model on validation AUC computed without any
validation sample that copies a training sample, checkpoints every epoch (atomically, without pickle) and
resumes after a kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from medclf import augment as augment_mod
from medclf import sanity
from medclf import threads as threads_mod
from medclf.budget import Budget, parse_duration
from medclf.bundle import WEIGHTS, save_bundle, update_bundle
from medclf.data.cache import PreparedData, prepare
from medclf.data.references import TRAIN_SIGNATURES, aligned_signatures, pack_signatures
from medclf.data.samples import SampleSet
from medclf.data.sources import load_source
from medclf.data.splits import ensure_validation, fold_split
from medclf.data.stream import (
    StreamedRows,
    block_shuffled_order,
    parse_bytes,
    prefetched,
    return_freed_batches_to_os,
    should_stream,
)
from medclf.distributed import DistContext, epoch_seed, from_env, shard
from medclf.errors import ConfigError, DataError, MedclfError
from medclf.evaluation.calibration import apply_temperature, fit_temperature_from_probs, log_probs
from medclf.evaluation.metrics import compute_metrics
from medclf.mitigation import check_mode as check_mitigation_mode
from medclf.mitigation import shortcut_step
from medclf.model_card import MODEL_CARD, model_card
from medclf.ood import OOD_FILE, OODDetector, fit_detector, input_statistics, penultimate_features
from medclf.planner import (
    PLANNING_MIN_S,
    PLANNING_SHARE,
    Fingerprint,
    Plan,
    choose_size_and_epochs,
    fingerprint,
    initial_plan,
)
from medclf.schedule import Schedule

CHECKPOINT_SUFFIX = ".ckpt"
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
MAX_LEFTOVER_MEMBERS = 5
LEFTOVER_FUSION_S = 20.0  # validation predictions of every member, fitting and writing the ensemble
OOD_FIT_SAMPLES = 3000  # plenty for class means and a shrunk covariance of a few hundred features
AUC_TIE = 1e-3


@dataclass
class TrainConfig:
    """User settings. ``None`` means: let the planner decide."""

    arch: str | None = None
    size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    seed: int = 0
    time_budget: float = 600.0
    augment: str | None = None
    denoise: str | None = None
    val_fraction: float = 0.15
    patience: int | None = None
    amp: str = "auto"
    ema: bool = True
    label_smoothing: float = 0.0
    # Batch mixing: none, mixup or cutmix (None: none); alpha None = the method's default.
    mix: str | None = None
    mix_alpha: float | None = None
    workers: int | None = None
    cache_dir: str | None = None
    include_train_copies: bool = False
    device: str = "auto"
    init_from: str | None = None
    freeze: str | list[str] | None = None
    # Seed of the carved validation split (and K-fold folds); None = ``seed``. Seed bagging keeps it fixed.
    split_seed: int | None = None
    # Seed bagging: None = automatic (the time left after an early stop trains more members), 1 = one model.
    members: int | None = None
    keep_checkpoints: bool = False
    # 2.5D for volumes: K axial slabs as channels of a 2D network (None: the planner decides, 0: never).
    slices_as_channels: int | None = None
    # Stream training rows from the disk cache instead of holding them in memory: auto, on, off.
    stream: str = "auto"
    # Memory the run may fill with cached rows, e.g. "8G" (default: what the machine/cgroup has free).
    memory_limit: str | int | None = None
    compile: bool = False  # torch.compile the training forward pass
    # PyTorch intra-op threads (None: the CPUs really available, see medclf.threads).
    threads: int | None = None
    # Shortcut mitigation: auto (on when the shortcut check flags the training split), on, off.
    shortcut_mitigation: str = "auto"

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read the config file ({exc.strerror})") from exc
        try:
            if p.suffix.lower() in (".yaml", ".yml"):
                raise ConfigError(f"{p}: use a JSON or TOML config file")
            if p.suffix.lower() == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p}: not a valid config file: {exc}") from exc
        return cls().updated(data.get("train", data))

    def updated(self, changes: dict[str, Any]) -> TrainConfig:
        known = set(asdict(self))
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(
                f"unknown training settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        kw = {**asdict(self), **{k: v for k, v in changes.items() if v is not None}}
        if isinstance(kw["time_budget"], str):
            kw["time_budget"] = parse_duration(kw["time_budget"])
        if kw["amp"] not in AMP_CHOICES:
            raise ConfigError(f"--amp must be one of {', '.join(AMP_CHOICES)}, not {kw['amp']!r}")
        augment_mod.check_mix(kw["mix"] or "none", kw["mix_alpha"])  # fail before any data is read
        if kw["threads"] is not None and int(kw["threads"]) < 1:
            raise ConfigError(f"--threads must be at least 1, not {kw['threads']}")
        check_mitigation_mode(kw["shortcut_mitigation"])
        return TrainConfig(**kw)

    def overrides(self) -> dict[str, Any]:
        keys = ("arch", "size", "epochs", "batch_size", "lr", "augment", "denoise", "patience", "amp", "ema")
        keys += ("slices_as_channels", "mix", "mix_alpha")
        d = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        d["weight_decay"] = self.weight_decay
        d["label_smoothing"] = self.label_smoothing
        return d


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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    return device


def train(
    data: str | Path,
    out: str | Path,
    *,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    epoch_callback: Callable[[dict[str, Any], nn.Module, Plan], dict[str, Any] | None] | None = None,
    val_fold: tuple[int, int] | None = None,
    **settings: Any,
) -> TrainResult:
    """Train a classifier on ``data`` and write a bundle to ``out``.

    When the planner sets the epochs (no ``epochs`` given) and validation stops the run early, the time
    left in the budget trains more members with other seeds, and ``out`` becomes their mean ensemble
    (``members=1`` turns this off; ``medclf.train_members`` asks for K members outright). Everything else
    is :func:`_train_one`'s. The sanity gate's verdict (:mod:`medclf.sanity`) is printed at the end and
    returned in ``TrainResult.sanity``.
    """
    cfg = (config or TrainConfig()).updated(settings)
    budget = Budget(cfg.time_budget)
    if cfg.members is not None and cfg.members != 1:
        raise ConfigError(
            "train() makes one model (members=1) or decides itself (None); use train_members(K)"
        )
    console = console or Console(stderr=True, soft_wrap=True)
    first = _train_one(
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
    result = _use_leftover_budget(first, data, Path(out), cfg, budget, progress, console) if auto else first
    if result.sanity is not None:
        sanity.render(result.sanity, console)
    return result


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
    # the sanity gate's baseline and writing the bundle (inference runs ~3x faster than a training step).
    budget.reserve(
        7.0 + (min(len(train_idx), OOD_FIT_SAMPLES) + len(val_idx)) / (3.0 * (plan.throughput or 100.0))
    )
    # Re-fit the epoch count to the time that is really left (decoding may have been faster or cached).
    if state is None and not cfg.epochs and plan.epoch_seconds:
        fit = int((budget.available() * 0.95 - 2) // plan.epoch_seconds)
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


def _plan(
    samples: SampleSet,
    fp: Fingerprint,
    n_train: int,
    cfg: TrainConfig,
    budget: Budget,
    probe_s: float,
    policy: threads_mod.ThreadPolicy,
    dist: DistContext,
    device: str,
) -> Plan:
    """The planner's plan for a new run: rules, then a timing probe bounded by a share of the budget."""
    overrides = cfg.overrides()
    source = _transfer_source(cfg, overrides, fp)
    plan = initial_plan(fp, n_train, overrides, world_size=dist.world_size, device=device)
    if cfg.size is not None and cfg.size < 4:
        raise ConfigError("--size must be at least 4")
    workers = cfg.workers or policy.decode_workers
    decode_estimate = probe_s * len(samples) / workers * 1.3
    planning_s = budget.fraction(PLANNING_SHARE, at_least=PLANNING_MIN_S)
    # Headroom for per-epoch validation and writing the bundle; the probe's own time comes off too.
    budget_left = (budget.left() - decode_estimate - planning_s) * 0.92 - 5
    if budget_left <= 0 and not cfg.epochs:
        raise ConfigError(
            f"the time budget ({cfg.time_budget:.0f} s) is spent on reading the data alone "
            f"(about {decode_estimate:.0f} s); give a larger --time-budget"
        )
    if dist.is_main:  # the others take rank 0's plan: one timing, one plan
        plan = choose_size_and_epochs(
            plan,
            n_train=n_train,
            budget_s=max(budget_left, 1.0),
            fp=fp,
            overrides=overrides,
            device=device,
            world_size=dist.world_size,
            planning_s=planning_s,
        )
    if source is not None:
        _apply_transfer(plan, source, cfg)
    return plan


def _plan_like(base: Plan, cfg: TrainConfig, budget: Budget) -> Plan:
    """``base`` (another member's plan) for this run: the same preprocessing, network and recipe, and the
    epochs that fit this budget at the pace ``base`` measured (at most its own epochs)."""
    plan = Plan.from_dict(base.to_dict())
    plan.reasons = [f"the plan of the first member ({base.arch}, input {list(base.spec.input_shape)})"]
    if cfg.epochs:
        plan.epochs = int(cfg.epochs)
    elif plan.epoch_seconds:
        fit = int((budget.left() * 0.92 - 5) // plan.epoch_seconds)
        plan.epochs = int(max(1, min(base.epochs, fit)))
    return plan


def _use_leftover_budget(
    first: TrainResult,
    data: str | Path,
    out: Path,
    cfg: TrainConfig,
    budget: Budget,
    progress: bool,
    console: Console,
) -> TrainResult:
    """When training stopped early, spend the rest of the time budget on more members (other seeds, the
    same validation split and plan) and fuse them by their mean: small datasets converge in a fraction of
    the budget, and their noisy validation split makes one model a lottery ticket.

    This never costs the first model: ``out`` keeps its bundle until the fused one replaces it (atomically),
    every extra member trains on the first member's plan (same preprocessing, dimensions and channels), and
    when a member or the fusion fails for any reason the best single member becomes the bundle and the
    failure is reported (console, ``bundle.json`` ``leftover``, ``TrainResult.leftover_failure``)."""
    from medclf.fusion import ensemble

    left = budget.left()
    per_member = leftover_member_seconds(first.history, first.best_epoch)
    n_more = min(MAX_LEFTOVER_MEMBERS - 1, int((left - LEFTOVER_FUSION_S) // per_member))
    if n_more < 1:
        return first
    work = out.with_name(out.name + ".folds")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    members = [work / "member-0"]
    shutil.copytree(out, members[0])
    console.print(
        f"[bold]Early stop left {left / 60:.1f} min of the budget[/]: training {n_more} more member(s) with "
        "other seeds on the same validation split, then fusing them by their mean (seed bagging)"
    )
    # The first member's measured pace decides the others' epochs.
    base = Plan.from_dict(first.plan.to_dict())
    if first.history:
        base.epoch_seconds = float(np.mean([h["seconds"] for h in first.history]))
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    budget.reserve(LEFTOVER_FUSION_S)
    failure: str | None = None
    for k in range(1, n_more + 1):
        member = work / f"member-{k}"
        share = budget.share(n_more + 1 - k)
        run = cfg.updated(
            {"members": 1, "seed": cfg.seed + k, "split_seed": split_seed, "time_budget": max(share, 1.0)}
        )
        try:
            _train_one(
                data,
                member,
                config=run,
                progress=progress,
                console=console,
                budget=budget.child(max(share, 1.0)),
                base_plan=base,
            )
        except Exception as exc:  # the members trained so far (and the first bundle) stay
            failure = f"member {k + 1} failed: {_one_line(exc)}"
            break
        members.append(member)
    fused = None
    if len(members) >= 2:
        try:
            fused = ensemble(
                members,
                out,
                data=data,
                method="mean",
                cache_dir=cfg.cache_dir,
                workers=cfg.workers,
                progress=progress,
                console=console,
                seed=cfg.seed,
                recipe={
                    "bagging": "seeds (time left after an early stop)",
                    "members": len(members),
                    "seed": cfg.seed,
                },
            )
        except Exception as exc:
            failure = (
                failure + "; " if failure else ""
            ) + f"fusing {len(members)} members failed: {_one_line(exc)}"
            fused = None
    if fused is None:
        result = _keep_best_member(first, members, out, failure or "no extra member finished", console)
    else:
        verdict = sanity.judge(fused.val_metrics or first.val_metrics, first.references or {}, first.schedule)
        # The first member's run, which the fused bundle's own record (an ensemble) does not hold.
        leftover = {
            "members": len(members),
            "failure": failure,
            "first_member": {
                "schedule": first.schedule,
                "epoch_seconds": [h["seconds"] for h in first.history],
            },
        }
        update_bundle(out, {"sanity": verdict.to_dict(), "leftover": leftover})
        result = replace(
            first,
            bundle=fused.bundle,
            val_metrics=fused.val_metrics or first.val_metrics,
            members=members if cfg.keep_checkpoints else [],
            sanity=verdict.to_dict(),
            leftover_failure=failure,
        )
    if not cfg.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return replace(result, seconds=budget.elapsed())


def leftover_member_seconds(history: list[dict[str, Any]], best_epoch: int) -> float:
    """What one extra member costs: the time the first member took to reach its best epoch, plus headroom.

    Later members skip decoding (cached) and planning, and their schedules follow their own share of the
    clock, so a member given this much anneals within as many epochs as the first needed for its best
    model. (Pricing a member at the first run's whole training time, patience included, fitted none after
    a late early stop: BreastMNIST, 10 min, a busy CPU, left 280 s unused.)"""
    to_best = sum(h["seconds"] for h in history[: max(best_epoch, 1)])
    return max(to_best, 1.0) * 1.15 + 5.0


def _keep_best_member(
    first: TrainResult, members: list[Path], out: Path, failure: str, console: Console
) -> TrainResult:
    """The fallback when the leftover members cannot be fused: the member with the best validation AUC
    (then accuracy) becomes the bundle at ``out``, which records why (``leftover``)."""
    from medclf.bundle import load_bundle

    def score(path: Path) -> tuple[float, float]:
        val = load_bundle(path).manifest.get("metrics", {}).get("val", {})
        return (val.get("auc") or -1.0, val.get("accuracy") or -1.0)

    best = max(members, key=score)
    console.print(
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


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    # Deterministic oneDNN/ATen kernels on CPU for a given seed and thread count.
    torch.use_deterministic_algorithms(True, warn_only=True)


def _print_plan(
    console: Console,
    plan: Plan,
    fp: Fingerprint,
    samples: SampleSet,
    policy: threads_mod.ThreadPolicy | None = None,
) -> None:
    counts = ", ".join(f"{s}: {sum(c.values())}" for s, c in samples.summary().items())
    console.print(
        f"[bold]Data[/] {samples.source} ({samples.kind}; {counts}; classes {', '.join(samples.classes)})"
    )
    console.print(
        f"[bold]Plan[/] arch={plan.arch} {plan.arch_kwargs} input={plan.spec.input_shape} "
        f"batch={plan.batch_size} epochs={plan.epochs} lr={plan.lr:g} augment={plan.augment} amp={plan.amp} "
        f"ema={plan.ema} denoise={plan.spec.denoise}"
    )
    for r in plan.reasons:
        console.print(f"  - {r}")
    if policy is not None:
        console.print(f"  - threads: {policy.describe()}")


class _Loop:
    """The epoch loop, its checkpoints and its progress display."""

    def __init__(
        self,
        plan: Plan,
        samples: SampleSet,
        prepared: PreparedData,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        cfg: TrainConfig,
        device: str,
        ckpt_dir: Path,
        console: Console,
        progress: bool,
        dist: DistContext | None = None,
        clock_driven: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.plan, self.samples, self.prepared, self.cfg = plan, samples, prepared, cfg
        self.clock = clock or time.perf_counter
        self.device, self.ckpt_dir, self.console, self.progress = device, ckpt_dir, console, progress
        self.train_idx, self.val_idx = train_idx, val_idx
        dims = plan.spec.spatial_dims
        self.fmt = (
            (torch.channels_last if dims == 2 else torch.channels_last_3d) if plan.channels_last else None
        )
        n_classes = len(samples.classes)
        self.model = _create(plan, n_classes)
        if plan.init_from:
            _load_transfer_weights(self.model, plan, samples.classes, console)
        self.dist = dist or DistContext()
        if self.dist.enabled and device.startswith("cuda"):
            # Per-GPU batches of images are small: batch-norm statistics over the global batch instead.
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.frozen = _freeze(self.model, plan.freeze)
        self.model = self._to_device(self.model)
        # What the training step calls: DDP (gradients all-reduced) and/or torch.compile around the model;
        # checkpoints, EMA and the bundle always use the plain self.model.
        self.train_model = self._parallel(self.model)
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        steps_per_epoch = max(1, len(train_idx) // plan.batch_size)
        # Warm-up and cosine, the EMA's horizon and the patience (re-planned after epochs when clock-driven).
        self.schedule = Schedule(steps_per_epoch, plan.epochs, plan.patience, clock_driven=clock_driven)
        self.total_steps = self.schedule.total_steps
        if plan.ema:
            # Average over roughly the last tenth of training (at least 10 steps).
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=_warmup_ema(self.schedule.ema_decay), use_buffers=True
            )
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=plan.lr,
            weight_decay=plan.weight_decay,
        )
        schedule = self.schedule

        def lr_factor(step: int) -> float:  # a plain function: LambdaLR's state then holds only counters
            return schedule.lr_factor(step)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        # Another process's load, measured over each epoch (set by _train_one when threads were measured).
        self.load_monitor: threads_mod.LoadMonitor | None = None
        counts = np.bincount(samples.labels[train_idx], minlength=n_classes).astype(np.float64)
        # Balanced class weights (n / (K n_c)), so a rare class counts as much as a common one.
        weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
        self.class_weights = torch.tensor(weights, dtype=torch.float32, device=device)
        self.aug = augment_mod.build_augmentation(plan.augment, dims)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.amp)
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        # fp16 has too few exponent bits for small gradients: scale the loss (bf16 needs no scaling).
        self.scaler = torch.amp.GradScaler(dev_type) if plan.amp == "fp16" else None
        self.pin = dev_type == "cuda"  # page-locked host batches: the copy to the GPU runs asynchronously
        self.epoch = 0
        self.streaming = self._decide_streaming()
        # Streaming means memory is tight: evaluate in training-sized batches (activations of 256 samples at
        # once can outweigh the data); otherwise in larger ones for speed.
        self.eval_batch: int | None = plan.batch_size if self.streaming else None
        self.train_x = _rows(prepared.tensors, train_idx, self.streaming)
        self.val_x = _rows(prepared.tensors, val_idx, self.streaming)
        self.train_y = torch.from_numpy(samples.labels[train_idx])
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epoch_callback: Callable[[dict[str, Any], nn.Module, Plan], dict[str, Any] | None] | None = None
        # (augmented batch, logits, cross-entropy) -> the loss to minimise; knowledge distillation sets it.
        self.loss_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # Per-training-sample sampling weights (shortcut mitigation: class x acquisition group balance).
        self.sample_weights: torch.Tensor | None = None
        self.t_start = self.clock()

    def _to_device(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=self.fmt) if self.fmt is not None else model

    def _parallel(self, model: nn.Module) -> nn.Module:
        wrapped = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _decide_streaming(self) -> bool:
        t = self.prepared.tensors
        row_bytes = int(np.prod(t.shape[1:])) * t.dtype.itemsize
        nbytes = row_bytes * (len(self.train_idx) + len(self.val_idx))
        stream, why = should_stream(
            self.cfg.stream,
            nbytes,
            copies=self.dist.local_world_size,
            memory_limit=parse_bytes(self.cfg.memory_limit),
        )
        if stream and getattr(t, "filename", None) is None:
            stream, why = False, "no disk cache to stream from: rows held in memory"
        if stream or self.cfg.stream != "auto":
            self.console.print(f"Training data: {why}")
        if stream:
            return_freed_batches_to_os()
        return stream

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.train_idx)
        order_gen = self.gen
        if self.dist.enabled:
            # One permutation for all ranks (seeded by the epoch, as DistributedSampler.set_epoch does) and
            # augmentation draws of each rank's own; recomputed from the epoch, so resuming is exact.
            order_gen = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, self.epoch))
            self.gen.manual_seed(epoch_seed(self.cfg.seed, self.epoch, self.dist.rank))
            # Dropout draws from the global generator: per rank and epoch too (only rank 0's is checkpointed).
            torch.manual_seed(epoch_seed(self.cfg.seed, self.epoch, self.dist.rank, stream=1))
        if self.sample_weights is not None:
            perm = torch.multinomial(self.sample_weights, n, replacement=True, generator=order_gen)
        elif self.streaming:  # neighbouring rows together: sequential-ish reads from the disk cache
            perm = block_shuffled_order(n, order_gen)
        else:
            perm = torch.randperm(n, generator=order_gen)
        bs = self.plan.batch_size
        # Drop the ragged last batch: a batch of 1 breaks batch norm, and the order is reshuffled anyway.
        # Under DDP each rank takes its disjoint share of every global batch of bs samples.
        starts = range(0, n - bs + 1 if n >= bs else 1, bs)
        shards = [shard(perm[start : start + bs], self.dist) for start in starts]
        if os.environ.get("MEDCLF_DEBUG_SHARDS"):
            _log_shards(self.dist, self.epoch, [self.train_idx[s.numpy()] for s in shards])
        for idx, x in prefetched(self.train_x.__getitem__, shards, depth=2 if self.streaming else 0):
            x, y = self.aug(x.float(), self.gen), self.train_y[idx]
            if self.plan.mix != "none":
                x, y = augment_mod.mix_batch(
                    self.plan.mix, self.plan.mix_alpha, x, y, len(self.samples.classes), self.gen
                )
            # CUDA kernels run asynchronously: this CPU work for the next batch overlaps the GPU's step.
            yield (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dev_type = "cuda" if self.device.startswith("cuda") else "cpu"
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev_type, dtype=self.amp_dtype)

    def train_epoch(self) -> float:
        self.model.train()
        for module in self.frozen:
            module.eval()  # frozen layers keep their batch-norm statistics too
        total, count, skipped = 0.0, 0, 0
        for x, y in self._batches():
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.fmt is not None:
                x = x.contiguous(memory_format=self.fmt)
            with self._autocast():
                logits = self.train_model(x)
            # Hard labels, or the soft targets of a mixed batch (the same weighted cross-entropy on both).
            loss = F.cross_entropy(
                logits.float(), y, weight=self.class_weights, label_smoothing=self.plan.label_smoothing
            )
            if self.loss_hook is not None:
                loss = self.loss_hook(x, logits.float(), loss)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = True
            else:
                loss.backward()
                # One non-finite gradient would make every weight it reaches NaN for good (seen with
                # PyTorch 2.13's CPU bf16 3D convolution backward, now and then, on finite inputs): skip such
                # a step, as GradScaler does for fp16. Only on the CPU, whose steps are synchronous anyway: on
                # a GPU the check would make every step wait for the host.
                stepped = self.device.startswith("cuda") or self._finite_gradients()
                if stepped:
                    self.optimizer.step()
                else:
                    skipped += 1
            if stepped:  # a skipped step advances neither the schedule nor the average
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
            total += loss.detach().double() * len(y)  # no .item(): a GPU step need not wait for the host
            count += len(y)
        if skipped:
            self.console.print(
                f"[yellow]warning:[/] {skipped} training step(s) of epoch {self.epoch + 1} had non-finite "
                "gradients and were skipped"
            )
        total, count = self.dist.sum([float(total), count])
        return total / max(count, 1)

    def _finite_gradients(self) -> bool:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    @torch.no_grad()
    def predict(self, x: torch.Tensor, model: nn.Module) -> np.ndarray:
        model.eval()
        out = []
        step = self.eval_batch or 256
        for start in range(0, len(x), step):
            xb = x[start : start + step].float()
            xb = (xb.pin_memory() if self.pin else xb).to(self.device, non_blocking=True)
            if self.fmt is not None:
                xb = xb.contiguous(memory_format=self.fmt)
            with self._autocast():
                out.append(torch.softmax(model(xb).float(), dim=1).cpu())
        return torch.cat(out).numpy().astype(np.float64)

    def predict_val(self, model: nn.Module) -> np.ndarray:
        """Validation probabilities; under DDP each rank predicts a strided shard and all gather them."""
        if not self.dist.enabled:
            return self.predict(self.val_x, model)
        n = len(self.val_x)
        mine = torch.arange(self.dist.rank, n, self.dist.world_size)
        k = len(self.samples.classes)
        local = self.predict(self.val_x[mine], model) if len(mine) else np.zeros((0, k))
        return self.dist.gather_strided(local, n)

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def best_model(self) -> nn.Module:
        # Building a model draws initial weights: keep the training RNG stream untouched (exact resume).
        with torch.random.fork_rng(devices=[]):
            model = _create(self.plan, len(self.samples.classes))
        assert self.best_state is not None
        model.load_state_dict(self.best_state)
        return model.eval()

    def run(
        self, state: dict[str, Any] | None, deadline: float | None
    ) -> tuple[list[dict[str, float]], int, np.ndarray]:
        history: list[dict[str, float]] = []
        self.stop_reason = "completed"
        self.epochs_run = 0
        best_auc, best_loss, best_epoch, start_epoch = -1.0, float("inf"), 0, 0
        if state is not None:
            self._restore(state)
            history = state["history"]
            best_auc, best_loss, best_epoch = state["best_auc"], state["best_loss"], state["best_epoch"]
            start_epoch = state["epoch"] + 1
        val_y = self.samples.labels[self.val_idx]
        epoch_times: list[float] = []
        bar = _ProgressDisplay(self.console, self.plan.epochs, start_epoch, enabled=self.progress)
        with bar:
            for epoch in range(start_epoch, self.plan.epochs):
                t0 = self.clock()
                self.epoch = epoch
                loss = self.train_epoch()
                probs = self.predict_val(self.eval_model())
                val_auc = _auc(val_y, probs, len(self.samples.classes))
                val_loss = float(
                    F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(val_y))
                )
                val_acc = float((probs.argmax(1) == val_y).mean())
                epoch_times.append(self.clock() - t0)
                # Validation AUCs within AUC_TIE of the best are noise: among them keep the later, more
                # annealed model (PneumoniaMNIST: val AUC flat at 0.9965 +- 0.0005 from epoch 11 on while
                # test AUC rose from 0.973 to 0.980).
                if np.isnan(val_auc):  # a validation split with one class: fall back to the loss
                    improved = val_loss < best_loss
                else:
                    improved = val_auc >= best_auc - AUC_TIE
                if self.dist.agree(improved):
                    best_auc, best_loss, best_epoch = (
                        max(best_auc, np.nan_to_num(val_auc, nan=-1.0)),
                        val_loss,
                        epoch + 1,
                    )
                    self.best_state = {
                        k: v.detach().cpu().contiguous().clone()
                        for k, v in _plain_state(self.eval_model()).items()
                    }
                    self.best_probs = probs
                lr = self.optimizer.param_groups[0]["lr"]
                row = {
                    "epoch": epoch + 1,
                    "loss": loss,
                    "val_auc": val_auc,
                    "val_acc": val_acc,
                    "val_loss": val_loss,
                    "lr": lr,
                    "seconds": epoch_times[-1],
                    "wall_s": self.clock() - self.t_start,
                    "threads": torch.get_num_threads(),
                }
                if self.epoch_callback is not None and self.dist.is_main:
                    with torch.random.fork_rng(devices=[]):
                        row.update(self.epoch_callback(dict(row), self.eval_model(), self.plan) or {})
                history.append(row)
                self._replan(epoch + 1, epoch_times, deadline)
                if self.dist.is_main:
                    self._checkpoint(epoch, history, best_auc, best_loss, best_epoch)
                horizon = self.schedule.horizon_epochs if self.schedule.clock_driven else self.plan.epochs
                remaining = (horizon - epoch - 1) * float(np.mean(epoch_times[-3:]))
                if deadline is not None:
                    remaining = min(remaining, max(deadline - self.clock(), 0.0))
                bar.update(row, best_auc, remaining, total=horizon)
                patience = self.schedule.patience()
                if epoch + 1 - best_epoch >= patience:
                    self.stop_reason = "early_stop"
                    self.console.print(
                        f"Early stop: validation AUC has not come within {AUC_TIE} of its best for {patience} epochs"
                    )
                    break
                if self.schedule.clock_driven and deadline is not None:
                    if epoch + 1 >= self.schedule.horizon_epochs:
                        if epoch + 1 < self.plan.epochs:
                            self.stop_reason = "time_budget"
                            annealed = self.schedule.completed(self.scheduler.last_epoch)
                            self.console.print(
                                f"Time budget reached after {epoch + 1} of {self.plan.epochs} planned epochs: "
                                + (
                                    "the schedule was fitted to end here"
                                    if annealed
                                    else "[yellow]stopping before the learning rate annealed[/]"
                                )
                            )
                        break
                elif self.dist.agree(
                    deadline is not None and self.clock() + float(np.mean(epoch_times[-3:])) * 1.05 > deadline
                ):
                    if epoch + 1 < self.plan.epochs:
                        self.stop_reason = "time_budget"
                        self.console.print("Time budget reached: stopping with the best model so far")
                    break
                self._follow_load()
        self.epochs_run = len(history)
        if self.best_state is None:
            # Resumed after the last epoch had already run: rebuild the best model from its checkpoint.
            self.best_state = load_file(str(self.ckpt_dir / "best.safetensors"))
            model = self.best_model()
            self.best_probs = self.predict_val(self._to_device(model))
        return history, best_epoch, self.best_probs

    def _replan(self, epochs_done: int, epoch_times: list[float], deadline: float | None) -> None:
        """Clock-driven schedule: fit the horizon to the epochs that still fit (rank 0 decides for all)."""
        if not self.schedule.clock_driven or deadline is None:
            return
        # The first epoch pays one-off costs (kernel creation, compilation): leave it out once others ran.
        recent = epoch_times[1:][-3:] if len(epoch_times) > 1 else epoch_times
        pace = max(epoch_times[-1], float(np.mean(recent))) * 1.05
        if self.dist.is_main:
            self.schedule.replan(self.scheduler.last_epoch, epochs_done, deadline - self.clock(), pace)
        self.schedule.load_state_dict(self.dist.broadcast_json(self.schedule.state_dict()))
        # LambdaLR computed the next step's learning rate under the old horizon.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.schedule.lr_factor(self.scheduler.last_epoch)

    def _follow_load(self) -> None:
        """With measured threads: give a core back when another process took it during the last epoch,
        take it again when it is free (see :mod:`medclf.threads`)."""
        policy = threads_mod.current()
        if self.load_monitor is None or policy is None:
            return
        others = self.load_monitor.sample()
        if others is None:
            return
        wanted = replace(policy.cpus, others_busy=others).available
        have = torch.get_num_threads()
        if wanted != have:
            self.console.print(
                f"Threads: {have} -> {wanted} (other processes kept {others:.1f} core(s) busy in the last epoch)"
            )
            threads_mod.set_torch_threads(wanted)

    def schedule_record(self) -> dict[str, Any]:
        """The schedule as it ran, for the bundle: planned vs run epochs and whether it annealed."""
        step = int(self.scheduler.last_epoch)
        return {
            "mode": "clock" if self.schedule.clock_driven else "epochs",
            "planned_epochs": self.schedule.planned_epochs,
            "horizon_epochs": self.schedule.horizon_epochs,
            "epochs_run": self.epochs_run,
            "stop_reason": self.stop_reason,
            "completed": self.schedule.completed(step),
            "final_progress": round(self.schedule.progress(step), 4),
            "final_lr_factor": round(self.schedule.lr_factor(step), 4),
        }

    # --- checkpoints: safetensors for tensors, JSON for the rest (no pickle) ---

    def _checkpoint(
        self, epoch: int, history: list[dict[str, float]], best_auc: float, best_loss: float, best_epoch: int
    ) -> None:
        d = self.ckpt_dir
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for k, v in _plain_state(self.model).items():
            tensors[f"model.{k}"] = v
        if self.ema is not None:
            for k, v in self.ema.state_dict().items():
                tensors[f"ema.{k}"] = v
        opt_state = self.optimizer.state_dict()
        for pid, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.gen"] = self.gen.get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_save_tensors(tensors, d / "last.safetensors")
        if self.best_state is not None and best_epoch == epoch + 1:
            _atomic_save_tensors(self.best_state, d / "best.safetensors")
        meta = {
            "epoch": epoch,
            "plan": self.plan.to_dict(),
            "history": history,
            "best_auc": best_auc,
            "best_loss": best_loss,
            "best_epoch": best_epoch,
            "scheduler": self.scheduler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "optim_param_groups": opt_state["param_groups"],
            "data_fingerprint": self.prepared.fingerprint,
        }
        tmp = d / "state.json.tmp"
        tmp.write_text(json.dumps(meta, default=_json_safe))
        os.replace(tmp, d / "state.json")

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("data_fingerprint") != self.prepared.fingerprint:
            raise ConfigError("--resume: the data changed since the checkpoint was written; start a new run")
        tensors = load_file(str(self.ckpt_dir / "last.safetensors"))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["optim_param_groups"]}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict(opt_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.schedule.load_state_dict(state.get("schedule"))
        torch.set_rng_state(tensors["rng.torch"])
        self.gen.set_state(tensors["rng.gen"])
        best = self.ckpt_dir / "best.safetensors"
        if best.exists():
            self.best_state = load_file(str(best))
            self.best_probs = self.predict_val(self._to_device(self.best_model()))


def _fit_ood(
    model: nn.Module,
    tensors: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    labels: np.ndarray,
    seed: int,
    batch_size: int | None = None,
) -> OODDetector:
    """The out-of-distribution guard for this model: penultimate features and input statistics of (up to) a
    few thousand un-augmented training samples and of the validation samples (:mod:`medclf.ood`)."""
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(train_idx, size=min(len(train_idx), OOD_FIT_SAMPLES), replace=False))
    train_f, train_s = _features(model, tensors, fit_idx, batch_size)
    val_f, val_s = _features(model, tensors, np.sort(val_idx), batch_size)
    return fit_detector(train_f, labels[fit_idx], val_f, train_inputs=train_s, val_inputs=val_s, seed=seed)


def _features(
    model: nn.Module, tensors: np.ndarray, idx: np.ndarray, batch_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and input statistics of the cache rows ``idx``. With ``batch_size`` (streaming:
    memory is tight) the rows are read from disk one batch at a time instead of all at once."""
    if batch_size is None or getattr(tensors, "filename", None) is None:
        x = np.asarray(tensors[idx], dtype=np.float32)
        return penultimate_features(model, x), input_statistics(x)
    rows = StreamedRows(tensors, idx)
    feats, stats = [], []
    for start in range(0, len(idx), batch_size):
        x = rows[start : start + batch_size]
        feats.append(penultimate_features(model, x, batch_size=batch_size))
        stats.append(input_statistics(x))
    if not feats:
        return penultimate_features(model, rows[0:0]), input_statistics(rows[0:0])
    return np.concatenate(feats), np.concatenate(stats)


def _transfer_source(cfg: TrainConfig, overrides: dict[str, Any], fp: Fingerprint) -> Any:
    """For ``--init-from``: load (and verify) the source bundle and pin the settings its weights need."""
    if not cfg.init_from:
        if cfg.freeze:
            raise ConfigError("--freeze needs --init-from: there is nothing to keep frozen in a new network")
        return None
    from medclf.bundle import load_bundle

    source = load_bundle(cfg.init_from)
    if source.spec.spatial_dims != fp.spatial_dims:
        raise ConfigError(
            f"--init-from: the bundle takes {source.spec.spatial_dims}D input, the data is {fp.spatial_dims}D"
        )
    pinned = {"arch": source.arch, "size": int(source.spec.size[0])}
    for key, value in pinned.items():
        if overrides.get(key) not in (None, value):
            raise ConfigError(
                f"--init-from fixes --{key} to the source bundle's ({value}); leave --{key} out"
            )
        overrides[key] = value
    # Fine-tuning starts from a trained network: a smaller peak learning rate keeps what it learned.
    overrides.setdefault("lr", 5e-4)
    return source


def _apply_transfer(plan: Plan, source: Any, cfg: TrainConfig) -> None:
    from medclf.models.registry import model_info

    plan.spec = source.spec  # the same preprocessing as the weights were trained with
    plan.arch_kwargs = dict(source.manifest["model"].get("kwargs", {}))
    plan.init_from = {"path": str(source.path), "sha256": source.sha256, "classes": list(source.classes)}
    groups = model_info(plan.arch).layer_groups
    names = cfg.freeze.split(",") if isinstance(cfg.freeze, str) else list(cfg.freeze or [])
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise ConfigError(
            f"--freeze: unknown layer group(s) {', '.join(unknown)}; {plan.arch} has {', '.join(groups)}"
        )
    plan.freeze = names
    plan.reasons.append(
        f"fine-tuning from {source.path} ({source.sha256[:12]}); frozen: {', '.join(names) or 'nothing'}"
    )


def _load_transfer_weights(model: nn.Module, plan: Plan, classes: list[str], console: Console) -> None:
    """Copy the source bundle's weights into ``model``. Output rows follow the class names when the source
    knows the same classes (in any order); a head of another shape starts afresh."""
    from medclf.bundle import load_bundle

    assert plan.init_from is not None
    source = load_bundle(plan.init_from["path"], expected_sha256=plan.init_from["sha256"])
    src_state, own = source.model.state_dict(), model.state_dict()
    order = None
    if sorted(source.classes) == sorted(classes) and source.classes != classes:
        order = torch.tensor([source.classes.index(c) for c in classes])
    fresh = []
    for k, v in own.items():
        w = src_state.get(k)
        if w is not None and order is not None and w.shape == v.shape and _is_output_row_tensor(model, k):
            w = w[order]
        if w is None or w.shape != v.shape:
            fresh.append(k)
            continue
        own[k] = w
    model.load_state_dict(own)
    if fresh:
        console.print(f"  new (randomly initialised) weights: {', '.join(fresh)}")


def _is_output_row_tensor(model: nn.Module, key: str) -> bool:
    # The last Linear layer's weight and bias have one row per class.
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return bool(last) and key.rsplit(".", 1)[0] == last[-1]


def _freeze(model: nn.Module, groups: list[str]) -> list[nn.Module]:
    frozen = []
    for name in groups:
        module = getattr(model, name)
        for p in module.parameters():
            p.requires_grad_(False)
        frozen.append(module)
    return frozen


def _create(plan: Plan, n_classes: int) -> nn.Module:
    from medclf.models import create_model

    return create_model(plan.arch, plan.spec.channels, n_classes, plan.spec.spatial_dims, **plan.arch_kwargs)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # AveragedModel adds n_averaged; a bundle stores the plain network's state only.
    return {k: v for k, v in model.state_dict().items() if k != "n_averaged"}


def _rows(tensors: np.ndarray, idx: np.ndarray, streaming: bool) -> torch.Tensor | StreamedRows:
    """Rows ``idx`` of the cache, indexable like a tensor: read from disk per batch, or held in memory."""
    return StreamedRows(tensors, idx) if streaming else _materialise(tensors, idx)


def _log_shards(dist: DistContext, epoch: int, shards: list[np.ndarray]) -> None:
    """With ``MEDCLF_DEBUG_SHARDS=<folder>``, append the sample indices this rank trains on in ``epoch`` to
    ``<folder>/shards-rank<r>.jsonl`` (tests check that ranks see disjoint shards)."""
    folder = os.environ["MEDCLF_DEBUG_SHARDS"]
    Path(folder).mkdir(parents=True, exist_ok=True)
    line = json.dumps({"rank": dist.rank, "epoch": epoch, "batches": [s.tolist() for s in shards]})
    with open(Path(folder) / f"shards-rank{dist.rank}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def _materialise(tensors: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """The rows ``idx`` of the cache as one in-memory float16 tensor (sorted reads from the memmap)."""
    order = np.argsort(idx)
    rows = np.empty((len(idx), *tensors.shape[1:]), dtype=np.float16)
    rows[order] = tensors[idx[order]]
    return torch.from_numpy(rows)


def _auc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    scores = [roc_auc_score(y == c, probs[:, c]) for c in present]
    return float(np.mean(scores))


def _warmup_ema(decay: float | Callable[[], float]) -> Any:
    """EMA whose decay ramps up as (1 + n) / (10 + n) (as timm's ModelEmaV3 warm-up): early on the average
    follows the fast-changing network instead of mixing weights from incompatible points. ``decay`` may be
    a callable, read at every update (the schedule's horizon can change between epochs)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay() if callable(decay) else decay, (1.0 + n) / (10.0 + n))
        for a, c in zip(averaged, current, strict=True):
            if a.dtype.is_floating_point:
                a.lerp_(c, 1.0 - d)
            else:
                a.copy_(c)  # integer buffers (BatchNorm's num_batches_tracked)

    return update


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _json_safe(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _load_checkpoint_state(ckpt_dir: Path) -> dict[str, Any] | None:
    p = ckpt_dir / "state.json"
    if not p.exists() or not (ckpt_dir / "last.safetensors").exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise MedclfError(f"{p}: the checkpoint state is damaged ({exc}); start a new run") from exc


class _ProgressDisplay:
    """A live progress bar on a terminal (unless disabled); one plain line per epoch otherwise, so logs
    and CI output still show how training went."""

    def __init__(self, console: Console, total: int, start: int, enabled: bool) -> None:
        self.console, self.total = console, total
        self.live = enabled and console.is_terminal
        self.progress: Any = None
        self.start = start

    def __enter__(self) -> _ProgressDisplay:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("epoch"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(
        self, row: dict[str, float], best: float, remaining_s: float, total: int | None = None
    ) -> None:
        if total is not None and total != self.total:
            self.total = total
            if self.progress is not None:
                self.progress.update(self.task, total=total)
        info = (
            f"loss {row['loss']:.4f}  val AUC {row['val_auc']:.4f} (best {best:.4f})  "
            f"acc {row['val_acc']:.3f}  left ~{remaining_s / 60:.1f} min"
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=int(row["epoch"]), info=info)
        else:
            self.console.print(f"epoch {int(row['epoch'])}/{self.total}  {info}  ({row['seconds']:.1f} s)")

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)


__all__ = ["TrainConfig", "TrainResult", "parse_duration", "train"]
