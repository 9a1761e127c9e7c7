"""Training-time augmentation: named presets of random transforms applied to whole batches.

Every transform first *samples* its parameters (one set per sample, from a seeded ``torch.Generator``),
then calls a deterministic ``apply(x, params)``: any augmented sample can be reproduced from its
parameters (the TorchIO pattern). Transforms act on batches ``(B, C, *spatial)`` at once, so
augmentation costs a few per cent of a CPU training step instead of dominating it.

Inputs are expected in [0, 1] (the default preprocessing); intensity transforms clamp back to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from medclf.errors import ConfigError

Params = dict[str, torch.Tensor]


class BatchTransform:
    """Base class: ``sample`` draws per-sample parameters, ``apply`` is their deterministic twin."""

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(x, gen))


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


@dataclass
class RandomFlip(BatchTransform):
    """Mirror along the given spatial axes (0 = first spatial axis) with probability ``p`` each."""

    axes: tuple[int, ...] = (-1,)
    p: float = 0.5

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        return {"flip": torch.rand(x.shape[0], len(self.axes), generator=gen) < self.p}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        out = x.clone()
        for j, axis in enumerate(self.axes):
            dim = axis if axis < 0 else axis + 2
            sel = params["flip"][:, j]
            if sel.any():
                out[sel] = out[sel].flip(dim)
        return out


@dataclass
class RandomAffine(BatchTransform):
    """Rotation (degrees, in the last two axes), isotropic scale and translation (fraction of size)."""

    degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    p: float = 0.8

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        n = x.shape[0]
        active = torch.rand(n, generator=gen) < self.p
        nd = x.ndim - 2
        return {
            "angle": _uniform(n, -self.degrees, self.degrees, gen) * active,
            "scale": torch.where(active, _uniform(n, *self.scale, gen), torch.ones(n)),
            "shift": (torch.rand(n, nd, generator=gen) * 2 - 1) * self.translate * 2 * active[:, None],
        }

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        n, nd = x.shape[0], x.ndim - 2
        theta = torch.zeros(n, nd, nd + 1, dtype=torch.float32)
        a = params["angle"] * math.pi / 180
        s = 1.0 / params["scale"]  # the grid maps output to input: zoom in = shrink the grid
        cos, sin = torch.cos(a) * s, torch.sin(a) * s
        for i in range(nd):
            theta[:, i, i] = s
        # Rotate in the plane of the last two spatial axes (in-plane for axial slices and volumes).
        theta[:, nd - 2, nd - 2], theta[:, nd - 2, nd - 1] = cos, -sin
        theta[:, nd - 1, nd - 2], theta[:, nd - 1, nd - 1] = sin, cos
        # affine_grid orders coordinates x, y(, z): reverse the spatial axes of the shift.
        theta[:, :, nd] = params["shift"].flip(-1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(
            x.dtype
        )


@dataclass
class RandomIntensity(BatchTransform):
    """Brightness shift, contrast factor (around the image mean) and gamma, clamped to [0, 1]."""

    brightness: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.25)
    gamma: tuple[float, float] = (0.8, 1.25)
    p: float = 0.8

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        n = x.shape[0]
        active = torch.rand(n, generator=gen) < self.p
        one = torch.ones(n)
        lg = (math.log(self.gamma[0]), math.log(self.gamma[1]))
        lc = (math.log(self.contrast[0]), math.log(self.contrast[1]))
        return {
            "brightness": _uniform(n, -self.brightness, self.brightness, gen) * active,
            "contrast": torch.where(active, torch.exp(_uniform(n, *lc, gen)), one),
            "gamma": torch.where(active, torch.exp(_uniform(n, *lg, gen)), one),
        }

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        dims = tuple(range(1, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        y = (x - mean) * _bcast(params["contrast"], x) + mean + _bcast(params["brightness"], x)
        y = y.clamp(0.0, 1.0)
        return y.pow(_bcast(params["gamma"], x))


@dataclass
class RandomNoise(BatchTransform):
    """Additive Gaussian noise with a per-sample standard deviation in [0, ``std``]."""

    std: float = 0.03
    p: float = 0.5

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        n = x.shape[0]
        active = torch.rand(n, generator=gen) < self.p
        return {
            "std": _uniform(n, 0.0, self.std, gen) * active,
            "noise": torch.randn(x.shape, generator=gen),
        }

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return (x + params["noise"].to(x.dtype) * _bcast(params["std"], x)).clamp(0.0, 1.0)


@dataclass
class Compose(BatchTransform):
    transforms: list[BatchTransform] = field(default_factory=list)

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        raise NotImplementedError("Compose samples lazily: each transform sees the previous output")

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, gen)
        return x

    def with_params(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, list[Params]]:
        """Augment and also return every transform's parameters (to reproduce or display them)."""
        record = []
        for t in self.transforms:
            p = t.sample(x, gen)
            record.append(p)
            x = t.apply(x, p)
        return x, record

    def replay(self, x: torch.Tensor, record: list[Params]) -> torch.Tensor:
        for t, p in zip(self.transforms, record, strict=True):
            x = t.apply(x, p)
        return x


PresetBuilder = Callable[[int], Compose]
_PRESETS: dict[str, tuple[PresetBuilder, str]] = {}


def register_preset(name: str, description: str) -> Callable[[PresetBuilder], PresetBuilder]:
    def decorate(fn: PresetBuilder) -> PresetBuilder:
        _PRESETS[name] = (fn, description)
        return fn

    return decorate


def list_presets() -> dict[str, str]:
    return {k: v[1] for k, v in sorted(_PRESETS.items())}


def build_augmentation(name: str, spatial_dims: int = 2) -> Compose:
    if name not in _PRESETS:
        raise ConfigError(
            f"unknown augmentation preset {name!r}; choose one of {', '.join(sorted(_PRESETS))}"
        )
    return _PRESETS[name][0](spatial_dims)


@register_preset("none", "no augmentation")
def _none(spatial_dims: int) -> Compose:
    return Compose([])


@register_preset("light", "left-right flips, small rotations/zoom/shift, mild brightness/contrast/gamma")
def _light(spatial_dims: int) -> Compose:
    return Compose(
        [
            RandomFlip(axes=(-1,)),
            RandomAffine(degrees=10, scale=(0.92, 1.08), translate=0.04),
            RandomIntensity(brightness=0.05, contrast=(0.85, 1.18), gamma=(0.85, 1.18)),
        ]
    )


@register_preset("standard", "flips, rotation +-15 deg, zoom 0.85-1.15, shift, contrast/gamma, noise")
def _standard(spatial_dims: int) -> Compose:
    return Compose(
        [
            RandomFlip(axes=(-1,)),
            RandomAffine(degrees=15, scale=(0.85, 1.15), translate=0.06),
            RandomIntensity(brightness=0.08, contrast=(0.8, 1.25), gamma=(0.75, 1.33)),
            RandomNoise(std=0.03, p=0.3),
        ]
    )


def describe(name: str) -> dict[str, Any]:
    """The preset and its transforms' settings, for bundle.json and the report."""
    comp = build_augmentation(name)
    return {"preset": name, "transforms": [repr(t) for t in comp.transforms]}
