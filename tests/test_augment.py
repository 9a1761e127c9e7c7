"""Batched augmentation: shapes kept, values in range, reproducible from seeds and from parameters."""

import pytest
import torch

from medclf.augment import RandomAffine, RandomFlip, build_augmentation, list_presets
from medclf.errors import ConfigError


@pytest.mark.parametrize("preset", list(list_presets()))
@pytest.mark.parametrize("dims", [2, 3])
def test_presets_keep_shape_and_range(preset, dims):
    x = torch.rand(4, 1, *([16] * dims))
    aug = build_augmentation(preset, dims)
    y = aug(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_same_seed_same_output_and_replay_from_parameters():
    x = torch.rand(6, 1, 24, 24)
    aug = build_augmentation("standard")
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    y, record = aug.with_params(x, torch.Generator().manual_seed(5))
    assert torch.allclose(aug.replay(x, record), y)


def test_flip_and_identity_affine_are_exact():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) / 16
    flip = RandomFlip(p=1.0)
    assert torch.equal(flip.apply(x, {"flip": torch.tensor([[True]])}), x.flip(-1))
    aff = RandomAffine()
    ident = {"angle": torch.zeros(1), "scale": torch.ones(1), "shift": torch.zeros(1, 2)}
    assert torch.allclose(aff.apply(x, ident), x, atol=1e-5)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown augmentation"):
        build_augmentation("extreme")
