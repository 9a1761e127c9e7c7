"""Training-time augmentation: named presets of random transforms applied to whole batches.

Every transform first *samples* its parameters (one set per sample, from a seeded ``torch.Generator``),
then calls a deterministic ``apply(x, params)``: any augmented sample can be reproduced from its
parameters (the TorchIO pattern). Transforms act on batches ``(B, C, *spatial)`` at once, so
augmentation costs a few per cent of a CPU training step instead of dominating it.

Two kinds of transforms:

* geometry and global intensity (flips, affine, brightness/contrast/gamma, Gaussian noise) are written
  here as *batched* tensor operations, because they run on every sample of every step and per-sample
  calls would dominate a CPU training step;
* everything else - elastic deformation, Rician noise, blur and the MRI artefacts (bias field, Gibbs
  ringing, k-space spikes) - are MONAI transforms (:class:`MonaiTransform`), applied to the sampled
  subset of a batch, one sample at a time, each with its own sampled seed. MONAI has no motion/ghosting
  transform, so :class:`RandomGhosting` implements the k-space ghosting model of TorchIO
  (Pérez-García et al. 2021, after Shaw et al. 2019, "MRI k-space motion artefact augmentation").

Inputs are expected in [0, 1] (the default preprocessing); intensity transforms clamp back to it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

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


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # Per-sample transforms on small tensors are several times faster single-threaded (thread start-up
    # dominates); the network's own kernels get the threads back afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# MONAI random transforms by name: (spatial shape) -> transform with prob=1 (we decide who gets it).
def _monai_factories() -> dict[str, Callable[..., Any]]:
    from monai import transforms as mt

    def elastic(shape: tuple[int, ...], magnitude: tuple[float, float] = (0.5, 1.5)) -> Any:
        if len(shape) != 2:
            raise ConfigError("elastic deformation is implemented for 2D images only")
        # Control points every ~1/6 of the image: smooth, anatomically plausible warps.
        spacing = (max(4, shape[0] // 6), max(4, shape[1] // 6))
        return mt.Rand2DElastic(
            spacing=spacing, magnitude_range=magnitude, prob=1.0, padding_mode="zeros", mode="bilinear"
        )

    return {
        "elastic": elastic,
        "bias_field": lambda shape, coeff=(0.0, 0.25): mt.RandBiasField(
            degree=3, coeff_range=coeff, prob=1.0
        ),
        "gibbs": lambda shape, alpha=(0.2, 0.55): mt.RandGibbsNoise(alpha=alpha, prob=1.0),
        "kspace_spike": lambda shape, intensity=None: mt.RandKSpaceSpikeNoise(
            intensity_range=intensity, prob=1.0
        ),
        "rician": lambda shape, std=0.04: mt.RandRicianNoise(std=std, sample_std=True, prob=1.0),
        "blur": lambda shape, sigma=(0.3, 1.0): mt.RandGaussianSmooth(
            **{f"sigma_{a}": sigma for a in "xyz"[: len(shape)]}, prob=1.0
        ),
    }


@dataclass
class MonaiTransform(BatchTransform):
    """A MONAI random transform applied with probability ``p`` to each sample of a batch.

    The parameters sampled here are, per sample, whether it is transformed and a 31-bit seed; applying
    the MONAI transform after ``set_random_state(seed)`` is deterministic, so the seed reproduces the
    augmented sample exactly. ``keep_mean`` rescales the result to the input's mean intensity (a bias
    field multiplies the image by a smooth positive field: without it, brightness would drift too).
    """

    name: str
    p: float = 0.2
    options: dict[str, Any] = field(default_factory=dict)
    keep_mean: bool = False

    def __post_init__(self) -> None:
        if self.name not in _monai_factories():
            raise ConfigError(f"unknown MONAI transform {self.name!r}")
        self._cache: dict[tuple[int, ...], Any] = {}

    def _get(self, shape: tuple[int, ...]) -> Any:
        if shape not in self._cache:
            self._cache[shape] = _monai_factories()[self.name](shape, **self.options)
        return self._cache[shape]

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        n = x.shape[0]
        return {
            "active": torch.rand(n, generator=gen) < self.p,
            "seed": torch.randint(0, 2**31 - 1, (n,), generator=gen),
        }

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        idx = torch.nonzero(params["active"]).flatten().tolist()
        if not idx:
            return x
        out = x.clone()
        t = self._get(tuple(x.shape[2:]))
        with _one_thread():
            for i in idx:
                t.set_random_state(seed=int(params["seed"][i]))
                y = torch.as_tensor(t(x[i].float())).as_subclass(torch.Tensor).float()
                if self.keep_mean:
                    y = y * (x[i].float().mean() / y.mean().clamp_min(1e-6))
                out[i] = y.clamp(0.0, 1.0).to(x.dtype)
        return out


@dataclass
class RandomGhosting(BatchTransform):
    """MRI motion ghosting: every ``k``-th k-space line along one in-plane axis is scaled by
    ``1 - strength``, which adds ``k`` faint shifted copies of the image (TorchIO's ``RandomGhosting``)."""

    ghosts: tuple[int, int] = (2, 6)
    strength: tuple[float, float] = (0.3, 0.7)
    p: float = 0.1

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        n = x.shape[0]
        return {
            "active": torch.rand(n, generator=gen) < self.p,
            "ghosts": torch.randint(self.ghosts[0], self.ghosts[1] + 1, (n,), generator=gen),
            "axis": torch.randint(0, 2, (n,), generator=gen),
            "strength": _uniform(n, *self.strength, gen),
        }

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        idx = torch.nonzero(params["active"]).flatten().tolist()
        if not idx:
            return x
        out = x.clone()
        for i in idx:
            dim = x.ndim - 3 + int(params["axis"][i])  # one of the last two axes of the sample
            img = x[i].float()
            k = torch.fft.fftn(img, dim=(-2, -1))
            n_lines = img.shape[dim]
            mask = torch.ones(n_lines)
            mask[:: int(params["ghosts"][i])] = 1.0 - float(params["strength"][i])
            mask[0] = 1.0  # keep the centre of k-space (in unshifted order): the image's contrast
            shape = [1] * img.ndim
            shape[dim] = n_lines
            y = torch.fft.ifftn(k * mask.view(shape), dim=(-2, -1)).abs()
            out[i] = y.clamp(0.0, 1.0).to(x.dtype)
        return out


# Transforms that make acquisition cues uninformative (``medclf train --shortcut-mitigation``): when one
# source supplied most images of a class, its resolution, compression, padding and contrast style separate
# the classes without any anatomy. Randomising exactly those properties during training takes the shortcut
# away (the idea of "acquisition augmentation" against site confounds: e.g. Zech et al. 2018, PLOS Med.
# 15:e1002683, on how CNNs detect the hospital; Ilse et al. / Glocker et al. on scanner effects).


class SingleThreadedTransform(BatchTransform):
    """A transform whose ``_apply`` loops over samples on small tensors: run it on one thread."""

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        with _one_thread():
            return self._apply(x, params)

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class RandomResolution(SingleThreadedTransform):
    """Resolution loss: shrink (anti-aliased) by a factor in ``factor`` and enlarge back, so that images
    from low-resolution sources are not the only blurry ones."""

    factor: tuple[float, float] = (1.0, 4.0)
    p: float = 0.5

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        n = x.shape[0]
        lf = (math.log(self.factor[0]), math.log(self.factor[1]))
        return {
            "active": torch.rand(n, generator=gen) < self.p,
            "factor": torch.exp(_uniform(n, *lf, gen)),
        }

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        idx = torch.nonzero(params["active"]).flatten().tolist()
        if not idx:
            return x
        out = x.clone()
        spatial = tuple(x.shape[2:])
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        for i in idx:
            small = tuple(max(4, round(s / float(params["factor"][i]))) for s in spatial)
            xi = x[i : i + 1].float()
            if len(spatial) == 2:
                y = F.interpolate(xi, size=small, mode=mode, antialias=True, align_corners=False)
            else:
                y = F.adaptive_avg_pool3d(xi, cast("tuple[int, int, int]", small))
            y = F.interpolate(y, size=spatial, mode=mode, align_corners=False)
            out[i] = y[0].clamp(0.0, 1.0).to(x.dtype)
        return out


@dataclass
class RandomJpeg(SingleThreadedTransform):
    """JPEG re-compression at a random quality in ``quality`` (Pillow, 8 bits): blocking and ringing of
    strongly compressed sources stop being a class cue. 2D only (volumes pass unchanged)."""

    quality: tuple[int, int] = (25, 95)
    p: float = 0.3

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        n = x.shape[0]
        return {
            "active": torch.rand(n, generator=gen) < self.p,
            "quality": torch.randint(self.quality[0], self.quality[1] + 1, (n,), generator=gen),
        }

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        idx = torch.nonzero(params["active"]).flatten().tolist()
        if not idx or x.ndim != 4:
            return x
        import io

        import numpy as np
        from PIL import Image as PILImage

        out = x.clone()
        for i in idx:
            q = int(params["quality"][i])
            channels = []
            for c in range(x.shape[1]):
                arr = (x[i, c].float().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).numpy()
                buf = io.BytesIO()
                PILImage.fromarray(arr).save(buf, format="JPEG", quality=q)
                buf.seek(0)
                with PILImage.open(buf) as im:
                    channels.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
            out[i] = torch.stack(channels).to(x.dtype)
        return out


@dataclass
class RandomPadding(SingleThreadedTransform):
    """Random letterboxing: the image shrinks into a box with a random margin on each side (up to
    ``max_fraction`` of the size) filled with a random dark value, so padding and framing vary within
    every class instead of between sources."""

    max_fraction: float = 0.15
    max_fill: float = 0.1
    p: float = 0.3

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        n, nd = x.shape[0], x.ndim - 2
        return {
            "active": torch.rand(n, generator=gen) < self.p,
            "margins": torch.rand(n, nd, 2, generator=gen) * self.max_fraction,
            "fill": torch.rand(n, generator=gen) * self.max_fill,
        }

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        idx = torch.nonzero(params["active"]).flatten().tolist()
        if not idx:
            return x
        out = x.clone()
        spatial = tuple(x.shape[2:])
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        for i in idx:
            m = params["margins"][i]
            before = [round(float(m[a, 0]) * s) for a, s in enumerate(spatial)]
            after = [round(float(m[a, 1]) * s) for a, s in enumerate(spatial)]
            inner = [s - b - e for s, b, e in zip(spatial, before, after, strict=True)]
            if min(inner) < 4:
                continue
            y = F.interpolate(x[i : i + 1].float(), size=tuple(inner), mode=mode, align_corners=False)
            canvas = torch.full((1, x.shape[1], *spatial), float(params["fill"][i]))
            box = tuple(slice(b, b + s) for b, s in zip(before, inner, strict=True))
            canvas[(slice(None), slice(None), *box)] = y
            out[i] = canvas[0].clamp(0.0, 1.0).to(x.dtype)
        return out


@dataclass
class RandomHistogram(SingleThreadedTransform):
    """Histogram and contrast randomisation: a random monotone piecewise-linear intensity curve
    (``knots`` segments; each segment's share of the output range drawn uniformly, then normalised),
    blended with the image's own histogram equalisation by a random strength in [0, ``max_equalise``].
    Different sources' contrast styles (windowing, gamma, equalisation) then overlap."""

    knots: int = 4
    max_equalise: float = 0.5
    p: float = 0.5

    def sample(self, x: torch.Tensor, gen: torch.Generator) -> Params:
        n = x.shape[0]
        active = torch.rand(n, generator=gen) < self.p
        steps = 0.3 + torch.rand(n, self.knots, generator=gen)
        return {
            "active": active,
            "steps": steps / steps.sum(dim=1, keepdim=True),
            "equalise": torch.rand(n, generator=gen) * self.max_equalise,
        }

    def _apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        active = params["active"]
        if not active.any():
            return x
        out = x.clone()
        # Batched over the active samples: flattened pixels (n, N), one curve and one histogram per row.
        xi = x[active].float().clamp(0.0, 1.0).flatten(1)
        k = self.knots
        ys = torch.cat([torch.zeros(len(xi), 1), torch.cumsum(params["steps"][active], 1)], dim=1)
        seg = (xi * k).floor().clamp(max=k - 1).long()
        frac = xi * k - seg
        lo, hi = ys.gather(1, seg), ys.gather(1, seg + 1)
        y = lo + frac * (hi - lo)
        alpha = params["equalise"][active].float()[:, None]
        bins = 256
        level = (xi * (bins - 1)).round().long()
        hist = torch.zeros(len(xi), bins).scatter_add_(1, level, torch.ones_like(xi))
        cdf = torch.cumsum(hist, 1) / xi.shape[1]
        y = (1 - alpha) * y + alpha * cdf.gather(1, level)
        out[active] = y.clamp(0.0, 1.0).reshape(-1, *x.shape[1:]).to(x.dtype)
        return out


def decue_transforms(spatial_dims: int) -> list[BatchTransform]:
    """The transforms of the ``decue`` preset (appended to the planned preset by the shortcut mitigation)."""
    steps: list[BatchTransform] = [
        RandomPadding(),
        RandomResolution(),
        RandomHistogram(),
    ]
    if spatial_dims == 2:
        steps.append(RandomJpeg())
    return steps


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
    """The preset ``name``; presets joined with ``+`` (``mri+decue``) run one after the other."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in _PRESETS]
    if unknown:
        raise ConfigError(
            f"unknown augmentation preset {unknown[0]!r}; choose one of {', '.join(sorted(_PRESETS))} "
            "(or several joined with +)"
        )
    return Compose([t for p in parts for t in _PRESETS[p][0](spatial_dims).transforms])


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


@register_preset(
    "mri",
    "light geometry and contrast + MRI artefacts: bias field, Gibbs ringing, k-space spikes, motion "
    "ghosting, Rician noise, blur (MONAI)",
)
def _mri(spatial_dims: int) -> Compose:
    return Compose(
        [
            RandomFlip(axes=(-1,)),
            RandomAffine(degrees=12, scale=(0.9, 1.1), translate=0.05),
            RandomIntensity(brightness=0.06, contrast=(0.8, 1.25), gamma=(0.8, 1.25)),
            MonaiTransform("bias_field", p=0.3, keep_mean=True),
            MonaiTransform("gibbs", p=0.15),
            MonaiTransform("kspace_spike", p=0.05),
            RandomGhosting(p=0.1),
            MonaiTransform("rician", p=0.2),
            MonaiTransform("blur", p=0.15),
        ]
    )


@register_preset(
    "xray",
    "no left-right flip (anatomy is lateralised), small rotation/zoom, elastic (2D), strong "
    "contrast/gamma, noise, blur",
)
def _xray(spatial_dims: int) -> Compose:
    steps: list[BatchTransform] = [RandomAffine(degrees=7, scale=(0.9, 1.1), translate=0.05)]
    if spatial_dims == 2:
        steps.append(MonaiTransform("elastic", p=0.2, options={"magnitude": (0.5, 1.0)}))
    steps += [
        RandomIntensity(brightness=0.08, contrast=(0.75, 1.33), gamma=(0.7, 1.4)),
        RandomNoise(std=0.03, p=0.3),
        MonaiTransform("blur", p=0.2),
    ]
    return Compose(steps)


@register_preset(
    "strong",
    "flips, rotation +-20 deg, zoom 0.8-1.2, elastic (2D), strong contrast/gamma, noise, blur, bias field, "
    "Gibbs ringing",
)
def _strong(spatial_dims: int) -> Compose:
    steps: list[BatchTransform] = [
        RandomFlip(axes=(-1,)),
        RandomAffine(degrees=20, scale=(0.8, 1.2), translate=0.08),
    ]
    if spatial_dims == 2:
        steps.append(MonaiTransform("elastic", p=0.3))
    steps += [
        RandomIntensity(brightness=0.12, contrast=(0.7, 1.4), gamma=(0.65, 1.5)),
        RandomNoise(std=0.04, p=0.4),
        MonaiTransform("blur", p=0.2),
        MonaiTransform("bias_field", p=0.2, keep_mean=True),
        MonaiTransform("gibbs", p=0.1),
    ]
    return Compose(steps)


@register_preset(
    "decue",
    "acquisition-cue randomisation against shortcuts: random padding, resolution loss, histogram/contrast "
    "curves, JPEG re-compression (2D)",
)
def _decue(spatial_dims: int) -> Compose:
    return Compose(decue_transforms(spatial_dims))


# Which preset suits which modality (DICOM Modality codes); the planner uses it when the data says.
MODALITY_PRESETS = {"MR": "mri", "CR": "xray", "DX": "xray", "RG": "xray", "MG": "xray"}


def preset_for_modality(modality: str | None) -> str | None:
    """The preset for a DICOM modality code, or None when no modality-specific preset applies."""
    return MODALITY_PRESETS.get((modality or "").upper())


def gallery(
    x: torch.Tensor, preset: str, *, n_views: int = 3, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``n_views`` augmented versions of the batch ``x`` (for the report's gallery of what training saw)."""
    aug = build_augmentation(preset, x.ndim - 2)
    gen = torch.Generator().manual_seed(seed)
    return x, [aug(x, gen) for _ in range(n_views)]


def describe(name: str) -> dict[str, Any]:
    """The preset and its transforms' settings, for bundle.json and the report."""
    comp = build_augmentation(name)
    return {
        "preset": name,
        "description": "; then ".join(_PRESETS[p][1] for p in name.split("+")),
        "transforms": [repr(t) for t in comp.transforms],
    }


# Batch mixing (``medclf train --mix mixup|cutmix``): pairs of training images are blended (MixUp, Zhang et al.
# 2018) or a box of one is pasted into the other (CutMix, Yun et al. 2019), and the targets are mixed in the
# same proportions. MONAI's transforms do the mixing; the default Beta(alpha, alpha) follows each paper's
# recommendation for small images (MixUp 0.4, CutMix 1.0).
MIX_METHODS: dict[str, tuple[str, float]] = {
    "none": ("no mixing", 0.0),
    "mixup": ("MixUp: blend pairs of images and their targets, weight ~ Beta(alpha, alpha)", 0.4),
    "cutmix": ("CutMix: paste a random box of one image into another; targets mixed by area", 1.0),
}


def check_mix(method: str, alpha: float | None = None) -> float:
    """Validate a mixing method and return the alpha to use (its default when ``alpha`` is None)."""
    if method not in MIX_METHODS:
        raise ConfigError(f"unknown --mix {method!r}; choose one of {', '.join(MIX_METHODS)}")
    if method == "none":
        return 0.0
    alpha = MIX_METHODS[method][1] if alpha is None else float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"--mix-alpha must be a positive number, not {alpha!r}")
    return alpha


