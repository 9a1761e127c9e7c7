"""One pretraining run (:func:`pretrain`): sources -> cached tensors -> SimCLR epochs on the clock -> a sealed
backbone bundle.

Like ``medclf train``, the time budget is :class:`medclf.budget.Budget`'s and counts everything from the
call on: reading the sources, decoding, timing a step, the epochs, and the work after the last epoch (the
last k-NN probe and writing the bundle), which is set aside first. :mod:`medclf.pretrain.pace` refuses a
budget that cannot hold decoding and a minimal run, and plans the epochs (or the steps of one partial
epoch) that fit. The learning-rate schedule is :class:`medclf.schedule.Schedule`'s and, without
``--epochs``, follows the clock; the run stops at the step the deadline allows (:mod:`medclf.pretrain.loop`).
``--epochs N`` runs N epochs whatever the clock says, as in train. A checkpoint (safetensors + JSON, written
atomically) after every epoch lets ``--resume`` continue a killed run exactly where it stopped.

Under torchrun (``torchrun --nproc_per_node N -m medclf pretrain ...``, :mod:`medclf.distributed`): rank 0
plans and tells the others, local rank 0 decodes into the cache while the others wait, every process trains
on its shard of each global batch (:mod:`medclf.pretrain.loop`), and rank 0 alone prints and writes
checkpoints and the bundle.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medclf import allocator, reporting
from medclf import threads as threads_mod
from medclf.budget import Budget, decode_seconds, inference_seconds
from medclf.bundle import check_out, save_bundle
from medclf.data.cache import is_cached
from medclf.data.samples import SampleSet
from medclf.distributed import DistContext, from_env
from medclf.errors import ConfigError, MedclfError
from medclf.preprocess import PreprocessSpec
from medclf.pretrain.config import PretrainConfig
from medclf.pretrain.data import PretrainData, load_unlabelled, plan_input, prepare_sources
from medclf.pretrain.loop import KNN_K, PretrainLoop, load_state
from medclf.pretrain.pace import StepPlan, check_decoding, plan_steps, time_step
from medclf.pretrain.simclr import SimclrStep, build_net

__all__ = ["PretrainConfig", "PretrainResult", "checkpoint_dir", "pretrain"]

CHECKPOINT_SUFFIX = ".ckpt"
# Without --epochs the clock decides; the schedule is laid out over at most this many epochs.
MAX_EPOCHS = 1000


@dataclass
class PretrainResult:
    bundle: Path
    history: list[dict[str, float]]
    epochs_run: int
    stop_reason: str  # "completed" (all --epochs), "time_budget" (the clock's horizon)
    seconds: float
    sources: list[dict[str, Any]] = field(default_factory=list)


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + CHECKPOINT_SUFFIX)


@dataclass
class _Job:
    """What one call was asked, and where it runs."""

    cfg: PretrainConfig
    sources: list[str | Path]
    out: Path
    ckpt: Path
    state: dict[str, Any] | None  # the checkpoint resumed from (None: a new run)
    budget: Budget
    dist: DistContext
    device: str
    progress: bool


def pretrain(
    data: str | Path | list[str | Path],
    out: str | Path,
    *,
    config: PretrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    budget: Budget | None = None,
    **settings: Any,
) -> PretrainResult:
    """Pretrain a backbone on the images of ``data`` (one source or several; labels ignored) with SimCLR
    and write it to ``out`` as a sealed backbone bundle (``kind: backbone``: the network without its output
    layer) that ``medclf train --init-from`` fine-tunes. ``resume``: continue from ``<out>.ckpt``.
    ``budget``: the clock everything draws on (default: ``time_budget`` from now; tests pass one on a fake
    clock). Messages go to the active reporter (:mod:`medclf.reporting`)."""
    cfg = (config or PretrainConfig()).updated(settings)
    budget = budget or Budget(cfg.time_budget)
    out = Path(out)
    sources = [data] if isinstance(data, (str, Path)) else list(data)
    if not sources:
        raise ConfigError("pretrain needs at least one data source")
    check_out(out, sources)  # before any work: a refusal after the run would leave its checkpoint behind
    ckpt = checkpoint_dir(out)
    state = load_state(ckpt) if resume else None
    if resume and state is None:
        raise ConfigError(f"--resume: no checkpoint at {ckpt} (nothing to resume)")
    if state is not None:  # the run's own settings, except those that cannot change its weights
        local = ("time_budget", "workers", "cache_dir", "keep_checkpoint", "device", "threads")
        cfg = PretrainConfig().updated({**state["config"], **{k: getattr(cfg, k) for k in local}})
    # Under torchrun: join the process group; only rank 0 plans, reports and writes (medclf.distributed).
    dist, device = from_env(_device(cfg.device))
    with contextlib.ExitStack() as scope:
        scope.callback(dist.close)
        if not dist.is_main:
            scope.enter_context(reporting.use(reporting.SilentReporter()))
        job = _Job(cfg, sources, out, ckpt, state, budget, dist, device, progress and dist.is_main)
        return _run(job)


def _run(job: _Job) -> PretrainResult:
    cfg, budget, dist, state = job.cfg, job.budget, job.dist, job.state
    rep = reporting.current()
    threads_mod.apply(cfg.threads)
    allocator.keep_freed_memory()  # each step reuses the last step's buffers (medclf.allocator)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if state is not None and state.get("world_size", dist.world_size) != dist.world_size:
        # Each process's shard of every global batch, and so the run's steps, depend on the process count.
        raise ConfigError(
            f"--resume: the checkpoint was written by {state['world_size']} process(es), this run has "
            f"{dist.world_size}; resume with the same torchrun --nproc_per_node"
        )
    sets = [load_unlabelled(s) for s in job.sources]
    inputs = _on_main(dist, lambda: _plan_input(job, sets))
    data_ = _decode(job, sets, PreprocessSpec.from_dict(inputs["spec"]))
    if state is not None and state["data_fingerprint"] != data_.fingerprint:
        raise ConfigError("--resume: the data changed since the checkpoint was written; start a new run")
    loop, reasons = _build_loop(job, data_, inputs["arch_kwargs"], len(sets))
    for line in [*inputs["reasons"], *reasons]:
        rep.print(f"  {line}", highlight=False)
    if state is not None:
        loop.restore(job.ckpt, state)
        rep.print(f"[bold]Resuming[/] after epoch {state['epoch'] + 1} ({job.ckpt})")
    loop.epochs(job.ckpt, deadline=budget.work_deadline() if not cfg.epochs else None)
    path = job.out
    if dist.is_main:
        path = write_backbone(loop, job.out, [str(s) for s in job.sources])
        if not cfg.keep_checkpoint:
            shutil.rmtree(job.ckpt, ignore_errors=True)
        rep.print(f"Backbone bundle written to {path} ({loop.epochs_run} epochs, {budget.elapsed():.0f} s)")
    dist.barrier()  # the other processes return once the bundle is there
    return PretrainResult(
        path, loop.history, loop.epochs_run, loop.stop_reason, budget.elapsed(), data_.sources
    )


def _on_main(dist: DistContext, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()`` on rank 0 and its result (JSON) on every rank; a refusal there is raised on every rank, so
    that no process waits for the others alone."""
    if not dist.enabled:
        return fn()
    message: dict[str, Any] = {}
    error: MedclfError | None = None
    if dist.is_main:
        try:
            message = {"value": fn()}
        except MedclfError as exc:
            error, message = exc, {"error": str(exc)}
    message = dist.broadcast_json(message)
    if error is not None:
        raise error
    if "error" in message:
        raise ConfigError(message["error"])
    value: dict[str, Any] = message["value"]
    return value


