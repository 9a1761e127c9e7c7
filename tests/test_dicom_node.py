"""The DICOM node: dcmtk's echoscu/storescu (a client this project did not write) against a live node.

The node runs in background threads of this process on a free port, with the session's tiny bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, ComprehensiveSRStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

AE_TITLE = "MEDCLF"


def _find_dcmtk(name: str) -> str | None:
    """The dcmtk program ``name`` on PATH, passing over same-named ones (pynetdicom installs a Python
    ``storescu`` and ``echoscu`` into the virtual environment's bin folder)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which(name, path=folder) if folder else None
        if candidate:
            probe = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30)
            if "dcmtk" in (probe.stdout + probe.stderr).lower():
                return candidate
    return None


DCMTK = {name: _find_dcmtk(name) for name in ("echoscu", "storescu")}
needs_dcmtk = pytest.mark.skipif(
    None in DCMTK.values(),
    reason="dcmtk's storescu/echoscu are not installed (Debian package dcmtk; `make system-deps` installs it)",
)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    from medclf.bundle import load_bundle

    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def node(bundle, tmp_path_factory):
    from medclf.serve.dicom_node import DicomNode

    out = tmp_path_factory.mktemp("dicom-node-out")
    with DicomNode(bundle, out, port=0, ae_title=AE_TITLE) as running:
        yield running


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def _outputs(node, uid: str) -> tuple[Path, Path]:
    return node.out_dir / f"{uid}.json", node.out_dir / f"{uid}.sr.dcm"


def _send(port: int, ds: Dataset) -> Dataset:
    """C-STORE ``ds`` with pynetdicom as the client; returns the response status data set."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def _mr_small_copy() -> Dataset:
    """MR_small.dcm with a fresh SOP Instance UID, so its outputs are this test's alone."""
    ds = dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _content_items(ds: Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _meaning(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> str:
    return str(item[attribute][0].CodeMeaning)


# Comprehensive SR IOD (PS3.3 A.35.3): type 1 attributes must hold a value, type 2 must be present.
_SR_TYPE1 = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    "CompletionFlag",
    "VerificationFlag",
    "ContentDate",
    "ContentTime",
    "ValueType",
    "ConceptNameCodeSequence",
    "ContinuityOfContent",
    "ContentSequence",
]
_SR_TYPE2 = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "ReferencedPerformedProcedureStepSequence",
    "Manufacturer",
    "PerformedProcedureCodeSequence",
]


