"""The bundle manifest: its JSON Schema accepts what every writer writes (and old bundles), refuses a wrong
field in one line naming it, and a recipe rebuilds the validation split its training run used."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medclf import bundle as bundle_mod
from medclf.bundle import load_bundle, save_bundle, update_bundle
from medclf.data.samples import DEFAULT_VAL_FRACTION
from medclf.data.sources import load_source
from medclf.data.splits import ensure_validation
from medclf.errors import BundleError
from medclf.manifest import MANIFEST_VERSION, SCHEMA, Manifest, ManifestInvalid, Recipe, check_manifest
from medclf.models import create_model
from medclf.preprocess import PreprocessSpec


def _manifest_of(path: Path) -> dict:
    return json.loads((path / "bundle.json").read_text())


def _reseal(path: Path, edit) -> None:
    """Edit bundle.json and recompute its hash, as anyone with a text editor and sha256sum can."""
    m = _manifest_of(path)
    edit(m)
    m["self_sha256"] = bundle_mod._SELF_PLACEHOLDER
    (path / "bundle.json").write_bytes(bundle_mod._seal(m))


@pytest.fixture
def copied(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))


def test_the_schema_is_a_valid_json_schema():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(SCHEMA)


def test_a_trained_bundle_fits_the_schema_and_carries_the_version(tiny_bundle):
    m = _manifest_of(tiny_bundle)
    check_manifest(m)
    assert m["manifest_version"] == MANIFEST_VERSION
    typed = Manifest.from_dict(load_bundle(tiny_bundle).manifest)
    assert typed.version == MANIFEST_VERSION and typed.kind == "classifier"
    assert typed.model.arch == "compact-s" and typed.model.n_classes == len(typed.classes) == 3
    assert typed.task == "multiclass" and typed.recipe.val_fraction == DEFAULT_VAL_FRACTION
    assert not typed.recipe.is_ensemble and typed.recipe.val_fold is None


@pytest.mark.slow
def test_ensemble_and_exported_bundles_fit_the_schema(tiny_bundle, sim_data, tmp_path):
    from medclf.compress.pipeline import export_bundle
    from medclf.fusion import ensemble

    twin = Path(shutil.copytree(tiny_bundle, tmp_path / "twin"))
    update_bundle(twin, {"note": "a second member with the same weights"})  # another sha256
    fused = ensemble([tiny_bundle, twin], tmp_path / "ens", data=sim_data, progress=False).bundle
    exported = export_bundle(tiny_bundle, tmp_path / "onnx", data=sim_data, onnx=True, progress=False).bundle
    for path in (twin, fused, exported):
        m = _manifest_of(path)
        check_manifest(m)
        load_bundle(path)
    assert Manifest.from_dict(_manifest_of(fused)).recipe.is_ensemble
    assert "compression" in _manifest_of(exported)


def test_a_wrong_type_in_a_known_field_is_refused_in_one_line_naming_it(copied):
    _reseal(copied, lambda m: m["model"].update(n_classes="3"))
    with pytest.raises(BundleError) as info:
        load_bundle(copied)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith("bundle.json's model.n_classes must be an integer, not a string")
    # Every hash matches: the schema is what refuses these.
    _reseal(copied, lambda m: m["model"].update(n_classes=3) or m["recipe"].update(val_fold=[1]))
    with pytest.raises(BundleError, match=r"bundle\.json's recipe\.val_fold .* too short"):
        load_bundle(copied)
    _reseal(copied, lambda m: m["recipe"].update(val_fold=None) or m["calibration"].update(temperature=None))
    with pytest.raises(BundleError, match=r"calibration\.temperature must be a number, not null"):
        load_bundle(copied)


def test_the_cli_refuses_such_a_bundle_with_exit_code_2(copied):
    _reseal(copied, lambda m: m.update(classes="tumour"))
    proc = subprocess.run(
        [sys.executable, "-m", "medclf", "info", str(copied)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "bundle.json's classes must be an array, not a string" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_old_manifest_without_versions_still_loads(copied):
    # Bundles written before manifest_version existed (and a hand-made one without format_version).
    _reseal(copied, lambda m: [m.pop(k) for k in ("manifest_version", "format_version")])
    b = load_bundle(copied)
    typed = Manifest.from_dict(b.manifest)
    assert typed.version == 0 and b.arch == "compact-s"


def test_unknown_sections_and_fields_pass(tiny_bundle):
    m = _manifest_of(tiny_bundle)
    m["thresholds"] = {"labels": [0.3, 0.5, 0.7]}  # per-label operating thresholds (multi-label)
    m["model"]["head"] = {"kind": "sigmoid"}
    m["recipe"]["a_future_setting"] = [1, 2]
    check_manifest(m)
    # A backbone bundle (medclf pretrain): no classes, no recipe, its output layer omitted.
    backbone = {k: m[k] for k in ("format", "format_version", "preprocess", "files", "self_sha256")}
    backbone.update(
        kind="backbone",
        classes=[],
        model={**m["model"], "omitted": ["head.3.weight", "head.3.bias"]},
        pretraining={"method": "simclr", "history": []},
    )
    check_manifest(backbone)
    assert Manifest.from_dict(backbone).kind == "backbone"


def test_a_writer_that_breaks_the_schema_fails_at_save(tmp_path):
    manifest = {
        "model": {"arch": "compact-s", "kwargs": {}, "in_channels": 1, "n_classes": 3, "spatial_dims": 2},
        "classes": ["a", "b", "c"],
        "preprocess": PreprocessSpec(size=(16, 16)).to_dict(),
        "recipe": {"seed": "0"},
    }
    with pytest.raises(ManifestInvalid, match=r"^recipe\.seed must be an integer, not a string$"):
        save_bundle(tmp_path / "b", model=create_model("compact-s", 1, 3, 2), manifest=manifest)
    assert not (tmp_path / "b").exists()


def test_rebuild_splits_gives_the_split_training_used(tiny_bundle, sim_data):
    b = load_bundle(tiny_bundle)
    recipe = Manifest.from_dict(b.manifest).recipe
    samples = load_source(sim_data, default_split="train")
    rebuilt = recipe.rebuild_splits(samples)
    # What the bundle recorded: its per-split counts, and the content of every training file.
    assert rebuilt.summary() == b.manifest["data"]["counts"]
    train = {rebuilt.content_hash(i) for i in rebuilt.indices("train")}
    assert train == set(json.loads(b.read_file("train_hashes.json")))
    assert len(rebuilt.indices("val")) > 0


def test_one_fallback_rule_for_old_recipes(sim_data):
    samples = load_source(sim_data, default_split="train")

    def val_of(recipe: dict) -> np.ndarray:
        return Recipe.from_dict(recipe).rebuild_splits(samples).indices("val")

    by_seed_3 = ensure_validation(samples, fraction=DEFAULT_VAL_FRACTION, seed=3).indices("val")
    # No split_seed (or a null one): the training seed drew the split; no fraction: the default one.
    assert np.array_equal(val_of({"seed": 3}), by_seed_3)
    assert np.array_equal(val_of({"seed": 3, "split_seed": None}), by_seed_3)
    assert np.array_equal(
        val_of({"seed": 7, "split_seed": 3, "val_fraction": DEFAULT_VAL_FRACTION}), by_seed_3
    )
    assert not np.array_equal(val_of({"seed": 3, "val_fraction": 0.3}), by_seed_3)
    assert np.array_equal(val_of({}), ensure_validation(samples, seed=0).indices("val"))
