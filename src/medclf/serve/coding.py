"""The coded concepts of medclf's results, shared by the DICOM SR (:mod:`medclf.serve.sr`) and FHIR
(:mod:`medclf.serve.fhir`) writers, so both say the same thing with the same codes.

Standard codes wherever one exists (DICOM PS3.16 ``DCM``, SNOMED CT ``SCT``, UCUM, LOINC, as pydicom's
PS3.16 tables carry them):

==================================  =============================================================
a class probability                 DCM 122157 "Probability", unit UCUM ``1`` (no units)
a class the model predicted         the class's concept = SCT 52101004 "Present"
the operating point's decision      the group's concept = SCT 52101004 "Present" / 272519000 "Absent"
its threshold                       DCM 122411 "Threshold Value"
a multi-label finding's decision    the finding's concept = SCT "Present" / "Absent", at its threshold
an ordinal grade                    DCM 121071 "Finding" = the grade's concept; its index on the scale
                                    and the distribution's mean: ``99MEDCLF`` GRADEINDEX,
                                    EXPECTEDGRADE, unit UCUM ``1`` (a position on the scale)
the out-of-distribution check       DCM 111017 "CAD Processing and Findings Summary" =
                                    DCM 111242 "All algorithms succeeded; with findings", or
                                    DCM 111245 "No algorithms succeeded; without findings"
algorithm identification            DCM 111001 / 111003 / 122405 / 111002 (TID 4019)
==================================  =============================================================

A class is a user's label, so its concept is standard only when it names one: a class whose name equals
the meaning of exactly one SNOMED CT concept in pydicom's table (case, ``_`` and ``-`` aside: ``normal``,
``pneumothorax``, ``benign``, ``malignant``, ``edema``) gets that concept. Every other class, and the
out-of-distribution score (a Mahalanobis distance in the model's feature space, for which no standard
concept exists), gets a code in the private scheme ``99MEDCLF`` (PS3.16 8.2: private designators start
with ``99``), declared in the SR's Coding Scheme Identification Sequence and known to FHIR by
:data:`SCHEME_SYSTEM`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ABSENT",
    "CHECK_SUMMARY",
    "EXPECTED_GRADE",
    "GRADE_INDEX",
    "IN_DISTRIBUTION",
    "OOD_SCORE",
    "OUT_OF_DISTRIBUTION",
    "PRESENT",
    "PROBABILITY",
    "SCHEME",
    "SCHEME_NAME",
    "SCHEME_SYSTEM",
    "SCHEME_UID",
    "THRESHOLD",
    "UNITLESS",
    "class_code",
    "fhir_system",
]

SCHEME = "99MEDCLF"
SCHEME_NAME = "medclf model classes and result checks"
# The scheme's UID (2.25 root, PS3.5 B.2: no organisation root needed), fixed for good; FHIR names the
# scheme by it (``urn:oid:``), the SR declares it beside the designator.
SCHEME_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'medclf:coding-scheme:99MEDCLF').int}"
SCHEME_SYSTEM = f"urn:oid:{SCHEME_UID}"

PROBABILITY = codes.DCM.Probability
UNITLESS = codes.UCUM.NoUnits
THRESHOLD = codes.DCM.ThresholdValue
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
CHECK_SUMMARY = codes.DCM.CADProcessingAndFindingsSummary
IN_DISTRIBUTION = codes.DCM.AllAlgorithmsSucceededWithFindings
OUT_OF_DISTRIBUTION = codes.DCM.NoAlgorithmsSucceededWithoutFindings
OOD_SCORE = Code("OODSCORE", SCHEME, "Out-of-distribution score (Mahalanobis distance)")
# An ordinal model's grade as a position on its scale, and the mean of its grade distribution: no standard
# concept says either of a model's own grades.
GRADE_INDEX = Code("GRADEINDEX", SCHEME, "Grade index on the model's ordinal scale (0 = lowest grade)")
EXPECTED_GRADE = Code("EXPECTEDGRADE", SCHEME, "Expected grade index (mean of the grade distribution)")
_RESERVED = {OOD_SCORE.value, GRADE_INDEX.value, EXPECTED_GRADE.value}

# FHIR code system URIs of the DICOM coding scheme designators used here (HL7 terminology).
_FHIR_SYSTEMS = {
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    SCHEME: SCHEME_SYSTEM,
}


def fhir_system(code: Code) -> str:
    """The FHIR ``system`` URI of a code's scheme."""
    return _FHIR_SYSTEMS[code.scheme_designator]


def class_code(name: str) -> Code:
    """The concept of class ``name``: a SNOMED CT concept when the name is that concept's meaning (and
    only one concept's), else a ``99MEDCLF`` code: the name itself when it is a valid code value (at most
    16 printable ASCII characters, no backslash), else ``C`` + 15 hex digits of its sha256. The meaning
    of a private code is the class name."""
    standard = _snomed_by_meaning().get(_normal(name))
    if standard is not None:
        return standard
    clean = name.strip()
    if (
        0 < len(clean) <= 16
        and "\\" not in clean
        and clean.isprintable()
        and clean.isascii()
        and clean not in _RESERVED
    ):
        value = clean
    else:
        value = "C" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:15]
    return Code(value, SCHEME, name)


def _normal(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text).strip().lower()


@functools.lru_cache(maxsize=1)
def _snomed_by_meaning() -> dict[str, Code]:
    """SNOMED CT concepts of pydicom's PS3.16 table by normalised meaning, where the meaning is unique (a
    meaning two concepts share, such as "Normal" for a finding and an ECG result, maps to the one whose
    keyword is that meaning, else to none)."""
    found: dict[str, dict[str, tuple[Code, bool]]] = {}
    for keyword, code in codes.SCT.concepts.items():
        key = _normal(code.meaning)
        exact = keyword.lower() == key.replace(" ", "")
        entry = found.setdefault(key, {})
        known = entry.get(code.value)
        entry[code.value] = (code, exact or (known is not None and known[1]))
    out = {}
    for key, by_value in found.items():
        if len(by_value) == 1:
            out[key] = next(iter(by_value.values()))[0]
        else:
            exact = [code for code, is_exact in by_value.values() if is_exact]
            if len(exact) == 1:
                out[key] = exact[0]
    return out
