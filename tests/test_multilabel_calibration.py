"""Multi-label bundles (issue 22): a temperature per finding, fitted on validation logits, applied by every
engine, ensembles, test-time augmentation and serving, with old bundles answering as before; and the
out-of-distribution guard's class means per set of findings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, logit

from medclf.engines import probabilities
from medclf.metrics.calibration import finding_calibration_record, fit_finding_temperatures

# --- fitting and applying the temperatures (no training) ---------------------------------------------------


def _miscalibrated(n: int, scales: list[float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from ``sigmoid(z)`` and logits ``scales * z``: a model over-confident by ``scale`` (> 1)
    or under-confident (< 1) per finding, whose right temperature is that scale."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, len(scales)))
    y = (rng.random(z.shape) < expit(z)).astype(np.int64)
    return z * np.asarray(scales), y


def test_the_fitted_temperatures_recover_known_over_and_under_confidence():
    logits, y = _miscalibrated(4000, [3.0, 0.5, 1.0])
    fits = fit_finding_temperatures(logits, y)
    assert [f.temperature for f in fits] == pytest.approx([3.0, 0.5, 1.0], rel=0.1)
    for f in fits[:2]:  # the miscalibrated findings: much better calibrated after
        assert f.nll_after < f.nll_before and f.ece_after < f.ece_before / 2
    assert all(f.note is None and f.n == 4000 for f in fits)


def test_findings_with_one_class_or_too_few_samples_keep_temperature_one():
    logits, y = _miscalibrated(400, [3.0, 3.0, 3.0])
    y[:, 1], y[:, 2] = 0, 1
    fits = fit_finding_temperatures(logits, y)
    assert fits[0].temperature > 2 and [f.temperature for f in fits[1:]] == [1.0, 1.0]
    assert "no positives" in fits[1].note and "no negatives" in fits[2].note
    assert fits[1].ece_before == fits[1].ece_after is not None  # reported, unchanged
    [few] = fit_finding_temperatures(logits[:10, :1], np.array([[0], [1]] * 5))
    assert few.temperature == 1.0 and "too few" in few.note
    record = finding_calibration_record(["a", "b", "c"], fits)
    assert record["temperatures"] == {"a": fits[0].temperature, "b": 1.0, "c": 1.0}
    assert "no positives" in record["per_finding"]["b"]["note"] and "temperature" not in record
    assert record["ece_after"] < record["ece_before"]
    with pytest.raises(ValueError, match="findings"):
        finding_calibration_record(["a"], fits)
    with pytest.raises(ValueError, match="0 or 1"):
        fit_finding_temperatures(logits, y * 2)


def test_probabilities_divide_each_finding_by_its_own_temperature():
    z = np.array([[-3.0, 0.0, 2.5], [10.0, -20.0, 0.3]])
    t = np.array([2.0, 0.5, 1.0])
    np.testing.assert_array_equal(probabilities(z, t, "multilabel"), expit(z / t))
    np.testing.assert_array_equal(probabilities(z, tuple(t), "multilabel"), expit(z / t))
    with pytest.raises(ValueError, match="multi-label"):
        probabilities(z, t)  # softmax classes share one temperature
    with pytest.raises(ValueError, match="multi-label"):
        probabilities(z, t[:2], "multilabel")


# ``engines.probabilities(Z, 1.0, "multilabel")`` as medclf computed it before temperatures per finding
# (commit 478b555): what an old multi-label bundle answers for these logits.
Z = np.array([[-3.0, 0.0, 2.5], [10.0, -20.0, 0.3], [-0.7, 16.0, -35.0]])
OLD_PROBS = np.array(
    [
        [0.04742587317756678, 0.5, 0.9241418199787566],
        [0.9999546021312976, 2.0611536181902037e-09, 0.574442516811659],
        [0.3318122278318339, 0.9999998874648379, 6.305116760146985e-16],
    ]
)
OLD_CALIBRATION = {"temperature": 1.0, "note": "multi-label: per-finding sigmoids, no temperature fitted"}


def test_old_multilabel_manifests_scale_no_finding():
    from medclf.manifest import Manifest

    old = Manifest.from_dict(
        {"task": "multilabel", "classes": ["a", "b", "c"], "calibration": OLD_CALIBRATION}
    )
    assert old.finding_temperatures is None and old.output_temperature == 1.0
    np.testing.assert_array_equal(probabilities(Z, old.output_temperature, "multilabel"), OLD_PROBS)
    new = Manifest.from_dict(
        {
            "task": "multilabel",
            "classes": ["a", "b", "c"],
            "calibration": {"temperatures": {"c": 4, "a": 2, "b": 1}},
        }
    )
    assert new.output_temperature == (2.0, 1.0, 4.0)  # in the order of the classes
    single = Manifest.from_dict(
        {"task": "multiclass", "classes": ["a", "b"], "calibration": {"temperature": 1.5}}
    )
    assert single.finding_temperatures is None and single.output_temperature == 1.5


def test_the_manifest_check_wants_a_temperature_for_every_finding_and_only_for_findings():
    from medclf.manifest import ManifestInvalid, check_manifest

    base = {
        "format": "medclf-bundle",
        "model": {"arch": "compact-s", "in_channels": 1, "n_classes": 2, "spatial_dims": 2},
        "classes": ["a", "b"],
        "preprocess": {},
        "files": {},
        "self_sha256": "0" * 64,
        "task": "multilabel",
    }
    check_manifest({**base, "calibration": {"temperatures": {"a": 1.2, "b": 0.8}}})
    with pytest.raises(ManifestInvalid, match=r"every finding.*\['b'\]"):
        check_manifest({**base, "calibration": {"temperatures": {"a": 1.2}}})
    with pytest.raises(ManifestInvalid, match=r"less than or equal to the minimum"):
        check_manifest({**base, "calibration": {"temperatures": {"a": 1.2, "b": 0}}})
    with pytest.raises(ManifestInvalid, match="multi-label"):
        check_manifest({**base, "task": "multiclass", "calibration": {"temperatures": {"a": 1.2, "b": 0.8}}})


# --- the guard's class means per set of findings (no training) ---------------------------------------------


def test_finding_sets_are_grouped_most_frequent_first_and_rare_sets_pooled():
    from medclf.ood import finding_set_groups

    rows = [[0, 0, 0]] * 15 + [[1, 0, 0]] * 12 + [[1, 1, 0]] * 3 + [[0, 0, 1]] * 2 + [[0, 1, 0]] * 11
    groups, described = finding_set_groups(np.array(rows), ["a", "b", "c"], min_samples=10)
    assert groups.tolist() == [0] * 15 + [1] * 12 + [3] * 3 + [3] * 2 + [2] * 11
    assert described == [
        {"findings": [], "n": 15},
        {"findings": ["a"], "n": 12},
        {"findings": ["b"], "n": 11},
        {"pooled_sets": 2, "n": 5},
    ]
    _, none_rare = finding_set_groups(np.array(rows[:27]), min_samples=10)
    assert none_rare == [{"findings": [], "n": 15}, {"findings": ["0"], "n": 12}]


def test_means_per_finding_set_flag_what_one_mean_over_all_rows_lets_pass():
    """Features in tight clusters, one per set of findings: a point between them is like no training image.
    One mean over every row (the guard before) puts the spread between the sets into its covariance and
    lets that point pass; a mean per set flags it."""
    from medclf.ood import fit_detector

    rng = np.random.default_rng(0)
    sets = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    centres = 6.0 * np.hstack([sets, np.zeros((4, 4))])  # (set) -> 6-D feature centre

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        k = rng.integers(0, 4, n)
        return centres[k] + rng.normal(0.0, 0.5, (n, 6)), sets[k]

    (train, y), (val, _) = draw(2000), draw(400)
    between = centres.mean(axis=0, keepdims=True) + rng.normal(0.0, 0.3, (20, 6))
    per_set = fit_detector(train, y, val, label_names=["a", "b"])
    one_mean = fit_detector(train, np.zeros(len(train), dtype=np.int64), val)
    assert per_set.means.shape == (4, 6) and len(per_set.groups) == 4
    assert per_set.flags(between)[0].all()
    assert not one_mean.flags(between)[0].any()
    assert per_set.flags(draw(400)[0])[0].mean() < 0.04  # still ~1 % false alarms
    assert per_set.manifest()["class_means"]["groups"][0]["n"] > 400


# --- a trained bundle -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cal_data(tmp_path_factory) -> Path:
    """Simulated findings with a validation split of 33 images: enough to fit temperatures (20)."""
    from medclf.data.simulate import make_multilabel_dataset

    return make_multilabel_dataset(
        tmp_path_factory.mktemp("mlcal") / "data",
        n=110,
        size=32,
        seed=3,
        splits={"train": 0.6, "val": 0.3, "test": 0.1},
    )


@pytest.fixture(scope="module")
def cal_bundle(cal_data, tmp_path_factory) -> Path:
    from medclf.training import train

    out = tmp_path_factory.mktemp("mlcal_bundle") / "model"
    train(cal_data, out, epochs=12, size=32, batch_size=16, arch="compact-s", progress=False)
    return out


def _validation(bundle: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The validation tensors and labels training used (decoded with the bundle's spec, copies left out)."""
    from medclf.api import load_bundle
    from medclf.data.cache import prepare
    from medclf.data.sources import load_source

    b = load_bundle(bundle)
    samples = load_source(data)
    prepared = prepare(samples, b.spec, progress=False)
    rows = np.flatnonzero(
        prepared.ok & (np.array(samples.splits) == "val") & samples.known & ~prepared.train_copy
    )
    return np.asarray(prepared.tensors[rows], dtype=np.float32), samples.labels[rows]


