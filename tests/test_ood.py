"""Out-of-distribution guard: fitted at training, stored in the bundle, flags unusual inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from medclf.bundle import load_bundle
from medclf.ood import OOD_FILE, fit_detector, penultimate_features


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

    from medclf.errors import BundleError

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / OOD_FILE).read_bytes())
    data[-1] ^= 1
    (copy / OOD_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"sha256 of {OOD_FILE}"):
        load_bundle(copy)
