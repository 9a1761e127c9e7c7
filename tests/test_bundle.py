"""Bundles: hashes verified on load, any changed byte refused, atomic writes, no pickle anywhere."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medclf import bundle as bundle_mod
from medclf.bundle import load_bundle, save_bundle, update_bundle, verify_bundle, zip_bundle
from medclf.errors import BundleError
from medclf.models import create_model
from medclf.preprocess import PreprocessSpec

SRC = Path(__file__).resolve().parents[1] / "src" / "medclf"


def _manifest(spec=None):
    spec = spec or PreprocessSpec(size=(16, 16))
    return {
        "model": {"arch": "compact-s", "kwargs": {}, "in_channels": 1, "n_classes": 3, "spatial_dims": 2},
        "classes": ["a", "b", "c"],
        "preprocess": spec.to_dict(),
        "metrics": {"val": {"auc": 0.5}},
    }


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("compact-s", 1, 3, 2)
    path = save_bundle(tmp_path / "b", model=model, manifest=_manifest(), extra_files={"notes.txt": "hello"})
    return path, model


def test_roundtrip_gives_identical_predictions(saved):
    path, model = saved
    b = load_bundle(path)
    x = torch.rand(4, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model(x), 1).numpy()
    assert np.allclose(b.predict_tensors(x), expected, atol=1e-6)
    assert b.classes == ["a", "b", "c"] and b.spec == PreprocessSpec(size=(16, 16))
    assert len(b.sha256) == 64
    assert set(b.manifest["files"]) == {"model.safetensors", "notes.txt"}
    assert b.manifest["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("name", ["model.safetensors", "bundle.json", "notes.txt"])
def test_one_changed_byte_is_refused(saved, name):
    path, _ = saved
    f = path / name
    data = bytearray(f.read_bytes())
    pos = len(data) // 2
    if name == "bundle.json":
        # change a digit inside the metrics: still valid JSON, different content
        text = data.decode()
        pos = text.index('"auc": 0.5') + len('"auc": 0.')
    data[pos] = ord("7") if data[pos] != ord("7") else ord("8")
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="integrity check failed"):
        load_bundle(path)


def test_missing_file_and_not_a_bundle(saved, tmp_path):
    path, _ = saved
    (path / "notes.txt").unlink()
    with pytest.raises(BundleError, match=r"notes\.txt is missing"):
        load_bundle(path)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"bundle\.json is missing"):
        load_bundle(tmp_path / "empty")


def test_expected_sha256(saved):
    path, _ = saved
    b = load_bundle(path)
    assert load_bundle(path, expected_sha256=b.sha256).sha256 == b.sha256
    with pytest.raises(BundleError, match="expected"):
        load_bundle(path, expected_sha256="0" * 64)


def test_crash_while_writing_keeps_previous_bundle(saved, monkeypatch):
    path, model = saved
    before = verify_bundle(path)["self_sha256"]

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing weights")

    monkeypatch.setattr(bundle_mod, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_bundle(path, model=model, manifest=_manifest(PreprocessSpec(size=(32, 32))))
    assert verify_bundle(path)["self_sha256"] == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_overwrite_and_update(saved):
    path, _model = saved
    first = load_bundle(path).sha256
    update_bundle(path, {"metrics": {"val": {"auc": 0.9}, "test": {"auc": 0.8}}})
    b = load_bundle(path)
    assert b.sha256 != first and b.manifest["metrics"]["test"]["auc"] == 0.8
    assert (path / "notes.txt").read_text() == "hello"


def test_zip_roundtrip_and_zip_slip(saved, tmp_path):
    path, _ = saved
    z = zip_bundle(path)
    assert load_bundle(z).sha256 == load_bundle(path).sha256
    import zipfile

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(BundleError, match="unsafe file name"):
        load_bundle(evil)


def test_manifest_cannot_point_outside_the_bundle(saved):
    path, _ = saved
    m = json.loads((path / "bundle.json").read_text())
    assert "self_sha256" in m
    with pytest.raises(BundleError):
        bundle_mod._check_name("../model.safetensors")


def test_no_pickle_anywhere_in_the_package():
    offenders = []
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        if re.search(r"^\s*import pickle|torch\.load\(|allow_pickle\s*=\s*True|joblib\.load", text, re.M):
            offenders.append(str(f))
    assert not offenders, f"pickle-based loading found in {offenders}"
