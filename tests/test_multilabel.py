"""Multi-label findings end to end: sources (npz, NIH-shaped CSV), splits, audit, training, evaluation,
prediction."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medclf.cli import main
from medclf.data.sources import load_source, with_task
from medclf.data.splits import ensure_validation
from medclf.errors import DataError

FINDINGS = ["Atelectasis", "Effusion", "Nodule"]


def _nih_like(root: Path, n: int = 24, seed: int = 0) -> Path:
    """NIH ChestX-ray14's file layout in miniature: images/, Data_Entry_2017-style rows, splits.csv (the
    publisher's split, which lets patient 1 cross from train to test)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows, split_rows = [], []
    for i in range(n):
        patient = i // 2 + 1  # two images per patient
        name = f"{patient:08d}_{i % 2:03d}.png"
        img = (rng.random((16, 16)) * 255).astype(np.uint8)
        PILImage.fromarray(img).save(root / "images" / name)
        findings = [f for f in FINDINGS if rng.random() < 0.35]
        rows.append([name, "|".join(findings) or "No Finding", i % 2, patient, 50, "M", "PA"])
        split = "test" if i == 1 else ("train", "valid", "test")[patient % 3] if i > 1 else "train"
        split_rows.append([name, split])
    with (root / "Data_Entry_2017_subset.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                *("Image Index", "Finding Labels", "Follow-up #", "Patient ID"),
                *("Patient Age", "Patient Gender", "View Position"),
            ]
        )
        w.writerows(rows)
    with (root / "splits.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "split"])
        w.writerows(split_rows)
    return root


def _cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    return message


# --- sources ----------------------------------------------------------------------------------------------


def test_a_2d_npz_label_array_is_multilabel(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 14)) < 0.2).astype(np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    samples = load_source(tmp_path / "chestmnist.npz")
    assert samples.task == "multilabel"
    assert samples.labels.shape == (32, 14)
    assert samples.classes[:3] == ["atelectasis", "cardiomegaly", "effusion"]  # ChestMNIST's names
    np.testing.assert_array_equal(samples.labels[:20], arrays["train_labels"])
    # A (N, 1) label array stays one class per image.
    arrays = {k: (v[:, :1] if k.endswith("labels") else v) for k, v in arrays.items()}
    np.savez(tmp_path / "single.npz", **arrays)
    assert load_source(tmp_path / "single.npz").task == "multiclass"


def test_nih_files_work_as_they_are(tmp_path):
    root = _nih_like(tmp_path / "nih")
    samples = load_source(
        root / "Data_Entry_2017_subset.csv", manifest={"split_file": str(root / "splits.csv")}
    )
    assert samples.task == "multilabel" and samples.classes == FINDINGS
    assert samples.labels.shape == (24, 3)
    rows = list(csv.DictReader((root / "Data_Entry_2017_subset.csv").open()))
    for i, row in enumerate(rows):
        want = set() if row["Finding Labels"] == "No Finding" else set(row["Finding Labels"].split("|"))
        assert {FINDINGS[j] for j in np.flatnonzero(samples.labels[i])} == want
        assert Path(samples.refs[i]) == root / "images" / row["Image Index"]  # found in images/
        assert samples.patient_ids[i] == row["Patient ID"]
    assert set(samples.splits) == {"train", "val", "test"}  # "valid" read as val
    assert "patient age" in samples.metadata and "finding labels" not in samples.metadata


def test_the_no_finding_label_is_settable_and_means_the_empty_set(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,findings\na.png,mass;nodule\na.png,normal\na.png,\na.png,nodule\n")
    s = load_source(manifest, manifest={"label_separator": ";", "no_finding": "Normal"})
    assert s.classes == ["mass", "nodule"]
    np.testing.assert_array_equal(s.labels, [[1, 1], [0, 0], [-1, -1], [0, 1]])
    np.testing.assert_array_equal(s.known, [True, True, False, True])
    assert s.class_counts() == {"mass": 1, "nodule": 2}


def test_single_and_multi_label_tasks_do_not_mix(tmp_path, sim_data):
    with pytest.raises(DataError, match="multilabel needs several findings"):
        load_source(sim_data, task="multilabel")
    root = _nih_like(tmp_path / "nih")
    samples = load_source(root / "Data_Entry_2017_subset.csv")
    with pytest.raises(DataError, match="cannot be ordinal"):
        with_task(samples, "ordinal")


def test_bad_manifest_options_are_one_line_errors(tmp_path, capsys):
    root = _nih_like(tmp_path / "nih")
    csv_path = root / "Data_Entry_2017_subset.csv"
    msg = _cli_error(capsys, "audit", csv_path, "--label-column", "Diagnosis", "--out", tmp_path / "a.json")
    assert "--label-column 'Diagnosis' is not a column" in msg
    msg = _cli_error(capsys, "audit", csv_path, "--label-separator", ";", "--out", tmp_path / "a.json")
    assert "use --label-separator '|'" in msg
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\na.png,\nb.png,\n")
    assert "empty in every row" in _cli_error(capsys, "audit", empty, "--out", tmp_path / "a.json")
    assert "split file not found" in _cli_error(
        capsys, "audit", csv_path, "--split-file", tmp_path / "none.csv", "--out", tmp_path / "a.json"
    )
    only_none = tmp_path / "none.csv"
    only_none.write_text("path,label\na.png,No Finding|\n")
    assert "no row names a finding" in _cli_error(capsys, "audit", only_none, "--out", tmp_path / "a.json")


# --- splits and simulated data ----------------------------------------------------------------------------


def test_a_carved_multilabel_validation_split_keeps_patients_together(tmp_path):
    root = _nih_like(tmp_path / "nih", n=60)
    samples = load_source(root / "Data_Entry_2017_subset.csv")  # no split file: all train
    carved = ensure_validation(samples, fraction=0.25, seed=0)
    val = set(carved.indices("val").tolist())
    assert 0 < len(val) < len(samples)
    by_patient: dict[str | None, set[str]] = {}
    for pid, split in zip(carved.patient_ids, carved.splits, strict=True):
        by_patient.setdefault(pid, set()).add(split)
    assert all(len(sides) == 1 for sides in by_patient.values())


def test_simulated_multi_finding_data_have_co_occurring_findings(tmp_path):
    from medclf.data.simulate import FINDINGS as SIM_FINDINGS
    from medclf.data.simulate import make_multilabel_dataset

    root = make_multilabel_dataset(tmp_path / "sim", n=24, size=32, seed=1)
    samples = load_source(root)
    assert samples.task == "multilabel" and samples.classes == sorted(SIM_FINDINGS)
    per_image = samples.labels.sum(axis=1)
    assert (per_image == 0).any() and (per_image >= 2).any()
    assert not (samples.labels[:, 1] & samples.labels[:, 2]).any()  # oedema and tumour are exclusive
    again = make_multilabel_dataset(tmp_path / "again", n=24, size=32, seed=1)
    assert (again / "manifest.csv").read_bytes() == (root / "manifest.csv").read_bytes()


# --- audit ------------------------------------------------------------------------------------------------


def test_the_audit_counts_findings_their_pairs_conflicts_and_patients_crossing_splits(tmp_path):
    from medclf.api import audit

    root = _nih_like(tmp_path / "nih")
    csv_path = root / "Data_Entry_2017_subset.csv"
    # A copy of one image under another name with a different set of findings: a conflict.
    rows = list(csv.reader(csv_path.open()))
    (root / "images" / "copy.png").write_bytes((root / "images" / rows[3][0]).read_bytes())
    other = "Nodule" if rows[3][1] != "Nodule" else "Effusion"
    with csv_path.open("a", newline="") as fh:
        csv.writer(fh).writerow(["copy.png", other, 0, 999, 50, "F", "PA"])
    report = audit(
        csv_path,
        manifest={"split_file": str(root / "splits.csv")},
        workers=1,
        progress=False,
        check_shift=False,
        check_shortcut=False,
    ).to_dict()
    samples = load_source(csv_path, manifest={"split_file": str(root / "splits.csv")})
    assert report["task"] == "multilabel" and report["classes"] == FINDINGS
    for split, counts in report["counts"].items():
        mask = np.array([s == split for s in samples.splits])
        assert counts == dict(zip(FINDINGS, samples.labels[mask].sum(axis=0).tolist(), strict=True))
    both = np.array(report["findings"]["co_occurrence"]["images"])
    y = samples.labels
    assert both[0, 1] == int((y[:, 0] & y[:, 1]).sum()) and both[2, 2] == int(y[:, 2].sum())
    assert report["findings"]["no_finding"] == int((y.sum(axis=1) == 0).sum())
    assert len(report["label_conflicts"]) == 1
    assert sorted(report["label_conflicts"][0]["refs"]) == sorted([f"images/{rows[3][0]}", "images/copy.png"])
    # Patient 1's two images sit in train and test (the publisher's split is not by patient).
    assert "1" in report["patients"]["crossing_examples"]
    assert any("patient leakage" in w for w in report["warnings"])


# --- training, evaluation, prediction (findings_data, findings_bundle: tests/conftest.py) -----------------


def test_training_stores_per_finding_thresholds_next_to_the_task(findings_bundle):
    import json

    manifest = json.loads((findings_bundle / "bundle.json").read_text())
    keys = list(manifest)
    assert manifest["task"] == "multilabel" and keys[keys.index("task") + 1] == "thresholds"
    findings = manifest["classes"]
    assert findings == ["atrophy", "oedema", "tumour"] and manifest["model"]["n_classes"] == 3
    thresholds = manifest["thresholds"]["labels"]
    assert list(thresholds) == findings and all(0 <= t <= 1 for t in thresholds.values())
    assert manifest["thresholds"]["fitted_on"] == "validation"
    val = manifest["metrics"]["val"]
    per_label = val["multilabel"]["per_label"]
    assert [per_label[f]["threshold"] for f in findings] == [thresholds[f] for f in findings]
    assert val["auc"] == val["multilabel"]["macro_auc"]  # selection and the headline: macro AUC
    assert manifest["recipe"]["multilabel_loss"] == "bce"
    assert all("val_auc" in row for row in manifest["history"])


def test_multilabel_losses_and_their_setting():
    import torch

    from medclf.models.tasks import asymmetric_loss, multilabel_loss, weighted_bce
    from medclf.training import TrainConfig

    logits, y = torch.randn(6, 3), (torch.rand(6, 3) < 0.4).float()
    w = torch.tensor([1.0, 3.0, 2.0])
    assert torch.equal(multilabel_loss("bce", logits, y, w), weighted_bce(logits, y, w))
    assert torch.equal(multilabel_loss("asymmetric", logits, y, w), asymmetric_loss(logits, y))
    assert TrainConfig().updated({"multilabel_loss": "asymmetric"}).multilabel_loss == "asymmetric"
    from medclf.errors import ConfigError

    with pytest.raises(ConfigError, match="multilabel-loss"):
        TrainConfig().updated({"multilabel_loss": "focal"})


def test_predict_answers_findings_at_the_bundle_thresholds(findings_bundle, findings_data):
    import json

    import medclf

    thresholds = json.loads((findings_bundle / "bundle.json").read_text())["thresholds"]["labels"]
    images = sorted((findings_data / "images").glob("*.png"))[:4]
    answers = medclf.predict(findings_bundle, [str(p) for p in images])
    for a in answers:
        assert set(a["findings"]) == set(thresholds)
        for name, f in a["findings"].items():
            assert f["threshold"] == thresholds[name]
            assert f["present"] == (f["probability"] >= thresholds[name])
            assert a["probabilities"][name] == f["probability"]
        assert a["positive"] == [n for n, f in a["findings"].items() if f["present"]]
        assert a["predicted"] == ("|".join(a["positive"]) or "No Finding")
    # Independent sigmoids: the probabilities need not sum to one.
    assert any(abs(sum(a["probabilities"].values()) - 1) > 1e-3 for a in answers)


def test_single_label_bundles_answer_as_before(tiny_bundle, sim_data):
    import medclf
    from medclf.engines import probabilities

    a = medclf.predict(tiny_bundle, [str(next(sim_data.rglob("*.png")))])[0]
    assert "findings" not in a and abs(sum(a["probabilities"].values()) - 1) < 1e-9
    z = np.array([[2.0, -1.0, 0.5]])
    np.testing.assert_allclose(probabilities(z), np.exp(z) / np.exp(z).sum())
    np.testing.assert_allclose(probabilities(z, task="multilabel"), 1 / (1 + np.exp(-z)))


def test_evaluate_scores_every_finding_at_its_threshold_with_patient_intervals(
    findings_bundle, findings_data, tmp_path
):
    import json

    import medclf

    out = tmp_path / "eval"
    m = medclf.evaluate(findings_bundle, findings_data, out, n_bootstrap=50, progress=False)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["macro_auc"] == m["macro_auc"] and saved["task"] == "multilabel"
    assert saved["ci"]["unit"] == "patient" and saved["n_patients"] == saved["n"]
    thresholds = json.loads((findings_bundle / "bundle.json").read_text())["thresholds"]["labels"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == m["n"]
    for name, entry in m["per_label"].items():
        assert entry["threshold"] == thresholds[name]
        pos = [r for r in rows if name in r["findings"].split("|")]
        hit = [r for r in pos if float(r[f"prob_{name}"]) >= thresholds[name]]
        assert entry["n_positive"] == len(pos)
        if pos:
            assert entry["sensitivity"] == pytest.approx(len(hit) / len(pos), abs=1e-6)
    html = (out / "report.html").read_text()
    assert "Findings" in html and all(name in html for name in thresholds)
    assert (out / "roc.png").stat().st_size > 0 and (out / "calibration.png").stat().st_size > 0


def test_evaluate_refuses_findings_for_a_single_label_model(tiny_bundle, findings_data, tmp_path):
    import medclf

    with pytest.raises(DataError, match="multi-label model"):
        medclf.evaluate(tiny_bundle, findings_data, tmp_path / "eval", progress=False)


# --- beyond the core path ---------------------------------------------------------------------------------


def test_fetch_chestmnist_checks_its_md5_and_loads_as_findings(tmp_path, monkeypatch):
    import hashlib

    from medclf.data.fetch import MEDMNIST_MD5, fetch_medmnist
    from tests.test_fetch import Server

    assert set(MEDMNIST_MD5["chestmnist"]) == {28, 64, 128, 224}  # MedMNIST+ (release 3) sizes
    root = tmp_path / "mirror"
    root.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 10), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 64, 64), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 14)) < 0.2).astype(np.uint8)
    np.savez(root / "chestmnist_64.npz", **arrays)
    digest = hashlib.md5((root / "chestmnist_64.npz").read_bytes(), usedforsecurity=False).hexdigest()
    monkeypatch.setitem(MEDMNIST_MD5, "chestmnist", {**MEDMNIST_MD5["chestmnist"], 64: digest})
    server = Server(root)
    try:
        path = fetch_medmnist("ChestMNIST", 64, tmp_path / "data", mirror=server.url)
    finally:
        server.close()
    samples = load_source(path)
    assert samples.task == "multilabel" and len(samples.classes) == 14 and samples.classes[-1] == "hernia"


