"""What goes into a training run and what comes out: :class:`TrainConfig` (from the CLI, a JSON/TOML file or
keyword arguments) and :class:`TrainResult`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from medclf import allocator
from medclf import augment as augment_mod
from medclf.budget import parse_duration
from medclf.data.samples import DEFAULT_VAL_FRACTION
from medclf.errors import ConfigError, check_number
from medclf.mitigation import check_mode as check_mitigation_mode
from medclf.planner import Plan, check_normalise

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


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
    # Intensity scaling: auto, percentile or fixed (planner.check_normalise); None: auto.
    normalise: str | None = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    patience: int | None = None
    amp: str = "auto"
    ema: bool = True
    label_smoothing: float = 0.0
    # One class per image: "balanced" (each class weighs as much as the others) or "none" (the training
    # prior stands); None: none for ordinal grades, balanced for classes (training.setup._head_for_task).
    class_weights: str | None = None
    # Batch mixing: none, mixup or cutmix (None: none); alpha None = the method's default.
    mix: str | None = None
    mix_alpha: float | None = None
    workers: int | None = None
    cache_dir: str | None = None
    include_train_copies: bool = False
    device: str = "auto"
    init_from: str | None = None
    freeze: str | list[str] | None = None
    # With --init-from: the share of the epochs that train the output layer only before all layers
    # fine-tune (medclf.training.probe); None: the planner decides (on for small data from a supervised
    # source), 0: off.
    linear_probe: float | None = None
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
    # multiclass or ordinal (grades 0..K-1: a CORN head); None: what the data declare (data.sources.infer_task).
    task: str | None = None
    # How to read a CSV manifest (data.sources.ManifestOptions as a dict: label_column, split_file, ...).
    manifest: dict[str, str] | None = None
    # Multi-label findings: bce (class-balanced binary cross-entropy) or asymmetric (models.tasks).
    multilabel_loss: str = "bce"

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
        if kw["multilabel_loss"] not in ("bce", "asymmetric"):  # models.tasks.MULTILABEL_LOSSES
            raise ConfigError(f"--multilabel-loss must be bce or asymmetric, not {kw['multilabel_loss']!r}")
        check_normalise(kw["normalise"])
        if kw["class_weights"] not in (None, "balanced", "none"):
            raise ConfigError(f"--class-weights must be balanced or none, not {kw['class_weights']!r}")
        check_number("--seed", kw["seed"], at_least=0)
        check_number("--lr", kw["lr"], above=0)
        check_number("--weight-decay", kw["weight_decay"], at_least=0)
        check_number("--label-smoothing", kw["label_smoothing"], at_least=0, below=1)
        if kw["threads"] is not None and int(kw["threads"]) < 1:
            raise ConfigError(f"--threads must be at least 1, not {kw['threads']}")
        check_mitigation_mode(kw["shortcut_mitigation"])
        allocator.check_setting()  # the environment's MEDCLF_MALLOC, refused before any data is read
        return TrainConfig(**kw)

    def overrides(self) -> dict[str, Any]:
        keys: tuple[str, ...]
        keys = ("arch", "size", "epochs", "batch_size", "lr", "augment", "denoise", "patience", "amp", "ema")
        keys += ("slices_as_channels", "mix", "mix_alpha", "class_weights", "normalise")
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
