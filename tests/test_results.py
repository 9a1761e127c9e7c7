"""Standard results (issue 24, items 2 and 3): DICOM SR written with highdicom (``medclf predict --sr``, the
codes, the operating point's decision) and FHIR R4 from the HTTP API (``Accept: application/fhir+json``)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medclf.api import load_bundle
from medclf.predictor import Predictor
from medclf.serve import coding
from medclf.serve.app import create_app
from medclf.serve.fhir import diagnostic_report, wants_fhir
from medclf.serve.sr import build_sr

from .inprocess import run_medclf
from .sr_check import check_sr, dciodvfy, needs_dciodvfy

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's TestClient warns about its httpx backend
    from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Predictor:
    return load_bundle(tiny_bundle)


@pytest.fixture
def mr_copy(tmp_path) -> Path:
    """MR_small.dcm with a fresh SOP Instance UID, as a file."""
    ds = dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "in" / "scan.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    return path


def _medclf(*args: str) -> subprocess.CompletedProcess:
    run = run_medclf(*args)  # in this process (tests/inprocess.py)
    assert "Traceback" not in run.stderr, run.stderr
    return run


# -- DICOM SR -------------------------------------------------------------------------------------------------


def test_class_codes_are_snomed_ct_when_the_class_names_a_concept():
    assert coding.class_code("normal") == coding.codes.SCT.Normal  # not the ECG result of the same name
    assert coding.class_code("Pneumothorax").value == "36118008"
    assert coding.class_code("malignant").scheme_designator == "SCT"
    tumour = coding.class_code("tumour")  # British spelling: no SNOMED CT concept by that meaning
    assert (tumour.value, tumour.scheme_designator, tumour.meaning) == ("tumour", "99MEDCLF", "tumour")
    long_name = coding.class_code("a class name longer than sixteen characters")
    assert long_name.scheme_designator == "99MEDCLF" and len(long_name.value) == 16
    assert coding.class_code(coding.OOD_SCORE.value) != coding.OOD_SCORE  # no class collides with the check


def test_predict_sr_writes_a_valid_sr_per_dicom_input_and_notes_the_others(
    tiny_bundle, bundle, mr_copy, sim_data, tmp_path
):
    png = sorted((sim_data / "test" / "tumour").glob("*.png"))[0]
    shutil.copy(png, mr_copy.parent / "slice.png")
    out = tmp_path / "sr"
    run = _medclf("predict", str(tiny_bundle), str(mr_copy.parent), "--sr", str(out))
    assert run.returncode == 0, run.stderr
    results = {Path(r["path"]).name: r for r in json.loads(run.stdout)}
    assert "slice.png" in results and "scan.dcm" in results
    assert "not a DICOM file" in results["slice.png"]["sr_skipped"] and "sr" not in results["slice.png"]
    assert "no SR" in run.stderr and "slice.png" in run.stderr
    src = dcmread(mr_copy, stop_before_pixels=True)
    sr_path = Path(results["scan.dcm"]["sr"])
    assert sr_path == out / f"{src.SOPInstanceUID}.sr.dcm"
    assert sorted(p.name for p in out.iterdir()) == [sr_path.name]  # one SR, no temporary files left
    check_sr(sr_path, src, results["scan.dcm"], bundle)
    # A second run never replaces the first SR: the entry says why none was written.
    before = sr_path.read_bytes()
    again = _medclf("predict", str(tiny_bundle), str(mr_copy), "--sr", str(out))
    assert again.returncode == 0, again.stderr
    (entry,) = json.loads(again.stdout)
    assert "already exists" in entry["sr_skipped"] and sr_path.read_bytes() == before


@pytest.mark.parametrize("positive", [True, False])
def test_the_operating_point_decision_is_in_the_sr(bundle, mr_copy, tmp_path, positive):
    (prediction,) = bundle.predict([mr_copy])
    prediction.pop("ood", None)  # a bundle without an OOD guard: no check group
    decision = {"label": "tumour" if positive else "not tumour", "positive": positive, "group": "tumour"}
    prediction["decision"] = {**decision, "score": 0.42, "threshold": 0.3, "method": "youden"}
    src = dcmread(mr_copy, stop_before_pixels=True)
    sr = build_sr(src, prediction, bundle)
    path = tmp_path / "decision.sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = check_sr(path, src, prediction, bundle)
    (group,) = [
        g
        for g in report.content.get_image_measurement_groups()
        if g.tracking_identifier.startswith("operating")
    ]
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values == {"Probability": pytest.approx(0.42), "Threshold Value": pytest.approx(0.3)}


@needs_dciodvfy
def test_dciodvfy_sees_no_private_code_when_every_class_has_a_standard_one(tmp_path):
    """Classes that name SNOMED CT concepts and no OOD score: the SR uses standard codes only, and dciodvfy
    has nothing to say about coding schemes (nor any error)."""
    classes = ["normal", "benign", "malignant"]
    fake = SimpleNamespace(
        arch="compact",
        sha256="ab" * 32,
        temperature=1.3,
        finding_temperatures=None,
        classes=classes,
        ood=None,
        manifest={},
    )
    prediction = {
        "predicted": "benign",
        "confidence": 0.6,
        "probabilities": dict(zip(classes, (0.3, 0.6, 0.1), strict=True)),
    }
    src = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    path = tmp_path / "standard.sr.dcm"
    build_sr(src, prediction, fake).save_as(path, enforce_file_format=True)
    findings = dciodvfy(path)
    assert not [f for f in findings if f.startswith("Error") or "Coding Scheme" in f], findings
    check_sr(path, src, prediction, fake)


# -- FHIR -------------------------------------------------------------------------------------------------------

# The elements of these resources in FHIR R4 (4.0.1): the report is built with the R4B models, and must use
# only what R4 has.
R4_ELEMENTS = {
    "DiagnosticReport": "id meta implicitRules language text contained extension modifierExtension identifier "
    "basedOn status category code subject encounter effectiveDateTime effectivePeriod issued performer "
    "resultsInterpreter specimen result imagingStudy media conclusion conclusionCode presentedForm",
    "Observation": "id meta implicitRules language text contained extension modifierExtension identifier "
    "basedOn partOf status category code subject focus encounter effectiveDateTime issued performer "
    "valueQuantity valueCodeableConcept dataAbsentReason interpretation note bodySite method specimen "
    "device referenceRange hasMember derivedFrom component",
    "Device": "id meta implicitRules language text contained extension modifierExtension identifier "
    "definition udiCarrier status statusReason distinctIdentifier manufacturer manufactureDate "
    "expirationDate lotNumber serialNumber deviceName modelNumber partNumber type specialization version "
    "property patient owner contact location url note safety parent",
}
R4_DEVICE_NAME_TYPES = {"udi-label-name", "user-friendly-name", "patient-reported-name", "manufacturer-name", "model-name", "other"}  # fmt: skip


def check_fhir(document: dict, answer: dict, bundle: Predictor) -> DiagnosticReport:
    """``document`` is a valid FHIR DiagnosticReport (R4 elements only) saying what ``answer`` says."""
    report = DiagnosticReport.model_validate(document)  # raises on any invalid element
    for resource in [document, *document["contained"]]:
        unknown = set(resource) - {"resourceType"} - set(R4_ELEMENTS[resource["resourceType"]].split())
        assert not unknown, (resource["resourceType"], unknown)
    assert document["status"] == "preliminary"
    contained = {r["id"]: r for r in document["contained"]}
    device = contained.pop("model")
    assert device["resourceType"] == "Device" and device["manufacturer"] == "medclf"
    assert device["version"][0]["value"] == bundle.sha256
    assert {n["type"] for n in device["deviceName"]} <= R4_DEVICE_NAME_TYPES
    assert [r["reference"] for r in document["result"]] == [f"#{k}" for k in contained]
    for obs in contained.values():
        assert obs["resourceType"] == "Observation" and obs["device"]["reference"] == "#model"
    check = contained.pop("ood-check")
    verdict = check["valueCodeableConcept"]["coding"][0]
    expected = coding.OUT_OF_DISTRIBUTION if answer["ood"] else coding.IN_DISTRIBUTION
    assert (verdict["system"], verdict["code"]) == (
        "http://dicom.nema.org/resources/ontology/DCM",
        expected.value,
    )
    score = next(c for c in check["component"] if c["code"]["coding"][0]["code"] == coding.OOD_SCORE.value)
    assert score["valueQuantity"]["value"] == pytest.approx(answer["ood_score"])
    if answer["ood"]:  # no result reads as a finding
        assert not contained and "conclusionCode" not in document
        assert answer["warning"] in check["note"][0]["text"]
        assert "outside the training distribution" in document["conclusion"]
        return report
    finding = contained.pop("finding")
    assert finding["valueCodeableConcept"]["text"] == answer["predicted"]
    assert document["conclusionCode"][0]["text"] == answer["predicted"]
    probabilities = {}
    for obs in contained.values():  # one per class: the class's code (as in the SR) and its probability
        name = obs["code"]["text"]
        code = coding.class_code(name)
        coded = obs["code"]["coding"][0]
        assert (coded["code"], coded["display"]) == (code.value, code.meaning)
        assert coded["system"] == coding.fhir_system(code)
        quantity = obs["valueQuantity"]
        assert (quantity["system"], quantity["code"]) == ("http://unitsofmeasure.org", "1")
        probabilities[name] = quantity["value"]
    assert probabilities == pytest.approx(answer["probabilities"], abs=1e-9)
    assert len(finding["hasMember"]) == len(bundle.classes)
    return report


def test_wants_fhir_follows_the_accept_header():
    assert wants_fhir("application/fhir+json")
    assert wants_fhir("application/json;q=0.5, application/fhir+json")
    assert not wants_fhir(None) and not wants_fhir("*/*") and not wants_fhir("application/json")
    assert not wants_fhir("application/fhir+json;q=0.2, application/json")
    assert not wants_fhir("application/fhir+json;q=0")


def test_predict_answers_a_fhir_diagnostic_report_when_asked(tiny_bundle, sim_data, tmp_path):
    guarded = load_bundle(tiny_bundle)  # its own copy: the OOD threshold is changed below
    png = sorted((sim_data / "test" / "tumour").glob("*.png"))[0]
    files = {"file": ("slice.png", png.read_bytes(), "image/png")}
    app = create_app(guarded, audit_db=str(tmp_path / "audit.db"))
    with TestClient(app) as client:
        plain = client.post("/v1/predict", files=files).json()
        fhir_headers = {"Accept": "application/fhir+json"}
        r = client.post("/v1/predict?explain=true", files=files, headers=fhir_headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/fhir+json")
        document = r.json()
        check_fhir(document, plain, guarded)
        (form,) = document["presentedForm"]
        assert form["contentType"] == "image/png" and base64.b64decode(form["data"]).startswith(b"\x89PNG")
        assert f"for '{plain['predicted']}'" in form["title"], "the heatmap names what it explains"
        assert document["identifier"][0]["value"].startswith("urn:uuid:")
        guarded.ood.threshold = -1.0  # every input now unlike the training data
        flagged = client.post("/v1/predict", files=files).json()
        assert flagged["ood"] is True
        document = client.post("/v1/predict", files=files, headers=fhir_headers).json()
        check_fhir(document, flagged, guarded)
        # Errors stay the API's JSON refusals.
        refused = client.post("/v1/predict", content=b"not an image", headers=fhir_headers)
        assert refused.status_code == 415 and set(refused.json()) == {"error", "reason"}


def test_the_fhir_report_carries_the_decision(bundle):
    prediction = {
        "predicted": "tumour",
        "confidence": 0.5,
        "probabilities": {c: 1 / len(bundle.classes) for c in bundle.classes},
        "decision": {"label": "tumour", "positive": True, "group": "tumour", "score": 0.5, "threshold": 0.3},
    }
    document = json.loads(diagnostic_report(prediction, bundle).model_dump_json())
    (decision,) = [r for r in document["contained"] if r.get("id") == "decision"]
    assert decision["code"]["text"] == "tumour"
    assert decision["valueCodeableConcept"]["coding"][0]["code"] == coding.PRESENT.value
    assert [c["valueQuantity"]["value"] for c in decision["component"]] == [0.5, 0.3]
    assert "Decision at the operating point: tumour" in document["conclusion"]
