"""medclf pretrain (SimCLR backbone bundles), --init-from a backbone or a plain state dict, and the
linear-probe-then-fine-tune freeze schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medclf.bundle import load_bundle
from medclf.errors import BundleError
from medclf.pretrain import pretrain
from medclf.pretrain.simclr import contrastive_loss

TINY = {"size": 24, "arch": "compact-s", "batch_size": 12, "progress": False}


def test_monai_contrastive_loss_is_nt_xent():
    """The loss we rely on: identical views give a lower loss than unrelated ones, and it equals the
    NT-Xent written out (positive over all others, denominator counting the positive)."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    loss = contrastive_loss(0.5)
    assert float(loss(a, a)) < float(loss(a, b))
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / 0.5
    sim.fill_diagonal_(float("-inf"))
    pos = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    expected = torch.nn.functional.cross_entropy(sim, pos)
    assert float(loss(a, b)) == pytest.approx(float(expected), rel=1e-5)


@pytest.fixture(scope="module")
def backbone(sim_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "backbone"
    pretrain(sim_data, out, epochs=2, cache_dir=str(out.parent / "cache"), **TINY)
    return out


def test_backbone_bundle_verifies_and_describes_itself(backbone, sim_data):
    b = load_bundle(backbone)
    m = b.manifest
    assert m["kind"] == "backbone" and m["classes"] == []
    assert m["model"]["arch"] == "compact-s" and m["model"]["omitted"] == ["head.3.weight", "head.3.bias"]
    assert list(b.spec.input_shape) == [1, 24, 24]
    pre = m["pretraining"]
    assert pre["method"] == "simclr" and pre["epochs"] == 2 and len(pre["loss_curve"]) == 2
    assert pre["sources"][0]["path"] == str(sim_data) and pre["sources"][0]["splits"] == ["train"]
    assert len(pre["knn_probe"]["accuracy_curve"]) == 2  # the simulated data carry labels
    # No output layer in the weights: the sealed file holds the backbone only.
    from safetensors import safe_open

    with safe_open(str(backbone / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    assert "head.3.weight" not in names and "layer4.conv1.weight" in names


def test_tampered_backbone_is_refused(backbone, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(backbone, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["pretraining"]["epochs"] = 99
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="modified"):
        load_bundle(copy)
    # A classifier may not omit tensors: only a backbone's output layer may be missing.
    shutil.rmtree(copy)
    shutil.copytree(backbone, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"sha256 of model\.safetensors"):
        load_bundle(copy)


def test_pretrain_refuses_test_split_and_cli_exit_code(sim_data, tmp_path):
    from medclf.errors import ConfigError

    with pytest.raises(ConfigError, match="never read"):
        pretrain(sim_data, tmp_path / "x", splits="train,test", **TINY)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medclf",
            "pretrain",
            str(sim_data),
            "--out",
            str(tmp_path / "y"),
            "--splits",
            "test",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_pretrain_killed_after_a_checkpoint_resumes(sim_data, tmp_path):
    """A run killed (SIGKILL) after its first checkpoint continues from it with --resume, keeps the first
    epoch's history and ends with the planned epochs."""
    out = tmp_path / "bb"
    ckpt = tmp_path / "bb.ckpt"
    cmd = [sys.executable, "-m", "medclf", "pretrain", str(sim_data), "--out", str(out), "--epochs", "30"]
    cmd += ["--size", "24", "--arch", "compact-s", "--batch-size", "12", "--cache-dir", str(tmp_path / "c")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 240
        while not (ckpt / "state.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()
    done = json.loads((ckpt / "state.json").read_text())["epoch"] + 1
    assert 1 <= done < 30
    first_loss = json.loads((ckpt / "state.json").read_text())["history"][0]["loss"]
    res = pretrain(sim_data, out, resume=True, cache_dir=str(tmp_path / "c"), progress=False)
    assert res.epochs_run == 30 and res.history[0]["loss"] == first_loss
    assert load_bundle(out).manifest["pretraining"]["epochs"] == 30
    assert not ckpt.exists()


def test_resume_without_checkpoint_is_refused(sim_data, tmp_path):
    from medclf.errors import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint"):
        pretrain(sim_data, tmp_path / "none", resume=True, **TINY)


def test_plain_image_folder_is_a_source(tmp_path):
    """Unlabelled images in one folder (no class sub-folders) are enough to pretrain on."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"{i}.png")
    res = pretrain(
        folder, tmp_path / "bb", epochs=1, cache_dir=str(tmp_path / "c"), **{**TINY, "batch_size": 4}
    )
    manifest = load_bundle(res.bundle).manifest
    assert manifest["pretraining"]["knn_probe"] is None and manifest["pretraining"]["images"] == 16
