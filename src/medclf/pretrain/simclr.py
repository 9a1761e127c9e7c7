"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020)
on medclf's networks: two augmented views of each image, a registered network without its output layer (the
backbone), a small projection head, and MONAI's NT-Xent loss (:class:`monai.losses.ContrastiveLoss`).

MONAI's loss takes the two views' projections as ``input`` and ``target`` (B x F each), treats row i of one
and row i of the other as the positive pair and the other 2B - 2 rows as negatives, and divides by its
``temperature`` (0.5, MONAI's default and SimCLR's choice for small batches); the batch size is read from
the tensors. Its denominator counts the positive too, as SimCLR's paper writes it.

Under torchrun (:class:`SimclrStep` with several processes) every process embeds its shard of the global
batch and the projections are gathered, so that the loss is the global batch's: see
:func:`global_contrastive_loss` for why and how the gradients stay those of one process.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medclf.augment import Compose, RandomAffine, RandomFlip, RandomIntensity, RandomNoise
from medclf.models import create_model
from medclf.models.keymaps import output_keys, strip_output
from medclf.planner import resolve_amp
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


class _GatherWithGradient(torch.autograd.Function):
    """``all_gather`` of every process's ``z`` (world x rows x features) that gradients flow back through:
    the backward sums what every process computed for each process's rows (``all_reduce``) and hands each
    its own. (``all_reduce`` rather than a reduce-scatter: gloo, the CPU backend, has no reduce-scatter.)"""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        ctx.rank = dist.get_rank()
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def global_contrastive_loss(z: torch.Tensor, loss_fn: nn.Module, world_size: int = 1) -> torch.Tensor:
    """NT-Xent of the projections ``z`` (the first half: one view of each image, the second: the other).

    With ``world_size`` > 1 (torchrun) ``z`` is this process's shard of the global batch and the loss is
    the global batch's. Why gather: SimCLR contrasts each image with every other image of its batch; a loss
    per process would see only the B/W images of its shard as negatives, an easier objective than one
    process's at batch B, and ``--batch-size`` would mean something else with each process count (Chen et
    al. gather across TPU cores for the same reason). Only the projections travel (2B x 64 numbers), not
    images. Every process computes the same global loss; the gather's backward sums the W identical
    gradients of each process's rows, and DDP's average over the W processes then gives exactly one
    process's gradient of the global batch (tests/test_pretrain_distributed.py checks it)."""
    n = z.shape[0] // 2
    if world_size <= 1:
        return loss_fn(z[:n], z[n:])
    parts = _GatherWithGradient.apply(z)  # world x 2n x F: every process's [view 1; view 2]
    features = z.shape[1]
    return loss_fn(parts[:, :n].reshape(-1, features), parts[:, n:].reshape(-1, features))


class SimclrStep:
    """One SimCLR optimisation step on a batch of images: two augmented views of each, their projections,
    NT-Xent (the global batch's under torchrun), back-propagation and the optimiser's step. The run's steps
    and the time budget's timing probe (:mod:`medclf.pretrain.pace`) take the same one."""

    def __init__(
        self, spec: PreprocessSpec, *, temperature: float, device: str, amp: str, world_size: int = 1
    ) -> None:
        self.augment = contrastive_augmentation(spec.spatial_dims)
        self.loss_fn = contrastive_loss(temperature)
        self.device, self.world_size = device, world_size
        # Mixed precision as train resolves it; the loss is computed in float32 either way.
        self.amp = resolve_amp(amp, device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda" if self.device.startswith("cuda") else "cpu", dtype=self.amp_dtype)

    def run(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        x: torch.Tensor,
        gen: torch.Generator,
        *,
        gather: bool,
    ) -> float | None:
        """One step on the images ``x`` (views drawn from ``gen``); the loss, or None when it was not finite
        and the step was skipped (it would make every weight NaN). ``gather``: the global batch's loss."""
        views = torch.cat([self.augment(x, gen), self.augment(x, gen)]).to(self.device)
        with self.autocast():
            z = net(views).float()
        loss = global_contrastive_loss(z, self.loss_fn, self.world_size if gather else 1)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        elif torch.isfinite(loss):
            loss.backward()
            optimizer.step()
        else:
            return None
        return float(loss.detach())
