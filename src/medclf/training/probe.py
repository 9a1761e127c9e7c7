"""The freeze schedule of a fine-tuning run: a linear probe, then fine-tuning (Kumar et al., "Fine-Tuning can
Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022: LP-FT).

For the first ``plan.linear_probe`` share of the epochs only the output layer trains, on features the
source's weights compute unchanged (the backbone's batch-norm statistics too); then every layer not in
``--freeze`` trains, the backbone at ``plan.backbone_lr`` times the head's learning rate, so a head that
already fits does not send large gradients through the pretrained weights. The planner turns it on for small
labelled data (:data:`SMALL_DATA`) fine-tuned from a supervised bundle or a state dict, the setting LP-FT was
shown in; not from a self-supervised backbone (``medclf pretrain``): there every layer trains from the first
epoch. With the starter backbone on BreastMNIST, probing first cost about 0.07 test AUC on each of 3 seeds
(BENCHMARKS.md, "Self-supervised pretraining"): model selection on the small validation split kept
end-of-probe models, which generalised worse. ``--linear-probe`` sets the share (0: off).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medclf.errors import ConfigError
from medclf.models.keymaps import output_keys

# Fewer labelled training images than this, with --init-from: the planner probes first.
SMALL_DATA = 2000
DEFAULT_SHARE, DEFAULT_BACKBONE_LR = 0.3, 0.1
PROBE, FINETUNE = "probe", "finetune"


def plan_probe(
    share: float | None, n_train: int, source_kind: str = "bundle"
) -> tuple[float, float, str | None]:
    """The share of epochs that probe, the backbone's learning-rate factor, and why (None: off, nothing to
    say). ``source_kind`` is the ``--init-from`` source's (``bundle``, ``backbone``, ``state_dict``)."""
    if share is None:
        if n_train >= SMALL_DATA:
            return 0.0, 1.0, None
        if source_kind == "backbone":
            return (
                0.0,
                1.0,
                (
                    f"{n_train} labelled training images, a self-supervised backbone: every layer fine-tunes from "
                    "the first epoch (no linear probe; --linear-probe SHARE asks for one)"
                ),
            )
        share, why = DEFAULT_SHARE, f"{n_train} labelled training images (< {SMALL_DATA})"
    else:
        if not 0.0 <= float(share) < 1.0:
            raise ConfigError(f"--linear-probe is a share of the epochs in [0, 1), not {share}")
        if share == 0:
            return 0.0, 1.0, None
        why = "--linear-probe"
    return (
        float(share),
        DEFAULT_BACKBONE_LR,
        f"{why}: linear probe (output layer only) for the first {share:.0%} of the epochs, then all "
        f"layers fine-tune, the backbone at {DEFAULT_BACKBONE_LR:g}x the learning rate",
    )


def head_module(model: nn.Module) -> str:
    """The name of the output layer's module (``head.3``, ``fc``, ``class_layers.out``)."""
    keys = output_keys(model)
    if not keys:
        raise ConfigError(f"{type(model).__name__} has no linear output layer to probe")
    return keys[0].rsplit(".", 1)[0]


def param_groups(model: nn.Module, lr: float, backbone_lr: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the output layer at ``lr``, the rest at ``lr x backbone_lr``
    (parameters of ``--freeze`` groups, which never train, left out)."""
    head = head_module(model) + "."
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n.startswith(head)], "lr": lr},
        {"params": [p for n, p in named if not n.startswith(head)], "lr": lr * backbone_lr},
    ]


class FreezeSchedule:
    """Which phase an epoch is in, and the network set up for it. Once fine-tuning started it goes on
    (a resumed run reads the phase from its history)."""

    def __init__(self, model: nn.Module, share: float, frozen: list[nn.Module]) -> None:
        self.model, self.share, self.frozen = model, share, frozen
        self.head = head_module(model) + "."
        self.finetuning = share <= 0
        self.backbone = [
            p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(self.head)
        ]

    def resume(self, history: list[dict[str, Any]]) -> None:
        self.finetuning = self.finetuning or any(r.get("phase") == FINETUNE for r in history)

    def phase(self, epoch: int, horizon: int) -> str:
        """Set the backbone's gradients for 0-based ``epoch`` of ``horizon`` epochs; the phase's name."""
        # At least one epoch probes, and at least one fine-tunes (a one-epoch run only fine-tunes).
        probe_epochs = min(max(1, round(self.share * horizon)), horizon - 1)
        if not self.finetuning and epoch >= probe_epochs:
            self.finetuning = True
        for p in self.backbone:
            p.requires_grad_(self.finetuning)
        return FINETUNE if self.finetuning else PROBE

    def train_mode(self) -> None:
        """Training mode for what trains in this phase; evaluation mode (batch-norm statistics kept) for
        the frozen groups and, while probing, for the whole backbone."""
        self.model.train()
        for module in self.frozen:
            module.eval()
        if not self.finetuning:
            top = self.head.split(".")[0]
            for name, child in self.model.named_children():
                if name != top:
                    child.eval()
