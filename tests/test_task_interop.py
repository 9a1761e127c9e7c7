"""Multi-label findings and ordinal grades where results leave medclf (issue 22): FHIR R4 reports (from
``Predictor.predict`` and the HTTP API) and MONAI bundle export, on bundles trained on generated data."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from medclf.api import export_monai_bundle, load_bundle
from medclf.errors import ConfigError
from medclf.interop.monai_bundle import METADATA_SCHEMA, ClassificationEvaluator
from medclf.serve import coding
from medclf.serve.fhir import diagnostic_report

from .test_results import R4_ELEMENTS

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"


def _document(prediction: dict, bundle) -> dict:
    """The FHIR report of ``prediction`` as JSON, checked to be valid R4 (R4B models, R4 elements only)."""
    document = json.loads(diagnostic_report(prediction, bundle).model_dump_json())
    DiagnosticReport.model_validate(document)
    for resource in [document, *document["contained"]]:
        unknown = set(resource) - {"resourceType"} - set(R4_ELEMENTS[resource["resourceType"]].split())
        assert not unknown, (resource["resourceType"], unknown)
    contained = {r["id"]: r for r in document["contained"]}
    assert [r["reference"] for r in document["result"]] == [f"#{k}" for k in contained if k != "model"]
    return document


def _components(obs: dict) -> dict[str, dict]:
    return {c["code"]["coding"][0]["code"]: c for c in obs.get("component", [])}


def _check_findings_report(document: dict, answer: dict, bundle) -> None:
    """One observation per finding, Present/Absent at its threshold with the probability and threshold;
    the findings present, and only they, are the conclusion codes; no observation picks one class."""
    observations = {r["id"]: r for r in document["contained"] if r["resourceType"] == "Observation"}
    assert "finding" not in observations and not any(k.startswith("p") for k in observations)
    per_finding = {o["code"]["text"]: o for k, o in observations.items() if k.startswith("finding")}
    assert list(per_finding) == list(answer["findings"]) == bundle.classes
    rule = bundle.manifest["thresholds"]
    for name, f in answer["findings"].items():
        obs = per_finding[name]
        coded = obs["code"]["coding"][0]
        code = coding.class_code(name)
        assert (coded["system"], coded["code"]) == (coding.fhir_system(code), code.value)
        value = obs["valueCodeableConcept"]["coding"][0]
        want = coding.PRESENT if f["present"] else coding.ABSENT
        assert (value["system"], value["code"]) == (SCT, want.value)
        parts = _components(obs)
        assert parts[coding.PROBABILITY.value]["valueQuantity"]["value"] == pytest.approx(f["probability"])
        assert parts[coding.THRESHOLD.value]["valueQuantity"]["value"] == pytest.approx(f["threshold"])
        assert rule["rule"] in obs["method"]["text"] and rule["fitted_on"] in obs["method"]["text"]
    conclusion_codes = [c["text"] for c in document.get("conclusionCode", [])]
    assert conclusion_codes == answer["positive"]
    for name in answer["positive"]:
        assert name in document["conclusion"]


def test_a_findings_report_carries_every_finding_at_its_threshold(findings_bundle, findings_data):
    b = load_bundle(findings_bundle)
    png = sorted((findings_data / "images").glob("*.png"))[0]
    [answer] = b.predict([png])
    answer.pop("ood", None)  # the guard's verdict is tested apart; here every finding must be reported
    # One finding present and the others absent, whatever this tiny model says.
    forced = copy.deepcopy(answer)
    for k, f in enumerate(forced["findings"].values()):
        f["present"] = k == 1
    forced["positive"] = [b.classes[1]]
    _check_findings_report(_document(forced, b), forced, b)
    assert "Absent:" in _document(forced, b)["conclusion"]
    # No finding present: no conclusion code, and the conclusion says so (no "predicts 'No Finding'").
    for f in forced["findings"].values():
        f["present"] = False
    forced["positive"] = []
    document = _document(forced, b)
    _check_findings_report(document, forced, b)
    assert "conclusionCode" not in document and "none of its 3 findings present" in document["conclusion"]
    # The model's own answer, as it is.
    _check_findings_report(_document(answer, b), answer, b)


def test_the_http_api_answers_findings_as_fhir(findings_bundle, findings_data, tmp_path):
    from medclf.serve.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    b = load_bundle(findings_bundle)
    if b.ood is not None:
        b.ood.threshold = float("inf")  # every input in distribution: the findings must be reported
    png = sorted((findings_data / "images").glob("*.png"))[1]
    files = {"file": ("x.png", png.read_bytes(), "image/png")}
    with TestClient(create_app(b, audit_db=str(tmp_path / "audit.db"))) as client:
        plain = client.post("/v1/predict", files=files).json()
        r = client.post("/v1/predict", files=files, headers={"Accept": "application/fhir+json"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert plain["ood"] is False
    _check_findings_report(r.json(), plain, b)


def test_a_grade_report_carries_the_grade_its_rule_and_its_distribution(ordinal_bundle, sim_data):
    b = load_bundle(ordinal_bundle)
    png = sorted((sim_data / "test").rglob("*.png"))[0]
    [answer] = b.predict([png])
    answer.pop("ood", None)
    document = _document(answer, b)
    observations = {r["id"]: r for r in document["contained"] if r["resourceType"] == "Observation"}
    finding = observations.pop("finding")
    grade = answer["grade"]
    assert finding["valueCodeableConcept"]["text"] == grade["grade"] == answer["predicted"]
    assert finding["code"]["coding"][0]["code"] == "121071"  # DCM "Finding", as for one class
    assert "median" in finding["method"]["text"]
    parts = _components(finding)
    assert parts[coding.GRADE_INDEX.value]["valueInteger"] == grade["index"]
    assert parts[coding.EXPECTED_GRADE.value]["valueQuantity"]["value"] == pytest.approx(
        grade["expected_index"]
    )
    assert all(c["code"]["coding"][0]["system"] == coding.SCHEME_SYSTEM for c in finding["component"])
    # The grade distribution: one member per grade, in order, summing to one.
    members = [observations[m["reference"][1:]] for m in finding["hasMember"]]
    assert [o["code"]["text"] for o in members] == b.classes
    distribution = [o["valueQuantity"]["value"] for o in members]
    assert distribution == pytest.approx(list(answer["probabilities"].values()))
    assert sum(distribution) == pytest.approx(1.0, abs=1e-6)
    assert [c["text"] for c in document["conclusionCode"]] == [grade["grade"]]
    assert (
        f"grades the image '{grade['grade']}'" in document["conclusion"]
        and "median" in document["conclusion"]
    )


def test_single_label_reports_are_unchanged_by_the_task_branches(tiny_bundle, sim_data):
    b = load_bundle(tiny_bundle)
    [answer] = b.predict([sorted((sim_data / "test").rglob("*.png"))[0]])
    answer.pop("ood", None)
    document = _document(answer, b)
    finding = next(r for r in document["contained"] if r["id"] == "finding")
    assert "method" not in finding and "component" not in finding
    assert f"predicts '{answer['predicted']}' with probability" in document["conclusion"]


# -- MONAI bundles -------------------------------------------------------------------------------------------


def _monai_run(bundle_dir: Path, images: Path, out: Path) -> list[dict[str, str]]:
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle_dir / "configs" / "inference.json"),
         "--bundle_root", str(bundle_dir), "--dataset_dir", str(images), "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _images(pngs: list[Path], folder: Path) -> Path:
    folder.mkdir()
    for k, png in enumerate(pngs):
        shutil.copy(png, folder / f"{k}-{png.name}")
    return folder


def test_a_findings_monai_bundle_applies_sigmoids_and_the_bundles_thresholds(
    findings_bundle, findings_data, tmp_path
):
    b = load_bundle(findings_bundle)
    out = export_monai_bundle(findings_bundle, tmp_path / "monai")
    meta = json.loads((out / "configs" / "metadata.json").read_text(encoding="utf-8"))
    config = json.loads((out / "configs" / "inference.json").read_text(encoding="utf-8"))
    jsonschema.validate(meta, METADATA_SCHEMA)
    thresholds = b.manifest["thresholds"]["labels"]
    task = meta["medclf_task"]
    assert task["type"] == "multilabel" and task["thresholds"] == thresholds
    assert task["thresholds_fitted_on"] == "validation" and "sigmoid" in task["activation"]
    assert "Multi-label" in meta["task"] and all(name in meta["task"] for name in b.classes)
    assert "sigmoid" in meta["description"] and "softmax" not in meta["description"]
    post = meta["network_data_format"]["post_processed_outputs"]["pred"]
    assert post["channel_def"] == {str(i): c for i, c in enumerate(b.classes)} and post["value_range"] == [
        0,
        1,
    ]
    activation = config["postprocessing"]["transforms"][-1]
    assert activation == {"_target_": "Activations", "sigmoid": True}
    assert config["task"] == "multilabel" and config["thresholds"] == [thresholds[c] for c in b.classes]
    # The exported network reproduces medclf's probabilities and decisions.
    # Test images: a validation image's probability can be its finding's threshold exactly, where float
    # rounding of the two paths could tip the decision.
    with open(findings_data / "manifest.csv", newline="") as fh:
        tests = [findings_data / r["path"] for r in csv.DictReader(fh) if r["split"] == "test"]
    images = _images(tests[:5], tmp_path / "images")
    rows = _monai_run(out, images, tmp_path / "eval")
    expected = {r["path"]: r for r in b.predict([images], engine="torch")}
    assert sorted(r["path"] for r in rows) == sorted(expected)
    for row in rows:
        want = expected[row["path"]]
        assert row["predicted"] == want["predicted"]
        for name, f in want["findings"].items():
            assert abs(float(row[f"prob_{name}"]) - f["probability"]) <= 1e-4
            assert row[f"present_{name}"] == str(int(f["present"]))
    # Independent sigmoids, not a softmax: the probabilities need not sum to one.
    assert any(abs(sum(float(r[f"prob_{c}"]) for c in b.classes) - 1) > 1e-3 for r in rows)
    with pytest.raises(ConfigError, match="2 thresholds for 3 findings"):
        ClassificationEvaluator(
            [], None, None, None, b.classes, tmp_path, task="multilabel", thresholds=[0.5, 0.5]
        )


def test_a_grades_monai_bundle_gives_the_distribution_and_the_median_grade(
    ordinal_bundle, sim_data, tmp_path
):
    b = load_bundle(ordinal_bundle)
    out = export_monai_bundle(ordinal_bundle, tmp_path / "monai")
    meta = json.loads((out / "configs" / "metadata.json").read_text(encoding="utf-8"))
    config = json.loads((out / "configs" / "inference.json").read_text(encoding="utf-8"))
    jsonschema.validate(meta, METADATA_SCHEMA)
    task = meta["medclf_task"]
    assert task["type"] == "ordinal" and task["grades"] == b.classes and task["head"] == "corn"
    assert "median" in task["decision"] and "median" in meta["description"]
    assert meta["task"].startswith("Ordinal grading") and " < ".join(b.classes) in meta["task"]
    for part in ("outputs", "post_processed_outputs"):
        assert meta["network_data_format"][part]["pred"]["format"] == "ordinal"
    assert config["network_def"]["head"] == "corn" and "thresholds" not in config
    assert config["postprocessing"]["transforms"][-1] == {"_target_": "Activations", "softmax": True}
    images = _images(sorted((sim_data / "test").rglob("*.png"))[:6], tmp_path / "images")
    rows = _monai_run(out, images, tmp_path / "eval")
    expected = {r["path"]: r for r in b.predict([images], engine="torch")}
    assert sorted(r["path"] for r in rows) == sorted(expected)
    for row in rows:
        want = expected[row["path"]]
        assert row["predicted"] == want["grade"]["grade"]  # the median, which need not be the most probable
        assert float(row["expected_grade_index"]) == pytest.approx(want["grade"]["expected_index"], abs=1e-4)
        probs = np.array([float(row[f"prob_{c}"]) for c in b.classes])
        assert probs == pytest.approx(list(want["probabilities"].values()), abs=1e-4)


def test_a_single_label_monai_bundle_says_softmax_and_most_probable_class(tiny_bundle, tmp_path):
    out = export_monai_bundle(tiny_bundle, tmp_path / "monai")
    meta = json.loads((out / "configs" / "metadata.json").read_text(encoding="utf-8"))
    config = json.loads((out / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert meta["medclf_task"]["type"] == "multiclass" and "thresholds" not in config
    assert meta["description"].endswith(
        "before the softmax. Requires the medclf package. See docs/README.md."
    )
    assert config["postprocessing"]["transforms"][-1] == {"_target_": "Activations", "softmax": True}