def _plan_input(job: _Job, sets: list[SampleSet]) -> dict[str, Any]:
    """The preprocessing and the network's arguments (the checkpoint's when resuming); with a clock, the
    refusal of a budget that decoding would spend (:func:`medclf.pretrain.pace.check_decoding`)."""
    cfg, budget, state = job.cfg, job.budget, job.state
    reasons: list[str] = []
    if state is not None:  # decoded before: the cache holds it unless it was cleared
        spec, kwargs, per_file = PreprocessSpec.from_dict(state["spec"]), state["arch_kwargs"], 0.0
    else:
        t0 = budget.clock()
        spec, kwargs, reasons, probed = plan_input(sets[0], arch=cfg.arch, size=cfg.size, seed=cfg.seed)
        per_file = (budget.clock() - t0) / max(probed, 1)  # the fingerprint decodes files: it prices decoding
    if not cfg.epochs:
        todo = sum(len(s) for s in sets if not is_cached(s, spec, cfg.cache_dir))
        decode_s = decode_seconds(per_file, todo, cfg.workers or threads_mod.decode_workers())
        budget.reserve_finishing(0, None)  # writing the bundle at least; the k-NN probe is priced later
        check_decoding(budget, decode_s)
    return {"spec": spec.to_dict(), "arch_kwargs": kwargs, "reasons": reasons}


