"""Structured pruning: remove whole channels, so the network really is smaller and faster.

Unstructured pruning (zeroing single weights) keeps every tensor's shape and saves nothing on a CPU. Here
each channel *group* (channels that must go together because a residual sum or a layer ties them) gets an
importance, the least important fraction is cut out of every tensor that touches it, and the result is a
genuinely narrower network of the same architecture, rebuilt from its widths (stored as architecture
arguments in ``bundle.json``).

A channel's importance is what it contributes to the layers that read it, measured on training images:
the mean absolute activation of the channel times the L1 norm of the weights that read it, summed over its
readers (each reader's scores divided by their mean): a first-order estimate of the change its removal
causes (in the spirit of Molchanov et al., *Importance Estimation for Neural Network Pruning*, CVPR 2019).
Without images, the batch-norm scale ``|gamma|`` of the layers that write the channel stands in ("network
slimming", Liu et al., ICCV 2017). Removing channels shifts the statistics downstream, so the batch-norm
running statistics of the pruned network are re-estimated on the same images; a short fine-tune on the
training split (:func:`medclf.compress.finetune.finetune`) then recovers the accuracy.

Pruners are registered per model class; the compact CNNs (``compact``, ``compact-s``, ``compact-l``) have one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medclf.errors import ConfigError
from medclf.models import create_model
from medclf.models.compact import CompactCNN, ResidualBlock

# Keep a multiple of this many channels where a group has at least twice as many: vectorised kernels
# (oneDNN, ONNX Runtime's int8 convolutions) run fastest on such widths.
CHANNEL_MULTIPLE = 8


@dataclass
class PruneResult:
    model: nn.Module
    arch_kwargs: dict[str, Any]
    params_before: int
    params_after: int
    groups: dict[str, tuple[int, int]]  # group -> (channels before, channels kept)


# (model, amount, calibration images or None) -> (the narrower network's state dict, the architecture
#   arguments that build it, channel group -> (channels before, channels kept))
Pruner = Callable[
    [nn.Module, float, np.ndarray | None],
    tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, tuple[int, int]]],
]
_PRUNERS: dict[type[nn.Module], Pruner] = {}


def register_pruner(cls: type[nn.Module]) -> Callable[[Pruner], Pruner]:
    def decorate(fn: Pruner) -> Pruner:
        _PRUNERS[cls] = fn
        return fn

    return decorate


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_model(
    model: nn.Module,
    amount: float,
    *,
    arch: str,
    in_channels: int,
    n_classes: int,
    spatial_dims: int,
    arch_kwargs: dict[str, Any],
    calibration: np.ndarray | None = None,
) -> PruneResult:
    """Remove the fraction ``amount`` (0 < amount < 1) of the channels of every prunable group of ``model``
    (an instance of the registered architecture ``arch`` built with ``arch_kwargs``); return the narrower
    network, rebuilt through the model registry, and the architecture arguments that rebuild it.
    ``calibration``: preprocessed training images ``(N, C, ...)`` that rank the channels and re-estimate the
    batch-norm statistics (see the module docstring)."""
    if not 0.0 < amount < 1.0:
        raise ConfigError(f"--prune takes the fraction of channels to remove, between 0 and 1 (got {amount})")
    pruner = next((fn for cls, fn in _PRUNERS.items() if isinstance(model, cls)), None)
    if pruner is None:
        supported = ", ".join(sorted(c.__name__ for c in _PRUNERS))
        raise ConfigError(
            f"structured pruning is not available for {arch!r} ({type(model).__name__}); "
            f"it is for: {supported} (the compact architectures)"
        )
    state, new_kwargs, groups = pruner(model.eval(), amount, calibration)
    kwargs = {**arch_kwargs, **new_kwargs}
    pruned = create_model(arch, in_channels, n_classes, spatial_dims, **kwargs)
    pruned.load_state_dict(state, strict=True)
    if calibration is not None and len(calibration):
        recalibrate_batch_norm(pruned, calibration)
    return PruneResult(pruned.eval(), kwargs, n_params(model), n_params(pruned), groups)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, x: np.ndarray, batch_size: int = 64) -> None:
    """Re-estimate every batch norm's running mean and variance on ``x`` (a cumulative average over the
    batches), leaving the weights alone."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    bs = batch_size if len(x) >= 2 * batch_size else len(x)  # no ragged last batch: equal weights
    try:
        for start in range(0, len(x) - bs + 1, bs):
            model(torch.as_tensor(np.asarray(x[start : start + bs])).float())
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()


