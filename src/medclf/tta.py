"""Test-time augmentation: class probabilities averaged over deterministic views of each input.

A view is a named, invertible-in-spirit transform of the preprocessed tensor ``(N, C, *spatial)``:

- ``identity``;
- ``flip<a>``: mirror along spatial axis ``a`` (0 = first spatial axis; in 2D, ``flip1`` is left-right);
- ``shift<a><+|-><p>``: translate by ``p`` pixels along spatial axis ``a``, edges replicated.

``tta=True`` picks the default set for the input's dimensionality (:func:`default_transforms`): in 2D
identity, left-right flip and four shifts of about 1/32 of the side (what the training presets' flips and
small translations make the model robust to); in 3D identity and a flip along each axis. The wrapper
calls whatever prediction function it is given once per view, so it works the same for any engine, and
for ensembles.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medclf.errors import ConfigError

__all__ = ["apply_view", "default_transforms", "describe", "predict_with_tta", "resolve"]

COMBINE = "mean of the class probabilities over the views"
_PATTERN = re.compile(r"^(identity|flip(\d)|shift(\d)([+-])(\d+))$")


def default_transforms(spatial_size: Sequence[int]) -> list[str]:
    """The default view set for inputs of this spatial size (2 entries: 2D, 3: 3D)."""
    dims = len(spatial_size)
    if dims == 3:
        return ["identity", "flip0", "flip1", "flip2"]
    p = max(1, round(min(spatial_size) / 32))
    return ["identity", "flip1", f"shift0+{p}", f"shift0-{p}", f"shift1+{p}", f"shift1-{p}"]


def resolve(tta: bool | str | Sequence[str] | None, spatial_size: Sequence[int]) -> list[str]:
    """Normalise the ``tta`` argument to a list of view names ([] for no TTA); refuse unknown names."""
    if tta is None or tta is False:
        return []
    if tta is True or tta == "default":
        return default_transforms(spatial_size)
    names = [s.strip() for s in tta.split(",")] if isinstance(tta, str) else [str(s) for s in tta]
    names = [s for s in names if s]
    if not names:
        return []
    for name in names:
        m = _PATTERN.match(name)
        axis = m.group(2) or m.group(3) if m else None
        if m is None or (axis is not None and int(axis) >= len(spatial_size)):
            raise ConfigError(
                f"unknown test-time transform {name!r} for {len(spatial_size)}D inputs: use identity, "
                f"flip<axis> or shift<axis><+|-><pixels> with axis < {len(spatial_size)} (e.g. flip1, shift0+2)"
            )
    return names


def apply_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """The view ``name`` of a batch ``(N, C, *spatial)``."""
    m = _PATTERN.match(name)
    if m is None:
        raise ConfigError(f"unknown test-time transform {name!r}")
    if m.group(1) == "identity":
        return x
    if m.group(2) is not None:
        return x.flip(int(m.group(2)) + 2)
    dim, sign, p = int(m.group(3)) + 2, m.group(4), int(m.group(5))
    size = x.shape[dim]
    p = min(p, size - 1)
    if p == 0:
        return x
    # Pad on one side with the edge values, then crop the other: content moves by p pixels.
    spatial = x.ndim - 2
    pad = [0, 0] * spatial
    k = 2 * (x.ndim - 1 - dim)  # F.pad lists the last dimension first
    pad[k + (0 if sign == "+" else 1)] = p
    padded = F.pad(x.float(), pad, mode="replicate")
    start = 0 if sign == "+" else p
    return padded.narrow(dim, start, size).to(x.dtype)


def predict_with_tta(
    predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray | torch.Tensor, names: Sequence[str]
) -> np.ndarray:
    """Mean over the views ``names`` of ``predict(view)`` (class probabilities ``(N, K)``)."""
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    total: np.ndarray | None = None
    for name in names:
        probs = np.asarray(predict(apply_view(t, name).contiguous().numpy()), dtype=np.float64)
        total = probs if total is None else total + probs
    if total is None:
        raise ValueError("predict_with_tta needs at least one view")
    return total / len(names)


def describe(names: Sequence[str]) -> dict[str, Any] | None:
    """What metrics.json records about TTA (None when it was off)."""
    if not names:
        return None
    return {"transforms": list(names), "combine": COMBINE}
