"""FHIR results of medclf predictions: one ``DiagnosticReport`` with its ``Observation``\\ s and the model
as a ``Device``, all contained in the report, validated by building them with ``fhir.resources``.

FHIR version: **R4** (4.0.1) is what hospital systems run. ``fhir.resources`` (the maintained FHIR model
library on pydantic 2) ships models for R5, R4B (4.3.0) and STU3, but no longer for R4 itself. R4B is a
limited update of R4 (chiefly new medication definition and evidence resources), so the report is built and
validated with the R4B models and uses only elements R4 defines (the test checks each resource's element
names against R4's).

What the report holds (codes as in the DICOM SR, see :mod:`medclf.serve.coding`):

- ``status`` ``preliminary`` (an AI result that nobody has verified), category ``RAD``, code LOINC
  18748-4, ``issued``, an ``identifier`` (the HTTP request's id, or the SR's SOP Instance UID when the
  DICOM node writes it beside an SR);
- a contained ``Device``: the model (name ``medclf <architecture>``, version = the bundle's sha256,
  manufacturer ``medclf``, identifier = the SR's device observer UID);
- one ``Observation`` per class: code = the class concept (``text`` = the class name), ``valueQuantity`` =
  its probability (UCUM ``1``); and a "Finding" (DCM 121071) ``Observation`` whose value is the predicted
  class, with the class observations as members; the predicted class is also the ``conclusionCode``;
- an ordinal model's grade: the same, the class observations being the grade distribution, and the
  "Finding" also says how the grade was chosen (``method``: the median of the distribution) and holds the
  grade's index on the scale (``valueInteger``) and the distribution's mean (the expected index) as
  components (``99MEDCLF`` GRADEINDEX, EXPECTEDGRADE);
- multi-label findings instead: one ``Observation`` per finding, code = the finding's concept, value SCT
  Present/Absent at the model's threshold for that finding, components probability and threshold,
  ``method`` = how the bundle's thresholds were chosen; the findings present are the ``conclusionCode``\\ s
  (none when no finding is present), and no observation picks one class;
- the operating point's decision when the bundle has one: code = the positive group, value SCT
  Present/Absent, components probability and threshold;
- the out-of-distribution check when the bundle has a guard: DCM 111017 = "All algorithms succeeded; with
  findings" or "No algorithms succeeded; without findings", components score and threshold, the warning
  as a note. A flagged input gets **no class observations, finding, decision or conclusion code**, as in
  the SR.

It holds no patient data: the HTTP API never sees any, and the DICOM node's copy sits beside JSON results
that are kept free of patient identifiers.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medclf._version import __version__
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
    THRESHOLD,
    UNITLESS,
    class_code,
    fhir_system,
)
from medclf.serve.sr import algorithm_name, model_observer_uid

if TYPE_CHECKING:
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    from medclf.predictor import Predictor

__all__ = ["MEDIA_TYPE", "diagnostic_report", "report_json", "wants_fhir"]

MEDIA_TYPE = "application/fhir+json"
FHIR_VERSION = "4.0.1"  # what the JSON is valid as (built with the R4B models, see the module docstring)
_DISCLAIMER = "Research software: not a medical device and not a diagnosis."
_IMAGING = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "imaging",
            "display": "Imaging",
        }
    ]
}
_RADIOLOGY = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
    ]
}


def wants_fhir(accept: str | None) -> bool:
    """Whether an HTTP ``Accept`` header prefers ``application/fhir+json`` to ``application/json``: it
    names FHIR JSON with a non-zero quality at least as high as plain JSON's."""
    fhir_q, json_q = 0.0, 0.0
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == MEDIA_TYPE:
            fhir_q = max(fhir_q, q)
        elif media == "application/json":
            json_q = max(json_q, q)
    return fhir_q > 0 and fhir_q >= json_q