def test_test_time_augmentation_averages_per_finding_probabilities(findings_bundle, findings_data):
    import torch

    import medclf
    from medclf.io import read_image
    from medclf.preprocess import preprocess
    from medclf.tta import apply_view

    b = medclf.load_bundle(findings_bundle)
    images = sorted((findings_data / "images").glob("*.png"))[:3]
    x = np.stack([preprocess(read_image(p), b.spec) for p in images])
    views = b.tta_views(True)
    per_view = [b.predict_tensors(apply_view(torch.from_numpy(x), v).contiguous().numpy()) for v in views]
    with_tta = b.predict_tensors(x, tta=True)
    np.testing.assert_allclose(with_tta, np.mean(per_view, axis=0), rtol=1e-12)
    assert not np.allclose(with_tta.sum(axis=1), 1)  # sigmoids per finding, not a distribution
    answers = medclf.predict(findings_bundle, [str(p) for p in images], tta=True)
    np.testing.assert_allclose([list(a["probabilities"].values()) for a in answers], with_tta, rtol=1e-6)


def test_the_http_api_answers_findings(findings_bundle, findings_data, tmp_path):
    import warnings

    import medclf
    from medclf.serve.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    b = medclf.load_bundle(findings_bundle)
    png = sorted((findings_data / "images").glob("*.png"))[0]
    [expected] = b.predict([png])
    with TestClient(create_app(b, audit_db=str(tmp_path / "audit.db"))) as client:
        r = client.post("/v1/predict", files={"file": ("x.png", png.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["positive"] == expected["positive"] and body["predicted"] == expected["predicted"]
        for name, f in expected["findings"].items():
            assert body["findings"][name]["present"] == f["present"]
            assert body["findings"][name]["probability"] == pytest.approx(f["probability"], abs=1e-6)
        explained = client.post(
            "/v1/predict?explain=true", files={"file": ("x.png", png.read_bytes(), "image/png")}
        )
        assert explained.status_code == 200, explained.text
        probs = expected["probabilities"]
        assert explained.json()["explanation"]["explained_class"] == max(probs, key=probs.get)


def test_the_dicom_sr_holds_one_present_item_per_positive_finding(findings_bundle, tmp_path):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    import medclf
    from medclf.serve import coding
    from medclf.serve.sr import write_sr_files
    from tests.sr_check import check_sr

    b = medclf.load_bundle(findings_bundle)
    src_path = Path(get_testdata_file("MR_small.dcm"))
    [result] = b.predict([src_path])
    # A threshold per finding from the bundle decides; force one present and one absent finding.
    result["findings"]["atrophy"]["present"], result["findings"]["oedema"]["present"] = True, False
    result["findings"]["tumour"]["present"] = True
    result["positive"] = ["atrophy", "tumour"]
    result.pop("ood", None)
    notes = write_sr_files(b, [result], tmp_path / "sr")
    assert not notes, notes
    report = check_sr(Path(result["sr"]), dcmread(src_path, stop_before_pixels=True), result, b)
    groups = {g.tracking_identifier: g for g in report.content.get_image_measurement_groups()}
    for name, f in result["findings"].items():
        (threshold,) = groups[name].get_measurements(name=coding.THRESHOLD)
        assert float(threshold.value) == pytest.approx(f["threshold"], abs=1e-6)


def test_onnx_and_int8_export_keep_the_findings_and_report_per_finding_agreement(
    findings_bundle, findings_data, tmp_path
):
    import json

    import medclf
    from medclf.errors import ConfigError

    result = medclf.export(
        findings_bundle, tmp_path / "int8", data=findings_data, onnx=True, int8=True, progress=False
    )
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    source = json.loads((findings_bundle / "bundle.json").read_text())
    assert manifest["task"] == "multilabel" and manifest["thresholds"] == source["thresholds"]
    steps = {s["step"]: s for s in result.compression["steps"]}
    assert steps["onnx"]["parity"]["max_abs_prob_diff"] <= steps["onnx"]["parity"]["tolerance"]
    per_finding = steps["int8"]["agreement_per_finding_with_fp32"]
    assert list(per_finding) == source["classes"] and all(0 <= v <= 1 for v in per_finding.values())
    assert steps["int8"]["agreement_with_fp32"] == pytest.approx(np.mean(list(per_finding.values())))
    exported = medclf.load_bundle(result.bundle)
    png = str(sorted((findings_data / "images").glob("*.png"))[0])
    fp32 = exported.predict([png], engine="onnx-fp32")[0]
    torch_answer = medclf.predict(findings_bundle, [png])[0]
    for name, f in torch_answer["findings"].items():
        assert fp32["findings"][name]["probability"] == pytest.approx(f["probability"], abs=1e-4)
    assert set(exported.predict([png], engine="onnx-int8")[0]["findings"]) == set(per_finding)
    with pytest.raises(ConfigError, match="multi-label"):
        medclf.export(findings_bundle, tmp_path / "pruned", data=findings_data, prune=0.3, progress=False)


def test_an_ensemble_of_multilabel_members_averages_their_per_finding_probabilities(
    findings_bundle, findings_data, tmp_path
):
    import json

    import medclf
    from medclf.errors import ConfigError
    from medclf.training import train

    second = tmp_path / "second"
    options = {"label_separator": "|"}  # how the data were read: kept by the ensemble (export reads them so)
    train(findings_data, second, epochs=2, size=32, batch_size=16, arch="compact-s", seed=1, split_seed=0,
          manifest=options, progress=False)  # fmt: skip
    result = medclf.ensemble([second, findings_bundle], tmp_path / "ens", data=findings_data, progress=False)
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    assert manifest["data"]["manifest_options"] == options
    assert manifest["task"] == "multilabel" and set(manifest["thresholds"]["labels"]) == set(
        manifest["classes"]
    )
    images = [str(p) for p in sorted((findings_data / "images").glob("*.png"))[:4]]
    fused = medclf.predict(result.bundle, images)
    members = [medclf.predict(b, images) for b in (findings_bundle, second)]
    for k, answer in enumerate(fused):
        for name, f in answer["findings"].items():
            mean = np.mean([m[k]["probabilities"][name] for m in members])
            assert f["probability"] == pytest.approx(mean, abs=1e-5)
            assert f["threshold"] == manifest["thresholds"]["labels"][name]
    with pytest.raises(ConfigError, match="mean"):
        medclf.ensemble(
            [findings_bundle, second], tmp_path / "stacked", data=findings_data, method="stacking"
        )


def test_the_traditional_baseline_runs_one_vs_rest_per_finding(findings_data, tmp_path):
    import json

    import medclf

    out = tmp_path / "baseline"
    m = medclf.baseline(findings_data, out, methods="logreg", size=32, workers=1, progress=False)
    summary = json.loads((out / "baseline.json").read_text())
    assert "one-vs-rest" in m["model"] and m["task"] == "multilabel"
    assert set(summary["thresholds"]) == set(m["per_label"]) == {"atrophy", "oedema", "tumour"}
    for name, entry in m["per_label"].items():
        assert entry["threshold"] == summary["thresholds"][name]
    assert summary["test"]["auc"] == m["macro_auc"] and (out / "report.html").exists()


def test_grad_cam_explains_any_finding_and_recalibrate_refuses_findings(
    findings_bundle, findings_data, tmp_path
):
    import medclf
    from medclf.errors import ConfigError
    from medclf.explain import explain_image

    b = medclf.load_bundle(findings_bundle)
    png = sorted((findings_data / "images").glob("*.png"))[0]
    for name in b.classes:
        e = explain_image(b, png, target=name)
        assert e.explained_class == name and e.heatmap.shape[-2:] == tuple(b.spec.size)
    with pytest.raises(ConfigError, match="multi-label"):
        medclf.recalibrate(b, findings_data, tmp_path / "recal")


# --- K-fold bagging -----------------------------------------------------------------------------------------


def _paired_findings(root: Path) -> Path:
    """Simulated findings with two images per patient (a pair shares its split), so that folds must keep
    patients together."""
    from medclf.data.simulate import make_multilabel_dataset

    make_multilabel_dataset(root, n=60, size=32, seed=3)
    with (root / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "label", "patient_id", "split"])
        for k, row in enumerate(rows):
            w.writerow([row["path"], row["label"], f"pair{k // 2}", rows[k - k % 2]["split"]])
    return root


def _fold_parts(samples, n_folds: int, seed: int = 0) -> list[set[int]]:
    """The validation part of each fold, checked: a partition of the training split, patient-disjoint, and
    every finding with at least ``n_folds`` training patients in every part."""
    from medclf.data.splits import fold_split

    train = set(samples.indices("train").tolist())
    parts = [set(fold_split(samples, k, n_folds, seed=seed).indices("val").tolist()) for k in range(n_folds)]
    assert set().union(*parts) == train and sum(map(len, parts)) == len(train)
    patients = [{samples.patient_ids[i] for i in part} for part in parts]
    assert sum(map(len, patients)) == len(set().union(*patients))  # no patient in two folds
    for j, finding in enumerate(samples.classes):
        if len({samples.patient_ids[i] for i in train if samples.labels[i, j] == 1}) >= n_folds:
            assert all((samples.labels[sorted(part), j] == 1).any() for part in parts), (finding, n_folds)
    return parts


def test_multilabel_folds_keep_patients_together_and_every_finding_in_every_fold(tmp_path):
    from dataclasses import replace

    from medclf.data.samples import SampleSet
    from medclf.data.splits import fold_split

    samples = load_source(_paired_findings(tmp_path / "data"))
    assert samples.task == "multilabel" and len(set(samples.patient_ids)) == 30
    n_train = len(samples.indices("train"))
    for n_folds in (2, 3, 5):
        parts = _fold_parts(samples, n_folds)
        assert min(map(len, parts)) >= 0.5 * n_train / n_folds  # no fold starved of images
    assert (
        _fold_parts(samples, 3, seed=0) == _fold_parts(samples, 3, seed=0) != _fold_parts(samples, 3, seed=1)
    )
    # The rarest finding, with exactly K patients, lands in every fold.
    rng = np.random.default_rng(0)
    n = 48
    labels = np.zeros((n, 3), dtype=np.int64)
    labels[:, 1] = rng.random(n) < 0.4
    labels[:, 2] = rng.random(n) < 0.3
    labels[[0, 1, 10, 11, 20, 21], 0] = 1  # patients p0, p5 and p10 have the rare finding
    rare = SampleSet(
        refs=[f"i{i}.png" for i in range(n)],
        labels=labels,
        splits=["train"] * n,
        patient_ids=[f"p{i // 2}" for i in range(n)],
        classes=["rare", "common", "other"],
        source="memory",
        kind="csv",
        task="multilabel",
    )
    assert all(labels[sorted(part), 0].any() for part in _fold_parts(rare, 3))
    # Unknown findings (rows of -1) are carried along, not counted.
    unknown = labels.copy()
    unknown[5] = -1
    _fold_parts(replace(rare, labels=unknown), 3)
    # More folds than patients: a one-line refusal.
    four_each = replace(rare, patient_ids=[f"q{i // 4}" for i in range(n)])
    with pytest.raises(DataError, match="only 12 patients: too few for 13 folds"):
        fold_split(four_each, 0, 13)


def test_k_fold_bagging_of_findings_fuses_the_mean_at_out_of_fold_thresholds(tmp_path):
    import medclf
    from medclf.data.cache import prepare
    from medclf.folds import train_folds
    from medclf.fusion import member_validation_splits
    from medclf.metrics.multilabel import choose_thresholds

    data = _paired_findings(tmp_path / "data")
    out = tmp_path / "bagged"
    result = train_folds(
        data, out, folds=2, size=32, epochs=1, batch_size=16, arch="compact-s", keep_checkpoints=True,
        progress=False,
    )  # fmt: skip
    b = medclf.load_bundle(result.bundle)
    manifest = b.manifest
    assert manifest["task"] == "multilabel" and manifest["ensemble"]["method"] == "mean"
    assert [r["val_fold"] for r in manifest["ensemble"]["members"]] == [[0, 2], [1, 2]]
    samples = load_source(data)
    members = [medclf.load_bundle(out.with_name("bagged.folds") / f"fold-{k}") for k in range(2)]
    val_rows = [np.flatnonzero(np.array(member_validation_splits(samples, m)) == "val") for m in members]
    assert sorted(set(val_rows[0]) | set(val_rows[1])) == samples.indices("train").tolist()
    patients = [{samples.patient_ids[i] for i in rows} for rows in val_rows]
    assert not patients[0] & patients[1]
    for rows in val_rows:
        assert (samples.labels[rows].sum(axis=0) > 0).all()  # every finding in every fold
    # Each finding's threshold: chosen (Youden) on the out-of-fold probabilities, each training image scored
    # by the member that did not train on it.
    # (On the decoded tensors the fusion scored, which the cache holds in float16.)
    tensors = prepare(samples, b.spec, progress=False).tensors
    y = np.concatenate([samples.labels[rows] for rows in val_rows])
    p = np.concatenate(
        [
            m.predict_tensors(np.asarray(tensors[rows], dtype=np.float32), engine="torch")
            for m, rows in zip(members, val_rows, strict=True)
        ]
    )
    want, _ = choose_thresholds(y, p)
    thresholds = manifest["thresholds"]
    assert thresholds["fitted_on"].startswith("out-of-fold") and thresholds["rule"] == "youden"
    assert list(thresholds["labels"].values()) == pytest.approx(want.tolist(), abs=1e-5)
    oof = manifest["metrics"]["out_of_fold"]
    assert oof["n"] == len(samples.indices("train")) and "thresholds were chosen on these" in oof["note"]
    # The ensemble answers with the mean of its members' per-finding probabilities, at those thresholds.
    tests = [samples.refs[i] for i in samples.indices("test")[:4]]
    fused = b.predict(tests, engine="torch")
    by_member = [m.predict(tests, engine="torch") for m in members]
    for k, answer in enumerate(fused):
        for name, f in answer["findings"].items():
            mean = np.mean([answers[k]["probabilities"][name] for answers in by_member])
            assert f["probability"] == pytest.approx(mean, abs=1e-5)
            assert f["threshold"] == thresholds["labels"][name]


def test_k_fold_refusals_for_findings_are_one_line_errors(findings_data, tmp_path, capsys):
    msg = _cli_error(
        capsys, "train", findings_data, "--out", tmp_path / "w", "--folds", 2, "--fusion", "weighted"
    )
    assert "multi-label members are fused by the mean" in msg and "--fusion mean" in msg
    msg = _cli_error(
        capsys, "train", findings_data, "--out", tmp_path / "s", "--members", 2, "--fusion", "weighted"
    )
    assert "multi-label members are fused by the mean" in msg and not (tmp_path / "s.folds").exists()
    msg = _cli_error(capsys, "train", findings_data, "--out", tmp_path / "many", "--folds", 30)
    assert "too few for 30 folds" in msg
    assert not (tmp_path / "w.folds").exists() and not (tmp_path / "many.folds").exists()
    msg = _cli_error(capsys, "train", findings_data, "--out", tmp_path / "cw", "--class-weights", "none")
    assert "--class-weights is for one class or grade per image" in msg and not (tmp_path / "cw").exists()
