"""Ordinal grades and multi-label findings in the DICOM outputs (issue 22): the SR's grade items and the
DICOM node's result JSON, on bundles trained on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from medclf.api import load_bundle
from medclf.predictor import prediction_fields
from medclf.serve import coding
from medclf.serve.sr import CHECK_TRACKING_ID, GRADE_TRACKING_ID, build_sr, class_tracking_id

from .sr_check import check_sr
from .test_dicom_node import AE_TITLE, _mr_small_copy, _send

MR_SMALL = Path(get_testdata_file("MR_small.dcm"))


def _sr_of(bundle, prediction: dict, tmp_path: Path, name: str):
    """The SR of ``prediction`` about MR_small, written and checked (tests/sr_check.py: dciodvfy when
    installed, the IOD, the content read back with highdicom); returns highdicom's SR."""
    src = dcmread(MR_SMALL, stop_before_pixels=True)
    path = tmp_path / f"{name}.sr.dcm"
    build_sr(src, prediction, bundle).save_as(path, enforce_file_format=True)
    return check_sr(path, src, prediction, bundle)


def _same(got, want, where: str) -> None:
    """``got`` equals ``want``, numbers to 1e-6 (the node and ``predict`` read the pixels separately)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            _same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-6), where
    else:
        assert got == want, where


def _groups(report) -> dict:
    return {g.tracking_identifier: g for g in report.content.get_image_measurement_groups()}


@pytest.mark.parametrize("index", [None, 0, 2])
def test_an_ordinal_sr_holds_the_grade_as_a_code_item_and_its_index_and_mean_as_num_items(
    ordinal_bundle, tmp_path, index
):
    b = load_bundle(ordinal_bundle)
    [prediction] = b.predict([MR_SMALL])
    prediction.pop("ood", None)  # no check group: the class and grade groups are what is tested
    if index is not None:  # the lowest and the highest grade too, whatever the 2-epoch model says
        grade = b.classes[index]
        prediction["grade"].update(grade=grade, index=index)
        prediction["predicted"] = grade
    groups = _groups(_sr_of(b, prediction, tmp_path, f"grade{index}"))
    grade_group = groups.pop(GRADE_TRACKING_ID)
    grade = prediction["grade"]
    # The grade as a CODE item: "Finding" (DCM 121071) = the grade's concept, coded as the classes are.
    assert grade_group.finding_type == coding.class_code(grade["grade"])
    # Its index on the scale and the expected index as NUM items, unit UCUM 1.
    (num_index,) = grade_group.get_measurements(name=coding.GRADE_INDEX)
    (num_mean,) = grade_group.get_measurements(name=coding.EXPECTED_GRADE)
    assert num_index.value == grade["index"] and num_index.unit == coding.UNITLESS
    assert num_mean.value == pytest.approx(grade["expected_index"], abs=1e-6)
    assert 0.0 <= num_mean.value <= len(b.classes) - 1
    # The distribution over grades: one probability per grade, summing to one; the grade "Present".
    assert list(groups) == b.classes
    distribution = [g.get_measurements(name=coding.PROBABILITY)[0].value for g in groups.values()]
    assert distribution == pytest.approx(list(prediction["probabilities"].values()), abs=1e-6)
    assert sum(distribution) == pytest.approx(1.0, abs=1e-5)
    present = [n for n, g in groups.items() if g.get_qualitative_evaluations()]
    assert present == [grade["grade"]]


def test_an_ordinal_sr_of_an_out_of_distribution_input_holds_no_grade(ordinal_bundle, tmp_path):
    b = load_bundle(ordinal_bundle)
    [prediction] = b.predict([MR_SMALL])
    prediction.update(ood=True, ood_score=1e3, warning="unlike the training data")
    groups = _groups(_sr_of(b, prediction, tmp_path, "ood"))
    assert GRADE_TRACKING_ID not in groups and not set(groups) & set(b.classes)


def test_a_class_named_like_medclfs_own_groups_gets_an_identifier_of_its_own(ordinal_bundle, tmp_path):
    """A class called "ordinal grade" (or "out-of-distribution check", "operating point: ...") must not be
    found by a reader looking for the grade, the check or a decision."""
    assert class_tracking_id("grade2") == "grade2"
    for own in (GRADE_TRACKING_ID, CHECK_TRACKING_ID, "operating point: tumour", "class: x"):
        assert class_tracking_id(own) == f"class: {own}"
    b = load_bundle(ordinal_bundle)
    [prediction] = b.predict([MR_SMALL])
    prediction.pop("ood", None)
    first = b.classes[0]
    prediction["probabilities"] = {
        (GRADE_TRACKING_ID if k == first else k): v for k, v in prediction["probabilities"].items()
    }
    if prediction["predicted"] == first:
        prediction["predicted"] = GRADE_TRACKING_ID
    path = tmp_path / "named.sr.dcm"
    build_sr(dcmread(MR_SMALL, stop_before_pixels=True), prediction, b).save_as(
        path, enforce_file_format=True
    )
    groups = _groups(hd.sr.srread(path))
    # The grade's group keeps its identifier and its NUM items; the class's group is "class: ordinal grade".
    assert groups[GRADE_TRACKING_ID].get_measurements(name=coding.GRADE_INDEX)
    renamed = groups[f"class: {GRADE_TRACKING_ID}"]
    assert not renamed.get_measurements(name=coding.GRADE_INDEX)
    (probability,) = renamed.get_measurements(name=coding.PROBABILITY)
    assert probability.value == pytest.approx(prediction["probabilities"][GRADE_TRACKING_ID], abs=1e-6)
    assert len(groups) == len(b.classes) + 1


@pytest.mark.parametrize("fixture", ["tiny_bundle", "findings_bundle"])
def test_single_label_and_findings_srs_have_no_grade_items(request, fixture, tmp_path):
    b = load_bundle(request.getfixturevalue(fixture))
    [prediction] = b.predict([MR_SMALL])
    prediction.pop("ood", None)
    groups = _groups(_sr_of(b, prediction, tmp_path, fixture))
    assert list(groups) == b.classes  # one group per class, nothing more
    for group in groups.values():
        names = [m.name for m in group.get_measurements()]
        assert coding.GRADE_INDEX not in names and coding.EXPECTED_GRADE not in names


@pytest.mark.parametrize(
    ("fixture", "task_fields"),
    [("ordinal_bundle", {"grade"}), ("findings_bundle", {"findings", "positive"}), ("tiny_bundle", set())],
)
def test_the_dicom_nodes_json_carries_every_prediction_field_of_predict(
    request, fixture, task_fields, tmp_path
):
    from medclf.serve.dicom_node import DicomNode

    b = load_bundle(request.getfixturevalue(fixture))
    ds = _mr_small_copy()
    with DicomNode(b, tmp_path / "out", port=0, ae_title=AE_TITLE) as node:
        status = _send(node.port, ds)
        assert status.Status == 0x0000
        result = json.loads((node.out_dir / f"{ds.SOPInstanceUID}.json").read_text(encoding="utf-8"))
    [answer] = b.predict([MR_SMALL])  # the same pixels under another SOP Instance UID
    expected = prediction_fields(answer)
    assert task_fields <= set(expected)
    assert set(expected) <= set(result), set(expected) - set(result)
    for key, value in expected.items():
        _same(result[key], value, key)
    assert "path" not in result
    # The node's SR holds the same answer (an ordinal bundle's grade group included).
    src = dcmread(MR_SMALL, stop_before_pixels=True)
    src.SOPInstanceUID = ds.SOPInstanceUID
    check_sr(node.out_dir / f"{ds.SOPInstanceUID}.sr.dcm", src, result, b)
