"""The settings of a pretraining run (:class:`PretrainConfig`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from medclf import allocator
from medclf.budget import parse_duration
from medclf.errors import ConfigError, check_number
from medclf.pretrain.simclr import PROJECTION_DIM, TEMPERATURE


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
        if kw["batch_size"] is not None and int(kw["batch_size"]) < 2:  # no other image: no negative pair
            raise ConfigError("--batch-size must be at least 2: SimCLR contrasts each image with the others")
        check_number("--seed", kw["seed"], at_least=0)
        check_number("--lr", kw["lr"], above=0)
        check_number("--weight-decay", kw["weight_decay"], at_least=0)
        check_number("--temperature", kw["temperature"], above=0)
        if not 0 < float(kw["temperature"]) <= 1:
            raise ConfigError("--temperature must be in (0, 1]")
        allocator.check_setting()  # the environment's MEDCLF_MALLOC, refused before any data is read
        return PretrainConfig(**kw)
