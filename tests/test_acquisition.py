"""Acquisition cues from file headers and group labels per sample (medclf.data.acquisition)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medclf.data.acquisition import GROUP_KEYS, UNKNOWN, header_cues, jpeg_quality, sample_groups
from medclf.data.samples import SampleSet
from medclf.data.sources import load_source
from medclf.errors import ConfigError


def _png(path: Path, size: tuple[int, int], mode: str = "L") -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), dtype=np.uint8)
    PILImage.fromarray(arr).save(path)
    return path


def _jpeg(path: Path, quality: int, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(1)
    PILImage.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(path, quality=quality)
    return path


@pytest.mark.parametrize("quality", [20, 50, 75, 92, 100])
def test_jpeg_quality_is_recovered_from_the_quantisation_tables(tmp_path, quality):
    cues = header_cues(str(_jpeg(tmp_path / "a.jpg", quality)))
    assert abs(cues["jpeg_quality"] - quality) <= 1
    assert jpeg_quality([1] * 63) is None


def test_header_cues_of_png_and_jpeg(tmp_path):
    png = header_cues(str(_png(tmp_path / "a.png", (48, 32), "RGB")))
    assert png["format"] == "png" and png["width"] == 48 and png["height"] == 32
    assert png["mode"] == "RGB" and png["bit_depth"] == 8 and png["aspect"] == 1.5
    assert png["bytes_per_pixel"] == round(png["file_bytes"] / (48 * 32), 4)
    assert "jpeg_quality" not in png
    jpg = header_cues(str(_jpeg(tmp_path / "b.jpg", 80)))
    assert jpg["format"] == "jpeg" and jpg["mode"] == "L" and (jpg["width"], jpg["height"]) == (40, 30)
    json.dumps(png), json.dumps(jpg)


def test_16_bit_png_reports_its_bit_depth(tmp_path):
    p = tmp_path / "deep.png"
    PILImage.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).save(p)
    assert header_cues(str(p))["bit_depth"] == 16


def test_unreadable_files_give_no_cues(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert header_cues(str(tmp_path / "junk.png")) == {}
    assert header_cues(str(tmp_path / "empty.jpg")) == {}
    assert header_cues(str(tmp_path / "missing.png")) == {}
    assert header_cues(str(tmp_path)) == {}


def test_dicom_cues_hash_identifying_text(tmp_path):
    from tests.hostile_corpus import _dicom_bytes, _dicom_dataset

    ds = _dicom_dataset(rows=40, cols=50)
    ds.Manufacturer = "ACME Medical"
    ds.StationName = "MRI-NORTH-3"
    ds.InstitutionName = "St Example Hospital"
    ds.MagneticFieldStrength = 1.5
    ds.SliceThickness = 5
    ds.PixelSpacing = [0.5, 0.5]
    ds.BodyPartExamined = "BRAIN"
    p = tmp_path / "a.dcm"
    p.write_bytes(_dicom_bytes(ds))
    cues = header_cues(str(p), dicom_keywords=("PatientName", "EchoTime"))
    text = json.dumps(cues)
    for secret in ("ACME", "MRI-NORTH", "Example", "Hostile"):
        assert secret not in text
    assert cues["format"] == "dicom" and (cues["width"], cues["height"]) == (50, 40)
    assert cues["modality"] == "MR" and cues["body_part"] == "BRAIN" and cues["field_strength"] == 1.5
    assert cues["pixel_spacing"] == [0.5, 0.5] and cues["slice_thickness"] == 5.0 and cues["bit_depth"] == 12
    assert len(cues["station"]) == 10 and cues["station"] != cues["institution"]
    assert len(cues["dicom:PatientName"]) == 10 and "dicom:EchoTime" not in cues


def _csv_set(tmp_path: Path) -> SampleSet:
    rows = ["path,label,site"]
    for i in range(4):
        _png(tmp_path / f"big{i}.png", (64, 64))
        _png(tmp_path / f"small{i}.png", (32, 40))
        rows += [f"big{i}.png,tumour,A", f"small{i}.png,normal,{'B' if i else ''}"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return load_source(tmp_path / "m.csv")


def test_sample_groups_from_columns_cues_and_dicom_keywords(tmp_path):
    samples = _csv_set(tmp_path)
    assert sample_groups(samples, "site") == ["A", UNKNOWN, "A", "B", "A", "B", "A", "B"]
    assert sample_groups(samples, "size") == ["64x64", "32x40"] * 4
    assert sample_groups(samples, "format", workers=2) == ["png"] * 8
    assert sample_groups(samples, "aspect")[:2] == ["0.95-1.05", "0.8-0.95"]
    assert sample_groups(samples, "jpeg_quality") == ["not-jpeg"] * 8
    assert sample_groups(samples, "manufacturer") == [UNKNOWN] * 8
    assert sample_groups(samples, "StationName") == [UNKNOWN] * 8  # a DICOM keyword; PNGs have none


def test_every_group_key_labels_empty_cues_as_unknown():
    for key, label in GROUP_KEYS.items():
        assert label({}) == UNKNOWN, key


def test_unknown_group_key_is_a_one_line_config_error(tmp_path):
    samples = _csv_set(tmp_path)
    with pytest.raises(ConfigError) as err:
        sample_groups(samples, "scanner")
    assert "\n" not in str(err.value) and "site" in str(err.value) and "size" in str(err.value)


def test_npz_samples_take_cues_from_their_arrays():
    arrays = {"train": np.zeros((3, 28, 28), np.uint8), "test": np.zeros((2, 28, 28, 3), np.uint16)}
    samples = SampleSet(
        refs=["train/0", "train/1", "train/2", "test/0", "test/1"],
        labels=np.array([0, 1, 0, 1, 0]),
        splits=["train"] * 3 + ["test"] * 2,
        patient_ids=[None] * 5,
        classes=["a", "b"],
        source="x.npz",
        kind="npz",
        arrays=arrays,
    )
    assert sample_groups(samples, "size") == ["28x28"] * 5
    assert sample_groups(samples, "bit_depth") == ["8"] * 3 + ["16"] * 2
    assert sample_groups(samples, "mode") == ["grey"] * 3 + ["rgb"] * 2


def test_dicom_keyword_groups_are_hashed_and_group_keys_read_the_scanner(tmp_path):
    from tests.hostile_corpus import _dicom_bytes, _dicom_dataset

    for cls, station in (("a", "NORTH"), ("b", "SOUTH")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            ds = _dicom_dataset(rows=16, cols=16, identity=False)
            ds.StationName, ds.Manufacturer, ds.KVP = station, "ACME", 120
            (tmp_path / cls / f"{i}.dcm").write_bytes(_dicom_bytes(ds))
    samples = load_source(tmp_path)
    stations = sample_groups(samples, "StationName")
    assert len(set(stations)) == 2 and "NORTH" not in stations and UNKNOWN not in stations
    assert stations == sample_groups(samples, "station")  # the group key and the keyword agree
    assert set(sample_groups(samples, "manufacturer")) == {header_cues(samples.refs[0])["manufacturer"]}
    assert sample_groups(samples, "kvp") == ["120"] * 4 and sample_groups(samples, "modality") == ["MR"] * 4


def test_tiff_cues_report_size_and_bits(tmp_path):
    import tifffile

    p = tmp_path / "a.tif"
    tifffile.imwrite(p, np.zeros((20, 30), dtype=np.uint16))
    cues = header_cues(str(p))
    assert (
        cues["format"] == "tiff" and (cues["width"], cues["height"]) == (30, 20) and cues["bit_depth"] == 16
    )