def _logits(bundle, x: np.ndarray) -> np.ndarray:
    from medclf.engines import TorchRunner

    return np.asarray(TorchRunner(bundle.model)(x), dtype=np.float64)


def test_training_fits_a_temperature_per_finding_and_thresholds_on_the_calibrated_probabilities(
    cal_bundle, cal_data
):
    from medclf.api import load_bundle
    from medclf.metrics.multilabel import choose_thresholds

    manifest = json.loads((cal_bundle / "bundle.json").read_text())
    findings = manifest["classes"]
    cal = manifest["calibration"]
    assert list(cal["temperatures"]) == findings and "temperature" not in cal
    assert cal["method"].startswith("temperature scaling per finding")
    t = np.array([cal["temperatures"][c] for c in findings])
    assert (t != 1.0).any()  # fitted: 33 validation images, a 2-epoch model with errors
    x, y = _validation(cal_bundle, cal_data)
    val = manifest["metrics"]["val"]
    assert val["n"] == len(y) >= 20
    b = load_bundle(cal_bundle)
    probs = b.predict_tensors(x, engine="torch")
    np.testing.assert_allclose(probs, expit(_logits(b, x) / t), rtol=1e-12)
    np.testing.assert_allclose(b.predict_tensors(x, calibrated=False), expit(_logits(b, x)), rtol=1e-12)
    # The thresholds are the calibrated probabilities' Youden points, not the raw sigmoids'.
    chosen, _ = choose_thresholds(y, probs)
    stored = np.array([manifest["thresholds"]["labels"][c] for c in findings])
    np.testing.assert_allclose(stored, chosen, atol=1e-5)
    raw, _ = choose_thresholds(y, b.predict_tensors(x, calibrated=False))
    assert not np.allclose(stored[t != 1.0], raw[t != 1.0], atol=1e-5)
    # Per-finding ECE before and after, as the multi-class path reports its ECE.
    per_label = val["multilabel"]["per_label"]
    for c, fit in cal["per_finding"].items():
        assert per_label[c]["temperature"] == fit["temperature"] == cal["temperatures"][c]
        assert per_label[c]["ece"] == pytest.approx(fit["ece_after"], abs=1e-9)
        assert per_label[c]["ece_uncalibrated"] == pytest.approx(fit["ece_before"], abs=1e-9)
        assert fit["nll_after"] <= fit["nll_before"] + 1e-12
    assert val["ece"] == pytest.approx(np.mean([per_label[c]["ece"] for c in findings]))
    assert val["ece_uncalibrated"] == pytest.approx(
        np.mean([per_label[c]["ece_uncalibrated"] for c in findings])
    )
    assert val["temperatures"] == cal["temperatures"]
    assert "temperature per finding" in (cal_bundle / "MODEL_CARD.md").read_text()


