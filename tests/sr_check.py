"""Checks of the DICOM SRs medclf writes (the DICOM node, ``medclf predict --sr``), shared by their tests:
dicom3tools' validator, the SR IOD's required attributes, and the content read back with highdicom."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from highdicom.sr.utils import find_content_items
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, Comprehensive3DSRStorage

from medclf.serve import coding
from medclf.serve.sr import (
    CHECK_TRACKING_ID,
    GRADE_TRACKING_ID,
    algorithm_name,
    class_tracking_id,
    model_observer_uid,
)

# Comprehensive 3D SR IOD (PS3.3 A.35.13): type 1 attributes must hold a value, type 2 must be present.
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


NO_DCIODVFY = "dciodvfy is not installed (Debian package dicom3tools; `make system-deps` installs it)"
needs_dciodvfy = pytest.mark.skipif(not shutil.which("dciodvfy"), reason=NO_DCIODVFY)


def dciodvfy(path: Path) -> list[str] | None:
    """dicom3tools' IOD validator's findings (``Error ...`` / ``Warning ...`` lines); None when absent."""
    if not shutil.which("dciodvfy"):
        return None
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def _codes_in(ds: Dataset):
    for item in ds.get("ContentSequence", []):
        for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence"):
            yield from item.get(keyword, [])
        for measured in item.get("MeasuredValueSequence", []):
            yield from measured.get("MeasurementUnitsCodeSequence", [])
        yield from _codes_in(item)


def _text(group: Any, concept: Any) -> list[str]:
    return [str(i.TextValue) for i in find_content_items(group[0], name=concept, recursive=True)]


def check_sr(sr_path: Path, src: Dataset, result: dict[str, Any], bundle: Any) -> Any:
    """Everything an SR about ``src`` holding ``result`` (a prediction) must be; returns highdicom's SR."""
    sr = dcmread(sr_path)
    for keyword in _SR_TYPE1:
        assert sr.get(keyword) not in (None, ""), f"type 1 attribute {keyword} missing or empty"
    for keyword in _SR_TYPE2:
        assert keyword in sr, f"type 2 attribute {keyword} missing"
    # dciodvfy: no errors; its only complaint about codes is the one private scheme, declared in the SR,
    # and that scheme holds only what has no standard code (classes that name no SNOMED CT concept, the
    # out-of-distribution score, an ordinal grade's index and expected index).
    findings = dciodvfy(sr_path)
    if findings is not None:
        assert not [f for f in findings if f.startswith("Error")], findings
        scheme_warnings = [f for f in findings if "Coding Scheme" in f]
        assert all(f"<{coding.SCHEME}>" in f for f in scheme_warnings), scheme_warnings
    private = [c for c in _codes_in(sr) if c.CodingSchemeDesignator == coding.SCHEME]
    declared = [s.CodingSchemeDesignator for s in sr.get("CodingSchemeIdentificationSequence", [])]
    assert declared == ([coding.SCHEME] if private else [])
    for code in _codes_in(sr):
        if code.CodingSchemeDesignator == coding.SCHEME:
            own = (coding.OOD_SCORE.value, coding.GRADE_INDEX.value, coding.EXPECTED_GRADE.value)
            assert code.CodeValue in own or (
                code.CodeMeaning in bundle.classes
                and coding.class_code(code.CodeMeaning).scheme_designator == coding.SCHEME
            ), f"private code {code.CodeValue} ({code.CodeMeaning}) where a standard one exists"
        else:
            assert re.fullmatch(r"DCM|SCT|UCUM|LN|RFC5646", code.CodingSchemeDesignator), code
    # Its own identity, filed with the source's patient and study.
    assert sr.SOPClassUID == Comprehensive3DSRStorage and sr.Modality == "SR"
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    for uid in (sr.SOPInstanceUID, sr.SeriesInstanceUID):
        assert UID(uid).is_valid
    assert sr.SOPInstanceUID != src.SOPInstanceUID and sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.PatientID == src.get("PatientID", "")  # the SR carries the patient module
    assert str(sr.PatientName) == str(src.get("PatientName", ""))
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == src.SOPClassUID

    # The content, read back with highdicom: a TID 1500 measurement report observed by the model.
    report = hd.sr.srread(sr_path)
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    (observer,) = content.get_observer_contexts()
    assert observer.observer_type == codes.DCM.Device
    device = observer.observer_identifying_attributes
    assert device.uid == model_observer_uid(bundle) and device.manufacturer_name == "medclf"
    groups = {g.tracking_identifier: g for g in content.get_image_measurement_groups()}
    for group in groups.values():  # every group: the algorithm (TID 4019) and the source image
        assert _text(group, codes.DCM.AlgorithmName)[0].startswith(algorithm_name(bundle))
        assert _text(group, codes.DCM.AlgorithmVersion) == [bundle.sha256]
        assert _text(group, codes.DCM.AlgorithmManufacturer) == ["medclf"]
        assert [s.referenced_sop_instance_uid for s in group.source_images] == [src.SOPInstanceUID]
    assert (CHECK_TRACKING_ID in groups) is ("ood" in result)
    if "ood" in result:  # the out-of-distribution check, with standard codes, and its score
        check = groups.pop(CHECK_TRACKING_ID)
        (verdict,) = check.get_qualitative_evaluations(name=coding.CHECK_SUMMARY)
        expected = coding.OUT_OF_DISTRIBUTION if result["ood"] else coding.IN_DISTRIBUTION
        assert verdict.value == expected
        (score,) = check.get_measurements(name=coding.OOD_SCORE)
        assert score.value == pytest.approx(result["ood_score"], abs=1e-3)
    if result.get("ood"):  # no result reads as a finding: neither a class nor a probability
        assert not groups
        return report
    decision = {k: g for k, g in groups.items() if k.startswith("operating point: ")}
    assert len(decision) == bool(result.get("decision"))
    for key in decision:
        group = groups.pop(key)
        (answer,) = group.get_qualitative_evaluations()
        assert answer.value == (coding.PRESENT if result["decision"]["positive"] else coding.ABSENT)
    # An ordinal grade: the grade's concept as the finding (CODE), its index and expected index (NUM);
    # no other answer has one.
    assert (GRADE_TRACKING_ID in groups) is bool(result.get("grade"))
    if result.get("grade"):
        grade = groups.pop(GRADE_TRACKING_ID)
        assert grade.finding_type == coding.class_code(result["grade"]["grade"])
        assert len(grade.get_measurements()) == 2
        (index,) = grade.get_measurements(name=coding.GRADE_INDEX)
        (expected,) = grade.get_measurements(name=coding.EXPECTED_GRADE)
        assert index.unit == expected.unit == coding.UNITLESS
        assert index.value == result["grade"]["index"]
        assert expected.value == pytest.approx(result["grade"]["expected_index"], abs=1e-6)
        assert not grade.get_qualitative_evaluations()
    # One group per class: the class as finding, its probability; the predicted class "Present".
    class_of = {class_tracking_id(c): c for c in bundle.classes}
    assert set(groups) == set(class_of)
    for tracking, group in groups.items():
        name = class_of[tracking]
        concept = coding.class_code(name)
        assert group.finding_type == concept
        (probability,) = group.get_measurements(name=coding.PROBABILITY)
        assert probability.unit == coding.UNITLESS
        assert probability.value == pytest.approx(result["probabilities"][name], abs=1e-6)
        evaluations = group.get_qualitative_evaluations()
        # Multi-label findings: each one present at its threshold; otherwise the predicted class alone.
        present = set(result["positive"]) if "findings" in result else {result["predicted"]}
        if name in present:
            assert [(e.name, e.value) for e in evaluations] == [(concept, coding.PRESENT)]
        else:
            assert not evaluations
    return report
