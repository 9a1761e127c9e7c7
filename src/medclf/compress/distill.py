"""Knowledge distillation: a small student learns from a large teacher's softened outputs.

Loss (Hinton, Vinyals and Dean, *Distilling the Knowledge in a Neural Network*, 2015)::

    loss = (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with ``w`` the KD weight and ``T`` the distillation temperature.

The teacher sees exactly the augmented batch the student sees (it runs inside the training loop, through
``LoopHooks.loss``), in eval mode and without gradients. Any bundle can teach, including an ensemble
bundle: its model only has to map a batch to logits (or log-probabilities).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medclf.bundle import Bundle
from medclf.errors import ConfigError
from medclf.predictor import Predictor
from medclf.preprocess import PreprocessSpec

DEFAULT_TEMPERATURE = 4.0
DEFAULT_KD_WEIGHT = 0.7


def check_teacher(teacher: Bundle | Predictor, spec: PreprocessSpec, classes: list[str]) -> bool:
    """Can ``teacher`` teach a student that reads ``spec``? Returns whether its input must be resized."""
    if list(teacher.classes) != list(classes):
        raise ConfigError(f"the teacher's classes {teacher.classes} are not the student's {classes}")
    mine = {k: v for k, v in spec.to_dict().items() if k != "size"}
    theirs = {k: v for k, v in teacher.spec.to_dict().items() if k != "size"}
    if mine != theirs:
        raise ConfigError(
            "the teacher preprocesses its inputs differently from the student (beyond the input size): "
            "distil from a bundle trained with the same preprocessing"
        )
    return tuple(teacher.spec.size) != tuple(spec.size)


def kd_loss_hook(
    teacher: nn.Module,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    kd_weight: float = DEFAULT_KD_WEIGHT,
    teacher_size: tuple[int, ...] | None = None,
    amp: str = "off",
    channels_last: bool = False,
) -> Any:
    """A loss hook (``LoopHooks.loss``) that mixes the labels' cross-entropy with the teacher's softened
    outputs."""
    if temperature <= 0 or not 0.0 <= kd_weight <= 1.0:
        raise ConfigError("distillation needs a temperature > 0 and a KD weight between 0 and 1")
    teacher = copy.deepcopy(teacher).eval()  # frozen and re-laid-out below: leave the caller's model alone
    for p in teacher.parameters():
        p.requires_grad_(False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if channels_last:
        with contextlib.suppress(RuntimeError):  # 3D or non-convolutional teachers keep their layout
            # torch's stub of Module.to lacks its memory_format keyword.
            teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def hook(x: torch.Tensor, logits: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xt = x.float()
            if teacher_size is not None:
                mode = "bilinear" if xt.ndim == 4 else "trilinear"
                xt = F.interpolate(xt, size=teacher_size, mode=mode, align_corners=False)
            ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with ctx:
                t_logits = teacher(xt).float()
        kd = F.kl_div(
            F.log_softmax(logits / temperature, dim=1),
            F.log_softmax(t_logits / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return (1.0 - kd_weight) * ce + kd_weight * temperature**2 * kd

    return hook


def planned_student_kwargs(arch: str, spec: PreprocessSpec) -> dict[str, Any]:
    """Architecture arguments for a fresh ``arch`` student: what the planner picks for that architecture at
    this input size (e.g. the compact CNN's stem stride), whatever the teacher is (an ensemble, say)."""
    from medclf.planner import arch_kwargs_for

    return arch_kwargs_for(arch, int(min(spec.size)), spec.spatial_dims)