@torch.no_grad()
def activation_importance(
    model: nn.Module, readers: dict[str, list[str]], x: np.ndarray, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """For each channel group, the sum over the modules that read it (``readers``: group -> module names)
    of mean |input channel| x L1 norm of the weights reading that channel, normalised per reader."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            a = inputs[0].detach().float().abs()
            per_channel = a.sum(dim=[d for d in range(a.ndim) if d != 1])
            sums[name] = sums.get(name, 0) + per_channel

        return record

    names = sorted({n for group in readers.values() for n in group})
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        model.eval()
        for start in range(0, len(x), batch_size):
            model(torch.as_tensor(np.asarray(x[start : start + batch_size])).float())
    finally:
        for h in handles:
            h.remove()
    scores: dict[str, torch.Tensor] = {}
    for group, group_readers in readers.items():
        total = None
        for n in group_readers:
            w = modules[n].weight.detach().float().abs()
            w_norm = w.sum(dim=[d for d in range(w.ndim) if d != 1])
            s = sums[n] * w_norm
            s = s / s.mean().clamp_min(1e-12)
            total = s if total is None else total + s
        assert total is not None
        scores[group] = total
    return scores


def keep_count(channels: int, amount: float) -> int:
    keep = max(1, round(channels * (1.0 - amount)))
    if channels >= 2 * CHANNEL_MULTIPLE:
        keep = max(CHANNEL_MULTIPLE, CHANNEL_MULTIPLE * round(keep / CHANNEL_MULTIPLE))
    return min(keep, channels)


def _scale_importance(bn: nn.Module) -> torch.Tensor:
    g = cast(torch.Tensor, bn.weight).detach().abs().float()
    return g / g.mean().clamp_min(1e-12)


@register_pruner(CompactCNN)
def _prune_compact(
    model: nn.Module, amount: float, calibration: np.ndarray | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, tuple[int, int]]]:
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, ResidualBlock)]
    if len(blocks) != 4 or not isinstance(blocks[0][1].shortcut, nn.Identity):
        raise ConfigError("unexpected CompactCNN layout: cannot prune it")
    modules = dict(model.named_modules())
    # The stem's batch norm: stem.1, or stem.2 when its max-pool comes first (stem_pool_first).
    stem_bn = next(
        f"stem.{i}"
        for i, m in enumerate(cast(nn.Sequential, model.stem))
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    # Producers of each channel group: the batch norms that write those channels.
    producers: dict[str, list[str]] = {"w1": [stem_bn, f"{blocks[0][0]}.bn2"]}
    # (state-dict prefix, group of its output channels, group of its input channels)
    layout: list[tuple[str, str | None, str | None]] = [("stem.0", "w1", None), (stem_bn, "w1", None)]
    previous = "w1"
    for i, (name, _block) in enumerate(blocks, start=1):
        out = "w1" if i == 1 else f"w{i}"
        mid = f"m{i}"
        producers[mid] = [f"{name}.bn1"]
        layout += [
            (f"{name}.conv1", mid, previous),
            (f"{name}.bn1", mid, None),
            (f"{name}.conv2", out, mid),
            (f"{name}.bn2", out, None),
        ]
        if i > 1:
            producers[out] = [f"{name}.bn2", f"{name}.shortcut.1"]
            layout += [(f"{name}.shortcut.0", out, previous), (f"{name}.shortcut.1", out, None)]
        previous = out
    head = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    layout.append((head, None, previous))

    keep: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[int, int]] = {}
    if calibration is not None and len(calibration):
        readers: dict[str, list[str]] = {}
        for prefix, _out_group, in_group in layout:
            if in_group is not None:
                readers.setdefault(in_group, []).append(prefix)
        scores = activation_importance(model, readers, calibration)
    else:
        scores = {
            g: cast(torch.Tensor, sum(_scale_importance(modules[b]) for b in bns))
            for g, bns in producers.items()
        }
    for group, score in scores.items():
        n = len(score)
        k = keep_count(n, amount)
        keep[group] = torch.sort(torch.topk(score, k).indices).values
        groups[group] = (n, k)

    state = model.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for prefix, out_group, in_group in layout:
        for key, value in state.items():
            if not key.startswith(prefix + "."):
                continue
            covered.add(key)
            t = value
            if t.ndim >= 1 and out_group is not None:
                t = t.index_select(0, keep[out_group])
            if t.ndim >= 2 and in_group is not None:
                t = t.index_select(1, keep[in_group])
            new_state[key] = t.clone()
    # Everything else (the head's bias, counters) is copied unchanged.
    for key, value in state.items():
        if key not in covered:
            new_state[key] = value.clone()
    kwargs = {
        "widths": [len(keep[g]) for g in ("w1", "w2", "w3", "w4")],
        "mid_widths": [len(keep[f"m{i}"]) for i in range(1, 5)],
    }
    return new_state, kwargs, groups
