"""Adversarial robustness report: attacks stay in their budget and do lower the accuracy."""

from __future__ import annotations

import json

import torch
from torch import nn

from medclf.evaluation.robustness import fgsm, pgd


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.ones(16), -torch.ones(16)]))
        model[1].bias.zero_()
    return model


def test_attacks_respect_the_ball_and_the_intensity_range():
    model = _linear_model()
    x = torch.rand(8, 1, 4, 4)
    y = torch.zeros(8, dtype=torch.long)
    for adv in (fgsm(model, x, y, 0.05), pgd(model, x, y, 0.05, generator=torch.Generator().manual_seed(0))):
        assert (adv - x).abs().max() <= 0.05 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1


def test_fgsm_moves_against_the_true_class():
    model = _linear_model()  # class 0 score = sum(x) - sum(x): gradient of CE for y=0 is negative
    x = torch.full((1, 1, 4, 4), 0.5)
    adv = fgsm(model, x, torch.zeros(1, dtype=torch.long), 0.1)
    assert torch.allclose(adv, torch.full_like(x, 0.4))


def test_report_on_a_bundle(tiny_bundle, sim_data, tmp_path):
    from medclf.evaluation.runner import evaluate

    m = evaluate(tiny_bundle, sim_data, tmp_path / "eval", robustness=True, progress=False, n_bootstrap=10)
    r = m["robustness"]
    assert r["n"] == m["n"] and len(r["attacks"]) == 5
    strongest = r["attacks"][-1]
    assert strongest["pgd_accuracy"] <= r["clean_accuracy"]
    assert "Adversarial robustness" in (tmp_path / "eval" / "report.html").read_text()
    json.loads((tmp_path / "eval" / "metrics.json").read_text())["robustness"]