def _decode(job: _Job, sets: list[SampleSet], spec: PreprocessSpec) -> PretrainData:
    """Every source through the cache; on each machine local rank 0 decodes while the others wait, then
    they open what it wrote."""
    cfg, dist = job.cfg, job.dist
    if dist.enabled and not dist.is_local_main:
        dist.barrier()
    data_ = prepare_sources(
        sets,
        spec,
        splits=cfg.splits,
        cache_dir=cfg.cache_dir,
        workers=cfg.workers,
        progress=job.progress,
        seed=cfg.seed,
    )
    if dist.enabled and dist.is_local_main:
        dist.barrier()
    return data_


def _build_loop(
    job: _Job, data_: PretrainData, arch_kwargs: dict[str, Any], n_sources: int
) -> tuple[PretrainLoop, list[str]]:
    """The loop over ``data_``, with the steps the budget holds (or ``--epochs``); the reasons to print."""
    cfg, budget, dist, state = job.cfg, job.budget, job.dist, job.state
    n = len(data_.rows)
    if n < 4:
        raise ConfigError(f"{n} image(s) are too few to pretrain on (SimCLR contrasts images in a batch)")
    batch = int(state["batch_size"]) if state else _batch_size(cfg, n, job.device, dist.world_size)
    if batch > n:
        raise ConfigError(f"{n} images are too few for a batch of {batch} over {dist.world_size} processes")
    # The k-NN probe's last pass and writing the bundle come after the last epoch: set them aside.
    probe_n = len(data_.probe.ref_y) + len(data_.probe.query_y) if data_.probe else 0
    budget.reserve_finishing(probe_n, None)
    stepper = SimclrStep(
        data_.spec, temperature=cfg.temperature, device=job.device, amp=cfg.amp, world_size=dist.world_size
    )
    full_steps = max(1, n // batch)
    epochs = cfg.epochs or (int(state.get("planned_epochs", MAX_EPOCHS)) if state else MAX_EPOCHS)
    steps = int(state.get("steps_per_epoch", full_steps)) if state else full_steps
    probe_source = data_.probe.source if data_.probe else None
    reasons = [
        f"{n} images from {n_sources} source(s); batch {batch} (x2 views)"
        + (f" over {dist.world_size} processes" if dist.enabled else "")
        + f", SimCLR on {cfg.arch}, temperature {cfg.temperature:g}, projection {cfg.projection_dim}",
        f"k-NN probe: labels of {probe_source}" if probe_source else "k-NN probe: none (no labels)",
    ]
    step_s = None
    if not cfg.epochs:
        plan = StepPlan(
            **_on_main(dist, lambda: _plan_steps(job, data_, arch_kwargs, stepper, batch, steps, probe_n))
        )
        step_s = plan.step_seconds
        if state is None:  # a resumed run keeps its schedule; the clock only tells it when to stop
            epochs, steps = plan.epochs, plan.steps_per_epoch
        reasons.append(f"time budget: {plan.reason}")
    loop = PretrainLoop(
        cfg, data_, arch_kwargs, batch=batch, stepper=stepper, budget=budget, dist=dist,
        steps_per_epoch=steps, planned_epochs=epochs, step_seconds=step_s,
    )  # fmt: skip
    return loop, reasons


def _plan_steps(
    job: _Job,
    data_: PretrainData,
    arch_kwargs: dict[str, Any],
    stepper: SimclrStep,
    batch: int,
    full_steps: int,
    probe_n: int,
) -> dict[str, Any]:
    """Time a step of this process's share of a batch on a throwaway network, price the k-NN probe from
    it, and plan the steps that fit (rank 0's, for every process)."""
    cfg, budget = job.cfg, job.budget
    local = batch // job.dist.world_size

    def make_net() -> torch.nn.Module:
        net, _ = build_net(cfg.arch, data_.spec, arch_kwargs, cfg.projection_dim)
        return net.to(job.device)

    step_s = time_step(stepper, make_net, data_.rows[:local].float(), budget, budget.planning_seconds())
    views_per_s = 2 * local / max(step_s, 1e-9)  # training throughput: each image is two views
    budget.reserve_finishing(probe_n, views_per_s)
    knn_s = inference_seconds(probe_n, views_per_s)
    return plan_steps(
        budget, step_s=step_s, knn_s=knn_s, full_steps=full_steps, max_epochs=MAX_EPOCHS
    ).to_dict()


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    return device


def _batch_size(cfg: PretrainConfig, n: int, device: str, world_size: int = 1) -> int:
    """``--batch-size``, else 256 images (512 views) on a GPU and 128 on a CPU (SimCLR wants many negatives,
    a CPU few images per step), at most a quarter of the images so an epoch has several steps. Under
    torchrun it is the global batch, whatever the number of processes (the loss is the global batch's),
    rounded down to split evenly across them."""
    if cfg.batch_size:
        batch = int(min(cfg.batch_size, max(2, n // 2)))
    else:
        batch = int(max(2, min(256 if device.startswith("cuda") else 128, n // 4)))
    if world_size > 1:
        batch = max(batch - batch % world_size, world_size)
    return batch


def write_backbone(loop: PretrainLoop, out: Path, sources: list[str]) -> Path:
    """The backbone of ``loop`` as a sealed bundle at ``out``, with what its pretraining was."""
    backbone = loop.net.backbone.cpu().eval()
    spec, cfg, probe = loop.data.spec, loop.cfg, loop.data.probe
    step = int(loop.scheduler.last_epoch)
    manifest = {
        "kind": "backbone",
        "model": {
            "arch": cfg.arch,
            "in_channels": spec.channels,
            "n_classes": 2,  # the output layer's size when the network is built; its weights are omitted
            "spatial_dims": spec.spatial_dims,
            "kwargs": loop.arch_kwargs,
            "omitted": loop.omitted,
        },
        "classes": [],
        "preprocess": spec.to_dict(),
        "pretraining": {
            "method": "simclr",
            "loss": "monai.losses.ContrastiveLoss (NT-Xent)",
            "temperature": cfg.temperature,
            "projection_dim": cfg.projection_dim,
            "augmentation": "medclf.pretrain.simclr.contrastive_augmentation",
            "batch_size": loop.batch,
            "world_size": loop.dist.world_size,
            "steps_per_epoch": loop.steps_per_epoch,
            "amp": loop.amp,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "seed": cfg.seed,
            "splits": list(cfg.splits),
            "sources": loop.data.sources,
            "images": len(loop.data.rows),
            "epochs": len(loop.history),
            "stop_reason": loop.stop_reason,
            "schedule": loop.schedule.record(step, len(loop.history), loop.stop_reason),
            "loss_curve": [round(float(r["loss"]), 5) for r in loop.history],
            "knn_probe": (
                {
                    "source": probe.source,
                    "k": min(KNN_K, len(probe.ref_y)),
                    "accuracy_curve": [round(float(r["knn_acc"]), 4) for r in loop.history if "knn_acc" in r],
                }
                if probe
                else None
            ),
            "history": loop.history,
            "seconds": round(loop.budget.elapsed(), 1),
            "command_sources": sources,
        },
    }
    return save_bundle(out, model=backbone, manifest=manifest)
