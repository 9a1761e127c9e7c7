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


def test_monai_transforms_are_reproducible_from_their_seeds():
    from medclf.augment import MonaiTransform

    x = torch.rand(5, 1, 32, 32)
    for name in ("bias_field", "gibbs", "kspace_spike", "rician", "blur", "elastic"):
        t = MonaiTransform(name, p=1.0)
        params = t.sample(x, torch.Generator().manual_seed(1))
        a, b = t.apply(x, params), t.apply(x, params)
        assert torch.equal(a, b), name
        assert not torch.allclose(a, x), f"{name} changed nothing"
        assert a.min() >= 0 and a.max() <= 1


def test_ghosting_adds_shifted_copies_and_keeps_contrast():
    from medclf.augment import RandomGhosting

    x = torch.zeros(1, 1, 32, 32)
    x[..., 14:18, 12:20] = 1.0
    params = {
        "active": torch.tensor([True]),
        "ghosts": torch.tensor([4]),
        "axis": torch.tensor([0]),
        "strength": torch.tensor([0.6]),
    }
    y = RandomGhosting().apply(x, params)
    # Ghosts appear outside the square (rows shifted by 32/4 = 8 px), where the input was empty.
    assert y[..., 22:26, 12:20].mean() > 0.05
    assert abs(float(y.mean() - x.mean())) < 0.05


def test_planner_picks_the_preset_from_the_modality():
    from medclf.augment import preset_for_modality

    assert preset_for_modality("MR") == "mri"
    assert preset_for_modality("dx") == "xray"
    assert preset_for_modality(None) is None and preset_for_modality("CT") is None


def test_gallery_views_differ_from_the_input():
    from medclf.augment import gallery

    x = torch.rand(2, 1, 24, 24)
    _, views = gallery(x, "mri", n_views=3)
    assert len(views) == 3 and all(v.shape == x.shape for v in views)
    assert not torch.equal(views[0], views[1])
