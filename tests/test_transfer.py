"""--init-from / --freeze: fine-tuning a bundle on another site's data."""

from __future__ import annotations

import pytest
import torch

from medclf.bundle import load_bundle
from medclf.errors import ConfigError
from medclf.training import train


def test_init_from_copies_weights_and_freeze_keeps_them(tiny_bundle, sim_data, tmp_path):
    source = load_bundle(tiny_bundle)
    out = tmp_path / "tuned"
    res = train(sim_data, out, init_from=str(tiny_bundle), freeze="stem,layer1", epochs=1, progress=False)
    tuned = load_bundle(out)
    assert res.plan.init_from["sha256"] == source.sha256
    assert tuned.manifest["recipe"]["freeze"] == ["stem", "layer1"]
    assert tuned.spec == source.spec and tuned.arch == source.arch
    src, new = source.model.state_dict(), tuned.model.state_dict()
    # Frozen groups (weights and batch-norm statistics) are exactly the source's; the rest has trained.
    for k in src:
        if k.startswith(("stem.", "layer1.")) and src[k].is_floating_point():
            assert torch.equal(src[k], new[k]), k
    assert not torch.equal(src["layer4.conv1.weight"], new["layer4.conv1.weight"])


def test_freeze_needs_init_from_and_known_groups(tiny_bundle, sim_data, tmp_path):
    with pytest.raises(ConfigError, match="--freeze needs --init-from"):
        train(sim_data, tmp_path / "a", freeze="stem", epochs=1, progress=False)
    with pytest.raises(ConfigError, match="unknown layer group"):
        train(
            sim_data, tmp_path / "b", init_from=str(tiny_bundle), freeze="encoder", epochs=1, progress=False
        )
    with pytest.raises(ConfigError, match="fixes --arch"):
        train(sim_data, tmp_path / "c", init_from=str(tiny_bundle), arch="resnet18", epochs=1, progress=False)
    # The source's intensity scaling comes with its weights: another one is refused, not silently ignored.
    with pytest.raises(ConfigError, match=r"keeps the source bundle's intensity scaling \(percentile\)"):
        train(
            sim_data, tmp_path / "d", init_from=str(tiny_bundle), normalise="fixed", epochs=1, progress=False
        )
    # So does its denoising (the tiny bundle was trained without any).
    with pytest.raises(ConfigError, match=r"keeps the source bundle's denoising \(none\)"):
        train(sim_data, tmp_path / "e", init_from=str(tiny_bundle), denoise="nlm", epochs=1, progress=False)