def diagnostic_report(
    prediction: dict[str, Any],
    bundle: Predictor,
    *,
    issued: dt.datetime | None = None,
    identifiers: Sequence[dict[str, str]] = (),
    overlay_png: bytes | None = None,
    overlay_target: str | None = None,
) -> DiagnosticReport:
    """The FHIR ``DiagnosticReport`` of one prediction (an entry of :meth:`Predictor.predict`), validated.

    ``identifiers``: FHIR ``Identifier`` objects of the report (``{"system": ..., "value": ...}``);
    ``overlay_png``: a heatmap overlay to attach as the report's ``presentedForm``, ``overlay_target`` the
    class or finding it explains (a multi-label answer has several)."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    issued = issued or dt.datetime.now(dt.UTC)
    when = issued.isoformat(timespec="milliseconds")
    device_ref = {"reference": "#model", "display": algorithm_name(bundle)}
    common = {
        "resourceType": "Observation",
        "status": "preliminary",
        "category": [_IMAGING],
        "issued": when,
        "device": device_ref,
    }
    observations: list[dict[str, Any]] = []
    conclusion_codes: list[dict[str, Any]] = []
    if not prediction.get("ood"):
        observations, conclusion_codes = _results(prediction, bundle, common)
        if prediction.get("decision"):
            observations.append(_decision(prediction["decision"], common))
    if "ood" in prediction:
        observations.append(_check(prediction, bundle, common))
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "contained": [_device(bundle), *observations],
        "identifier": list(identifiers),
        "status": "preliminary",
        "category": [_RADIOLOGY],
        "code": {**_concept(codes.LN.DiagnosticImagingReport), "text": "medclf AI classification"},
        "effectiveDateTime": when,
        "issued": when,
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": _conclusion(prediction, bundle),
    }
    if conclusion_codes:
        report["conclusionCode"] = conclusion_codes
    if overlay_png is not None:
        report["presentedForm"] = [
            {
                "contentType": "image/png",
                "data": base64.b64encode(overlay_png).decode("ascii"),
                "title": "Heatmap of the input"
                + (f" for '{overlay_target}'" if overlay_target else "")
                + " (where the model looked; not a lesion outline)",
            }
        ]
    if not report["identifier"]:
        del report["identifier"]
    return DiagnosticReport.model_validate(report)


def report_json(report: DiagnosticReport) -> str:
    """The report as FHIR JSON text (no empty elements)."""
    return json.dumps(json.loads(report.model_dump_json()), indent=2, ensure_ascii=False) + "\n"


# -- pieces -------------------------------------------------------------------------------------------------


def _coding(code: Code) -> dict[str, str]:
    return {"system": fhir_system(code), "code": code.value, "display": code.meaning}


def _concept(code: Code, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [_coding(code)]}
    if text is not None:
        concept["text"] = text
    return concept


def _quantity(value: float) -> dict[str, Any]:
    return {"value": value, "unit": UNITLESS.value, "system": fhir_system(UNITLESS), "code": UNITLESS.value}


def _component(code: Code, value: float) -> dict[str, Any]:
    return {"code": _concept(code), "valueQuantity": _quantity(value)}


def _device(bundle: Predictor) -> dict[str, Any]:
    return {
        "resourceType": "Device",
        "id": "model",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{model_observer_uid(bundle)}"}],
        "manufacturer": "medclf",
        "deviceName": [{"name": algorithm_name(bundle), "type": "model-name"}],
        "type": {"text": "AI image classification model"},
        "version": [
            {"type": {"text": "sha256 of the model bundle"}, "value": bundle.sha256},
            {"type": {"text": "medclf"}, "value": __version__},
        ],
        "note": [{"text": _DISCLAIMER}],
    }


def _results(
    prediction: dict[str, Any], bundle: Predictor, common: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The observations and conclusion codes of the model's answer, by what the answer holds (as the SR
    reads it): multi-label ``findings``, or one class per image (an ordinal ``grade`` included)."""
    if prediction.get("findings"):
        return _finding_results(prediction["findings"], bundle, common)
    return _class_results(prediction, common)