def mix_batch(
    method: str, alpha: float, x: torch.Tensor, y: torch.Tensor, n_classes: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the batch ``x`` with a permutation of itself; return the images and soft targets ``(B, K)``.

    The pairing, the weights and the box come from one seed drawn from ``gen``, so a run resumed from a
    checkpoint (which saves ``gen``) mixes exactly as the uninterrupted run would have.
    """
    target = F.one_hot(y.long(), n_classes).float()
    if method == "none" or len(x) < 2:
        return x, target
    from monai.transforms import CutMix, MixUp

    mixer = (MixUp if method == "mixup" else CutMix)(batch_size=len(x), alpha=alpha)
    mixer.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    with warnings.catch_warnings():
        # MONAI 1.6's CutMix indexes with a list, which torch deprecates; the tests pin down its result.
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
        mixed = mixer(x)
        if method == "cutmix":
            # MONAI weighs CutMix targets by the box's nominal area, but a box clipped at the image border
            # pastes less than that: use the share of each image actually kept (found by mixing, with the
            # same draw, images whose pixels hold their own batch index).
            index = torch.arange(len(x), dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))).expand_as(x)
            kept = (mixer(index, randomize=False) == index).flatten(1).float().mean(1)
    weight, perm, _ = mixer._params  # what the call drew: per-sample weight and the partner of each sample
    if method == "cutmix":
        weight = kept
    # Targets are mixed here rather than by MONAI, whose MixUp accepts only image-shaped labels.
    weight = torch.as_tensor(weight, dtype=torch.float32)[:, None]
    return mixed, weight * target + (1 - weight) * target[torch.as_tensor(perm)]
