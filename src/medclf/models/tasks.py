"""What the network's outputs mean: one head per task type, in a registry.

* ``multiclass``: one label per image; K logits, softmax, cross-entropy (today's training).
* ``multilabel``: any number of findings per image (chest radiographs); one logit per finding, independent
  sigmoids, and a loss for rare findings: the asymmetric loss (Ridnik et al., ICCV 2021: focusing on the
  hard negatives, discarding the easiest ones) or a binary cross-entropy with positives weighted by each
  finding's negative-to-positive ratio.
* ``ordinal``: grades 0..K-1 (retinopathy, Kellgren-Lawrence); K-1 logits of CORN (Shi, Cao and Raschka,
  "Deep neural networks for rank-consistent ordinal regression based on conditional probabilities", 2023):
  logit k estimates P(grade > k | grade > k-1), trained on the images with grade >= k, so the cumulative
  probabilities are products of conditionals and can never cross (rank consistency by construction).

Each head maps the network's outputs to probabilities: (N, K) class or grade distributions, or (N, L)
per-finding probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MULTILABEL_LOSSES",
    "TASKS",
    "TaskHead",
    "asymmetric_loss",
    "corn_log_probabilities",
    "corn_loss",
    "corn_output_hook",
    "corn_probabilities",
    "median_grade",
    "multilabel_loss",
    "positive_weights",
    "task_head",
    "weighted_bce",
]

# A finding's positive weight is at most this many negatives per positive: a finding seen 3 times in 10,000
# images would otherwise dominate the loss with a weight of thousands.
MAX_POSITIVE_WEIGHT = 100.0


@dataclass(frozen=True)
class TaskHead:
    name: str
    outputs: Callable[[int], int]  # network outputs for K classes, findings or grades
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    description: str


def _multiclass_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1)


def _multilabel_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float())


def corn_loss(logits: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """CORN's loss: binary cross-entropy of task k (grade > k) over the images with grade >= k, summed over
    tasks and divided by the number of (image, task) pairs used."""
    logits = logits.float()
    n_tasks = logits.shape[1]
    k = torch.arange(n_tasks, device=logits.device)
    used = grades[:, None] >= k[None, :]  # image i takes part in task k when its grade is at least k
    targets = (grades[:, None] > k[None, :]).float()
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (losses * used).sum() / used.sum().clamp_min(1)


def corn_log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) log grade-probabilities from CORN's (N, K-1) logits, in log space for stability:
    log P(grade = k) = sum_{j<k} log sigmoid(z_j) + log sigmoid(-z_k), and the top grade keeps the full sum.

    Cross-entropy on these equals CORN's loss summed over each image's tasks (an image of grade y takes part
    in tasks 0..y, with target 1 below y and 0 at y): training a network whose outputs pass through this
    function with the ordinary cross-entropy *is* CORN, up to CORN's normalisation by the number of (image,
    task) pairs instead of images. And since these log-probabilities already sum to one, every softmax
    downstream (engines, temperature, ONNX, ensembles) returns the grade distribution unchanged."""
    z = logits.float()
    above = torch.cumsum(F.logsigmoid(z), dim=1)  # log P(grade > k)
    before = torch.cat([torch.zeros_like(above[:, :1]), above[:, :-1]], dim=1)  # log P(grade > k - 1)
    return torch.cat([before + F.logsigmoid(-z), above[:, -1:]], dim=1)


def corn_output_hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
    """Forward hook that turns a network's K-1 CORN logits into K grade log-probabilities (a module-level
    function: deep copies (EMA, ensembles) and exports keep it)."""
    return corn_log_probabilities(output)


def corn_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) grade distribution from CORN's (N, K-1) logits: P(grade > k) is the running product of the
    conditionals, and P(grade = k) the drop between neighbours."""
    above = torch.cumprod(torch.sigmoid(logits.float()), dim=1)  # P(grade > k), non-increasing in k
    ones = torch.ones_like(above[:, :1])
    zeros = torch.zeros_like(above[:, :1])
    return torch.cat([ones, above], dim=1) - torch.cat([above, zeros], dim=1)


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
) -> torch.Tensor:
    """The asymmetric loss for multi-label data (mean over images, summed over findings): negatives are
    down-weighted by ``p ** gamma_neg`` after shifting their probability down by ``clip`` (very easy negatives
    contribute nothing), positives by ``(1 - p) ** gamma_pos``. The paper's defaults."""
    p = torch.sigmoid(logits.float())
    t = targets.float()
    p_neg = (p - clip).clamp_min(0) if clip > 0 else p
    log_pos = torch.log(p.clamp_min(1e-8))
    log_neg = torch.log((1 - p_neg).clamp_min(1e-8))
    loss = t * (1 - p) ** gamma_pos * log_pos + (1 - t) * p_neg**gamma_neg * log_neg
    return -loss.sum(dim=1).mean()


def positive_weights(targets: np.ndarray) -> np.ndarray:
    """Per-finding positive weight for :func:`weighted_bce`: negatives per positive in the training targets,
    between 1 and ``MAX_POSITIVE_WEIGHT`` (a finding without positives gets 1)."""
    y = np.asarray(targets, dtype=np.float64)
    pos = y.sum(axis=0)
    neg = len(y) - pos
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(pos > 0, neg / pos, 1.0)
    return np.clip(ratio, 1.0, MAX_POSITIVE_WEIGHT)


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per finding with positives weighted, summed over findings, mean over images."""
    losses = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight, reduction="none"
    )
    return losses.sum(dim=1).mean()


TASKS: dict[str, TaskHead] = {
    "multiclass": TaskHead("multiclass", lambda k: k, _multiclass_probabilities, "softmax over K classes"),
    "multilabel": TaskHead("multilabel", lambda k: k, _multilabel_probabilities, "a sigmoid per finding"),
    "ordinal": TaskHead("ordinal", lambda k: k - 1, corn_probabilities, "CORN: K-1 conditional sigmoids"),
}


# The losses a multi-label run may train with (``--multilabel-loss``): class-balanced binary cross-entropy
# (positives weighted by each finding's negatives per positive) or the asymmetric loss.
MULTILABEL_LOSSES = ("bce", "asymmetric")


def multilabel_loss(
    name: str, logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor
) -> torch.Tensor:
    """The multi-label loss ``name`` (:data:`MULTILABEL_LOSSES`) of ``logits`` against 0/1 ``targets``."""
    if name == "bce":
        return weighted_bce(logits, targets, pos_weight)
    if name == "asymmetric":
        return asymmetric_loss(logits, targets)
    raise ValueError(f"unknown multi-label loss {name!r}; choose from {', '.join(MULTILABEL_LOSSES)}")


def median_grade(probs: np.ndarray) -> np.ndarray:
    """The grade an ordinal model predicts: the median of each row of an (N, K) grade distribution (the first
    grade whose cumulative probability reaches one half), which minimises the expected absolute error."""
    cumulative = np.cumsum(np.asarray(probs, dtype=np.float64), axis=1)
    # A row summing to 1 - 1e-7 must still reach its last grade.
    return np.minimum((cumulative < 0.5 - 1e-9).sum(axis=1), probs.shape[1] - 1).astype(np.int64)


def task_head(name: str) -> TaskHead:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None
