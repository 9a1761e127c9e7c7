"""Patient privacy: `medclf deid` follows the PS3.15 Basic Profile, and nothing medclf writes while training,
evaluating, auditing or predicting on identified DICOM contains the identity."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from medclf.errors import ConfigError, InputRejected
from medclf.io import read_image
from medclf.privacy import _ACTIONS, BASIC_PROFILE, BASIC_PROFILE_CODE, KEPT_UIDS, deidentify

from .inprocess import run_medclf

# Identity planted in the test files: distinctive strings that occur nowhere else.
IDENTITY = {
    "PatientName": "Zyxwvut^Qwertyuiop",
    "PatientID": "PID-77231-SECRET",
    "PatientBirthDate": "18770523",
    "PatientAddress": "12 Hushhush Lane",
    "OtherPatientIDs": "OTHER-55213",
    "InstitutionName": "Hospital Kappa Sigma",
    "ReferringPhysicianName": "Plmokn^Ijnuhb",
    "AccessionNumber": "ACC99817",
    "StudyDescription": "Zyxwvut follow-up",
    "StudyDate": "20240102",
}
TOKENS = [
    "Zyxwvut",
    "Qwertyuiop",
    "77231",
    "18770523",
    "Hushhush",
    "55213",
    "Kappa Sigma",
    "Plmokn",
    "ACC99817",
]


def identified_dicom(
    pixels: np.ndarray, *, patient: int = 0, study: str, series: str, frame_of_reference: str = "1.2.3.4"
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = frame_of_reference
    ds.Modality = "MR"
    for keyword, value in IDENTITY.items():
        setattr(ds, keyword, value)
    ds.PatientID = f"{IDENTITY['PatientID']}-{patient}"
    ds.PatientName = f"{IDENTITY['PatientName']}{patient}"
    ds.StudyID = "STUDY-1"
    ds.SeriesDescription = "axial Zyxwvut"
    ds.ImageComments = "scanned for Qwertyuiop"
    block = ds.private_block(0x0009, "ACME MEDICAL", create=True)
    block.add_new(0x10, "LO", "private note on Zyxwvut")
    ds.add_new(0x60000010, "US", 64)  # overlay plane
    ds.add_new(0x60003000, "OW", b"\x01" * 512)
    ds.add_new(0x50000005, "US", 2)  # a (retired) curve
    ds.set_pixel_data(pixels, "MONOCHROME2", 8 * pixels.dtype.itemsize)
    return ds


def write(ds: Dataset, path: Path, preamble: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble is not None:
        ds.preamble = preamble.ljust(128, b"\x00")
    ds.save_as(path, enforce_file_format=True)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    """Two images of one study (the second refers to the first), one with burned-in text, one PNG."""
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    study_uid, series_uid = generate_uid(), generate_uid()
    a = identified_dicom(rng.integers(0, 4000, (32, 32), np.uint16), study=study_uid, series=series_uid)
    b = identified_dicom(rng.integers(0, 4000, (32, 32), np.uint16), study=study_uid, series=series_uid)
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = a.SOPClassUID, a.SOPInstanceUID
    b.ReferencedImageSequence = [ref]
    write(a, src / "series1" / "img1.dcm", preamble=b"MZ\x90\x00This program cannot be run in DOS mode")
    write(b, src / "series1" / "img2.dcm")
    c = identified_dicom(rng.integers(0, 4000, (32, 32), np.uint16), study=study_uid, series=generate_uid())
    c.BurnedInAnnotation = "YES"
    write(c, src / "series2" / "burned.dcm")
    write(a, src / "Qwertyuiop0" / "scan.dcm")  # a folder name holding the patient's name
    PILImage.fromarray(np.zeros((16, 16), np.uint8)).save(src / "photo.png")
    return src


def test_profile_table_resolves() -> None:
    n = sum(len(v.split()) for v in BASIC_PROFILE.values())
    assert n > 500 and len(_ACTIONS) == n  # every keyword names one known tag, none twice
    assert all(pydicom.datadict.dictionary_VR(keyword) == "UI" for keyword in KEPT_UIDS)
    for keyword, action in [("PatientName", "Z"), ("PatientBirthDate", "Z"), ("PatientAddress", "X"),
                            ("StudyInstanceUID", "U"), ("InstitutionName", "D"), ("ContentDate", "D"),
                            ("AcquisitionDate", "Z"), ("ReferencedImageSequence", "U*")]:  # fmt: skip
        assert _ACTIONS[int(pydicom.datadict.tag_for_keyword(keyword))] == action, keyword


def test_deid_follows_the_basic_profile(study: Path, tmp_path: Path) -> None:
    inputs = {p: digest(p) for p in study.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    salt = tmp_path / "salt"
    salt.write_text("a secret salt of enough length\n")
    proc = run_medclf("deid", study, out, "--salt-file", salt, "--report", tmp_path / "report.json")
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2, proc.stderr  # the burned-in image was refused
    assert "burned" in proc.stderr.lower() and "photo.png" in proc.stderr and "not DICOM" in proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["input"] for r in report["refused"]] == [str(study / "series2" / "burned.dcm")]
    assert [r["input"] for r in report["skipped"]] == [str(study / "photo.png")]
    assert report["renamed"] == [str(study / "Qwertyuiop0" / "scan.dcm")]
    # img1 and its copy under an identifying name carry an executable (PE) preamble
    assert sorted(report["neutralised_preambles"]) == [
        str(study / "Qwertyuiop0" / "scan.dcm"),
        str(study / "series1" / "img1.dcm"),
    ]
    assert {p: digest(p) for p in study.rglob("*") if p.is_file()} == inputs  # the input is untouched
    assert not (out / "series2").exists()

    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(written) == 3 and not any(t in str(p) for p in written for t in TOKENS)
    a_in, b_in = (pydicom.dcmread(study / "series1" / n) for n in ("img1.dcm", "img2.dcm"))
    a, b = (pydicom.dcmread(out / "series1" / n) for n in ("img1.dcm", "img2.dcm"))
    for ds, orig in ((a, a_in), (b, b_in)):
        assert ds.preamble == b"\x00" * 128
        # Z: emptied (PatientName/ID get a keyed pseudonym, the same for one patient)
        assert ds.PatientName == ds.PatientID and str(ds.PatientID).startswith("ANON-")
        for kw in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName", "StudyDate", "StudyID"):
            assert kw in ds and not ds[kw].value, kw
        # X: removed
        for kw in (
            "PatientAddress",
            "OtherPatientIDs",
            "StudyDescription",
            "SeriesDescription",
            "ImageComments",
        ):
            assert kw not in ds, kw
        assert ds.InstitutionName == "ANONYMIZED"  # X/Z/D: a dummy value
        # U: new UIDs under 2.25, file meta consistent
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            assert ds[kw].value.startswith("2.25.") and ds[kw].value != orig[kw].value, kw
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == orig.SOPClassUID and ds.Modality == "MR"
        # private attributes, overlays and curves are gone
        assert not any(e.tag.is_private or (e.tag.group & 0xFF00) in (0x5000, 0x6000) for e in ds)
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
        code = ds.DeidentificationMethodCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == BASIC_PROFILE_CODE
        assert ds.DeidentificationMethod
        np.testing.assert_array_equal(ds.pixel_array, orig.pixel_array)
    # Consistent across the study: same study/series, and b's reference points at a's new UID.
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    # No identifying string survives anywhere in the written bytes.
    for p in written:
        blob = p.read_bytes().lower()
        assert not [t for t in TOKENS if t.lower().encode() in blob], p
    renamed = pydicom.dcmread(out / f"{a.SOPInstanceUID}.dcm")
    assert renamed.SOPInstanceUID == a.SOPInstanceUID  # same input, same salt: same UID
    # The input's executable preamble is refused by the reader; the de-identified copy reads.
    with pytest.raises(InputRejected) as info:
        read_image(study / "series1" / "img1.dcm")
    assert info.value.reason == "executable_preamble"
    np.testing.assert_array_equal(read_image(out / "series1" / "img1.dcm").pixels[0], a_in.pixel_array)


def test_uid_mapping_is_keyed_and_deterministic(study: Path, tmp_path: Path, monkeypatch) -> None:
    src = study / "series1" / "img2.dcm"
    monkeypatch.setenv("MEDCLF_DEID_SALT", "first secret salt value")
    deidentify(src, tmp_path / "one.dcm")
    deidentify(src, tmp_path / "two.dcm")
    monkeypatch.setenv("MEDCLF_DEID_SALT", "another secret salt value")
    deidentify(src, tmp_path / "three.dcm")
    one, two, three = (pydicom.dcmread(tmp_path / f"{n}.dcm") for n in ("one", "two", "three"))
    assert one.StudyInstanceUID == two.StudyInstanceUID != three.StudyInstanceUID
    assert one.PatientID == two.PatientID != three.PatientID
    monkeypatch.delenv("MEDCLF_DEID_SALT")
    report = deidentify(src, f"{tmp_path / 'folder'}/")  # a trailing slash: write into that folder
    assert report.written == [(str(src), str(tmp_path / "folder" / "img2.dcm"))]
    with pytest.raises(ConfigError):
        deidentify(src, tmp_path / "x.dcm", salt_file=tmp_path / "missing")


def test_deid_refuses_what_it_must(study: Path, tmp_path: Path) -> None:
    with pytest.raises(InputRejected) as info:
        deidentify(study / "photo.png", tmp_path / "p.dcm")
    assert info.value.reason == "unsupported_format" and "not DICOM" in info.value.message
    with pytest.raises(ConfigError):
        deidentify(study, study / "anon")  # output inside the input
    with pytest.raises(ConfigError):
        deidentify(study / "series1", study)  # output containing the input
    one = study / "series1" / "img1.dcm"
    with pytest.raises(ConfigError):
        deidentify(one, one)  # never over the input
    proc = run_medclf("deid", study / "photo.png", tmp_path / "x.dcm")
    assert proc.returncode == 2 and "not DICOM" in proc.stderr and "Traceback" not in proc.stderr
    burned = deidentify(study / "series2" / "burned.dcm", tmp_path / "b.dcm", allow_burned_in=True)
    assert burned.flagged == [str(study / "series2" / "burned.dcm")] and (tmp_path / "b.dcm").exists()


def test_nothing_written_holds_identity(sim_data: Path, tmp_path: Path, caplog) -> None:
    """Train, evaluate, audit and predict on DICOM carrying names, ids and birth dates: no file written
    (bundle, report, metrics, predictions, audit, cache) and no log line contains any of them."""
    from medclf.cli import app

    data = tmp_path / "dicom-data"
    study, series = generate_uid(), generate_uid()
    for i, png in enumerate(sorted(sim_data.rglob("*.png"))):
        pixels = np.asarray(PILImage.open(png).convert("L"), dtype=np.uint8)
        ds = identified_dicom(pixels, patient=i, study=study, series=series)
        write(ds, data / png.relative_to(sim_data).with_suffix(".dcm"))
    planted = next(data.rglob("*.dcm")).read_bytes().lower()
    assert all(t.lower().encode() in planted for t in TOKENS)  # the scan below can see the identity
    out, cache = tmp_path / "outputs", tmp_path / "cache"
    runner = CliRunner()
    logs = []
    caplog.set_level(logging.DEBUG)
    commands = [
        ["audit", str(data), "--out", str(out / "audit.json"), "--no-progress", "--workers", "1"],
        ["train", str(data), "--out", str(out / "bundle"), "--epochs", "1", "--size", "32", "--arch",
         "compact-s", "--batch-size", "16", "--no-progress", "--cache-dir", str(cache), "--workers", "1"],
        ["evaluate", str(out / "bundle"), str(data), "--out", str(out / "eval"), "--no-progress",
         "--cache-dir", str(cache), "--workers", "1"],
        ["predict", str(out / "bundle"), str(data / "test"), "--format", "csv", "--out", str(out / "pred.csv")],
        ["info", str(out / "bundle")],
    ]  # fmt: skip
    for args in commands:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output, result.exception)
        logs.append(result.output)
    logs.extend(record.getMessage() for record in caplog.records)
    written = [p for p in out.rglob("*") if p.is_file()] + [p for p in cache.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"model.safetensors", "bundle.json", "report.html", "metrics.json", "predictions.csv"} <= names
    leaks = {}
    for p in written:
        blob = p.read_bytes().lower()
        found = [t for t in TOKENS if t.lower().encode() in blob]
        if found:
            leaks[str(p)] = found
    text = "\n".join(logs).lower()
    leaks["logs"] = [t for t in TOKENS if t.lower() in text]
    assert not any(leaks.values()), leaks


# -- the catch-all by value representation and metadata inside compressed frames (issue 21, item 13) --------


def _jpeg_frame(pixels: np.ndarray, *, comment: bytes, exif_text: str) -> bytes:
    """A baseline JPEG of ``pixels`` carrying a COM segment and an APP1 Exif segment (Pillow's encoder)."""
    import io

    exif = PILImage.Exif()
    exif[0x010E] = exif_text  # ImageDescription
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, "JPEG", quality=90, comment=comment, exif=exif.tobytes())
    return buf.getvalue()


