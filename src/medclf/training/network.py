"""The network a run trains: built from the plan, started from a source bundle's weights
(``--init-from``), frozen layer groups, and the warm-up EMA of its weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from torch import nn

from medclf.planner import (
    Plan,
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
