"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020)
on medclf's networks: two augmented views of each image, a registered network without its output layer (the
backbone), a small projection head, and MONAI's NT-Xent loss (:class:`monai.losses.ContrastiveLoss`).

MONAI's loss takes the two views' projections as ``input`` and ``target`` (B x F each), treats row i of one
and row i of the other as the positive pair and the other 2B - 2 rows as negatives, and divides by its
``temperature`` (0.5, MONAI's default and SimCLR's choice for small batches); the batch size is read from
the tensors. Its denominator counts the positive too, as SimCLR's paper writes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medclf.augment import Compose, RandomAffine, RandomFlip, RandomIntensity, RandomNoise
from medclf.models import create_model
from medclf.models.keymaps import output_keys, strip_output
from medclf.preprocess import PreprocessSpec

TEMPERATURE = 0.5
PROJECTION_DIM = 64


class ContrastiveNet(nn.Module):
    """``backbone`` (a registered network whose output layer is an identity: it returns ``features``
    numbers per image) followed by a two-layer projection head, as in SimCLR. Only the backbone is kept."""

    def __init__(self, backbone: nn.Module, features: int, projection_dim: int = PROJECTION_DIM) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = min(features, 256)  # small: a CPU spends its time on the backbone, not the head
        self.projector = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, projection_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def build_net(
    arch: str, spec: PreprocessSpec, arch_kwargs: dict[str, Any], projection_dim: int = PROJECTION_DIM
) -> tuple[ContrastiveNet, list[str]]:
    """A new SimCLR network on ``arch``, and the names of the output layer its backbone left out."""
    network = create_model(arch, spec.channels, 2, spec.spatial_dims, **arch_kwargs)
    omitted = output_keys(network)
    features = strip_output(network)
    return ContrastiveNet(network, features, projection_dim), omitted


def contrastive_augmentation(spatial_dims: int) -> Compose:
    """SimCLR's views for greyscale medical images, batched (no per-image loop on the CPU): a random
    crop-and-resize (zoom in up to 1.6x anywhere in the image, with rotation), flips, strong brightness,
    contrast and gamma jitter in place of colour jitter, and noise in place of blur."""
    return Compose(
        [
            RandomFlip(axes=(-1,)),
            RandomAffine(degrees=20, scale=(0.9, 1.6), translate=0.15, p=1.0),
            RandomIntensity(brightness=0.2, contrast=(0.6, 1.6), gamma=(0.6, 1.6), p=0.9),
            RandomNoise(std=0.05, p=0.5),
        ]
    )


def contrastive_loss(temperature: float = TEMPERATURE) -> nn.Module:
    from monai.losses import ContrastiveLoss

    return ContrastiveLoss(temperature=temperature)
