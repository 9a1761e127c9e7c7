"""What every bag of members shares (K-fold, seed and leftover-budget bagging): the members' folder next to
the bundle, each member's settings and share of one :class:`~medclf.budget.Budget`, their fusion into the
bundle, and the clean-up."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from medclf import fusion
from medclf.budget import MIN_RUN_S, Budget
from medclf.training.config import TrainConfig

FOLDS_SUFFIX = ".folds"


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
        console: Console,
    ) -> None:
        self.data, self.out, self.cfg, self.budget = data, Path(out), cfg, budget
        self.progress, self.console = progress, console
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
            console=self.console,
            seed=self.cfg.seed,
            recipe=recipe,
        )

    def clean(self) -> None:
        """Remove the members' folder (unless ``keep_checkpoints``)."""
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(self.work, ignore_errors=True)
