"""How intensities reach 0..1: 8-bit colour photographs keep their brightness and colour balance (a fixed
0..255 scale), everything else is scaled per image as before; ``--normalise`` overrides."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from medclf.data.sources import load_source
from medclf.errors import ConfigError
from medclf.planner import fingerprint, initial_plan
from medclf.preprocess import preprocess
from medclf.training.config import TrainConfig

from .test_planning import FP

COLOUR_PHOTOS = replace(FP, channels=3, colour_fraction=1.0, eight_bit_fraction=1.0)


def test_8_bit_colour_photographs_are_scaled_by_the_fixed_range():
    plan = initial_plan(COLOUR_PHOTOS, 600, {})
    assert (plan.spec.normalise, plan.spec.window) == ("window", (0.0, 255.0))
    assert any("8-bit colour photographs" in r for r in plan.reasons)


@pytest.mark.parametrize(
    "fp",
    [
        FP,  # grey 8-bit (radiographs, MRI exported to PNG): per image, as always
        replace(FP, eight_bit_fraction=1.0),
        replace(COLOUR_PHOTOS, eight_bit_fraction=0.0),  # colour, not 8-bit (e.g. float microscopy)
    ],
)
def test_other_images_keep_per_image_percentiles(fp):
    plan = initial_plan(fp, 600, {})
    assert plan.spec.normalise == "percentile" and plan.spec.window is None


def test_the_user_decides_over_the_planner():
    assert initial_plan(COLOUR_PHOTOS, 600, {"normalise": "percentile"}).spec.normalise == "percentile"
    fixed = initial_plan(replace(FP, eight_bit_fraction=1.0), 600, {"normalise": "fixed"})
    assert (fixed.spec.normalise, fixed.spec.window) == ("window", (0.0, 255.0))
    assert any("--normalise fixed" in r for r in fixed.reasons)
    with pytest.raises(ConfigError, match="needs 8-bit images"):
        initial_plan(FP, 600, {"normalise": "fixed"})  # eight_bit_fraction 0: 0..255 would clip
    with pytest.raises(ConfigError, match="--normalise must be one of auto, percentile, fixed, not 'z'"):
        TrainConfig().updated({"normalise": "z"})
    assert TrainConfig().updated({"normalise": "fixed"}).overrides()["normalise"] == "fixed"


def test_the_fingerprint_tells_8_bit_images_and_the_spec_keeps_brightness(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(40, 160, size=(8, 16, 16, 3)).astype(np.uint8)
    base[..., 0] = np.clip(base[..., 0].astype(int) + 60, 0, 255)  # reddish: colourful
    darker = (base * 0.6).astype(np.uint8)  # the same images, underexposed
    images = np.concatenate([base, darker])
    path = tmp_path / "photos.npz"
    np.savez(path, train_images=images, train_labels=np.repeat([0, 1], 8))
    samples = load_source(path, default_split="train")
    fp = fingerprint(samples, n_probe=16)
    assert fp.channels == 3 and fp.eight_bit_fraction == 1.0
    as_float = tmp_path / "float.npz"
    np.savez(as_float, train_images=images / 255.0 * 1000.0, train_labels=np.repeat([0, 1], 8))
    assert fingerprint(load_source(as_float, default_split="train"), n_probe=16).eight_bit_fraction == 0.0
    fixed = initial_plan(fp, 16, {}).spec
    per_image = initial_plan(fp, 16, {"normalise": "percentile"}).spec
    bright, dark = samples.load(0), samples.load(8)
    # Per-image percentiles make an underexposed copy look almost like the original; the fixed scale keeps
    # the difference, as the photograph shows it.
    fixed_gap = np.abs(preprocess(bright, fixed).mean() - preprocess(dark, fixed).mean())
    per_image_gap = np.abs(preprocess(bright, per_image).mean() - preprocess(dark, per_image).mean())
    assert fixed_gap > 0.1 and per_image_gap < fixed_gap / 4
    assert preprocess(bright, fixed).max() <= 1.0 and preprocess(dark, fixed).min() >= 0.0
