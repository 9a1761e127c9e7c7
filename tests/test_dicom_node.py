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
from pydicom.uid import ComprehensiveSRStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from .sr_check import check_sr

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
    from medclf.api import load_bundle

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


def _check_sr(sr_path: Path, src: Dataset, result: dict, bundle) -> None:
    """See tests/sr_check.py; and the node's JSON names the SR it wrote."""
    sr = check_sr(sr_path, src, result, bundle)
    assert result["sr"]["sop_instance_uid"] == sr.SOPInstanceUID


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
    _check_sr(sr_path, src, result, bundle)
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
        "--allow-aet",
        "TESTSCU",
        "--allow-host",
        "127.0.0.1",
        "--max-per-peer",
        "3",
        "--idle-timeout",
        "20",
        "--accept-modality",
        "MR",
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
    assert "accepting images of MR, SC" in log and "calling AE titles TESTSCU, hosts 127.0.0.1/32" in log


def test_bad_settings_are_config_errors(node, bundle, tmp_path):
    from medclf.errors import ConfigError
    from medclf.serve.dicom_node import DicomNode

    with pytest.raises(ConfigError, match="AE title"):
        DicomNode(bundle, tmp_path, ae_title="A" * 17)
    with pytest.raises(ConfigError, match="cannot listen"):
        DicomNode(bundle, tmp_path, port=node.port).start()  # the port is taken by the running node


# -- who may connect, and for how long (issue 21, item 9) --------------------------------------------------


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


needs_loopback_aliases = pytest.mark.skipif(
    not (_can_bind("127.0.0.2") and _can_bind("127.0.0.3")),
    reason="needs 127.0.0.2 and 127.0.0.3 as local addresses (Linux routes all of 127.0.0.0/8 to loopback)",
)


def _associate(port: int, *, aet: str = "TESTSCU", source: str = "127.0.0.1", contexts=(Verification,)):
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.network_timeout = 10
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title=AE_TITLE, bind_address=(source, 0))


