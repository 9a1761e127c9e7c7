"""The compact networks' stem order option: old bundles rebuild unchanged, new plans may pool first."""

from __future__ import annotations

import torch
from torch import nn

from medclf import planner
from medclf.models import create_model


def test_stem_pool_first_is_an_option_and_the_old_order_stays_the_default():
    old = create_model("compact", 1, 3, 2, stem_stride=2)
    assert [type(m) for m in old.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    new = create_model("compact", 1, 3, 2, stem_stride=2, stem_pool_first=True)
    assert [type(m) for m in new.stem] == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU]
    x = torch.rand(2, 1, 96, 96)
    assert new(x).shape == old(x).shape == (2, 3)
    # Without a stem pool (stride 1) the option changes nothing.
    plain = create_model("compact-s", 1, 3, 3, stem_pool_first=True)
    assert [type(m) for m in plain.stem] == [nn.Conv3d, nn.BatchNorm3d, nn.ReLU]


def test_the_planner_sets_the_new_order_only_when_its_constant_says_so(monkeypatch):
    monkeypatch.setattr(planner, "STEM_POOL_FIRST", False)
    assert "stem_pool_first" not in planner.arch_kwargs_for("compact", 128, 2)
    monkeypatch.setattr(planner, "STEM_POOL_FIRST", True)
    assert planner.arch_kwargs_for("compact", 128, 2)["stem_pool_first"] is True
    assert "stem_pool_first" not in planner.arch_kwargs_for("compact", 64, 2)  # no stem pool at 64 px


def test_a_pool_first_network_can_be_pruned():
    from medclf.compress.prune import prune_model

    model = create_model("compact", 1, 3, 2, stem_stride=2, stem_pool_first=True).eval()
    kwargs = {"stem_stride": 2, "stem_pool_first": True}
    result = prune_model(
        model, 0.5, arch="compact", in_channels=1, n_classes=3, spatial_dims=2, arch_kwargs=kwargs
    )
    assert result.arch_kwargs["stem_pool_first"] is True
    assert result.model(torch.rand(1, 1, 96, 96)).shape == (1, 3)
