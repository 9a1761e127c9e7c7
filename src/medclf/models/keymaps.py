"""Weights from elsewhere: rename a foreign state dict (torchvision/timm names) to a registered network's,
and match it against that network, refusing what does not fit with the names that do not.

Each key map is a list of regular-expression rules applied in order to every foreign name. torchvision's
and timm's ResNets already use MONAI's names (``conv1``, ``layer1.0.bn1``, ``fc``); their downsampling
convolution has no bias where MONAI's has one, so a missing ``downsample.0.bias`` is filled with zeros (the
same function). Their DenseNets put a dense layer's modules directly under it (``denselayer1.norm1``, or
``norm.1`` in old checkpoints) where MONAI nests them under ``layers``, and call the output layer
``classifier`` where MONAI says ``class_layers.out``. A ``module.`` prefix (DataParallel/DDP) is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from medclf.errors import ConfigError

_COMMON = [(r"^module\.", "")]
KEYMAPS: dict[str, list[tuple[str, str]]] = {
    "resnet": [],
    "densenet": [
        (r"(denselayer\d+)\.(norm|relu|conv)\.(\d)\.", r"\1.\2\3."),  # torchvision's old "norm.1" names
        (r"(denselayer\d+)\.((?:norm|relu|conv)\d)\.", r"\1.layers.\2."),
        (r"^classifier\.", "class_layers.out."),
    ],
    "compact": [],
}
# Tensors a foreign network may lack because they are zero in it (a convolution without bias).
ZERO_IF_MISSING = {"resnet": [r"downsample\.0\.bias$"]}
# Counters a checkpoint may lack (older PyTorch): the network keeps its own.
OPTIONAL = [r"num_batches_tracked$"]


def family(arch: str) -> str:
    """The key-map family of a registered architecture (``resnet18`` -> ``resnet``)."""
    for name in KEYMAPS:
        if arch.startswith(name):
            return name
    return arch


def rename(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its names mapped to ``arch``'s (names that already fit are left as they are)."""
    rules = _COMMON + KEYMAPS.get(family(arch), [])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


def output_keys(model: nn.Module) -> list[str]:
    """The state-dict names of the network's output layer (its last ``nn.Linear``): the classifier head."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return []
    name, layer = linears[-1]
    return [f"{name}.{k}" for k in layer.state_dict()]


def strip_output(model: nn.Module) -> int:
    """Replace the network's output layer by an identity, in place (the network then returns the features
    its head saw); return the number of those features."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no linear output layer to replace")
    name, layer = linears[-1]
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return int(layer.in_features)


@dataclass
class Match:
    """How a foreign state dict fits a network: the tensors to load, and what does not fit."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: [foreign shape] vs [network shape]"
    fresh_head: bool = False

    def check(self, label: str) -> None:
        """Raise :class:`ConfigError` in one line naming the keys that do not fit (the first few of each)."""
        parts = []
        for what, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("wrong shape", self.mismatched),
        ):
            if keys:
                more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
                parts.append(f"{what}: {', '.join(keys[:4])}{more}")
        if parts:
            raise ConfigError(f"{label}: the weights do not fit the network ({'; '.join(parts)})")


def match_state(
    arch: str, model: nn.Module, state: Mapping[str, torch.Tensor], *, new_head: bool = True
) -> Match:
    """Match the (already renamed) ``state`` against ``model`` of architecture ``arch``. With ``new_head``
    the output layer may be absent or of another shape (it starts afresh); every other tensor must be there
    with the network's shape, and no other tensor may be in ``state``."""
    own = model.state_dict()
    head = set(output_keys(model)) if new_head else set()
    zero_ok = ZERO_IF_MISSING.get(family(arch), [])
    result = Match()
    for key, value in own.items():
        w = state.get(key)
        if w is None:
            if key in head or any(re.search(p, key) for p in OPTIONAL):
                result.fresh_head |= key in head
                continue
            if any(re.search(p, key) for p in zero_ok):
                result.tensors[key] = torch.zeros_like(value)
                continue
            result.missing.append(key)
        elif tuple(w.shape) != tuple(value.shape):
            if key in head:
                result.fresh_head = True
                continue
            result.mismatched.append(f"{key} {list(w.shape)} vs {list(value.shape)}")
        else:
            result.tensors[key] = w.to(value.dtype)
    result.unexpected = sorted(k for k in state if k not in own)
    return result