def _eventually(predicate, seconds: float = 15.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``seconds`` pass (False); not a timing assertion."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def _logged(caplog, *needles: str) -> bool:
    return any(all(n in r.getMessage() for n in needles) for r in caplog.records)


def test_calling_ae_title_allowlist(bundle, tmp_path, caplog):
    from medclf.serve.dicom_node import DicomNode

    caplog.set_level("INFO", logger="medclf")
    with DicomNode(bundle, tmp_path, port=0, ae_title=AE_TITLE, allowed_aets=["WARD7"]) as running:
        stranger = _associate(running.port, aet="INTRUDER")
        assert stranger.is_rejected and not stranger.is_established
        assert _eventually(lambda: _logged(caplog, "INTRUDER", "--allow-aet"))
        friend = _associate(running.port, aet="WARD7")
        assert friend.is_established
        assert friend.send_c_echo().Status == 0x0000
        friend.release()
        # A wrong called AE title was refused before too, but silently: now it is logged.
        ae = AE(ae_title="WARD7")
        ae.add_requested_context(Verification)
        wrong = ae.associate("127.0.0.1", running.port, ae_title="NOT-MEDCLF")
        assert wrong.is_rejected
        assert _eventually(lambda: _logged(caplog, "NOT-MEDCLF", "not this node's"))


@needs_loopback_aliases
def test_host_allowlist(bundle, tmp_path, caplog):
    from medclf.serve.dicom_node import DicomNode

    caplog.set_level("INFO", logger="medclf")
    with DicomNode(bundle, tmp_path, port=0, ae_title=AE_TITLE, allowed_hosts=["127.0.0.2/32"]) as running:
        outsider = _associate(running.port, source="127.0.0.3")
        assert not outsider.is_established  # the connection is closed before any DICOM byte is read
        assert _eventually(lambda: _logged(caplog, "refused a connection from 127.0.0.3", "--allow-host"))
        insider = _associate(running.port, source="127.0.0.2")
        assert insider.is_established
        insider.release()


@needs_loopback_aliases
def test_one_peer_cannot_lock_the_others_out(bundle, tmp_path):
    """The attack: a peer opens as many associations as the node serves and keeps them alive with a C-ECHO
    now and then. With a per-peer cap it holds only its share; everyone else still gets in."""
    from medclf.serve.dicom_node import DicomNode

    with DicomNode(
        bundle, tmp_path, port=0, ae_title=AE_TITLE, max_associations=4, max_per_peer=2
    ) as running:
        held = [_associate(running.port, source="127.0.0.2") for _ in range(2)]
        assert all(a.is_established for a in held)
        assert all(a.send_c_echo().Status == 0x0000 for a in held)  # the keep-alive
        greedy = _associate(running.port, source="127.0.0.2")
        assert not greedy.is_established
        other = _associate(running.port, source="127.0.0.3")
        assert other.is_established and other.send_c_echo().Status == 0x0000
        other.release()
        held[0].release()
        assert _eventually(lambda: running.open_connections("127.0.0.2") == 1)
        again = _associate(running.port, source="127.0.0.2")
        assert again.is_established
        for a in (again, held[1]):
            a.release()


def test_silent_connections_hold_a_slot_only_until_the_acse_timeout(bundle, tmp_path):
    from medclf.serve.dicom_node import DicomNode

    with DicomNode(bundle, tmp_path, port=0, ae_title=AE_TITLE, max_per_peer=2, acse_timeout=1) as running:
        silent = [socket.create_connection(("127.0.0.1", running.port), timeout=30) for _ in range(2)]
        try:
            assert _eventually(lambda: running.open_connections("127.0.0.1") == 2)
            assert not _associate(running.port).is_established  # both slots of this peer are taken
            for s in silent:  # the node closes each one when it has not asked for an association in time
                assert s.recv(1) == b""
        finally:
            for s in silent:
                s.close()
        assert _eventually(lambda: running.open_connections() == 0)
        assoc = _associate(running.port)
        assert assoc.is_established
        assoc.release()


def test_an_idle_association_is_closed(bundle, tmp_path):
    from medclf.serve.dicom_node import DicomNode

    with DicomNode(bundle, tmp_path, port=0, ae_title=AE_TITLE, idle_timeout=1, dimse_timeout=1) as running:
        assoc = _associate(running.port)
        assert assoc.is_established
        assert _eventually(lambda: not assoc.is_established)  # the node aborted it
        assert assoc.is_aborted
        assert _eventually(lambda: running.open_connections() == 0)


def test_access_settings_are_checked(bundle, tmp_path):
    from medclf.errors import ConfigError
    from medclf.serve.dicom_node import DicomNode

    with pytest.raises(ConfigError, match="--allow-host"):
        DicomNode(bundle, tmp_path, host="0.0.0.0")  # reachable from the network, but from whom?
    node = DicomNode(bundle, tmp_path, host="0.0.0.0", allowed_hosts=["10.1.2.0/24", "192.168.7.3"])
    assert node.allowed_hosts == ["10.1.2.0/24", "192.168.7.3/32"]
    for bad, match in [
        ({"allowed_hosts": ["ward7.example.org"]}, "not an IP address"),
        ({"max_per_peer": 0}, "max-per-peer"),
        ({"acse_timeout": 0}, "acse-timeout"),
        ({"allowed_aets": ["A" * 17]}, "--allow-aet"),
        ({"modalities": ["XYZ"]}, "unknown modality"),
    ]:
        with pytest.raises(ConfigError, match=match):
            DicomNode(bundle, tmp_path, **bad)


# -- one result per SOP Instance UID (issue 21, item 10) ---------------------------------------------------


def test_a_second_object_with_the_same_uid_never_replaces_the_first_result(node, caplog):
    caplog.set_level("INFO", logger="medclf")
    first = _mr_small_copy()
    first.PatientName, first.PatientID = "First^Patient", "P-FIRST"
    assert _send(node.port, first).Status == 0x0000
    json_path, sr_path = _outputs(node, first.SOPInstanceUID)
    before = json_path.read_bytes(), sr_path.read_bytes()

    other = _mr_small_copy()  # another patient's image under the same UID
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    other.PatientName, other.PatientID = "Second^Patient", "P-SECOND"
    status = _send(node.port, other)
    assert 0xC000 <= status.Status <= 0xCFFF and "duplicate_uid" in status.ErrorComment
    assert (json_path.read_bytes(), sr_path.read_bytes()) == before
    assert str(dcmread(sr_path).PatientName) == "First^Patient"
    assert _logged(caplog, first.SOPInstanceUID, "first result is kept")

    # The same instance again, even in another transfer syntax (a retry, a re-forward): Success, and still
    # the first result.
    rle = dcmread(get_testdata_file("MR_small_RLE.dcm"))
    for keyword in ("SOPInstanceUID", "PatientName", "PatientID"):
        setattr(rle, keyword, first[keyword].value)
    rle.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert _send(node.port, first).Status == 0x0000
    assert _send(node.port, rle).Status == 0x0000
    assert (json_path.read_bytes(), sr_path.read_bytes()) == before


# -- the SOP classes the model calls for (issue 21, item 11) -----------------------------------------------


def _image(sop_class: str, modality: str, bits: int = 8) -> Dataset:
    """A small greyscale image of ``sop_class`` (what an ultrasound or mammography unit sends, in brief)."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        sop_class,
        ds.SOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = modality, "Test^Patient", "T-1"
    yy, xx = np.mgrid[:96, :96]
    pixels = (np.exp(-((yy - 40) ** 2 + (xx - 55) ** 2) / 300.0) * (2**bits - 1)).astype(
        np.uint8 if bits == 8 else np.uint16
    )
    ds.set_pixel_data(pixels, "MONOCHROME2", bits)
    return ds


def test_ultrasound_and_mammography_reach_a_model_trained_on_png(node):
    from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation, UltrasoundImageStorage

    assert "png" in node.modalities_reason and {"US", "MG", "MR", "SC"} <= set(node.modalities)
    for ds in (
        _image(UltrasoundImageStorage, "US"),
        _image(DigitalMammographyXRayImageStorageForPresentation, "MG", bits=16),
    ):
        assert _send(node.port, ds).Status == 0x0000
        result = json.loads(_outputs(node, ds.SOPInstanceUID)[0].read_text(encoding="utf-8"))
        assert result["modality"] == ds.Modality and result["predicted"] in node.bundle.classes


def test_accepted_modalities_follow_the_training_data_and_rejections_are_logged(
    tiny_bundle, tmp_path, caplog
):
    from pynetdicom.sop_class import MRImageStorage, UltrasoundImageStorage

    from medclf.api import load_bundle
    from medclf.serve.dicom_node import DicomNode, storage_modalities

    mr_model = load_bundle(tiny_bundle)
    mr_model.manifest["data"]["fingerprint_stats"].update(modalities={"MR": 40}, formats={"dicom": 40})
    assert storage_modalities(mr_model)[0] == ["MR", "SC"]
    assert storage_modalities(mr_model, ["us", "OT"])[0] == ["SC", "US"]
    caplog.set_level("INFO", logger="medclf")
    with DicomNode(mr_model, tmp_path, port=0, ae_title=AE_TITLE) as running:
        assoc = _associate(running.port, contexts=(UltrasoundImageStorage, ComprehensiveSRStorage))
        assert not assoc.is_established  # nothing accepted: the requestor gives up
        # Nothing the peer could send was accepted: a warning naming each class and why.
        assert _eventually(
            lambda: _logged(caplog, "Ultrasound Image Storage", "modality US is not among", "MR")
        )
        assert _logged(caplog, "Comprehensive SR Storage", "not an image storage SOP class")
        assert all(
            r.levelname == "WARNING" for r in caplog.records if "rejected presentation" in r.getMessage()
        )
        # An accepted class proposed only in a transfer syntax that cannot be decoded here.
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(MRImageStorage, ["1.2.840.10008.1.2.4.100"])  # MPEG2 video
        assert not ae.associate("127.0.0.1", running.port, ae_title=AE_TITLE).is_established
        assert _eventually(
            lambda: _logged(caplog, "MR Image Storage", "transfer syntax not supported", "MPEG2")
        )


# -- the out-of-distribution result travels with the prediction (issue 21, item 12) ------------------------


def test_out_of_distribution_input_gets_no_finding_in_the_sr(tiny_bundle, tmp_path, caplog):
    from medclf.api import load_bundle
    from medclf.serve.dicom_node import DicomNode

    guarded = load_bundle(tiny_bundle)
    assert guarded.ood is not None
    caplog.set_level("INFO", logger="medclf")
    with DicomNode(guarded, tmp_path, port=0, ae_title=AE_TITLE) as running:
        for threshold, flagged in ((-1.0, True), (1e9, False)):  # every input flagged, then none
            guarded.ood.threshold = threshold
            src = _mr_small_copy()
            assert _send(running.port, src).Status == 0x0000
            json_path, sr_path = _outputs(running, src.SOPInstanceUID)
            result = json.loads(json_path.read_text(encoding="utf-8"))
            assert result["ood"] is flagged and result["ood_score"] >= 0
            assert ("warning" in result) is flagged
            _check_sr(sr_path, src, result, guarded)
    assert _logged(caplog, "unlike the images the model was trained on")


# -- FHIR beside the SR (issue 24, item 3) ---------------------------------------------------------------------


def test_the_node_writes_a_fhir_report_beside_each_sr(bundle, tmp_path):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    from medclf.serve.dicom_node import DicomNode

    with DicomNode(bundle, tmp_path, port=0, ae_title=AE_TITLE, fhir=True) as running:
        src = _mr_small_copy()
        assert _send(running.port, src).Status == 0x0000
    json_path, sr_path = _outputs(running, src.SOPInstanceUID)
    result = json.loads(json_path.read_text(encoding="utf-8"))
    fhir_path = tmp_path / result["fhir"]["file"]
    assert fhir_path.name == f"{src.SOPInstanceUID}.fhir.json"
    document = json.loads(fhir_path.read_text(encoding="utf-8"))
    DiagnosticReport.model_validate(document)
    # Identified by the SR it stands beside; probabilities as in the JSON; no patient identifiers.
    assert document["identifier"] == [
        {"system": "urn:dicom:uid", "value": f"urn:oid:{result['sr']['sop_instance_uid']}"}
    ]
    assert dcmread(sr_path).SOPInstanceUID == result["sr"]["sop_instance_uid"]
    if not result["ood"]:
        probabilities = {
            o["code"]["text"]: o["valueQuantity"]["value"]
            for o in document["contained"]
            if o["id"].startswith("p")
        }
        assert probabilities == pytest.approx(result["probabilities"])
    _check_json_has_no_patient_identifiers(fhir_path, src)