def _class_results(
    prediction: dict[str, Any], common: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One class per image: an observation per class (its probability; for an ordinal model the grade
    distribution), and the "Finding" observation whose value is the predicted class with the class
    observations as its members. An ordinal grade's finding also says how the grade was chosen and holds
    its index on the scale and the distribution's mean (its expected index) as components."""
    observations: list[dict[str, Any]] = []
    members = []
    for n, (name, p) in enumerate(prediction["probabilities"].items(), start=1):
        obs_id = f"p{n}"
        members.append({"reference": f"#{obs_id}", "display": f"probability of {name}"})
        observations.append(
            {
                **common,
                "id": obs_id,
                "code": _concept(class_code(str(name)), str(name)),
                "valueQuantity": _quantity(float(p)),
            }
        )
    predicted = str(prediction["predicted"])
    finding: dict[str, Any] = {
        **common,
        "id": "finding",
        "code": _concept(codes.DCM.Finding),
        "valueCodeableConcept": _concept(class_code(predicted), predicted),
        "hasMember": members,
    }
    grade = prediction.get("grade")
    if grade:
        finding["method"] = {"text": f"ordinal grade: the {grade['rule']}"}
        finding["component"] = [
            {"code": _concept(GRADE_INDEX), "valueInteger": int(grade["index"])},
            _component(EXPECTED_GRADE, float(grade["expected_index"])),
        ]
    observations.append(finding)
    return observations, [_concept(class_code(predicted), predicted)]


def _finding_results(
    findings: dict[str, dict[str, Any]], bundle: Predictor, common: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Multi-label findings: one observation per finding, ``Present`` or ``Absent`` at the model's threshold
    for it, with its probability and that threshold as components (a finding is not a class of the image,
    so no "Finding" observation picks one); the findings present are the conclusion codes."""
    method = {"text": _threshold_rule(bundle)}
    observations: list[dict[str, Any]] = []
    present: list[dict[str, Any]] = []
    for n, (name, f) in enumerate(findings.items(), start=1):
        concept = _concept(class_code(str(name)), str(name))
        observations.append(
            {
                **common,
                "id": f"finding{n}",
                "code": concept,
                "valueCodeableConcept": _concept(PRESENT if f["present"] else ABSENT),
                "method": method,
                "component": [
                    _component(PROBABILITY, float(f["probability"])),
                    _component(THRESHOLD, float(f["threshold"])),
                ],
            }
        )
        if f["present"]:
            present.append(concept)
    return observations, present


def _threshold_rule(bundle: Predictor) -> str:
    """How the bundle's per-finding thresholds were chosen, for each finding's ``method``."""
    recorded = (getattr(bundle, "manifest", None) or {}).get("thresholds") or {}
    if not recorded.get("labels"):
        return "present when its probability reaches 0.5 (the bundle holds no per-finding thresholds)"
    return (
        "present when its probability reaches the finding's threshold "
        f"({recorded.get('rule', 'unrecorded')} rule, chosen on {recorded.get('fitted_on', 'unrecorded data')})"
    )


def _decision(decision: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    group = str(decision.get("group") or decision.get("label"))
    return {
        **common,
        "id": "decision",
        "code": _concept(class_code(group), group),
        "valueCodeableConcept": _concept(PRESENT if decision.get("positive") else ABSENT),
        "method": {"text": f"operating point ({decision.get('method', 'unknown')}): {decision.get('label')}"},
        "component": [
            _component(PROBABILITY, float(decision["score"])),
            _component(THRESHOLD, float(decision["threshold"])),
        ],
    }


def _check(prediction: dict[str, Any], bundle: Predictor, common: dict[str, Any]) -> dict[str, Any]:
    threshold = getattr(bundle.ood, "threshold", None)
    components = [
        _component(concept, float(value))
        for concept, value in ((OOD_SCORE, prediction.get("ood_score")), (THRESHOLD, threshold))
        if value is not None and math.isfinite(float(value))
    ]
    obs = {
        **common,
        "id": "ood-check",
        "code": _concept(CHECK_SUMMARY, "out-of-distribution check"),
        "valueCodeableConcept": _concept(OUT_OF_DISTRIBUTION if prediction.get("ood") else IN_DISTRIBUTION),
        "method": {"text": "Mahalanobis distance of the penultimate features (Lee et al. 2018)"},
    }
    if components:
        obs["component"] = components
    if prediction.get("warning"):
        obs["note"] = [{"text": str(prediction["warning"])}]
    return obs


def _conclusion(prediction: dict[str, Any], bundle: Predictor) -> str:
    model = f"{algorithm_name(bundle)} (sha256 {bundle.sha256[:12]})"
    if prediction.get("ood"):
        text = (
            f"The input is outside the training distribution of {model}: the model gives no valid result for "
            f"it, so none is reported. {prediction.get('warning', '')}".strip()
        )
    elif prediction.get("findings"):
        text = _findings_sentence(model, prediction["findings"])
    elif prediction.get("grade"):
        grade = prediction["grade"]
        text = (
            f"{model} grades the image '{grade['grade']}' (the {grade['rule']}; expected grade index "
            f"{float(grade['expected_index']):.2f} on a scale of 0 to {len(prediction['probabilities']) - 1}); "
            f"probability of that grade {float(prediction['confidence']):.3f}."
        )
    else:
        text = f"{model} predicts '{prediction['predicted']}' with probability {float(prediction['confidence']):.3f}."
    decision = prediction.get("decision")
    if decision and not prediction.get("ood"):
        text += (
            f" Decision at the operating point: {decision.get('label')} (P({decision.get('group')}) "
            f"{float(decision['score']):.3f}, threshold {float(decision['threshold']):.4g})."
        )
    return f"{text} {_DISCLAIMER}"


def _findings_sentence(model: str, findings: dict[str, dict[str, Any]]) -> str:
    """Which findings the model finds present at their thresholds, and which absent, with the figures."""

    def figures(f: dict[str, Any]) -> str:
        sign = ">=" if f["present"] else "<"
        return f"probability {float(f['probability']):.3f} {sign} threshold {float(f['threshold']):.4g}"

    present = [f"{name} ({figures(f)})" for name, f in findings.items() if f["present"]]
    absent = [f"{name} ({figures(f)})" for name, f in findings.items() if not f["present"]]
    if present:
        text = f"{model} finds present: {'; '.join(present)}."
    else:
        text = f"{model} finds none of its {len(findings)} findings present at their thresholds."
    return text + (f" Absent: {'; '.join(absent)}." if absent else "")


def http_report(answer: dict[str, Any], bundle: Predictor, request_id: str) -> str:
    """``POST /v1/predict`` answered as FHIR (``Accept: application/fhir+json``): the report of ``answer``
    (what the JSON answer would hold), identified by the request's id (the audit log's), with the
    heatmap overlay as its presented form when ``?explain=true``."""
    explanation = answer.get("explanation") or {}
    overlay = explanation.get("overlay_png")
    report = diagnostic_report(
        answer,
        bundle,
        identifiers=[{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{_uuid(request_id)}"}],
        overlay_png=base64.b64decode(overlay) if overlay else None,
        overlay_target=explanation.get("explained_class"),
    )
    return report_json(report)


def _uuid(request_id: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"medclf:request:{request_id}"))
