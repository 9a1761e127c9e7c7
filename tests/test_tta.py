"""Test-time augmentation: the views, invariance, and what evaluate and predict record."""

import numpy as np
import pytest
import torch

import medclf
from medclf.api import load_bundle
from medclf.errors import ConfigError
from medclf.evaluation.runner import evaluate
from medclf.tta import apply_view, default_transforms, resolve


def test_views_move_content_as_named():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert torch.equal(apply_view(x, "identity"), x)
    assert torch.equal(apply_view(x, "flip1"), x.flip(3))
    assert torch.equal(apply_view(x, "flip0"), x.flip(2))
    right = apply_view(x, "shift1+1")  # content moves one column right, the left edge is replicated
    assert torch.equal(right[..., 1:], x[..., :-1]) and torch.equal(right[..., 0], x[..., 0])
    up = apply_view(x, "shift0-2")
    assert torch.equal(up[..., :2, :], x[..., 2:, :]) and torch.equal(up[..., 3, :], x[..., 3, :])
    vol = torch.rand(2, 1, 4, 5, 6)
    assert torch.equal(apply_view(vol, "flip2"), vol.flip(4))


def test_resolve_names_and_refusals():
    assert resolve(None, (32, 32)) == [] and resolve(False, (32, 32)) == []
    assert resolve(True, (64, 64)) == default_transforms((64, 64))
    assert default_transforms((64, 64)) == [
        "identity",
        "flip1",
        "shift0+2",
        "shift0-2",
        "shift1+2",
        "shift1-2",
    ]
    assert resolve(True, (16, 16, 16)) == ["identity", "flip0", "flip1", "flip2"]
    assert resolve("identity, flip1", (32, 32)) == ["identity", "flip1"]
    for bad in ("rotate90", "flip2", "shift0*3"):
        with pytest.raises(ConfigError, match="test-time transform"):
            resolve([bad], (32, 32))


def test_tta_changes_nothing_for_an_invariant_input(tiny_bundle):
    b = load_bundle(tiny_bundle)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=gen)
    symmetric = ((x + x.flip(3)) / 2).numpy()
    plain = b.predict_tensors(symmetric)
    assert np.allclose(b.predict_tensors(symmetric, tta=["identity", "flip1"]), plain, atol=1e-12)
    constant = np.full((2, 1, 32, 32), 0.4, dtype=np.float32)  # invariant under flips and shifts
    assert np.allclose(b.predict_tensors(constant, tta=True), b.predict_tensors(constant), atol=1e-12)
    # An ordinary input does change: the test above can fail.
    assert not np.allclose(b.predict_tensors(x.numpy(), tta=True), b.predict_tensors(x.numpy()), atol=1e-6)
    # TTA averages the views' probabilities.
    views = [b.predict_tensors(apply_view(x, v).numpy()) for v in default_transforms((32, 32))]
    assert np.allclose(b.predict_tensors(x.numpy(), tta=True), np.mean(views, axis=0), atol=1e-12)


def test_evaluate_and_predict_record_tta(tiny_bundle, sim_data, tmp_path):
    with_tta = evaluate(tiny_bundle, sim_data, tmp_path / "tta", tta=True, n_bootstrap=20, progress=False)
    assert with_tta["tta"]["transforms"] == default_transforms((32, 32))
    assert "mean" in with_tta["tta"]["combine"]
    without = evaluate(tiny_bundle, sim_data, tmp_path / "plain", n_bootstrap=20, progress=False)
    assert without["tta"] is None
    assert with_tta["n"] == without["n"]

    files = sorted((sim_data / "test" / "tumour").glob("*.png"))[:3]
    answers = medclf.predict(tiny_bundle, files, tta=True)
    assert [a["path"] for a in answers] == [str(f) for f in files]
    assert all(abs(sum(a["probabilities"].values()) - 1) < 1e-9 for a in answers)
    with pytest.raises(ConfigError, match="test-time transform"):
        medclf.predict(tiny_bundle, files, tta=["mirror"])
