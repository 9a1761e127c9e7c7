"""Out-of-distribution guard: fitted at training, stored in the bundle, flags unusual inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from medclf.api import load_bundle
from medclf.errors import BundleError
from medclf.ood import OOD_FILE, fit_detector, input_statistics, penultimate_features


def test_mahalanobis_detector_on_known_gaussians():
    rng = np.random.default_rng(0)
    means = np.array([[0.0] * 8, [4.0] * 8])
    y = rng.integers(0, 2, 2000)
    train = means[y] + rng.normal(size=(2000, 8))
    val = means[rng.integers(0, 2, 500)] + rng.normal(size=(500, 8))
    det = fit_detector(train, y, val, quantile=0.99)
    flagged_in, _ = det.flags(means[rng.integers(0, 2, 1000)] + rng.normal(size=(1000, 8)))
    flagged_out, _ = det.flags(rng.normal(loc=-6.0, size=(200, 8)))
    assert 0.0 <= flagged_in.mean() < 0.04  # ~1 % by construction of the threshold
    assert flagged_out.all()
    # The nearest class decides: a point at a class mean scores ~0.
    assert det.score(means[:1])[0] < 0.5


def test_penultimate_features_are_the_last_linear_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.rand(5, 1, 2, 2)
    f = penultimate_features(model, x)
    expected = torch.relu(model[1](x.flatten(1))).detach().numpy()
    assert f.shape == (5, 3) and np.allclose(f, expected, atol=1e-6)


def test_bundle_carries_the_detector_and_predictions_flag_unusual_inputs(tiny_bundle, sim_data):
    b = load_bundle(tiny_bundle)
    info = b.manifest["ood"]
    assert info["file"] == OOD_FILE and OOD_FILE in b.manifest["files"] and np.isfinite(info["threshold"])
    in_dist = sorted((sim_data / "test").rglob("*.png"))[:6]
    rng = np.random.default_rng(1)
    # Unlike any brain slice: uniform noise and a bright checkerboard.
    noise = rng.random((64, 64)).astype(np.float32)
    checker = (np.indices((64, 64)).sum(0) // 8 % 2).astype(np.float32)
    res = b.predict([*in_dist, noise, checker])
    assert all("ood" in r and "ood_score" in r for r in res)
    ins, outs = res[: len(in_dist)], res[len(in_dist) :]
    assert max(r["ood_score"] for r in ins) < min(r["ood_score"] for r in outs)
    assert all(r["ood"] and "unlike the images" in r["warning"] for r in outs)
    json.dumps(res)  # JSON-serialisable as the CLI and the API send it


def test_tampered_detector_is_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / OOD_FILE).read_bytes())
    data[-1] ^= 1
    (copy / OOD_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"sha256 of {OOD_FILE}"):
        load_bundle(copy)


# ----------------------------------------------------------------------------------------------------
# version 2: the input statistics catch strangers whose features look familiar (issue 21, item 16)


def _blobs(rng: np.random.Generator, n: int, size: int = 28) -> np.ndarray:
    """Smooth bright blobs on a dark background, scaled to [0, 1]: the 'training data'."""
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(9, 19), rng.uniform(9, 19), rng.uniform(4, 8)
        img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + rng.normal(0, 0.02, (size, size))
        out.append((img - img.min()) / (img.max() - img.min()))
    return np.asarray(out, dtype=np.float32)[:, None]


def _speckle(rng: np.random.Generator, n: int, size: int = 28) -> np.ndarray:
    """Ultrasound-like speckle, scaled to [0, 1]."""
    img = rng.rayleigh(0.3, (n, size, size))
    return (img / img.max(axis=(1, 2), keepdims=True)).astype(np.float32)[:, None]


def test_guard_sees_in_the_pixels_what_the_features_cannot():
    # What the issue saw: a small network maps a brain MRI into BreastMNIST's feature clusters. Here the
    # strangers' features come from the very distribution of the training features; only pixels differ.
    rng = np.random.default_rng(0)
    means = np.array([[0.0] * 16, [3.0] * 16])

    def feats(n):
        y = rng.integers(0, 2, n)
        return means[y] + rng.normal(size=(n, 16)), y

    (train_f, y), (val_f, _), (test_f, _), (out_f, _) = feats(600), feats(200), feats(300), feats(300)
    train_x, val_x, test_x, out_x = _blobs(rng, 600), _blobs(rng, 200), _blobs(rng, 300), _speckle(rng, 300)

    features_only = fit_detector(train_f, y, val_f)
    assert features_only.flags(out_f)[0].mean() < 0.1  # the old guard cannot tell them apart
    det = fit_detector(train_f, y, val_f, train_inputs=train_x, val_inputs=val_x)
    assert det.version == 2 and det.manifest()["version"] == 2
    assert det.flags(out_f, out_x)[0].all()
    assert det.flags(test_f, test_x)[0].mean() <= 0.05
    # Features still count on their own: a feature outlier with ordinary pixels is flagged.
    assert det.flags(test_f + 12.0, test_x)[0].all()
    # Precomputed statistics give the same scores as the inputs.
    assert np.allclose(det.score(out_f, statistics=input_statistics(out_x)), det.score(out_f, out_x))
    with pytest.raises(ValueError, match="scores the preprocessed inputs"):
        det.score(out_f)


def test_input_statistics_fixed_length_finite_deterministic():
    rng = np.random.default_rng(0)
    for shape in [(3, 1, 28, 28), (2, 3, 32, 32), (2, 1, 12, 16, 16), (2, 1, 300, 200), (2, 16, 40, 40)]:
        x = rng.random(shape, dtype=np.float32)
        s = input_statistics(x)
        assert s.shape[0] == shape[0] and s.shape[1] > 30 and np.isfinite(s).all()
        assert np.array_equal(s, input_statistics(torch.from_numpy(x)))
        assert s.shape[1] == input_statistics(x[:0]).shape[1]
    flat = input_statistics(np.zeros((2, 1, 28, 28), np.float32))  # constant images: no NaN
    assert np.isfinite(flat).all()


def test_low_resolution_copies_are_flagged(tiny_bundle, sim_data):
    # Each test image shrunk to 8 px and enlarged back: what a MedMNIST thumbnail is to a larger model. The
    # network's features mistake most of them for brain slices; their missing fine texture gives them away.
    from PIL import Image as PILImage

    images = sorted((sim_data / "test").rglob("*.png"))
    thumbs = [
        np.asarray(PILImage.open(p).resize((8, 8), PILImage.BILINEAR).resize((64, 64), PILImage.BILINEAR))
        for p in images
    ]
    b = load_bundle(tiny_bundle)
    assert b.manifest["ood"]["version"] == 2
    assert all(r["ood"] for r in b.predict(thumbs))
    assert sum(r["ood"] for r in b.predict(images)) <= 2


def test_bundles_with_the_old_detector_score_as_before(tiny_bundle, sim_data, tmp_path):
    from medclf.bundle import save_bundle
    from medclf.data.cache import prepare
    from medclf.data.sources import load_source
    from medclf.ood import OODDetector

    b = load_bundle(tiny_bundle)
    samples = load_source(sim_data)
    prepared = prepare(samples, b.spec, progress=False)
    rows = np.flatnonzero(prepared.ok & (np.array(samples.splits) == "train"))
    x = np.asarray(prepared.tensors[rows], dtype=np.float32)
    old = fit_detector(
        penultimate_features(b.model, x[10:]),
        samples.labels[rows[10:]],
        penultimate_features(b.model, x[:10]),
    )
    info = old.manifest()
    assert "version" not in info  # exactly what version-1 bundles carry
    manifest = {
        k: v for k, v in b.manifest.items() if k not in ("files", "self_sha256", "created", "versions")
    }
    manifest["ood"] = info
    path = save_bundle(tmp_path / "old", model=b.model, manifest=manifest, writers={OOD_FILE: old.save})
    legacy = load_bundle(path)
    assert legacy.ood.version == 1
    images = sorted((sim_data / "test").rglob("*.png"))[:4]
    scores = [r["ood_score"] for r in legacy.predict(images)]
    from medclf.io import read_image
    from medclf.preprocess import preprocess

    xt = np.stack([preprocess(read_image(p), b.spec) for p in images])
    assert scores == pytest.approx(old.score(penultimate_features(b.model, xt)), abs=1e-3)
    # A detector from a newer medclf is refused with a clear message, not misread.
    with pytest.raises(BundleError, match="format version 99"):
        OODDetector.load(tiny_bundle / OOD_FILE, {**b.manifest["ood"], "version": 99})
