"""DICOM Structured Reports of medclf predictions, written with highdicom.

:func:`build_sr` turns one prediction about a DICOM image into a **Comprehensive 3D SR** holding a TID 1500
"Imaging Measurement Report", the encoding the IHE AI Results (AIR) profile asks of an AI result:

- **observation context** (TID 1001/1004): the model as the observing device: a UID derived from the
  bundle's sha256, the node's AE title as its name, manufacturer ``medclf``, the architecture and the
  first 12 hex digits of the sha256 as the model name;
- **image library**: the source image;
- **one measurement group** (TID 1501) **per class**: tracking identifier (the class name, or
  ``class: <name>`` for a name that is one of the identifiers below, :func:`class_tracking_id`) and UID, the
  class as its "Finding", the algorithm identification (TID 4019: name, version = the bundle's sha256,
  manufacturer ``medclf``, parameters), the source image, the class's probability (DCM 122157
  "Probability", UCUM ``1``), and, for the class the model predicts, the qualitative evaluation
  ``<class> = Present``; a multi-label bundle's group also holds the finding's threshold (DCM 122411), and
  every finding present at its threshold is ``<finding> = Present``;
- **an ordinal bundle's grade**: a group (tracking identifier ``ordinal grade``) whose "Finding" (CODE,
  DCM 121071) is the grade's concept, coded as the classes are, with the grade's index on the scale
  (``99MEDCLF`` GRADEINDEX, 0 = the lowest grade) and the distribution's mean, the expected index
  (EXPECTEDGRADE), as NUM items (UCUM ``1``), and the rule that chose the grade among its algorithm's
  parameters; the class groups above are the distribution over grades;
- **the operating point's decision** when the bundle has one (``medclf recalibrate``): a group for its
  positive group of classes with their summed probability, the threshold (DCM 122411) and
  ``<group> = Present`` or ``Absent``;
- **the out-of-distribution check** when the bundle has a guard: a group whose qualitative evaluation is
  DCM 111017 "CAD Processing and Findings Summary" = "All algorithms succeeded; with findings" or, for an
  input unlike the training data, "No algorithms succeeded; without findings", with the score and the
  threshold. A flagged input gets **no class groups and no decision**: a reader, or a PACS rule, must not
  take the model's answer for a result.

Codes: see :mod:`medclf.serve.coding` (standard wherever one exists; user-defined classes and the
out-of-distribution score in the declared private scheme ``99MEDCLF``).

The SR references the source instance (Current Requested Procedure Evidence Sequence, image library and
every group's source image) and copies its Patient and General Study modules, so that a PACS files it
with the study: a report without them would be orphaned or mismatched. It carries the identifiers the
source image already carried to the same archive, nothing more.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from medclf._version import __version__
from medclf.errors import ConfigError, InputRejected
from medclf.serve.coding import (
    ABSENT,
    CHECK_SUMMARY,
    EXPECTED_GRADE,
    GRADE_INDEX,
    IN_DISTRIBUTION,
    OOD_SCORE,
    OUT_OF_DISTRIBUTION,
    PRESENT,
    PROBABILITY,
    SCHEME,
    SCHEME_NAME,
    THRESHOLD,
    UNITLESS,
    class_code,
)

if TYPE_CHECKING:
    from medclf.predictor import Predictor

__all__ = [
    "CHECK_TRACKING_ID",
    "GRADE_TRACKING_ID",
    "SR_SERIES_NUMBER",
    "algorithm_name",
    "build_sr",
    "class_tracking_id",
    "model_observer_uid",
    "write_sr_files",
]

SR_SERIES_NUMBER = 990
CHECK_TRACKING_ID = "out-of-distribution check"
DECISION_TRACKING_PREFIX = "operating point: "
GRADE_TRACKING_ID = "ordinal grade"
CLASS_TRACKING_PREFIX = "class: "
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "medclf:dicom-node")
_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
_IMAGE_DESCRIPTION = (
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "FrameOfReferenceUID",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PatientOrientation",
    "SliceThickness",
    "SpacingBetweenSlices",
)
_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_DISCLAIMER = "research software, not for diagnostic use"


def algorithm_name(bundle: Predictor) -> str:
    """The model's name in results: ``medclf <architecture>`` (its version is the bundle's sha256)."""
    return f"medclf {bundle.arch}"


def model_observer_uid(bundle: Predictor) -> str:
    """A UID for the model as an observing device, the same for every report of one bundle."""
    return _uid2_25(uuid.uuid5(_UID_NAMESPACE, f"model|{bundle.sha256}"))


def build_sr(
    source: Dataset,
    prediction: dict[str, Any],
    bundle: Predictor,
    *,
    now: dt.datetime | None = None,
    observer_name: str = "MEDCLF",
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR about ``source`` (a header; pixels not needed) holding ``prediction``.

    ``prediction`` is one entry of :meth:`Predictor.predict`. The SR has a new SOP Instance UID and a Series
    Instance UID derived from the source series and the model, so all reports of one model about one
    series share an SR series. Raises :class:`InputRejected` when the source's UIDs are not valid UIDs.
    """
    now = now or dt.datetime.now(dt.UTC)
    evidence = _evidence_header(source)
    image = hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    if not prediction.get("ood"):
        groups += _class_groups(prediction, bundle, image)
        if prediction.get("grade"):
            groups.append(_grade_group(prediction["grade"], bundle, image))
        if prediction.get("decision"):
            groups.append(_decision_group(prediction["decision"], bundle, image))
    if "ood" in prediction:
        groups.append(_check_group(prediction, bundle, image))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=_model_observer(bundle, observer_name)
        ),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        referenced_images=_image_library(evidence),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=report[0],
        series_instance_uid=_uid2_25(
            uuid.uuid5(_UID_NAMESPACE, f"sr-series|{evidence.SeriesInstanceUID}|{bundle.sha256}")
        ),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid2_25(uuid.uuid4()),
        instance_number=_instance_number(source),
        manufacturer="medclf",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="medclf AI classification (research, not for diagnosis)",
    )
    _set_header(sr, bundle, now)
    return sr


