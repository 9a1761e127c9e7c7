"""The network a run trains: built from the plan, started from a source bundle's weights
(``--init-from``), frozen layer groups, on its device in its memory format, wrapped for DDP and
``torch.compile``, and the warm-up EMA of its weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medclf.distributed import DistContext
from medclf.planner import Plan


def build_network(
    plan: Plan, classes: list[str], *, device: str, dist: DistContext, compile: bool
) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """The network ``plan`` describes, on ``device``; its frozen modules; and what the training step calls:
    DDP (gradients all-reduced) and/or ``torch.compile`` around it (checkpoints, EMA and the bundle always
    use the plain network)."""
    model = create_network(plan, len(classes))
    if plan.init_from:
        load_transfer_weights(model, plan, classes)
    if dist.enabled and device.startswith("cuda"):
        # Per-GPU batches of images are small: batch-norm statistics over the global batch instead.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = freeze(model, plan.freeze)
    model = to_device(model, device, memory_format(plan))
    wrapped = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
    if compile:
        # torch.compile(module) returns an OptimizedModule (a Module); its stub only says "a callable".
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return model, frozen, wrapped


def memory_format(plan: Plan) -> torch.memory_format | None:
    """Channels-last (2D or 3D) when the plan says so."""
    if not plan.channels_last:
        return None
    return torch.channels_last if plan.spec.spatial_dims == 2 else torch.channels_last_3d


def to_device(model: nn.Module, device: str, fmt: torch.memory_format | None) -> nn.Module:
    model = model.to(device)
    # torch's stub of Module.to lacks its memory_format keyword.
    return model.to(memory_format=fmt) if fmt is not None else model  # type: ignore[call-overload]


def load_transfer_weights(model: nn.Module, plan: Plan, classes: list[str]) -> None:
    """Copy the ``--init-from`` source's weights into ``model`` (a bundle, a backbone or a state dict:
    :func:`medclf.training.transfer.load_weights`)."""
    from medclf.training.transfer import load_weights

    load_weights(model, plan, classes)


def freeze(model: nn.Module, groups: list[str]) -> list[nn.Module]:
    """Stop the gradients of the layer groups ``groups`` (``--freeze``); return their modules."""
    frozen = []
    for name in groups:
        module = getattr(model, name)
        for p in module.parameters():
            p.requires_grad_(False)
        frozen.append(module)
    return frozen


def create_network(plan: Plan, n_classes: int) -> nn.Module:
    """A new network as ``plan`` describes it, with ``n_classes`` outputs."""
    from medclf.models import create_model

    return create_model(plan.arch, plan.spec.channels, n_classes, plan.spec.spatial_dims, **plan.arch_kwargs)


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state without the ``n_averaged`` counter AveragedModel adds (a bundle stores the plain
    network's state only)."""
    return {k: v for k, v in model.state_dict().items() if k != "n_averaged"}


def warmup_ema(decay: float | Callable[[], float]) -> Any:
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
