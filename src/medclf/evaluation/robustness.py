"""Adversarial robustness: accuracy under FGSM and PGD attacks at several perturbation sizes.

A small, deliberately chosen change of the pixels can flip a CNN's answer. This report measures how
small: white-box attacks on the bundle's PyTorch model, within an L-infinity ball of radius ``eps``
on the preprocessed input (intensities in [0, 1], so ``eps = 2/255`` is two grey levels of an 8-bit
image):

* FGSM (Goodfellow et al. 2015, "Explaining and harnessing adversarial examples"): one signed-gradient
  step of size ``eps``;
* PGD (Madry et al. 2018, "Towards deep learning models resistant to adversarial attacks"): a random
  start in the ball, then ``steps`` signed-gradient steps of ``2.5 eps / steps``, each projected back
  onto the ball and onto [0, 1].

Both maximise the cross-entropy of the true class. Accuracy under attack is an upper bound of the true
robust accuracy (a stronger attack may do better); the clean accuracy on the same samples is reported
next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_EPSILONS = (0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
MAX_SAMPLES = 512

__all__ = ["DEFAULT_EPSILONS", "fgsm", "pgd", "robustness_report"]


def _loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``x + eps * sign(grad)``, clipped to [0, 1]."""
    return (x + eps * _loss_grad(model, x, y).sign()).clamp(0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent with a random start in the L-inf ball of radius ``eps``."""
    step = 2.5 * eps / steps
    noise = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x.device, x.dtype)
    adv = (x + eps * noise).clamp(0.0, 1.0)
    for _ in range(steps):
        adv = adv + step * _loss_grad(model, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return adv


def robustness_report(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    pgd_steps: int = 10,
    max_samples: int = MAX_SAMPLES,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Clean accuracy and accuracy under FGSM and PGD for each ``eps`` on (a seeded subset of) ``x``."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(x))
    if len(idx) > max_samples:
        idx = np.sort(rng.choice(idx, size=max_samples, replace=False))
    gen = torch.Generator().manual_seed(seed)
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    clean_ok = np.zeros(len(idx), dtype=bool)
    ok = {(a, e): np.zeros(len(idx), dtype=bool) for a in ("fgsm", "pgd") for e in epsilons}
    for start in range(0, len(idx), batch_size):
        rows = idx[start : start + batch_size]
        xb = torch.as_tensor(np.asarray(x[rows], dtype=np.float32))
        yb = torch.as_tensor(np.asarray(y[rows], dtype=np.int64))
        sl = slice(start, start + len(rows))
        with torch.no_grad():
            clean_ok[sl] = (model(xb).argmax(1) == yb).numpy()
        for eps in epsilons:
            for name, attack in (("fgsm", fgsm), ("pgd", None)):
                adv = (
                    attack(model, xb, yb, eps)
                    if attack is not None
                    else pgd(model, xb, yb, eps, steps=pgd_steps, generator=gen)
                )
                with torch.no_grad():
                    ok[(name, eps)][sl] = (model(adv).argmax(1) == yb).numpy()
    for p in model.parameters():
        p.requires_grad_(True)
    return {
        "n": len(idx),
        "clean_accuracy": float(clean_ok.mean()) if len(idx) else None,
        "threat_model": "white-box, L-inf on the preprocessed input in [0, 1]",
        "pgd_steps": pgd_steps,
        "attacks": [
            {
                "eps": float(eps),
                "eps_8bit_levels": round(float(eps) * 255, 3),
                "fgsm_accuracy": float(ok[("fgsm", eps)].mean()) if len(idx) else None,
                "pgd_accuracy": float(ok[("pgd", eps)].mean()) if len(idx) else None,
            }
            for eps in epsilons
        ],
    }
