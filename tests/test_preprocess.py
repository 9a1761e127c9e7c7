"""The preprocessing spec: serialisable, deterministic, shape-exact, and the same function everywhere."""

import numpy as np
import pytest

from medclf.errors import ConfigError, InputRejected
from medclf.io import Image
from medclf.preprocess import PreprocessSpec, percentiles, preprocess


def _image(shape=(1, 60, 80), seed=0, fmt="png"):
    rng = np.random.default_rng(seed)
    px = np.zeros(shape, np.float32)
    # a bright "body" in the middle of an empty border
    sl = tuple([slice(None)] + [slice(s // 4, 3 * s // 4) for s in shape[1:]])
    px[sl] = 100 + 20 * rng.standard_normal(px[sl].shape)
    return Image(px, spacing=(1.0,) * (len(shape) - 1), format=fmt)


def test_roundtrip_and_digest():
    spec = PreprocessSpec(size=(64, 64), denoise="gaussian", window=None)
    again = PreprocessSpec.from_dict(spec.to_dict())
    assert again == spec and again.digest() == spec.digest()
    assert PreprocessSpec(size=(32, 32)).digest() != spec.digest()


def test_unknown_setting_and_bad_values_are_refused():
    with pytest.raises(ConfigError, match="unknown preprocessing"):
        PreprocessSpec.from_dict({**PreprocessSpec().to_dict(), "sharpen": True})
    with pytest.raises(ConfigError):
        PreprocessSpec(denoise="magic")
    with pytest.raises(ConfigError):
        PreprocessSpec(size=(64,))
    with pytest.raises(ConfigError):
        PreprocessSpec(normalise="window")


@pytest.mark.parametrize("denoise", ["none", "nlm", "gaussian", "median"])
def test_output_shape_range_and_determinism(denoise):
    spec = PreprocessSpec(size=(48, 48), denoise=denoise)
    img = _image()
    a, b = preprocess(img, spec), preprocess(img, spec)
    assert a.shape == (1, 48, 48) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_nlm_reduces_noise():
    rng = np.random.default_rng(1)
    clean = np.zeros((1, 64, 64), np.float32)
    clean[:, 16:48, 16:48] = 1.0
    noisy = clean + 0.15 * rng.standard_normal(clean.shape).astype(np.float32)
    img = Image(noisy, spacing=(1.0, 1.0), format="png")
    base = dict(size=(64, 64), crop_foreground=False, normalise="none")
    raw = preprocess(img, PreprocessSpec(**base))
    den = preprocess(img, PreprocessSpec(**base, denoise="nlm"))
    assert np.abs(den - clean).mean() < 0.6 * np.abs(raw - clean).mean()


def test_crop_removes_empty_border():
    img = _image(shape=(1, 100, 100))
    cropped = preprocess(img, PreprocessSpec(size=(50, 50), normalise="minmax"))
    uncropped = preprocess(img, PreprocessSpec(size=(50, 50), normalise="minmax", crop_foreground=False))
    # the body fills most of the cropped image, a quarter of the uncropped one
    assert (cropped > 0.3).mean() > 0.8
    assert (uncropped > 0.3).mean() < 0.4


def test_colour_to_grey_and_grey_to_colour():
    rgb = Image(
        np.stack([np.full((20, 20), v, np.float32) for v in (10, 20, 30)]), spacing=(1, 1), format="png"
    )
    grey = preprocess(rgb, PreprocessSpec(size=(8, 8), normalise="none", crop_foreground=False))
    assert grey.shape == (1, 8, 8)
    assert np.allclose(grey, 0.299 * 10 + 0.587 * 20 + 0.114 * 30, atol=1e-3)
    three = preprocess(_image(), PreprocessSpec(size=(8, 8), channels=3))
    assert three.shape == (3, 8, 8) and np.array_equal(three[0], three[2])


def test_keep_aspect_pads_instead_of_stretching():
    px = np.zeros((1, 40, 120), np.float32)
    px[:, :, 50:70] = 1.0  # a vertical bar in the middle
    img = Image(px, spacing=(1, 1), format="png")
    out = preprocess(img, PreprocessSpec(size=(60, 60), crop_foreground=False, normalise="none"))[0]
    assert out[:15].max() < 0.01 and out[-15:].max() < 0.01  # padding above and below
    assert out[30, 30] > 0.9


def test_3d_volume_and_dimension_mismatch():
    vol = _image(shape=(1, 30, 40, 50))
    out = preprocess(vol, PreprocessSpec(spatial_dims=3, size=(16, 16, 16)))
    assert out.shape == (1, 16, 16, 16)
    with pytest.raises(InputRejected, match="2D images"):
        preprocess(vol, PreprocessSpec(size=(16, 16)))
    with pytest.raises(InputRejected, match="3D volumes"):
        preprocess(_image(), PreprocessSpec(spatial_dims=3, size=(16, 16, 16)))
    single_slice = _image(shape=(1, 1, 40, 40))
    assert preprocess(single_slice, PreprocessSpec(size=(16, 16))).shape == (1, 16, 16)


def test_ct_window():
    px = np.array([[[-2000.0, -1000.0], [0.0, 3000.0]]], np.float32)
    img = Image(np.repeat(np.repeat(px, 8, 1), 8, 2), spacing=(1, 1), format="dicom")
    spec = PreprocessSpec(size=(16, 16), normalise="window", window=(-1000.0, 1000.0), crop_foreground=False)
    out = preprocess(img, spec)[0]
    assert out.min() == 0.0 and out.max() == 1.0
    assert abs(float(out[12, 4]) - 0.5) < 0.05  # 0 HU sits in the middle of the window


def test_fast_percentiles_match_numpy_bit_for_bit():
    # Integer-valued images (8/16-bit scans as float32) take the histogram path; anything else numpy's.
    rng = np.random.default_rng(0)
    cases = [
        rng.integers(0, hi + 1, size=int(rng.integers(1, 3000))).astype(np.float32)
        for hi in (1, 7, 255, 4095, 65535)
        for _ in range(40)
    ]
    cases += [
        rng.normal(size=500).astype(np.float32),
        np.array([0.5, 3.0, 70000.0], dtype=np.float32),
        rng.integers(0, 255, size=300).astype(np.float64),
    ]
    for values in cases:
        q = [float(rng.uniform(0, 100)), 0.5, 1.0, 99.0, 99.5, 0.0, 100.0]
        expected, got = np.percentile(values, q), percentiles(values, q)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), (values, q)


def test_non_finite_values_become_zero_and_clean_images_are_not_copied():
    x = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    x[0, 0, 0], x[0, 1, 1], x[0, 2, 2] = np.nan, np.inf, -np.inf
    spec = PreprocessSpec(size=(8, 8), crop_foreground=False, normalise="none")
    out = preprocess(Image(x, (1.0, 1.0), "array", {}), spec)
    assert np.isfinite(out).all() and out[0, 0, 0] == out[0, 1, 1] == out[0, 2, 2] == 0
    assert np.isnan(x[0, 0, 0])  # the caller's image is left as it was