def _check_sr(sr_path: Path, src: Dataset, result: dict) -> None:
    sr = dcmread(sr_path)
    # Valid as an IOD: dicom3tools' validator when installed, else the required attributes by hand.
    for keyword in _SR_TYPE1:
        assert sr.get(keyword) not in (None, ""), f"type 1 attribute {keyword} missing or empty"
    for keyword in _SR_TYPE2:
        assert keyword in sr, f"type 2 attribute {keyword} missing"
    for item in _content_items(sr):
        assert item.RelationshipType and item.ValueType
    if shutil.which("dciodvfy"):  # dicom3tools' validator (Debian package dicom3tools)
        check = _run("dciodvfy", str(sr_path))
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
    # Its own identity, filed with the source's patient and study.
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    for uid in (sr.SOPInstanceUID, sr.SeriesInstanceUID):
        assert UID(uid).is_valid
    assert sr.SOPInstanceUID != src.SOPInstanceUID and sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.PatientID == src.PatientID  # the SR carries the patient module (see the module docstring)
    assert result["sr"]["sop_instance_uid"] == sr.SOPInstanceUID
    # The evidence: study > series > the source instance.
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == src.SOPClassUID
    # The prediction as a CODE item inferred from the source image, the probabilities as NUM items.
    items = list(_content_items(sr))
    (finding,) = [
        i for i in items if i.ValueType == "CODE" and _meaning(i) == "Finding" and "ContentSequence" in i
    ]
    assert _meaning(finding, "ConceptCodeSequence") == result["predicted"]
    (image,) = [i for i in finding.ContentSequence if i.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    numbers = {
        _meaning(num.ContentSequence[0], "ConceptCodeSequence"): float(
            num.MeasuredValueSequence[0].NumericValue
        )
        for num in items
        if num.ValueType == "NUM" and _meaning(num) == "Probability"
    }
    assert numbers == pytest.approx(result["probabilities"], abs=1e-6)


def _check_json_has_no_patient_identifiers(json_path: Path, src: Dataset) -> None:
    text = json_path.read_text(encoding="utf-8")
    assert "patient" not in text.lower()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        value = str(src.get(keyword, "") or "")
        if len(value) >= 3:
            assert value not in text, f"{keyword} leaked into the JSON"


@needs_dcmtk
def test_echoscu_gets_an_answer_and_a_wrong_called_ae_title_is_rejected(node):
    ok = _run(DCMTK["echoscu"], "-aec", AE_TITLE, "127.0.0.1", str(node.port))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = _run(DCMTK["echoscu"], "-aec", "NOT-MEDCLF", "127.0.0.1", str(node.port))
    assert wrong.returncode != 0
    assert "Association Rejected" in wrong.stdout + wrong.stderr


@needs_dcmtk
@pytest.mark.parametrize(
    ("name", "propose"),
    [
        ("MR_small.dcm", []),  # explicit VR little endian
        ("MR_small_RLE.dcm", ["-xr"]),  # RLE Lossless
        ("MR_small_jpeg_ls_lossless.dcm", ["-xt"]),  # JPEG-LS lossless
        ("CT_small.dcm", []),
    ],
)
def test_storescu_image_gets_a_json_result_and_a_valid_sr(node, bundle, name, propose):
    src_path = get_testdata_file(name)
    src = dcmread(src_path, stop_before_pixels=True)
    json_path, sr_path = _outputs(node, src.SOPInstanceUID)
    for p in (json_path, sr_path):  # the MR_small variants share one SOP Instance UID
        p.unlink(missing_ok=True)

    sent = _run(DCMTK["storescu"], *propose, "-aec", AE_TITLE, "127.0.0.1", str(node.port), src_path)
    log = sent.stdout + sent.stderr
    assert sent.returncode == 0 and "E:" not in log, log

    result = json.loads(json_path.read_text(encoding="utf-8"))
    assert result["transfer_syntax"] == src.file_meta.TransferSyntaxUID  # sent as stored, not converted
    assert result["sop_instance_uid"] == src.SOPInstanceUID
    assert result["series_instance_uid"] == src.SeriesInstanceUID
    assert result["study_instance_uid"] == src.StudyInstanceUID
    assert result["model"]["sha256"] == bundle.sha256
    # The same reader and model as `medclf predict` on the file itself.
    (expected,) = bundle.predict([src_path])
    assert result["predicted"] == expected["predicted"]
    assert result["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    _check_json_has_no_patient_identifiers(json_path, src)
    _check_sr(sr_path, src, result)
    assert not [p.name for p in node.out_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def _truncated(ds: Dataset) -> Dataset:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


def _without_pixels(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds


def _hostile_uid(ds: Dataset) -> Dataset:
    ds.SOPInstanceUID = "../../escape"  # would write outside the output folder if used as a file name
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    ("spoil", "failure"),
    [
        (_truncated, range(0xC000, 0xD000)),  # cannot understand
        (_without_pixels, range(0xA900, 0xAA00)),  # does not match the (image) SOP class
        (_hostile_uid, range(0xC000, 0xD000)),
    ],
)
def test_refused_object_gets_a_failure_status_and_the_node_keeps_working(node, spoil, failure):
    bad = spoil(_mr_small_copy())
    status = _send(node.port, bad)
    assert status.Status in failure and status.ErrorComment
    assert not _outputs(node, bad.SOPInstanceUID)[0].exists()
    assert not (node.out_dir.parent / "escape.json").exists()

    good = _mr_small_copy()
    assert _send(node.port, good).Status == 0x0000
    json_path, sr_path = _outputs(node, good.SOPInstanceUID)
    assert json.loads(json_path.read_text(encoding="utf-8"))["sop_instance_uid"] == good.SOPInstanceUID
    assert (
        dcmread(sr_path).CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID
        == good.StudyInstanceUID
    )


def test_sop_class_that_is_not_an_accepted_image_is_not_negotiated(node):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComprehensiveSRStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE)
    try:
        assert assoc.is_established
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert Verification in accepted and ComprehensiveSRStorage not in accepted
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _echo(port: int) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_cli_serves_until_terminated(tiny_bundle, tmp_path):
    port = _free_port()
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "medclf",
        "dicom-node",
        str(tiny_bundle),
        "--port",
        str(port),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _echo(port):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the node did not start listening"
            time.sleep(0.3)
        good = _mr_small_copy()
        assert _send(port, good).Status == 0x0000
        assert (out / f"{good.SOPInstanceUID}.json").is_file()
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # what a service manager sends; Ctrl-C works too
        log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log
    assert "listening on 127.0.0.1" in log and "classified" in log


def test_bad_settings_are_config_errors(node, bundle, tmp_path):
    from medclf.errors import ConfigError
    from medclf.serve.dicom_node import DicomNode

    with pytest.raises(ConfigError, match="AE title"):
        DicomNode(bundle, tmp_path, ae_title="A" * 17)
    with pytest.raises(ConfigError, match="cannot listen"):
        DicomNode(bundle, tmp_path, port=node.port).start()  # the port is taken by the running node
