"""Short training runs for compression (fine-tuning a pruned network, distilling a student) on the
training loop of :mod:`medclf.training`: cached tensors, batched augmentation, AdamW with warm-up and cosine
decay, EMA, bf16 where it pays, model selection on validation AUC."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from medclf.compress.data import TrainingData
from medclf.planner import Plan, resolve_amp
from medclf.preprocess import PreprocessSpec
from medclf.tracking_hook import traced
from medclf.training import TrainConfig, _Loop

LossHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Used when a bundle carries no training recipe (e.g. one assembled by hand).
_DEFAULT_RECIPE: dict[str, Any] = {
    "batch_size": 32,
    "epochs": 10,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "augment": "light",
    "amp": "auto",
    "channels_last": True,
    "ema": True,
    "patience": 0,
    "label_smoothing": 0.0,
}


def plan_from_manifest(
    manifest: dict[str, Any], *, arch: str | None = None, arch_kwargs: dict | None = None
) -> Plan:
    """The bundle's training plan (its recipe), optionally for another architecture."""
    recipe = {**_DEFAULT_RECIPE, **manifest.get("recipe", {})}
    known = {f.name for f in fields(Plan)}
    kw = {k: v for k, v in recipe.items() if k in known}
    kw["arch"] = arch or manifest["model"]["arch"]
    kw["arch_kwargs"] = dict(arch_kwargs if arch_kwargs is not None else manifest["model"].get("kwargs", {}))
    kw["spec"] = PreprocessSpec.from_dict(manifest["preprocess"])
    kw["amp"] = resolve_amp(str(kw["amp"]))
    kw["reasons"] = []
    # The weights come from the network being compressed, not from the source's own starting point.
    kw.pop("init_from", None)
    kw.pop("freeze", None)
    return Plan(**kw)


@dataclass
class FinetuneResult:
    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    val_probs: np.ndarray
    seconds: float
    plan: Plan


@traced("finetune")  # a nested MLflow run when the export is tracked
def finetune(
    plan: Plan,
    data: TrainingData,
    *,
    init_state: dict[str, torch.Tensor] | None = None,
    epochs: int,
    lr: float,
    time_budget: float | None = None,
    loss_hook: LossHook | None = None,
    seed: int = 0,
    console: Console | None = None,
    progress: bool = True,
    epoch_callback: Callable[[dict[str, Any], nn.Module, Plan], dict[str, Any] | None] | None = None,
) -> FinetuneResult:
    """Train ``plan``'s network (starting from ``init_state`` when given) for ``epochs`` on the training
    split; return the model selected on validation AUC. ``epoch_callback``: as in
    :func:`medclf.training.train`."""
    console = console or Console(stderr=True, soft_wrap=True)
    t0 = time.perf_counter()
    plan.epochs, plan.lr = int(epochs), float(lr)
    plan.patience = plan.epochs + 1  # a short run: no early stopping, selection alone picks the epoch
    torch.manual_seed(seed)
    ckpt = Path(tempfile.mkdtemp(prefix="medclf-finetune-"))
    try:
        loop = _Loop(
            plan,
            data.samples,
            data.prepared,
            data.train_idx,
            data.val_idx,
            TrainConfig(seed=seed),
            "cpu",
            ckpt,
            console,
            progress,
        )
        if init_state is not None:
            loop.model.load_state_dict(init_state)  # in place: the optimizer keeps its parameters
            if loop.ema is not None:
                loop.ema.module.load_state_dict(init_state)
        loop.loss_hook = loss_hook
        loop.epoch_callback = epoch_callback
        deadline = t0 + time_budget if time_budget else None
        history, best_epoch, val_probs = loop.run(None, deadline)
        model = loop.best_model()
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return FinetuneResult(model, history, best_epoch, val_probs, time.perf_counter() - t0, plan)