def write_sr_files(bundle: Predictor, results: Sequence[dict[str, Any]], out_dir: str | Path) -> list[str]:
    """``medclf predict --sr DIR``: one ``<SOPInstanceUID>.sr.dcm`` per DICOM input of ``results``.

    Each successful entry of ``results`` (from :meth:`Predictor.predict`) whose path is a DICOM file gains
    ``sr`` (the file written); any other successful entry gains ``sr_skipped`` with the reason (not
    DICOM, an unreadable header, a file of that name already there: an SR is never overwritten). Returns
    one line per skipped entry, for the user."""
    from medclf.io.guard import sniff_format

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--sr {out}: cannot create the folder ({exc.strerror or exc})") from None
    notes = []
    for entry in results:
        if "error" in entry:
            continue
        path = Path(str(entry["path"]))
        try:
            kind = sniff_format(path) if path.is_file() else "not a file"
        except (InputRejected, OSError):
            kind = "unknown"
        if kind != "dicom":
            entry["sr_skipped"] = "not a DICOM file: a DICOM SR needs the source's DICOM header"
        else:
            try:
                header = dcmread(path, stop_before_pixels=True)
                sr = build_sr(header, entry, bundle)
                dest = out / f"{header.SOPInstanceUID}.sr.dcm"
                _write_new(dest, sr)
                entry["sr"] = str(dest)
            except FileExistsError as exc:
                entry["sr_skipped"] = f"{exc.filename} already exists: an SR is never overwritten"
            except InputRejected as exc:
                entry["sr_skipped"] = f"no SR: {exc.message}"
            except (OSError, ValueError, AttributeError) as exc:
                entry["sr_skipped"] = f"no SR: cannot read the DICOM header or write the SR ({exc})"
        if "sr_skipped" in entry:
            notes.append(f"{entry['path']}: {entry['sr_skipped']}")
    return notes


# -- pieces -------------------------------------------------------------------------------------------------