def test_old_multilabel_bundles_load_and_answer_exactly_as_before(cal_bundle, cal_data, tmp_path):
    from medclf.api import load_bundle
    from medclf.bundle import save_bundle
    from medclf.ood import OOD_FILE

    b = load_bundle(cal_bundle)
    manifest = {
        k: v for k, v in b.manifest.items() if k not in ("files", "self_sha256", "created", "versions")
    }
    manifest["calibration"] = dict(OLD_CALIBRATION)  # what multi-label training wrote before
    path = save_bundle(
        tmp_path / "old", model=b.model, manifest=manifest, extra_files={OOD_FILE: cal_bundle / OOD_FILE}
    )
    old = load_bundle(path)
    assert old.finding_temperatures is None and old.output_temperature == 1.0
    x, _ = _validation(cal_bundle, cal_data)
    raw = np.asarray(_logits(old, x), dtype=np.float64)
    # As engines.probabilities computed it then: the logits in float64, divided by 1.0, through expit.
    np.testing.assert_array_equal(old.predict_tensors(x, engine="torch"), expit(raw / 1.0))
    assert not np.allclose(old.predict_tensors(x), b.predict_tensors(x))  # the new bundle's differ


def test_onnx_int8_tta_and_serving_apply_the_temperatures(cal_bundle, cal_data, tmp_path):
    import warnings

    import torch

    import medclf
    from medclf.engines import ONNX_INT8, OnnxRunner
    from medclf.serve.app import create_app
    from medclf.tta import apply_view

    b = medclf.load_bundle(cal_bundle)
    t = np.array(b.finding_temperatures)
    x, _ = _validation(cal_bundle, cal_data)
    x = x[:8]
    calibrated = b.predict_tensors(x, engine="torch")
    exported = medclf.export(
        cal_bundle, tmp_path / "int8", data=cal_data, onnx=True, int8=True, progress=False
    )
    steps = {s["step"]: s for s in exported.compression["steps"]}
    assert steps["onnx"]["parity"]["temperature"] == pytest.approx(list(t))
    e = medclf.load_bundle(exported.bundle)
    assert e.finding_temperatures == b.finding_temperatures
    np.testing.assert_allclose(e.predict_tensors(x, engine="onnx-fp32"), calibrated, atol=1e-4)
    int8_logits = np.asarray(OnnxRunner(exported.bundle / ONNX_INT8)(x), dtype=np.float64)
    np.testing.assert_allclose(e.predict_tensors(x, engine="onnx-int8"), expit(int8_logits / t), rtol=1e-12)
    # Test-time augmentation: the mean over the views of the calibrated probabilities.
    views = ["identity", "flip1"]
    per_view = [expit(_logits(b, apply_view(torch.from_numpy(x), v).contiguous().numpy()) / t) for v in views]
    np.testing.assert_allclose(
        b.predict_tensors(x, engine="torch", tta=views), np.mean(per_view, axis=0), rtol=1e-9
    )
    # Serving: the HTTP answer is the calibrated probability.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    png = sorted((cal_data / "images").glob("*.png"))[0]
    [expected] = b.predict([png], engine="torch")
    from medclf.io import read_image
    from medclf.preprocess import preprocess

    one = preprocess(read_image(png), b.spec)[None]
    np.testing.assert_allclose(
        list(expected["probabilities"].values()), expit(_logits(b, one) / t)[0], rtol=1e-9
    )
    with TestClient(create_app(b, audit_db=str(tmp_path / "audit.db"))) as client:
        r = client.post("/v1/predict", files={"file": ("x.png", png.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        for name, f in expected["findings"].items():
            assert r.json()["findings"][name]["probability"] == pytest.approx(f["probability"], abs=1e-6)


def test_an_ensemble_fuses_calibrated_members_and_fits_its_own_temperatures(cal_bundle, cal_data, tmp_path):
    import medclf
    from medclf.training import train

    second = tmp_path / "second"
    train(cal_data, second, epochs=12, size=32, batch_size=16, arch="compact-s", seed=1, progress=False)
    result = medclf.ensemble([cal_bundle, second], tmp_path / "ens", data=cal_data, progress=False)
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    members = [medclf.load_bundle(p) for p in (cal_bundle, second)]
    kwargs = manifest["model"]["kwargs"]["members"]
    assert [m["temperatures"] for m in kwargs] == [list(m.finding_temperatures) for m in members]
    cal = manifest["calibration"]
    assert (
        cal["fitted_on"] == "validation shared by the members"
        and list(cal["temperatures"]) == members[0].classes
    )
    t = np.array(list(cal["temperatures"].values()))
    x, _ = _validation(cal_bundle, cal_data)
    mean = np.mean([m.predict_tensors(x, engine="torch") for m in members], axis=0)  # calibrated members
    fused = medclf.load_bundle(result.bundle).predict_tensors(x, engine="torch")
    np.testing.assert_allclose(fused, expit(logit(mean) / t), atol=1e-5)
    assert manifest["ood"]["class_means"]["groups"]
    per_label = manifest["metrics"]["val"]["multilabel"]["per_label"]
    assert all("ece_uncalibrated" in e and "temperature" in e for e in per_label.values())


def test_the_guard_of_a_multilabel_bundle_has_a_mean_per_set_of_findings_and_flags_strangers(
    cal_bundle, cal_data
):
    from medclf.api import load_bundle
    from medclf.data.sources import load_source

    b = load_bundle(cal_bundle)
    info = b.manifest["ood"]["class_means"]
    groups = info["groups"]
    assert b.ood.means.shape[0] == len(groups) >= 2  # several sets of findings, not one distribution
    samples = load_source(cal_data)
    assert sum(g["n"] for g in groups) == len(samples.indices("train"))
    assert all(g["n"] >= 10 for g in groups if "findings" in g)
    val_images = [samples.refs[i] for i in samples.indices("val")]
    rng = np.random.default_rng(1)
    side = np.indices((64, 64))
    strangers = [
        rng.random((64, 64)).astype(np.float32),  # noise
        (side.sum(0) // 8 % 2).astype(np.float32),  # checkerboard
        (side[1] / 63.0).astype(np.float32),  # a smooth ramp
        np.exp(-((side[0] - 20.0) ** 2 + (side[1] - 40.0) ** 2) / 50.0).astype(np.float32),  # one blob
        (rng.random((64, 64)) > 0.97).astype(np.float32),  # sparse dots
        np.sin(side[0] / 2.0).astype(np.float32) * 0.5 + 0.5,  # stripes
    ]
    own = b.predict(val_images)
    other = b.predict(strangers)
    own_flagged = np.mean([r["ood"] for r in own])
    other_flagged = np.mean([r["ood"] for r in other])
    assert own_flagged <= 0.1 and other_flagged >= 0.8
    assert np.median([r["ood_score"] for r in other]) > max(r["ood_score"] for r in own)


def test_the_monai_export_divides_each_finding_by_its_own_temperature(cal_bundle, cal_data, tmp_path):
    import csv

    from medclf.api import export_monai_bundle, load_bundle
    from tests.test_task_interop import _images, _monai_run

    b = load_bundle(cal_bundle)
    t = list(b.finding_temperatures)
    assert max(abs(v - 1.0) for v in t) > 0.05  # else this test could not tell one temperature from several
    out = export_monai_bundle(cal_bundle, tmp_path / "monai")
    config = json.loads((out / "configs" / "inference.json").read_text(encoding="utf-8"))
    meta = json.loads((out / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert config["temperature"] == pytest.approx(t) and meta["medclf_task"]["temperature"] == pytest.approx(
        t
    )
    assert all(name in meta["description"] for name in b.classes)
    with open(cal_data / "manifest.csv", newline="") as fh:
        tests = [cal_data / r["path"] for r in csv.DictReader(fh) if r["split"] == "test"]
    images = _images(tests[:5], tmp_path / "images")
    rows = _monai_run(out, images, tmp_path / "eval")
    expected = {r["path"]: r for r in b.predict([images], engine="torch")}
    for row in rows:
        for name, f in expected[row["path"]]["findings"].items():
            assert abs(float(row[f"prob_{name}"]) - f["probability"]) <= 1e-4
