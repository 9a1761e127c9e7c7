"""Batched augmentation: shapes kept, values in range, reproducible from seeds and from parameters."""

import pytest
import torch

from medclf.augment import (
    RandomAffine,
    RandomFlip,
    build_augmentation,
    check_mix,
    list_presets,
    mix_batch,
)
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


def _indexed_batch(n=6, size=16, dims=2):
    """Sample i is a constant image of value i: any mixed pixel says which image it came from."""
    return torch.arange(n, dtype=torch.float32).reshape(-1, 1, *([1] * dims)).expand(n, 1, *([size] * dims))


def test_mixup_blends_images_and_targets_in_the_same_proportion():
    x, y = _indexed_batch(), torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, target = mix_batch("mixup", 0.4, x, y, 3, torch.Generator().manual_seed(0))
    assert mixed.shape == x.shape and target.shape == (6, 3)
    assert torch.allclose(target.sum(1), torch.ones(6))
    # Image i became w*i + (1-w)*j: its targets hold the same w (for a partner of another class).
    w = target[torch.arange(6), y]
    partner_value = (mixed[:, 0, 0, 0] - w * torch.arange(6)) / (1 - w).clamp_min(1e-6)
    assert not torch.equal(mixed, x) and (w < 0.999).any()
    assert torch.allclose(partner_value[w < 0.999].round(), partner_value[w < 0.999], atol=1e-3)


@pytest.mark.parametrize("dims", [2, 3])
def test_cutmix_targets_match_the_area_actually_pasted(dims):
    x, y = _indexed_batch(8, 12, dims), torch.arange(8)  # every image its own class
    for seed in range(5):
        mixed, target = mix_batch("cutmix", 1.0, x, y, 8, torch.Generator().manual_seed(seed))
        kept = (mixed == x).flatten(1).float().mean(1)
        assert torch.allclose(target[torch.arange(8), y], kept)
        assert torch.allclose(target.sum(1), torch.ones(8))
        # The rest of each target goes to the one image the box came from.
        assert ((target > 0).sum(1) <= 2).all()


def test_mixing_is_reproducible_from_the_generator_and_none_is_one_hot():
    x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 2, (8,))
    a = mix_batch("cutmix", 1.0, x, y, 2, torch.Generator().manual_seed(7))
    b = mix_batch("cutmix", 1.0, x, y, 2, torch.Generator().manual_seed(7))
    c = mix_batch("cutmix", 1.0, x, y, 2, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    same, onehot = mix_batch("none", 0.0, x, y, 2, torch.Generator())
    assert same is x and torch.equal(onehot.argmax(1), y)


def test_mix_settings_are_checked():
    assert check_mix("none") == 0.0 and check_mix("mixup") == 0.4 and check_mix("cutmix", 0.5) == 0.5
    with pytest.raises(ConfigError, match="unknown --mix"):
        check_mix("mixmax")
    with pytest.raises(ConfigError, match="positive"):
        check_mix("mixup", 0.0)


# --------------------------------------------------------------------------------------------------
# Acquisition-cue randomisation (the shortcut mitigation's "decue" preset)


def test_decue_transforms_are_reproducible_from_their_parameters():
    x = torch.rand(6, 1, 32, 32)
    aug = build_augmentation("mri+decue")
    names = [type(t).__name__ for t in aug.transforms]
    assert {"RandomResolution", "RandomJpeg", "RandomPadding", "RandomHistogram"} <= set(names)
    assert names.index("RandomFlip") < names.index("RandomPadding")  # the base preset first
    y, record = aug.with_params(x, torch.Generator().manual_seed(1))
    assert torch.allclose(aug.replay(x, record), y)
    with pytest.raises(ConfigError, match="unknown augmentation preset 'nope'"):
        build_augmentation("light+nope")


def test_resolution_loss_blurs_and_identity_factor_keeps_the_image():
    from medclf.augment import RandomResolution

    x = (torch.arange(32).float().remainder(2)).expand(1, 1, 32, 32).clone()  # finest stripes
    t = RandomResolution()
    blurred = t.apply(x, {"active": torch.tensor([True]), "factor": torch.tensor([4.0])})
    assert blurred.std() < 0.1 * x.std()
    same = t.apply(x, {"active": torch.tensor([True]), "factor": torch.tensor([1.0])})
    assert torch.allclose(same, x, atol=1e-5)


def test_jpeg_recompression_quality_orders_the_error():
    from medclf.augment import RandomJpeg

    x = torch.rand(1, 1, 32, 32)
    t = RandomJpeg()
    err = {
        q: (t.apply(x, {"active": torch.tensor([True]), "quality": torch.tensor([q])}) - x).abs().mean()
        for q in (10, 95)
    }
    assert err[95] < err[10]
    vol = torch.rand(1, 1, 4, 8, 8)
    assert torch.equal(t.apply(vol, {"active": torch.tensor([True]), "quality": torch.tensor([10])}), vol)


def test_random_padding_adds_constant_margins():
    from medclf.augment import RandomPadding

    x = torch.ones(1, 1, 40, 40)
    margins = torch.tensor([[[0.1, 0.0], [0.0, 0.25]]])  # 4 rows on top, 10 columns on the right
    y = RandomPadding().apply(
        x, {"active": torch.tensor([True]), "margins": margins, "fill": torch.tensor([0.05])}
    )
    assert torch.allclose(y[0, 0, :4], torch.tensor(0.05)) and torch.allclose(
        y[0, 0, :, 30:], torch.tensor(0.05)
    )
    assert torch.allclose(y[0, 0, 4:, :30], torch.tensor(1.0))


def test_histogram_curve_is_monotone_and_keeps_the_range():
    from medclf.augment import RandomHistogram

    x = torch.linspace(0, 1, 256).reshape(1, 1, 16, 16)
    t = RandomHistogram()
    steps = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    y = t.apply(x, {"active": torch.tensor([True]), "steps": steps, "equalise": torch.tensor([0.3])})
    flat = y.flatten()
    assert (flat[1:] >= flat[:-1] - 1e-6).all()
    assert flat[0] == pytest.approx(0.0, abs=1e-2) and flat[-1] == pytest.approx(1.0, abs=1e-3)
    # Even steps and no equalisation: the identity.
    even = torch.full((1, 4), 0.25)
    same = t.apply(x, {"active": torch.tensor([True]), "steps": even, "equalise": torch.tensor([0.0])})
    assert torch.allclose(same, x, atol=1e-5)
