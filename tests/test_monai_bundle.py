"""MONAI bundle export (issue 24, item 4): ``medclf export BUNDLE --monai-bundle OUT``, checked with MONAI's
own commands (``python -m monai.bundle verify_metadata / verify_net_in_out / run``) and against
``Predictor.predict``."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from medclf.api import load_bundle
from medclf.interop.monai_bundle import METADATA_SCHEMA

from .inprocess import run_medclf

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _run(*args: str | Path, module: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600
    )


@pytest.fixture(scope="module")
def calibrated(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with a temperature other than 1 (its validation split is too small to fit one), so
    that the MONAI bundle must carry it over."""
    from medclf.bundle import update_bundle

    copy = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(tiny_bundle, copy)
    calibration = {**load_bundle(copy).manifest.get("calibration", {}), "temperature": 2.5}
    update_bundle(copy, {"calibration": calibration})
    assert load_bundle(copy).temperature == 2.5
    return copy


@pytest.fixture(scope="module")
def monai_bundle(calibrated, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("monai") / "bundle"
    # medclf's side in this process (tests/inprocess.py); MONAI's commands below run in their own processes,
    # which also shows that the exported bundle needs nothing of medclf's state.
    run = run_medclf("export", calibrated, "--monai-bundle", out)
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> Path:
    """The metadata schema to verify against: MONAI's published file when $MEDCLF_MONAI_SCHEMA names a
    copy of it, else medclf's offline restatement of what it requires."""
    official = os.environ.get("MEDCLF_MONAI_SCHEMA")
    if official:
        return Path(official)
    path = tmp_path_factory.mktemp("schema") / "meta_schema.json"
    path.write_text(json.dumps(METADATA_SCHEMA), encoding="utf-8")
    return path


def test_the_export_is_a_monai_bundle_without_pickle(monai_bundle, calibrated, tmp_path):
    files = sorted(str(p.relative_to(monai_bundle)) for p in monai_bundle.rglob("*") if p.is_file())
    assert files == [
        "configs/inference.json",
        "configs/logging.conf",
        "configs/metadata.json",
        "docs/README.md",
        "models/model.safetensors",
    ]
    assert (monai_bundle / "models" / "model.safetensors").read_bytes() == (
        calibrated / "model.safetensors"
    ).read_bytes()
    readme = (monai_bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert load_bundle(calibrated).sha256 in readme and "python -m monai.bundle run" in readme
    # Never over an existing folder; not mixed with compression options.
    again = run_medclf("export", calibrated, "--monai-bundle", monai_bundle)
    assert again.returncode == 2 and "not an empty folder" in again.stderr and "Traceback" not in again.stderr
    mixed = run_medclf("export", calibrated, "--monai-bundle", tmp_path / "m", "--onnx")
    assert mixed.returncode == 2 and "compress it first" in mixed.stderr and not (tmp_path / "m").exists()


def test_monai_verifies_the_metadata_and_the_network(monai_bundle, schema):
    meta = monai_bundle / "configs" / "metadata.json"
    verified = _run("verify_metadata", "--meta_file", meta, "--filepath", schema, module="monai.bundle")
    assert verified.returncode == 0 and "verified with no error" in verified.stdout + verified.stderr, (
        verified.stdout + verified.stderr
    )
    # The schema is not a rubber stamp: metadata without a required key fails it.
    broken = json.loads(meta.read_text(encoding="utf-8"))
    del broken["task"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(schema.read_text(encoding="utf-8")))
    # The network built from the config takes the input and gives the output the metadata describes.
    shapes = _run(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        meta,
        "--config_file",
        monai_bundle / "configs" / "inference.json",
        module="monai.bundle",
    )
    assert shapes.returncode == 0 and "verified with no error" in shapes.stdout + shapes.stderr, (
        shapes.stdout + shapes.stderr
    )


def test_monai_runs_inference_on_a_folder_with_medclfs_probabilities(
    monai_bundle, calibrated, sim_data, tmp_path
):
    images = tmp_path / "images"
    images.mkdir()
    for png in sorted((sim_data / "test").rglob("*.png"))[:6]:
        shutil.copy(png, images / f"{png.parent.name}-{png.name}")
    dicom = dcmread(get_testdata_file("MR_small.dcm"))
    dicom.save_as(images / "mr.dcm", enforce_file_format=True)
    out = tmp_path / "eval"
    run = _run(
        "run",
        "--config_file",
        monai_bundle / "configs" / "inference.json",
        "--bundle_root",
        monai_bundle,
        "--dataset_dir",
        images,
        "--output_dir",
        out,
        module="monai.bundle",
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    bundle = load_bundle(calibrated)  # temperature 2.5: the MONAI run must apply it too
    expected = {r["path"]: r for r in bundle.predict([images], engine="torch")}
    assert sorted(r["path"] for r in rows) == sorted(expected) and len(rows) == 7
    for row in rows:
        want = expected[row["path"]]
        assert row["predicted"] == want["predicted"]
        for name in bundle.classes:
            assert abs(float(row[f"prob_{name}"]) - want["probabilities"][name]) <= 1e-4