def _class_groups(
    prediction: dict[str, Any], bundle: Predictor, image: hd.sr.SourceImageForMeasurementGroup
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per class: its probability and, for the class predicted, ``<class> = Present``.

    Multi-label findings: every finding present at its threshold is "Present" (one CODE item each), and its
    group also holds that threshold; one label per image: the predicted class alone.
    """
    algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm_name(bundle),
        version=bundle.sha256,
        manufacturer="medclf",
        parameters=_parameters(bundle),
    )
    findings = prediction.get("findings")
    present = {str(f) for f in prediction.get("positive", [])} if findings else {str(prediction["predicted"])}
    groups = []
    for name, p in prediction["probabilities"].items():
        concept = class_code(str(name))
        measurements = [_measurement(PROBABILITY, float(p))]
        if findings:
            measurements.append(_measurement(THRESHOLD, float(findings[name]["threshold"])))
        groups.append(
            _group(
                class_tracking_id(str(name)),
                concept,
                algorithm,
                image,
                measurements,
                [hd.sr.QualitativeEvaluation(concept, PRESENT)] if str(name) in present else [],
            )
        )
    return groups


def class_tracking_id(name: str) -> str:
    """The tracking identifier of class ``name``'s group: the name itself, unless it is one that medclf gives
    its own groups (the grade, the check, a decision, or this function's own prefix); then ``class: <name>``,
    so that a reader finding groups by identifier never takes a class for the grade or the check."""
    own = name in (CHECK_TRACKING_ID, GRADE_TRACKING_ID) or name.startswith(
        (DECISION_TRACKING_PREFIX, CLASS_TRACKING_PREFIX)
    )
    return CLASS_TRACKING_PREFIX + name if own else name


def _grade_group(
    grade: dict[str, Any], bundle: Predictor, image: hd.sr.SourceImageForMeasurementGroup
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """An ordinal grade (``grade`` as :func:`medclf.inference.class_answer` makes it) as one CODE and two
    NUM items: a PACS rule or a reader gets the grade itself, not only a class marked present among the
    grades, and its index and the distribution's mean as numbers to compare or to threshold."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"{algorithm_name(bundle)} ordinal grade",
        version=bundle.sha256,
        manufacturer="medclf",
        parameters=[*_parameters(bundle), f"grade: the {grade['rule']}"],
    )
    measurements = [
        _measurement(GRADE_INDEX, float(grade["index"])),
        _measurement(EXPECTED_GRADE, float(grade["expected_index"])),
    ]
    return _group(GRADE_TRACKING_ID, class_code(str(grade["grade"])), algorithm, image, measurements, [])


def _model_observer(bundle: Predictor, observer_name: str) -> hd.sr.ObserverContext:
    """The model as the observing device (TID 1004)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model_observer_uid(bundle),
            name=_lo(observer_name),
            manufacturer_name="medclf",
            model_name=_lo(f"{bundle.arch} {bundle.sha256[:12]}"),
        ),
    )


def _set_header(sr: hd.sr.Comprehensive3DSR, bundle: Predictor, now: dt.datetime) -> None:
    """The attributes highdicom does not set: character set, model and software, dates, the private
    coding scheme's declaration."""
    # The class names and copied names may be in any script.
    sr.SpecificCharacterSet = "ISO_IR 192"
    sr.ManufacturerModelName = _lo(f"{bundle.arch} {bundle.sha256[:12]}")
    sr.SoftwareVersions = __version__
    # pydicom takes DA/TM values as text; its keyword stubs accept only DA/TM objects.
    sr.InstanceCreationDate = sr.ContentDate = sr.SeriesDate = now.strftime("%Y%m%d")  # type: ignore[assignment]
    sr.InstanceCreationTime = sr.ContentTime = sr.SeriesTime = now.strftime("%H%M%S.%f")  # type: ignore[assignment]
    sr.TimezoneOffsetFromUTC = now.strftime("%z") or "+0000"
    if SCHEME in _designators(sr):  # declared where used (a declaration alone draws dciodvfy's warning)
        scheme = Dataset()
        scheme.CodingSchemeDesignator = SCHEME
        scheme.CodingSchemeName = SCHEME_NAME
        scheme.CodingSchemeResponsibleOrganization = "medclf"
        sr.CodingSchemeIdentificationSequence = [scheme]


def _group(
    tracking: str,
    finding: Code,
    algorithm: hd.sr.AlgorithmIdentification,
    image: hd.sr.SourceImageForMeasurementGroup,
    measurements: list[hd.sr.Measurement],
    evaluations: list[hd.sr.QualitativeEvaluation],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=_lo(tracking)),
        finding_type=finding,
        algorithm_id=algorithm,
        source_images=[image],
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
    )


def _measurement(concept: Code, value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=concept, value=_decimal(value), unit=UNITLESS)


def _decision_group(
    decision: dict[str, Any], bundle: Predictor, image: hd.sr.SourceImageForMeasurementGroup
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The operating point's yes/no call (``decision`` as :meth:`OperatingPoint.decide` makes it)."""
    group = str(decision.get("group") or decision.get("label"))
    concept = class_code(group)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"{algorithm_name(bundle)} operating point",
        version=bundle.sha256,
        manufacturer="medclf",
        parameters=[
            f"threshold: {float(decision['threshold']):.6g}",
            f"method: {decision.get('method', 'unknown')}",
        ],
    )
    measurements = [_measurement(PROBABILITY, float(decision["score"]))]
    measurements.append(_measurement(THRESHOLD, float(decision["threshold"])))
    answer = PRESENT if decision.get("positive") else ABSENT
    return _group(
        DECISION_TRACKING_PREFIX + group,
        concept,
        algorithm,
        image,
        measurements,
        [hd.sr.QualitativeEvaluation(concept, answer)],
    )


