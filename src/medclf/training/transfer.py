"""What ``--init-from`` starts from: a classifier bundle, a backbone bundle (``medclf pretrain``: no output
layer, so a new head) or a plain safetensors state dict of a registered architecture (torchvision/timm
names mapped by :mod:`medclf.models.keymaps`), checked against the planned network before any data is read:
weights that do not fit are refused in one line naming the keys."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medclf import reporting
from medclf.bundle import load_bundle, omitted_keys, sha256_file
from medclf.errors import ConfigError
from medclf.models import create_model
from medclf.models.keymaps import match_state, rename
from medclf.planner import Plan
from medclf.preprocess import PreprocessSpec


@dataclass
class TransferSource:
    """A verified ``--init-from`` source: ``kind`` is ``bundle``, ``backbone`` or ``state_dict``."""

    kind: str
    path: Path
    sha256: str
    arch: str | None = None  # None for a state dict: --arch says
    spec: PreprocessSpec | None = None  # None for a state dict: the planner's
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)


def is_state_dict_file(path: Path) -> bool:
    return path.is_file() and not zipfile.is_zipfile(path) and path.suffix.lower() == ".safetensors"


def open_source(path: str | Path) -> TransferSource:
    """Load and verify the source (a bundle's hashes; a state dict's sha256 is recorded and pinned)."""
    p = Path(path)
    if is_state_dict_file(p):
        return TransferSource("state_dict", p, sha256_file(p))
    b = load_bundle(p)
    kind = "backbone" if b.manifest.get("kind") == "backbone" else "bundle"
    kwargs = dict(b.manifest["model"].get("kwargs", {}))
    return TransferSource(kind, b.path, b.sha256, b.arch, b.spec, kwargs, list(b.classes))


def read_state_dict(path: Path, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (``meta``: shapes only, nothing read into memory)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            if meta:
                return {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}  # noqa: SIM118
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"--init-from {path}: not a readable safetensors file ({exc})") from None


def check_state_dict(source: TransferSource, plan: Plan, n_outputs: int) -> None:
    """Refuse a state dict that does not fit the planned network (names after the key map, and shapes)."""
    state = rename(plan.arch, read_state_dict(source.path, meta=True))
    _fit_stem(plan, state)
    with torch.device("meta"):
        network = create_model(
            plan.arch, plan.spec.channels, n_outputs, plan.spec.spatial_dims, **plan.arch_kwargs
        )
    match_state(plan.arch, network, state).check(f"--init-from {source.path} ({plan.arch})")


def _fit_stem(plan: Plan, state: dict[str, torch.Tensor]) -> None:
    """A ResNet's stem is the state dict's: 7x7/2 with max-pooling as torchvision and timm train it on
    ImageNet, or medclf's 3x3/1 for small inputs; the planner's choice by input size gives way to it."""
    conv1 = state.get("conv1.weight")
    if "small_input" not in plan.arch_kwargs or conv1 is None or conv1.ndim < 3:
        return
    small = int(conv1.shape[-1]) == 3
    if small != bool(plan.arch_kwargs["small_input"]):
        plan.arch_kwargs = {**plan.arch_kwargs, "small_input": small}
        kernel = "x".join(str(int(k)) for k in conv1.shape[2:])
        plan.reasons.append(
            f"--init-from: the state dict's {kernel} stem ({'3x3/1' if small else '7x7/2, max-pool'})"
        )


def load_weights(model: nn.Module, plan: Plan, classes: list[str]) -> None:
    """Copy the ``--init-from`` source's weights (pinned by its sha256) into ``model``. A bundle's output
    rows follow the class names when it knows the same classes (in any order); a head of another shape, a
    backbone's missing head and a state dict's head start afresh."""
    assert plan.init_from is not None
    kind = plan.init_from.get("kind", "bundle")
    path = Path(plan.init_from["path"])
    if kind == "state_dict":
        if sha256_file(path) != plan.init_from["sha256"]:
            raise ConfigError(f"--init-from {path}: the file changed since the run was planned")
        match = match_state(plan.arch, model, rename(plan.arch, read_state_dict(path)))
        match.check(f"--init-from {path} ({plan.arch})")
        own = model.state_dict()
        own.update(match.tensors)
        model.load_state_dict(own)
        fresh = sorted(set(own) - set(match.tensors))
        if fresh:
            reporting.current().print(f"  new (randomly initialised) weights: {', '.join(fresh)}")
        return
    source = load_bundle(path, expected_sha256=plan.init_from["sha256"])
    skip = set(omitted_keys(source.manifest))
    src_state = {k: v for k, v in source.model.state_dict().items() if k not in skip}
    own = model.state_dict()
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
        reporting.current().print(f"  new (randomly initialised) weights: {', '.join(fresh)}")


def _is_output_row_tensor(model: nn.Module, key: str) -> bool:
    # The last Linear layer's weight and bias have one row per class.
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return bool(last) and key.rsplit(".", 1)[0] == last[-1]
