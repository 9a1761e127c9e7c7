"""One pretraining run (:func:`pretrain`): sources -> cached tensors -> SimCLR epochs on the clock -> a sealed
backbone bundle.

Like ``medclf train``: the time budget is :class:`medclf.budget.Budget`'s (the work after the last epoch is
reserved first), the learning-rate schedule is :class:`medclf.schedule.Schedule`'s and, without ``--epochs``,
follows the clock (re-planned after every epoch so the cosine ends at the last epoch that fits), and a
checkpoint (safetensors + JSON, written atomically) after every epoch lets ``--resume`` continue a killed
run exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medclf import reporting
from medclf import threads as threads_mod
from medclf.budget import Budget, epoch_pace, parse_duration
from medclf.bundle import save_bundle
from medclf.errors import ConfigError
from medclf.pretrain.data import PretrainData, ProbeSet, load_unlabelled, plan_input, prepare_sources
from medclf.pretrain.simclr import (
    PROJECTION_DIM,
    TEMPERATURE,
    build_net,
    contrastive_augmentation,
    contrastive_loss,
)
from medclf.schedule import Schedule

CHECKPOINT_SUFFIX = ".ckpt"
LAST, STATE = "last.safetensors", "state.json"
# Without --epochs the clock decides; the schedule is laid out over at most this many epochs.
MAX_EPOCHS = 1000
KNN_K = 10


@dataclass
class PretrainConfig:
    """Settings of a pretraining run; ``None`` means: decide from the data and the machine."""

    arch: str = "compact"
    size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    temperature: float = TEMPERATURE
    projection_dim: int = PROJECTION_DIM
    seed: int = 0
    time_budget: float = 3600.0
    splits: tuple[str, ...] = ("train",)
    workers: int | None = None
    cache_dir: str | None = None
    device: str = "auto"
    threads: int | None = None
    keep_checkpoint: bool = False
    amp: str = "auto"  # mixed precision as in train: auto (bf16 where the hardware runs it), bf16, fp16, off

    def updated(self, changes: dict[str, Any]) -> PretrainConfig:
        known = set(asdict(self))
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown pretraining settings: {', '.join(unknown)}")
        kw = {**asdict(self), **{k: v for k, v in changes.items() if v is not None}}
        kw["time_budget"] = parse_duration(kw["time_budget"])
        if isinstance(kw["splits"], str):
            kw["splits"] = tuple(s.strip() for s in kw["splits"].split(",") if s.strip())
        kw["splits"] = tuple(kw["splits"])
        if not kw["splits"] or not set(kw["splits"]) <= {"train", "val"}:
            raise ConfigError("--splits takes train and/or val (a test split is never read for pretraining)")
        for name in ("epochs", "batch_size"):
            if kw[name] is not None and int(kw[name]) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if kw["amp"] not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"--amp must be one of auto, bf16, fp16, off, not {kw['amp']!r}")
        if not 0 < float(kw["temperature"]) <= 1:
            raise ConfigError("--temperature must be in (0, 1]")
        return PretrainConfig(**kw)


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


def pretrain(
    data: str | Path | list[str | Path],
    out: str | Path,
    *,
    config: PretrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    **settings: Any,
) -> PretrainResult:
    """Pretrain a backbone on the images of ``data`` (one source or several; labels ignored) with SimCLR
    and write it to ``out`` as a sealed backbone bundle (``kind: backbone``: the network without its output
    layer) that ``medclf train --init-from`` fine-tunes. ``resume``: continue from ``<out>.ckpt``. Messages
    go to the active reporter (:mod:`medclf.reporting`)."""
    cfg = (config or PretrainConfig()).updated(settings)
    budget = Budget(cfg.time_budget)
    rep = reporting.current()
    out = Path(out)
    sources = [data] if isinstance(data, (str, Path)) else list(data)
    if not sources:
        raise ConfigError("pretrain needs at least one data source")
    ckpt = checkpoint_dir(out)
    state = _load_state(ckpt) if resume else None
    if resume and state is None:
        raise ConfigError(f"--resume: no checkpoint at {ckpt} (nothing to resume)")
    if state is not None:  # the run's own settings, except those that cannot change its weights
        local = ("time_budget", "workers", "cache_dir", "keep_checkpoint")
        cfg = PretrainConfig().updated({**state["config"], **{k: getattr(cfg, k) for k in local}})
    threads_mod.apply(cfg.threads)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    sets = [load_unlabelled(s) for s in sources]
    if state is not None:
        from medclf.preprocess import PreprocessSpec

        reasons: list[str] = []
        spec, arch_kwargs = PreprocessSpec.from_dict(state["spec"]), state["arch_kwargs"]
    else:
        spec, arch_kwargs, reasons = plan_input(sets[0], arch=cfg.arch, size=cfg.size, seed=cfg.seed)
    data_ = prepare_sources(
        sets,
        spec,
        splits=cfg.splits,
        cache_dir=cfg.cache_dir,
        workers=cfg.workers,
        progress=progress,
        seed=cfg.seed,
    )
    if state is not None and state["data_fingerprint"] != data_.fingerprint:
        raise ConfigError("--resume: the data changed since the checkpoint was written; start a new run")
    n = len(data_.rows)
    batch = int(state["batch_size"]) if state else _batch_size(cfg, n, device)
    if n < 4:
        raise ConfigError(f"{n} image(s) are too few to pretrain on (SimCLR contrasts images in a batch)")
    run = _Run(cfg, data_, arch_kwargs, batch, device, budget)
    probe_source = data_.probe.source if data_.probe else None
    reasons.append(
        f"{n} images from {len(sets)} source(s); batch {batch} (x2 views), SimCLR on {cfg.arch}, "
        f"temperature {cfg.temperature:g}, projection {cfg.projection_dim}"
    )
    reasons.append(
        f"k-NN probe: labels of {probe_source}" if probe_source else "k-NN probe: none (no labels)"
    )
    for line in reasons:
        rep.print(f"  {line}", highlight=False)
    if state is not None:
        run.restore(ckpt, state)
        rep.print(f"[bold]Resuming[/] after epoch {state['epoch'] + 1} ({ckpt})")
    # The k-NN probe's last pass and writing the bundle come after the last epoch: set them aside.
    probe_n = len(data_.probe.ref_y) + len(data_.probe.query_y) if data_.probe else 0
    budget.reserve_finishing(probe_n, None)
    run.epochs(ckpt, deadline=budget.work_deadline() if not cfg.epochs else None)
    path = run.write_bundle(out, [str(s) for s in sources])
    if not cfg.keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    rep.print(f"Backbone bundle written to {path} ({run.epochs_run} epochs, {budget.elapsed():.0f} s)")
    return PretrainResult(path, run.history, run.epochs_run, run.stop_reason, budget.elapsed(), data_.sources)


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    return device


def _batch_size(cfg: PretrainConfig, n: int, device: str) -> int:
    """``--batch-size``, else 256 images (512 views) on a GPU and 128 on a CPU (SimCLR wants many negatives,
    a CPU few images per step), at most a quarter of the images so an epoch has several steps."""
    if cfg.batch_size:
        return int(min(cfg.batch_size, max(2, n // 2)))
    return int(max(2, min(256 if device.startswith("cuda") else 128, n // 4)))


class _Run:
    """The network, optimiser, schedule and history of one run, epoch by epoch."""

    def __init__(
        self,
        cfg: PretrainConfig,
        data: PretrainData,
        arch_kwargs: dict[str, Any],
        batch: int,
        device: str,
        budget: Budget,
    ) -> None:
        self.cfg, self.data, self.arch_kwargs, self.batch = cfg, data, dict(arch_kwargs), batch
        self.device, self.budget = device, budget
        self.net, self.omitted = build_net(cfg.arch, data.spec, self.arch_kwargs, cfg.projection_dim)
        self.net = self.net.to(device)
        self.augment = contrastive_augmentation(data.spec.spatial_dims)
        self.loss_fn = contrastive_loss(cfg.temperature)
        self.steps_per_epoch = max(1, len(data.rows) // batch)
        self.schedule = Schedule(
            self.steps_per_epoch, cfg.epochs or MAX_EPOCHS, patience_epochs=10**6, clock_driven=not cfg.epochs
        )
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = self.schedule

        def lr_factor(step: int) -> float:
            return schedule.lr_factor(step)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        from medclf.planner import resolve_amp

        # Mixed precision as train resolves it; the loss is computed in float32 either way.
        self.amp = resolve_amp(cfg.amp, device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.amp == "fp16" and device.startswith("cuda") else None
        )
        self.history: list[dict[str, float]] = []
        self.start_epoch, self.epochs_run, self.stop_reason = 0, 0, "completed"

    # -- the epochs ------------------------------------------------------------------------------------
    def epochs(self, ckpt: Path, deadline: float | None) -> None:
        clock, times = self.budget.clock, []
        planned = self.cfg.epochs or MAX_EPOCHS
        for epoch in range(self.start_epoch, planned):
            if self.schedule.clock_driven and epoch >= self.schedule.horizon_epochs:
                break
            t0 = clock()
            loss = self._train_epoch()
            knn = self.knn_accuracy()
            times.append(clock() - t0)
            row = {
                "epoch": epoch + 1,
                "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": times[-1],
                "wall_s": self.budget.elapsed(),
            }
            if knn is not None:
                row["knn_acc"] = knn
            self.history.append(row)
            self._replan(epoch + 1, times, deadline)
            self._save(ckpt, epoch)
            last = epoch + 1 >= planned or (
                deadline is not None and self._out_of_time(epoch, times, deadline)
            )
            self._report(row, last, deadline)
            if last:
                break
        self.epochs_run = len(self.history)

    def _train_epoch(self) -> float:
        self.net.train()
        rows = self.data.rows
        order = torch.randperm(len(rows), generator=self.gen)
        total, count = 0.0, 0
        for s in range(self.steps_per_epoch):
            x = rows[order[s * self.batch : (s + 1) * self.batch]].float()
            views = torch.cat([self.augment(x, self.gen), self.augment(x, self.gen)]).to(self.device)
            with self._autocast():
                z = self.net(views).float()
            loss = self.loss_fn(z[: len(x)], z[len(x) :])
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif torch.isfinite(loss):  # a non-finite loss would make every weight NaN: skip the step
                loss.backward()
                self.optimizer.step()
            else:
                reporting.current().warn(f"a non-finite SSL loss at step {s + 1}: step skipped")
                continue
            self.scheduler.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        return total / max(count, 1)

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda" if self.device.startswith("cuda") else "cpu", dtype=self.amp_dtype)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``x`` (no projection head, as SimCLR evaluates), L2-normalised."""
        self.net.eval()
        out = [
            self.net.backbone(x[i : i + 256].float().to(self.device)).float().cpu()
            for i in range(0, len(x), 256)
        ]
        return torch.nn.functional.normalize(torch.cat(out), dim=1)

    def knn_accuracy(self) -> float | None:
        """Accuracy of a k-nearest-neighbour classifier (cosine) on the backbone's features, from the probe
        source's labels: a pretraining run learns without them; this only shows whether it learns."""
        probe: ProbeSet | None = self.data.probe
        if probe is None:
            return None
        from sklearn.neighbors import KNeighborsClassifier

        k = min(KNN_K, len(probe.ref_y))
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(
            self.embed(probe.ref_x).numpy(), probe.ref_y
        )
        return float(np.mean(knn.predict(self.embed(probe.query_x).numpy()) == probe.query_y))

    def _replan(self, epochs_done: int, times: list[float], deadline: float | None) -> None:
        """Fit the cosine's horizon to the epochs that still fit before ``deadline`` (as training does)."""
        if not self.schedule.clock_driven or deadline is None:
            return
        recent = times[1:][-3:] if len(times) > 1 else times
        pace = epoch_pace(max(times[-1], float(np.mean(recent))))
        self.schedule.replan(self.scheduler.last_epoch, epochs_done, deadline - self.budget.clock(), pace)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.schedule.lr_factor(self.scheduler.last_epoch)

    def _out_of_time(self, epoch: int, times: list[float], deadline: float) -> bool:
        """Whether no further epoch fits: the clock's horizon is reached, or (when the schedule could not
        shrink below the epochs done) the next epoch at the recent pace would end after ``deadline``."""
        next_end = self.budget.clock() + epoch_pace(float(np.mean(times[-3:])))
        done = next_end > deadline or (
            self.schedule.clock_driven and epoch + 1 >= self.schedule.horizon_epochs
        )
        if done:
            self.stop_reason = "time_budget"
        return done

    def _report(self, row: dict[str, float], last: bool, deadline: float | None) -> None:
        epoch = int(row["epoch"])
        horizon = epoch if last else self.schedule.horizon_epochs
        knn = f"  k-NN acc {row['knn_acc']:.3f}" if "knn_acc" in row else ""
        left = (horizon - epoch) * row["seconds"]
        if deadline is not None:
            left = min(left, max(deadline - self.budget.clock(), 0.0))
        reporting.current().print(
            f"epoch {int(row['epoch'])}/{horizon}  SSL loss {row['loss']:.4f}{knn}  "
            f"lr {row['lr']:.2e}  left ~{left / 60:.1f} min  ({row['seconds']:.1f} s)",
            highlight=False,
        )

    # -- checkpoints -------------------------------------------------------------------------------------
    def _save(self, ckpt: Path, epoch: int) -> None:
        ckpt.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.gen"] = self.gen.get_state()
        tmp = ckpt / (LAST + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, ckpt / LAST)
        meta = {
            "epoch": epoch,
            "history": self.history,
            "config": {**asdict(self.cfg), "splits": list(self.cfg.splits)},
            "spec": self.data.spec.to_dict(),
            "arch_kwargs": self.arch_kwargs,
            "batch_size": self.batch,
            "scheduler": self.scheduler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "optim_param_groups": opt["param_groups"],
            "data_fingerprint": self.data.fingerprint,
        }
        tmp = ckpt / (STATE + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, ckpt / STATE)

    def restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        tensors = load_file(str(ckpt / LAST))
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        opt: dict[str, Any] = {"state": {}, "param_groups": state["optim_param_groups"]}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                opt["state"].setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(state["scheduler"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(tensors["rng.torch"])
        self.gen.set_state(tensors["rng.gen"])
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"]) + 1

    # -- the bundle --------------------------------------------------------------------------------------
    def write_bundle(self, out: Path, sources: list[str]) -> Path:
        backbone = self.net.backbone.cpu().eval()
        spec = self.data.spec
        manifest = {
            "kind": "backbone",
            "model": {
                "arch": self.cfg.arch,
                "in_channels": spec.channels,
                "n_classes": 2,  # the output layer's size when the network is built; its weights are omitted
                "spatial_dims": spec.spatial_dims,
                "kwargs": self.arch_kwargs,
                "omitted": self.omitted,
            },
            "classes": [],
            "preprocess": spec.to_dict(),
            "pretraining": {
                "method": "simclr",
                "loss": "monai.losses.ContrastiveLoss (NT-Xent)",
                "temperature": self.cfg.temperature,
                "projection_dim": self.cfg.projection_dim,
                "augmentation": "medclf.pretrain.simclr.contrastive_augmentation",
                "batch_size": self.batch,
                "amp": self.amp,
                "lr": self.cfg.lr,
                "weight_decay": self.cfg.weight_decay,
                "seed": self.cfg.seed,
                "splits": list(self.cfg.splits),
                "sources": self.data.sources,
                "images": len(self.data.rows),
                "epochs": len(self.history),
                "stop_reason": self.stop_reason,
                "schedule": self.schedule.record(
                    int(self.scheduler.last_epoch), len(self.history), self.stop_reason
                ),
                "loss_curve": [round(float(r["loss"]), 5) for r in self.history],
                "knn_probe": (
                    {
                        "source": self.data.probe.source,
                        "k": min(KNN_K, len(self.data.probe.ref_y)),
                        "accuracy_curve": [
                            round(float(r["knn_acc"]), 4) for r in self.history if "knn_acc" in r
                        ],
                    }
                    if self.data.probe
                    else None
                ),
                "history": self.history,
                "seconds": round(self.budget.elapsed(), 1),
                "command_sources": sources,
            },
        }
        return save_bundle(out, model=backbone, manifest=manifest)


def _load_state(ckpt: Path) -> dict[str, Any] | None:
    p = ckpt / STATE
    if not p.exists() or not (ckpt / LAST).exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}: the checkpoint state is damaged ({exc}); start a new run") from exc
