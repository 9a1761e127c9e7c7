"""An ensemble of trained networks as one ``nn.Module``, so that an ensemble is a bundle like any other.

Its keyword arguments describe the members (architecture, arguments, input size, temperature); the
members' weights and the fusion parameters live in the one state dict (``model.safetensors``). Its output
is a vector of logits whose softmax is the fused class probability:

- ``mean`` / ``weighted``: ``log(sum_i w_i p_i)`` with ``p_i`` the i-th member's calibrated probabilities
  (``w_i = 1/M`` for ``mean``; fitted on validation for ``weighted``);
- ``stacking``: a linear layer (the meta-learner, fitted on validation) on the concatenated member
  log-probabilities.

Multi-label findings (``multilabel=True``, ``mean`` / ``weighted`` only): each member's per-finding sigmoid
``p_i`` (through the member's temperature per finding, ``temperatures``, when it has them); the output is the
logit of ``sum_i w_i p_i`` per finding, so that the sigmoid every engine applies returns the mean of the
members' per-finding probabilities.

Members may take different input sizes: the ensemble's input has the largest, and each smaller member
gets a resample of it: a separable Gaussian low-pass (sigma = (factor - 1) / 2, as skimage's resize) then
bilinear / trilinear interpolation, all plain convolutions and ``Resize`` so that the ensemble still
exports to ONNX (torch's ``antialias=True`` does not). That is close to, but not exactly, the member's
own preprocessing at its size; fusion weights are fitted through this same path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medclf.errors import ConfigError
from medclf.models.registry import create_model, register_model

METHODS = ("mean", "weighted", "stacking")
MAX_MEMBERS = 64
# Member log-probabilities are floored before stacking: an underflowed probability must not become -inf.
LOG_FLOOR = math.log(1e-8)


class Ensemble(nn.Module):
    """Fused members; see the module docstring. ``members``: one dict per member with ``arch``,
    ``kwargs``, ``in_channels``, ``n_classes``, ``spatial_dims``, ``size`` and ``temperature`` (multi-label
    members may have ``temperatures`` instead: one per finding)."""

    weights: torch.Tensor  # a registered buffer (methods other than stacking)

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        spatial_dims: int = 2,
        *,
        members: Sequence[dict[str, Any]],
        method: str = "mean",
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")
        if multilabel and method == "stacking":
            raise ConfigError("multi-label members are fused by their (weighted) mean, not by stacking")
        self.multilabel = multilabel
        if len(members) < 2:
            raise ConfigError("an ensemble needs at least two members")
        if len(members) > MAX_MEMBERS:  # a manifest must not make us build networks without end
            raise ConfigError(f"an ensemble has at most {MAX_MEMBERS} members, not {len(members)}")
        nets = []
        for j, m in enumerate(members):
            shape = (m["in_channels"], m["n_classes"], m["spatial_dims"])
            if shape != (in_channels, n_classes, spatial_dims):
                raise ConfigError(
                    f"ensemble member {j} takes {m['in_channels']} channel(s), {m['n_classes']} classes, "
                    f"{m['spatial_dims']}D; the ensemble: {in_channels}, {n_classes}, {spatial_dims}D"
                )
            if len(m["size"]) != spatial_dims:
                raise ConfigError(f"ensemble member {j}: size {m['size']} is not {spatial_dims}D")
            nets.append(create_model(m["arch"], *shape, **m.get("kwargs", {})))
        self.members = nn.ModuleList(nets)
        self.method = method
        self.sizes = [tuple(int(s) for s in m["size"]) for m in members]
        largest = tuple(max(s[a] for s in self.sizes) for a in range(spatial_dims))
        self.resamplers = nn.ModuleList(Resample(largest, size, in_channels) for size in self.sizes)
        self.temperatures = [float(m.get("temperature", 1.0)) for m in members]
        for j, m in enumerate(members):
            per = m.get("temperatures")
            if per is None:
                continue
            if not multilabel or len(per) != n_classes:
                raise ConfigError(
                    f"ensemble member {j}: one temperature per finding is for multi-label members, "
                    f"{n_classes} of them; got {len(per)}"
                )
            # A fixed, non-persistent buffer: part of the graph (and of an ONNX export), not of the weights.
            self.register_buffer(f"finding_temperatures{j}", torch.tensor(per, dtype=torch.float32), False)
        self.spatial_dims, self.n_classes = spatial_dims, n_classes
        k, n = n_classes, len(members)
        if method == "stacking":
            self.stack = nn.Linear(n * k, k)
        else:
            self.register_buffer("weights", torch.full((n,), 1.0 / n))

    def member_log_prob(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``j``'s calibrated log-probabilities ``(N, K)`` for ensemble inputs ``x``."""
        xi = x if tuple(x.shape[2:]) == self.sizes[j] else self.resamplers[j](x)
        per: torch.Tensor | None = getattr(self, f"finding_temperatures{j}", None)
        z = self.members[j](xi).float() / (self.temperatures[j] if per is None else per)
        # Multi-label: log of each finding's own probability (a sigmoid), not a distribution over findings.
        return F.logsigmoid(z) if self.multilabel else F.log_softmax(z, dim=1)

    def member_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's calibrated log-probabilities, ``(M, N, K)``."""
        return torch.stack([self.member_log_prob(j, x) for j in range(len(self.members))])

    def fuse(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Fused logits from member log-probabilities ``(M, N, K)``."""
        if self.method == "stacking":
            m, n, k = log_probs.shape
            features = log_probs.clamp_min(LOG_FLOOR).permute(1, 0, 2).reshape(n, m * k)
            return self.stack(features)
        # log(sum_i w_i p_i), computed stably; a zero weight gives -inf, which logsumexp ignores.
        log_w = torch.log(self.weights).view(-1, 1, 1)
        fused = torch.logsumexp(log_probs + log_w, dim=0)
        if not self.multilabel:
            return fused
        # The logit of the mean probability: log(mean p) - log(mean (1 - p)), finding by finding.
        log_not = torch.log((1 - torch.exp(log_probs)).clamp_min(1e-12))
        return fused - torch.logsumexp(log_not + log_w, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.member_log_probs(x))


class Resample(nn.Module):
    """Inputs of size ``src`` to size ``dst``: Gaussian low-pass along each shrunk axis, then linear
    interpolation. The blur is a normalised convolution (zero padding, divided by the blurred ones), so
    edges keep their level without a padding op that the ONNX exporter cannot shape. The kernels and
    normalisers are fixed, non-persistent buffers: not part of the state dict."""

    def __init__(self, src: Sequence[int], dst: Sequence[int], channels: int = 1) -> None:
        super().__init__()
        self.dst = tuple(int(d) for d in dst)
        self.channels = channels
        self.mode = "bilinear" if len(self.dst) == 2 else "trilinear"
        self.axes: list[int] = []
        nd = len(self.dst)
        for axis, (a, b) in enumerate(zip(src, dst, strict=True)):
            sigma = (a / b - 1.0) / 2.0
            if sigma <= 0:
                continue
            radius = max(1, math.ceil(3 * sigma))
            t = torch.arange(-radius, radius + 1, dtype=torch.float32)
            shape = [1, 1] + [1] * nd
            shape[2 + axis] = len(t)
            kernel = torch.exp(-0.5 * (t / sigma) ** 2)
            kernel = (kernel / kernel.sum()).view(shape)
            ones = torch.ones(1, 1, *(int(v) for v in src))
            norm = (F.conv2d if nd == 2 else F.conv3d)(ones, kernel, padding=self._padding(axis, radius, nd))
            # One kernel per channel (a grouped convolution), of a shape fixed when traced for export.
            weight = kernel.repeat(channels, *([1] * (kernel.ndim - 1)))
            self.register_buffer(f"kernel{axis}", weight, persistent=False)
            self.register_buffer(f"norm{axis}", norm, persistent=False)
            self.axes.append(axis)

    @staticmethod
    def _padding(axis: int, radius: int, nd: int) -> tuple[int, ...]:
        return tuple(radius if a == axis else 0 for a in range(nd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if tuple(x.shape[2:]) == self.dst:
            return x
        nd = x.ndim - 2
        conv = F.conv2d if nd == 2 else F.conv3d
        for axis in self.axes:
            weight = getattr(self, f"kernel{axis}")
            radius = (weight.shape[2 + axis] - 1) // 2
            blurred = conv(x, weight, padding=self._padding(axis, radius, nd), groups=self.channels)
            x = blurred / getattr(self, f"norm{axis}")
        return F.interpolate(x, size=self.dst, mode=self.mode, align_corners=False)


@register_model(
    "ensemble",
    description="fused trained members (mean, weighted mean or stacking); built by `medclf ensemble`",
    layer_groups=("members",),
    # No single feature map to explain: Grad-CAM finds no such layer, and explain falls back to occlusion.
    cam_layer="none",
)
def ensemble(
    in_channels: int,
    n_classes: int,
    spatial_dims: int = 2,
    members: Sequence[dict[str, Any]] = (),
    method: str = "mean",
    multilabel: bool = False,
) -> nn.Module:
    return Ensemble(
        in_channels, n_classes, spatial_dims, members=members, method=method, multilabel=multilabel
    )
