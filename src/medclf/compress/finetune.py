"""Short training runs for compression (fine-tuning a pruned network, distilling a student) on the
training loop of :mod:`medclf.training.loop`: cached tensors, batched augmentation, AdamW with warm-up and cosine
decay, EMA, bf16 where it pays, model selection on validation AUC."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from medclf.budget import Budget
from medclf.compress.data import TrainingData
from medclf.planner import Plan, resolve_amp
from medclf.preprocess import PreprocessSpec
from medclf.tracking_hook import traced
from medclf.training.config import TrainConfig
from medclf.training.loop import EpochCallback, Loop, LoopData, LoopHooks, LossHook

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
    kw.pop("linear_probe", None)  # the source's freeze schedule (a linear probe first) is done
    kw.pop("backbone_lr", None)
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
    progress: bool = True,
    epoch_callback: EpochCallback | None = None,
) -> FinetuneResult:
    """Train ``plan``'s network (starting from ``init_state`` when given) for ``epochs`` on the training
    split; return the model selected on validation AUC. ``epoch_callback``: as in
    :func:`medclf.training.train`."""
    t0 = time.perf_counter()
    budget = Budget(time_budget, start=t0) if time_budget else None
    plan.epochs, plan.lr = int(epochs), float(lr)
    plan.patience = plan.epochs + 1  # a short run: no early stopping, selection alone picks the epoch
    torch.manual_seed(seed)
    loop = Loop(
        plan,
        LoopData(data.samples, data.prepared, data.train_idx, data.val_idx),
        TrainConfig(seed=seed),
        progress=progress,
        budget=budget,
        hooks=LoopHooks(loss=loss_hook, on_epoch=epoch_callback),
    )
    if init_state is not None:
        loop.start_from(init_state)
    history, best_epoch, val_probs = loop.run(None, budget.deadline if budget is not None else None)
    return FinetuneResult(loop.best_model(), history, best_epoch, val_probs, time.perf_counter() - t0, plan)