def _check_group(
    prediction: dict[str, Any], bundle: Predictor, image: hd.sr.SourceImageForMeasurementGroup
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The out-of-distribution guard's verdict, score and threshold."""
    detector = bundle.ood
    threshold = getattr(detector, "threshold", None)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"{algorithm_name(bundle)} out-of-distribution guard",
        version=bundle.sha256,
        manufacturer="medclf",
        parameters=["Mahalanobis distance of the penultimate features (Lee et al. 2018)"],
    )
    measurements = [
        _measurement(concept, float(value))
        for concept, value in ((OOD_SCORE, prediction.get("ood_score")), (THRESHOLD, threshold))
        if value is not None and math.isfinite(float(value))
    ]
    verdict = OUT_OF_DISTRIBUTION if prediction.get("ood") else IN_DISTRIBUTION
    return _group(
        CHECK_TRACKING_ID,
        CHECK_SUMMARY,
        algorithm,
        image,
        measurements,
        [hd.sr.QualitativeEvaluation(CHECK_SUMMARY, verdict)],
    )


def _parameters(bundle: Predictor) -> list[str]:
    per = bundle.finding_temperatures  # multi-label: one per finding
    return [
        f"architecture: {bundle.arch}",
        f"temperature: {bundle.temperature:.6g}"
        if per is None
        else "temperatures: " + ", ".join(f"{c} {t:.6g}" for c, t in zip(bundle.classes, per, strict=True)),
        f"classes: {', '.join(bundle.classes)}",
        f"medclf {__version__}; {_DISCLAIMER}",
    ]


def _evidence_header(source: Dataset) -> Dataset:
    """The part of the source's header the SR uses, as highdicom's evidence: its UIDs (checked), the
    Patient and General Study attributes the SR copies (absent type 2 ones present and empty), the image
    attributes its image library describes, and the SR's character set (UTF-8)."""
    header = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        header.add_new(keyword, "UI", _checked_uid(source.get(keyword), keyword))
    for keyword in _PATIENT_STUDY + _IMAGE_DESCRIPTION:
        if keyword in source and keyword not in header:
            header.add(source[keyword])
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    header.SpecificCharacterSet = "ISO_IR 192"
    return header


def _image_library(header: Dataset) -> list[Dataset] | None:
    """The image library's entry for the source: with highdicom's descriptors for its modality when the
    header has what they need (an enhanced multi-frame image keeps its spacing in functional groups, a
    DX image may lack Patient Orientation), else with the SOP class's modality, size and frame of
    reference only; none for a SOP class highdicom cannot map to a modality."""
    for candidate in (header, _without_descriptors(header)):
        try:
            hd.sr.ImageLibrary([candidate])
        except (AttributeError, ValueError, KeyError, IndexError, TypeError):
            continue
        return [candidate]
    return None


def _without_descriptors(header: Dataset) -> Dataset:
    bare = Dataset()
    bare.update(header)
    bare.Modality = "OT"  # steers highdicom past the modality-specific descriptors; not written anywhere
    return bare


def _designators(ds: Dataset) -> set[str]:
    """The coding scheme designators of every code in ``ds``'s content tree."""
    found: set[str] = set()
    for item in ds.get("ContentSequence", []):
        for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            found.update(str(code.CodingSchemeDesignator) for code in item.get(keyword, []))
        for measured in item.get("MeasuredValueSequence", []):
            found.update(
                str(c.CodingSchemeDesignator) for c in measured.get("MeasurementUnitsCodeSequence", [])
            )
        found |= _designators(item)
    return found


def _checked_uid(value: object, keyword: str) -> str:
    text = str(value or "").strip()
    if not UID(text).is_valid:
        raise InputRejected(f"the {keyword} {text[:70]!r} is not a valid DICOM UID", reason="invalid_uid")
    return text


def _write_new(dest: Path, sr: Dataset) -> None:
    """Write ``sr`` to a temporary file beside ``dest``, then link it into place: never over a file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            sr.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp_name, dest)
    finally:
        os.unlink(tmp_name)


def _decimal(value: float) -> float:
    """``value`` rounded so that it fits a Decimal String (16 characters)."""
    return float(f"{value:.6g}") if abs(value) >= 1e6 else round(value, 6)


def _lo(text: str) -> str:
    """A value fit for a Long String: at most 64 characters, no backslash or control characters."""
    clean = "".join(c if c.isprintable() and c != "\\" else " " for c in text)
    return clean[:64]


def _uid2_25(u: uuid.UUID) -> str:
    """A UID under the 2.25 root from a UUID (PS3.5 B.2): no organisation root needed."""
    return f"2.25.{u.int}"


def _instance_number(source: Dataset) -> int:
    try:
        return max(int(source.get("InstanceNumber") or 1), 1)
    except (TypeError, ValueError):
        return 1
