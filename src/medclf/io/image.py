"""The in-memory image every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Image:
    """Decoded pixels plus the little metadata the pipeline needs.

    ``pixels`` is float32 and channel-first: ``(C, H, W)`` for 2D, ``(C, D, H, W)`` for 3D. Intensities are
    in the modality's own units after the reader applied what the file says must be applied (DICOM rescale
    slope/intercept, VOI LUT or window, MONOCHROME1 inversion; NIfTI scl_slope/inter). ``spacing`` has one
    entry per spatial axis in millimetres (1.0 when the format does not say). ``meta`` holds small,
    non-identifying facts (format, modality, photometric interpretation, bit depth, number of frames);
    never patient names, ids or dates.
    """

    pixels: np.ndarray
    spacing: tuple[float, ...]
    format: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pixels.ndim not in (3, 4):
            raise ValueError(f"pixels must be (C,H,W) or (C,D,H,W), got shape {self.pixels.shape}")
        if len(self.spacing) != self.pixels.ndim - 1:
            raise ValueError(f"spacing {self.spacing} does not match pixels shape {self.pixels.shape}")

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def spatial_dims(self) -> int:
        return int(self.pixels.ndim - 1)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.pixels.shape[1:])