def _plant_markers(ds: Dataset, level: int, markers: list[str]) -> None:
    """Put a unique marker in every public PN, DA, DT, TM and UI attribute of pydicom's data dictionary
    (except the class and transfer syntax UIDs deid keeps: they get registered UIDs)."""
    from pydicom.datadict import DicomDictionary

    base = np.datetime64("1801-01-01") + level * 400
    for n, (tag, entry) in enumerate(sorted(DicomDictionary.items())):
        vr, keyword = entry[0], entry[4]
        if vr not in ("PN", "DA", "DT", "TM", "UI") or not keyword or tag >> 16 in (0x0000, 0x0002):
            continue
        if keyword in KEPT_UIDS:
            ds.add_new(tag, vr, "1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture Image Storage
            continue
        value = {
            "PN": f"Mrk{level}^Person{n:05d}",
            "DA": str(base + n).replace("-", ""),
            "DT": f"17010101000000.{level}{n:05d}",
            "TM": f"120000.{level}{n:05d}",
            "UI": f"1.2.999.{level + 1}.{100000 + n}",
        }[vr]
        ds.add_new(tag, vr, value)
        markers.append(value)


@pytest.fixture()
def marked_file(tmp_path: Path) -> tuple[Path, list[str], np.ndarray]:
    """A two-frame JPEG Secondary Capture image with a marker in every public PN/DA/DT/TM/UI attribute at
    the top level, in a sequence item and in a sequence nested in that, and in each frame's COM and Exif."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

    markers: list[str] = []
    ds = Dataset()
    _plant_markers(ds, 0, markers)
    region = Dataset()
    _plant_markers(region, 1, markers)
    deeper = Dataset()
    _plant_markers(deeper, 2, markers)
    region.ReferencedImageSequence = [deeper]
    ds.AnatomicRegionSequence = [region]
    markers.remove(ds.TargetFrameOfReferenceUID)
    ds.TargetFrameOfReferenceUID = ds.FrameOfReferenceUID  # the same UID under a listed and an unlisted name
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (2, 64, 64), dtype=np.uint8)
    frames[:, 16:48, 16:48] //= 4  # some structure, so the JPEG is not noise only
    payloads = []
    for i, frame in enumerate(frames):
        comment, exif = f"MrkCOM{i}-Doe^Jane", f"MrkEXIF{i}-Doe^Jane"
        payloads.append(_jpeg_frame(frame, comment=comment.encode(), exif_text=exif))
        markers += [comment, exif]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.PatientID = "PID-MRK-1"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = 2
    ds.PixelData = encapsulate(payloads, has_bot=True)
    ds["PixelData"].VR = "OB"
    path = write(ds, tmp_path / "marked.dcm")
    blob = path.read_bytes()
    missing = [m for m in markers if m.encode() not in blob]
    assert not missing, missing  # the scan below can see every marker
    return path, markers, pydicom.dcmread(path).pixel_array


def test_no_planted_value_survives_anywhere(marked_file, tmp_path: Path) -> None:
    from pydicom.uid import SecondaryCaptureImageStorage

    src, markers, pixels = marked_file
    salt = tmp_path / "salt"
    salt.write_text("a fixed salt, so the remapped UIDs are the same on every run\n")
    report = deidentify(src, tmp_path / "out.dcm", salt_file=salt)
    assert report.cleaned_pixel_metadata == [str(src)]
    blob = (tmp_path / "out.dcm").read_bytes()
    # Not preceded by a digit or a dot: a DA marker's 8 digits may occur inside a new 2.25 UID's 39.
    survivors = [m for m in markers if re.search(rb"(?<![0-9.])" + re.escape(m.encode()), blob)]
    assert not survivors, f"{len(survivors)} of {len(markers)} planted values survived: {survivors[:10]}"

    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.PatientIdentityRemoved == "YES"
    # Class UIDs are kept; a UID under a listed and an unlisted attribute gets one new value.
    assert out.SOPClassUID == SecondaryCaptureImageStorage
    assert out.AnatomicRegionSequence[0].ReferencedSOPClassUID == SecondaryCaptureImageStorage
    assert out.TargetFrameOfReferenceUID == out.FrameOfReferenceUID != "1.2.999.1"
    assert out.FrameOfReferenceUID.startswith("2.25.")
    # The frames lost their COM and Exif segments, and still decode to the same pixels.
    from pydicom.encaps import generate_frames

    for frame in generate_frames(out.PixelData, number_of_frames=2):
        assert b"\xff\xfe" not in frame.split(b"\xff\xda")[0] and b"Exif" not in frame
    np.testing.assert_array_equal(out.pixel_array, pixels)


def test_jpeg_and_jpeg2000_metadata_segments_are_removed_or_blanked() -> None:
    import io

    from medclf.privacy import blank_j2k_comments, strip_jpeg_metadata

    pixels = np.random.default_rng(2).integers(0, 255, (48, 40), dtype=np.uint8)
    for progressive in (False, True):  # progressive: several scans, markers between them
        buf = io.BytesIO()
        PILImage.fromarray(pixels).save(buf, "JPEG", comment=b"Doe^Jane", progressive=progressive)
        jpeg = buf.getvalue() + b"Doe^John after EOI"
        cleaned, removed = strip_jpeg_metadata(jpeg)
        assert removed == 2 and b"Doe" not in cleaned  # the COM segment and the bytes after EOI
        assert cleaned[6:11] == b"JFIF\0"  # JFIF without a thumbnail is kept (colour space signalling)
        decoded = [np.asarray(PILImage.open(io.BytesIO(b))) for b in (jpeg, cleaned)]
        np.testing.assert_array_equal(*decoded)
    with pytest.raises(ValueError, match="SOI"):
        strip_jpeg_metadata(b"\x00\x01" * 8)
    with pytest.raises(ValueError, match="runs past"):
        strip_jpeg_metadata(jpeg[:2] + b"\xff\xfe\x40\x00Doe")

    # JPEG 2000: a COM in the main header and one in each tile-part header (Psot counts it there).
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, "JPEG2000", no_jp2=True, irreversible=False, tile_size=(32, 32))
    code = bytearray(buf.getvalue())
    com = b"\xff\x64\x00\x0c\x00\x01Doe^Jane"
    sot = code.index(b"\xff\x90")
    code[sot:sot] = com  # main header
    pos = sot + len(com)
    while pos < len(code) and code[pos : pos + 2] == b"\xff\x90":
        psot = int.from_bytes(code[pos + 6 : pos + 10], "big")
        code[pos + 6 : pos + 10] = (psot + len(com)).to_bytes(4, "big")
        code[pos + 12 : pos + 12] = com  # right after SOT, in the tile-part header
        pos += psot + len(com)
    assert bytes(code).count(b"Doe^Jane") >= 3
    cleaned, blanked = blank_j2k_comments(bytes(code))
    assert b"Doe" not in cleaned and blanked >= 4 and len(cleaned) == len(code)
    decoded = [np.asarray(PILImage.open(io.BytesIO(b))) for b in (bytes(code), cleaned)]
    np.testing.assert_array_equal(decoded[0], pixels)
    np.testing.assert_array_equal(*decoded)


def test_pixel_data_that_cannot_be_checked_is_not_written(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = identified_dicom(np.zeros((32, 32), np.uint8), study=generate_uid(), series=generate_uid())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 video with user data: Doe^Jane" + bytes(64)])
    ds["PixelData"].VR = "OB"
    src = write(ds, tmp_path / "video.dcm")
    with pytest.raises(InputRejected) as info:
        deidentify(src, tmp_path / "out.dcm")
    assert info.value.reason == "unsupported_compression" and not (tmp_path / "out.dcm").exists()
