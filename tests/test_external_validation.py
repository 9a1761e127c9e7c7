"""Subgroup evaluation (--by), external validation with a class map, site recalibration and operating points."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from scipy.stats import binomtest

from medclf.api import load_bundle
from medclf.bundle import sha256_file
from medclf.data.references import (
    TRAIN_SIGNATURES,
    aligned_signatures,
    dequantise_signatures,
    quantise_signatures,
    read_train_references,
)
from medclf.errors import ConfigError, DataError
from medclf.evaluation.classmap import parse_class_map
from medclf.evaluation.operating import binary_figures, clopper_pearson, fit_threshold
from medclf.evaluation.subgroups import holm, merge_small_groups, plot_forest, subgroup_analysis
from medclf.operating_point import OperatingPoint

from .inprocess import run_medclf

CLASS_MAP = "abnormal=tumour,oedema;normal=normal"


def run_cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "medclf", *args], capture_output=True, text=True, env=env, timeout=600
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The same command in this process (tests/inprocess.py): seconds of imports fewer per call."""
    return run_medclf(*args, env={"COLUMNS": "200"})


def assert_one_line_refusal(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


# ----------------------------------------------------------------------------- class maps


def test_class_map_parses_and_maps_labels():
    cm = parse_class_map(
        "tumour=glioma, meningioma,pituitary; normal=notumor",
        ["glioma", "meningioma", "notumor", "pituitary"],
    )
    assert cm.names == ["tumour", "normal"]
    assert cm.group_of("pituitary") == "tumour"
    probs = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1]])
    np.testing.assert_allclose(cm.apply(probs), [[0.4, 0.6], [0.9, 0.1]])
    # Labels may be groups or model classes (mapped through to their group).
    np.testing.assert_array_equal(cm.label_lookup(["normal", "glioma", "tumour", "notumor"]), [1, 0, 0, 1])
    with pytest.raises(ConfigError, match=r"\['lesion'\] of the data are neither groups"):
        cm.label_lookup(["normal", "lesion"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tumour=glioma,meningioma;normal=notumor", r"\['pituitary'\] are in no group"),
        (
            "tumour=glioma,meningioma,pituitary,notumor;normal=notumor",
            r"\['notumor'\] are in more than one group",
        ),
        ("tumour=glioma,meningioma,pituitary,polyp;normal=notumor", r"\['polyp'\] are not model classes"),
        ("all=glioma,meningioma,pituitary,notumor", "at least two groups"),
        ("tumour glioma;normal=notumor", "is not GROUP=classes"),
        ("a=glioma,meningioma;a=pituitary;b=notumor", "named more than once"),
        ("a=;b=glioma,meningioma,pituitary,notumor", "hold no class"),
    ],
)
def test_class_map_refusals_name_the_problem(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_class_map(spec, ["glioma", "meningioma", "notumor", "pituitary"])


def test_ambiguous_label_is_refused():
    cm = parse_class_map(
        "glioma=meningioma,pituitary;other=glioma,notumor", ["glioma", "meningioma", "notumor", "pituitary"]
    )
    with pytest.raises(ConfigError, match="both a group of the class map and a model class"):
        cm.label_lookup(["glioma"])


# ----------------------------------------------------------------------------- subgroup statistics


def test_holm_matches_the_textbook_example():
    # p-values 0.01, 0.04, 0.03, 0.005 -> sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, made monotone.
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert holm([0.9, 0.8]).max() == 1.0


def test_small_values_are_pooled_and_the_group_count_is_capped():
    values = ["a"] * 40 + ["b"] * 35 + ["c"] * 3 + ["d"] * 2 + ["e"] * 1
    groups, pooled = merge_small_groups(values, min_n=30)
    assert pooled == {"other (3 values)": ["c", "d", "e"]}
    assert groups.count("other (3 values)") == 6 and groups.count("a") == 40
    # One small value alone stays itself (reported, not tested).
    assert merge_small_groups(["a"] * 40 + ["z"] * 3, min_n=30)[1] == {}
    many = [f"v{i}" for i in range(20) for _ in range(40)]
    capped, pooled = merge_small_groups(many, min_n=30, max_groups=5)
    assert len(set(capped)) == 5 and len(next(iter(pooled.values()))) == 16


def _synthetic(n: int, seed: int, worse_in_b: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    groups = ["A" if g else "B" for g in rng.random(n) < 0.5]
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 2.0
    if worse_in_b:
        hurt = (np.array(groups) == "B") & (y == 1)
        logits[hurt, 1] -= 3.0
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True), groups


def test_a_planted_subgroup_failure_is_flagged_and_located(tmp_path):
    y, p, groups = _synthetic(500, seed=1, worse_in_b=True)
    a = subgroup_analysis(y, p, ["x", "y", "z"], groups, key="site", n_bootstrap=400)
    flagged = {(t["group"], t["metric"], t["class"]) for t in a["tests"] if t["significantly_worse"]}
    assert ("B", "sensitivity", "y") in flagged
    assert not any(g == "A" for g, _, _ in flagged)
    assert (a["largest_gap"]["metric"], a["largest_gap"]["class"]) == ("sensitivity", "y")
    assert a["largest_gap"]["worst_group"] == "B" and a["largest_gap"]["gap"] > 0.5
    assert any("site=B" in w and "sensitivity of y" in w for w in a["warnings"])
    b = next(g for g in a["groups"] if g["group"] == "B")
    lo, hi = b["ci"]["per_class"]["y"]["sensitivity"]
    assert lo <= b["per_class"]["y"]["sensitivity"] <= hi
    assert b["per_class"]["y"]["support"] == int(((np.array(groups) == "B") & (y == 1)).sum())
    json.dumps(a)  # JSON-ready
    assert plot_forest(a, tmp_path / "forest.png").stat().st_size > 1000


def test_specificity_is_tested_only_beyond_two_classes():
    y, p, groups = _synthetic(300, seed=5, worse_in_b=False)
    three = subgroup_analysis(y, p, ["x", "y", "z"], groups, key="k", n_bootstrap=50)
    assert {t["metric"] for t in three["tests"]} == {"accuracy", "auc", "sensitivity", "specificity"}
    binary = (y > 0).astype(int)
    p2 = np.c_[p[:, 0], p[:, 1:].sum(axis=1)]
    two = subgroup_analysis(binary, p2, ["neg", "pos"], groups, key="k", n_bootstrap=50)
    assert {t["metric"] for t in two["tests"]} == {"accuracy", "auc", "sensitivity"}


def test_no_subgroup_is_flagged_when_there_is_no_difference():
    y, p, groups = _synthetic(500, seed=2, worse_in_b=False)
    a = subgroup_analysis(y, p, ["x", "y", "z"], groups, key="site", n_bootstrap=400)
    assert a["tests"] and not a["warnings"]
    assert all(not t["significantly_worse"] for t in a["tests"])


def test_small_groups_are_reported_but_not_tested():
    y, p, groups = _synthetic(200, seed=3, worse_in_b=True)
    groups = ["tiny" if i < 12 else g for i, g in enumerate(groups)]
    a = subgroup_analysis(y, p, ["x", "y", "z"], groups, key="site", n_bootstrap=100, min_n=30)
    tiny = next(g for g in a["groups"] if g["group"] == "tiny")
    assert tiny["n"] == 12 and not tiny["tested"] and tiny["accuracy"] is not None
    assert not any(t["group"] == "tiny" for t in a["tests"])


def test_patients_are_resampled_together():
    # Every patient contributes 10 identical images: resampling images would shrink the interval ~3x.
    y, p, groups = _synthetic(60, seed=4, worse_in_b=False)
    y, p, groups = np.repeat(y, 10), np.repeat(p, 10, axis=0), [g for g in groups for _ in range(10)]
    ids = [str(i // 10) for i in range(600)]
    by_image = subgroup_analysis(y, p, ["x", "y", "z"], groups, key="site", n_bootstrap=300)
    by_patient = subgroup_analysis(
        y, p, ["x", "y", "z"], groups, key="site", n_bootstrap=300, patient_ids=ids
    )

    def width(a):
        lo, hi = a["overall"]["ci"]["accuracy"]
        return hi - lo

    assert width(by_patient) > 2 * width(by_image)
    assert by_patient["overall"]["n_patients"] == 60 and "by patient" in by_patient["ci_method"]


# ----------------------------------------------------------------------------- thresholds, intervals


def test_clopper_pearson_matches_scipy():
    for k, n in [(0, 20), (7, 20), (20, 20), (45, 50)]:
        ref = binomtest(k, n).proportion_ci(0.95, method="exact")
        np.testing.assert_allclose(clopper_pearson(k, n), [ref.low, ref.high], atol=1e-9)
    assert clopper_pearson(0, 0) is None


def test_threshold_reaches_the_target_sensitivity_with_the_best_specificity():
    rng = np.random.default_rng(0)
    truth = np.r_[np.ones(40, bool), np.zeros(60, bool)]
    score = np.r_[rng.uniform(0.3, 1.0, 40), rng.uniform(0.0, 0.7, 60)]
    t = fit_threshold(truth, score, sensitivity=0.95)
    f = binary_figures(truth, score, t)
    assert f["sensitivity"] >= 0.95 and f["tp"] == 38
    # One step stricter would miss the target: the threshold is the highest that reaches it.
    stricter = np.sort(score[truth])[::-1][37]
    assert t < stricter and binary_figures(truth, score, np.nextafter(stricter, 2))["sensitivity"] < 0.95
    youden = fit_threshold(truth, score)
    fy = binary_figures(truth, score, youden)
    for other in np.unique(score):
        fo = binary_figures(truth, score, other)
        assert fy["sensitivity"] + fy["specificity"] >= fo["sensitivity"] + fo["specificity"] - 1e-12
    with pytest.raises(ConfigError):
        fit_threshold(truth, score, sensitivity=1.5)


def test_operating_point_columns_and_decisions():
    op = OperatingPoint("abnormal", ("tumour", "oedema"), 0.4, "youden", "normal")
    np.testing.assert_array_equal(op.columns(["normal", "tumour", "oedema"]), [1, 2])
    groups = {"abnormal": ("tumour", "oedema"), "normal": ("normal",)}
    np.testing.assert_array_equal(op.columns(["abnormal", "normal"], groups), [0])
    with pytest.raises(ConfigError, match="splits"):
        op.columns(["x", "normal"], {"x": ("tumour", "normal"), "normal": ("oedema",)})
    assert op.decide(0.4)["label"] == "abnormal" and op.decide(0.39)["label"] == "normal"
    assert op.decide(0.5) == {
        "label": "abnormal",
        "positive": True,
        "group": "abnormal",
        "score": 0.5,
        "threshold": 0.4,
        "method": "youden",
    }


# ----------------------------------------------------------------------------- signatures in the bundle


def test_int8_signatures_keep_correlations():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(50, 1024)).astype(np.float32)
    s -= s.mean(axis=1, keepdims=True)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    s[3] = 0  # a constant image
    q = quantise_signatures(s)
    assert q.dtype == np.int8 and q.nbytes == 50 * 1024
    back = dequantise_signatures(q)
    assert not back[3].any()
    keep = np.r_[0:3, 4:50]
    np.testing.assert_allclose(back[keep] @ s[keep].T, s[keep] @ s[keep].T, atol=2e-3)
    aligned = aligned_signatures(["h1", "h0", "hx"], ["h0", "h1", "h1"], s, np.array([0, 1, 2]))
    np.testing.assert_array_equal(aligned[0], s[1])
    np.testing.assert_array_equal(aligned[1], s[0])
    assert not aligned[2].any()


def test_training_stores_signatures_aligned_with_hashes(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert TRAIN_SIGNATURES in b.manifest["files"]
    refs = read_train_references(b.path, b.manifest["files"])
    assert refs.signatures is not None and refs.signatures.shape == (len(refs.hashes), 1024)
    norms = np.linalg.norm(refs.signatures, axis=1)
    np.testing.assert_allclose(norms[norms > 0], 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- end to end


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def external_data(sim_data, tmp_path_factory) -> tuple[Path, int, int]:
    """Images the model never saw (another simulation seed), labelled abnormal/normal, plus one byte copy
    and two resized re-encoded copies of training images. Returns (manifest, exact copies, near copies)."""
    from medclf.data.simulate import make_dataset

    root = tmp_path_factory.mktemp("external")
    make_dataset(root / "new", n_per_class=8, size=64, seed=11, splits=None)
    rows = []
    for cls in ("normal", "tumour", "oedema"):
        for f in sorted((root / "new" / cls).glob("*.png")):
            rows.append(
                {"path": str(f.relative_to(root)), "label": "normal" if cls == "normal" else "abnormal"}
            )
    train = sorted((sim_data / "train" / "tumour").glob("*.png"))
    shutil.copyfile(train[0], root / "exact.png")
    rows.append({"path": "exact.png", "label": "abnormal"})
    for j, src in enumerate(train[1:3]):
        img = PILImage.open(src)
        img.resize((80, 80), PILImage.LANCZOS).save(root / f"near{j}.jpg", quality=92)
        rows.append({"path": f"near{j}.jpg", "label": "abnormal"})
    return _write_manifest(root / "manifest.csv", rows), 1, 2


def test_evaluate_with_a_class_map_removes_copies_of_training_images(tiny_bundle, external_data, tmp_path):
    import medclf

    manifest, n_exact, n_near = external_data
    m = medclf.evaluate(
        tiny_bundle, manifest, tmp_path / "ev", class_map=CLASS_MAP, progress=False, n_bootstrap=50
    )
    assert m["class_names"] == ["abnormal", "normal"] and m["class_map"]["abnormal"] == ["tumour", "oedema"]
    assert (m["n_removed_exact"], m["n_removed_near"]) == (n_exact, n_near)
    assert m["n_removed_duplicates"] == n_exact + n_near and m["n"] == 24
    assert m["all_samples"]["n"] == 24 + n_exact + n_near
    assert set(m["per_class"]) == {"abnormal", "normal"} and m["auc"] is not None
    with open(tmp_path / "ev" / "predictions.csv") as fh:
        header = next(csv.reader(fh))
    assert "prob_abnormal" in header and "prob_tumour" not in header
    assert "Class map (external validation)" in (tmp_path / "ev" / "report.html").read_text()


def test_bundle_without_signatures_removes_exact_copies_only(tiny_bundle, external_data, tmp_path):
    import medclf
    from medclf.bundle import save_bundle

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    b = load_bundle(old)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "self_sha256")}
    keep = {n: b.path / n for n in b.manifest["files"] if n not in ("model.safetensors", TRAIN_SIGNATURES)}
    save_bundle(old, model=b.model, manifest=manifest, extra_files=keep)
    assert TRAIN_SIGNATURES not in load_bundle(old).manifest["files"]
    m = medclf.evaluate(
        old, external_data[0], tmp_path / "ev", class_map=CLASS_MAP, progress=False, n_bootstrap=20
    )
    assert (m["n_removed_exact"], m["n_removed_near"]) == (1, 0) and not m["near_copies_checked"]


def test_cli_refusals_are_one_line(tiny_bundle, external_data, tmp_path):
    manifest = str(external_data[0])
    # One refusal in a real process (nothing else reaches its stderr), the others in this one.
    r = run_cli_subprocess(
        "evaluate",
        str(tiny_bundle),
        manifest,
        "--out",
        str(tmp_path / "a"),
        "--class-map",
        "abnormal=tumour;normal=normal",
        "--no-progress",
    )
    assert_one_line_refusal(r, "['oedema'] are in no group")
    r = run_cli(
        "evaluate",
        str(tiny_bundle),
        manifest,
        "--out",
        str(tmp_path / "b"),
        "--by",
        "hospital",
        "--class-map",
        CLASS_MAP,
        "--no-progress",
    )
    assert_one_line_refusal(r, "unknown group key 'hospital'")
    r = run_cli("evaluate", str(tiny_bundle), manifest, "--out", str(tmp_path / "c"), "--no-progress")
    assert_one_line_refusal(r, "not among the model's classes")
    r = run_cli(
        "evaluate",
        str(tiny_bundle),
        manifest,
        "--out",
        str(tmp_path / "d"),
        "--class-map",
        CLASS_MAP,
        "--operating-point",
        "--no-progress",
    )
    assert_one_line_refusal(r, "has no operating point")
    r = run_cli(
        "recalibrate",
        str(tiny_bundle),
        manifest,
        "--out",
        str(tmp_path / "e"),
        "--class-map",
        CLASS_MAP,
        "--no-progress",
    )
    assert_one_line_refusal(r, "--positive is required")
    r = run_cli(
        "recalibrate",
        str(tiny_bundle),
        manifest,
        "--out",
        str(tiny_bundle),
        "--positive",
        "tumour",
        "--no-progress",
    )
    assert_one_line_refusal(r, "is the source bundle")
    # 16 abnormal and 8 normal usable images: too few to place a threshold.
    r = run_cli(
        "recalibrate",
        str(tiny_bundle),
        manifest,
        "--out",
        str(tmp_path / "f"),
        "--class-map",
        CLASS_MAP,
        "--positive",
        "abnormal",
        "--no-progress",
    )
    assert_one_line_refusal(r, "16 positive (abnormal) and 8 negative", "at least 20 of each")
    assert not (tmp_path / "f").exists()


def test_evaluate_by_manifest_column_and_size(sim_data, tiny_bundle, tmp_path):
    rows = []
    for cls in ("normal", "tumour", "oedema"):
        for i, f in enumerate(sorted((sim_data / "test" / cls).glob("*.png"))):
            rows.append(
                {"path": str(f), "label": cls, "split": "test", "site": "north" if i % 2 else "south"}
            )
    manifest = _write_manifest(tmp_path / "sites.csv", rows)
    out = tmp_path / "ev"
    r = run_cli(
        "evaluate",
        str(tiny_bundle),
        str(manifest),
        "--out",
        str(out),
        "--by",
        "site,size",
        "--min-group-n",
        "5",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "Subgroups by site" in r.stderr and "largest gap" in r.stderr
    m = json.loads((out / "metrics.json").read_text())
    site = m["subgroups"]["site"]
    assert {g["group"] for g in site["groups"]} == {"north", "south"}
    assert sum(g["n"] for g in site["groups"]) == m["n"] and all(g["tested"] for g in site["groups"])
    assert site["tests"] and all(0 <= t["p_holm"] <= 1 for t in site["tests"])
    assert [g["group"] for g in m["subgroups"]["size"]["groups"]] == ["64x64"]
    report = (out / "report.html").read_text()
    assert "Subgroups by site (forest plot)" in report and "Subgroups by size" in report
    assert (out / "subgroups_site.png").is_file()


def test_evaluate_uses_the_flagged_keys_without_by(sim_data, tiny_bundle, tmp_path):
    import medclf
    from medclf.bundle import update_bundle

    flagged = tmp_path / "flagged"
    shutil.copytree(tiny_bundle, flagged)
    update_bundle(flagged, {"shortcuts": {"checked": True, "flagged_keys": ["size", "site"]}})
    m = medclf.evaluate(flagged, sim_data, tmp_path / "ev", progress=False, n_bootstrap=50)
    # "site" is not a column of this dataset: skipped with a note, not an error.
    assert list(m["subgroups"]) == ["size"]
    m = medclf.evaluate(tiny_bundle, sim_data, tmp_path / "ev2", progress=False, n_bootstrap=50)
    assert "subgroups" not in m


@pytest.fixture(scope="module")
def site_sample(tmp_path_factory) -> Path:
    """A labelled sample from a 'new site': 72 simulated images, labels grouped as abnormal/normal."""
    from medclf.data.simulate import make_dataset

    root = make_dataset(
        tmp_path_factory.mktemp("site") / "data", n_per_class=24, size=64, seed=23, splits=None
    )
    rows = [
        {"path": str(f.relative_to(root.parent)), "label": "normal" if cls == "normal" else "abnormal"}
        for cls in ("normal", "tumour", "oedema")
        for f in sorted((root / cls).glob("*.png"))
    ]
    # Beside the class folders, which stay a dataset of their own labelled with model classes.
    return _write_manifest(root.parent / "site.csv", rows)


@pytest.fixture(scope="module")
def recalibrated(tiny_bundle, site_sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recal") / "site-model"
    r = run_cli(
        "recalibrate",
        str(tiny_bundle),
        str(site_sample),
        "--out",
        str(out),
        "--class-map",
        CLASS_MAP,
        "--positive",
        "abnormal",
        "--sensitivity",
        "0.9",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "Operating point: abnormal when P(abnormal)" in r.stderr and "Bundle written" in r.stderr
    return out


def test_recalibrate_writes_a_new_sealed_bundle_and_leaves_the_source(tiny_bundle, recalibrated, site_sample):
    source_hash = sha256_file(Path(tiny_bundle) / "bundle.json")
    b, src = load_bundle(recalibrated), load_bundle(tiny_bundle)
    assert sha256_file(Path(tiny_bundle) / "bundle.json") == source_hash
    assert "operating_point" not in src.manifest
    card = b.read_file("MODEL_CARD.md").decode()
    assert "Recalibrated from bundle " + src.sha256[:12] in card and "Decision rule" in card
    assert "Decision rule" not in src.read_file("MODEL_CARD.md").decode()
    op = b.manifest["operating_point"]
    assert (op["positive"], op["classes"], op["negative"], op["method"], op["target"]) == (
        "abnormal",
        ["tumour", "oedema"],
        "normal",
        "sensitivity",
        0.9,
    )
    achieved = op["achieved"]
    assert achieved["n"] == 72 and achieved["n_positive"] == 48 and achieved["sensitivity"] >= 0.9
    assert achieved["ci"]["sensitivity"][0] <= achieved["sensitivity"] <= achieved["ci"]["sensitivity"][1]
    assert op["site"]["labels"] == "class-map groups" and len(op["site"]["content_sha256"]) == 64
    assert op["source_bundle_sha256"] == src.sha256
    assert b.manifest["calibration"]["previous"]["temperature"] == src.temperature
    assert b.temperature == op["temperature"] > 0
    # Same weights and training references; the new temperature and threshold are all that changed.
    for name in ("model.safetensors", "train_hashes.json", TRAIN_SIGNATURES):
        assert b.manifest["files"][name] == src.manifest["files"][name]
    # The fitted figures are what the threshold gives on the site sample.
    truth_and_score = _site_scores(b, site_sample)
    assert binary_figures(*truth_and_score, op["threshold"])["tp"] == achieved["tp"]


def _site_scores(b, site_sample):
    rows = list(csv.DictReader(site_sample.open()))
    results = b.predict([site_sample.parent / r["path"] for r in rows])
    truth = np.array([r["label"] == "abnormal" for r in rows])
    return truth, np.array([res["decision"]["score"] for res in results])


def test_predict_and_info_show_the_operating_point(recalibrated, sim_data):
    png = sorted((sim_data / "test" / "tumour").glob("*.png"))[0]
    r = run_cli("predict", str(recalibrated), str(png))
    assert r.returncode == 0, r.stderr
    [entry] = json.loads(r.stdout)
    d = entry["decision"]
    op = load_bundle(recalibrated).manifest["operating_point"]
    assert d["group"] == "abnormal" and d["threshold"] == op["threshold"]
    assert d["score"] == pytest.approx(entry["probabilities"]["tumour"] + entry["probabilities"]["oedema"])
    assert d["label"] == ("abnormal" if d["score"] >= d["threshold"] else "normal")
    r = run_cli("predict", str(recalibrated), str(png), "--format", "csv")
    header, row = list(csv.reader(r.stdout.splitlines()))
    assert header[-2:] == ["decision", "decision_threshold"] and row[-2] == d["label"]
    r = run_cli("info", str(recalibrated))
    assert (
        r.returncode == 0
        and "operating   abnormal when P(abnormal)" in r.stdout
        and "site sample" in r.stdout
    )


def test_evaluate_reports_sensitivity_and_specificity_at_the_operating_point(
    recalibrated, external_data, tmp_path
):
    import medclf

    m = medclf.evaluate(
        recalibrated, external_data[0], tmp_path / "ev", class_map=CLASS_MAP, progress=False, n_bootstrap=20
    )
    e = m["operating_point"]["evaluated"]
    assert (e["n_positive"], e["n_negative"]) == (16, 8) and e["tp"] + e["fn"] == 16
    assert (
        m["operating_point"]["threshold"]
        == load_bundle(recalibrated).manifest["operating_point"]["threshold"]
    )
    assert "Operating point" in (tmp_path / "ev" / "report.html").read_text()
    # On the model's own classes the positive group is tumour + oedema.
    m = medclf.evaluate(
        recalibrated, external_data[0].parent / "new", tmp_path / "ev2", progress=False, n_bootstrap=20
    )
    assert m["operating_point"]["evaluated"]["n_positive"] == 16
    m = medclf.evaluate(
        recalibrated,
        external_data[0],
        tmp_path / "ev3",
        class_map=CLASS_MAP,
        operating_point=False,
        progress=False,
        n_bootstrap=20,
    )
    assert "operating_point" not in m


def test_youden_recalibration_on_model_class_labels(tiny_bundle, site_sample, tmp_path):
    import medclf

    site = site_sample.parent / "data"  # class folders: labels are model classes, so T is fitted on them
    op = medclf.recalibrate(tiny_bundle, site, tmp_path / "b", positive="tumour", progress=False)
    assert op["method"] == "youden" and op["classes"] == ["tumour"] and op["negative"] == "not tumour"
    assert op["site"]["labels"] == "model classes" and op["achieved"]["n_positive"] == 24
    b = load_bundle(tmp_path / "b")
    assert b.manifest["calibration"]["method"].startswith("temperature scaling (minimum validation NLL)")
    with pytest.raises(DataError, match="give --class-map"):
        medclf.recalibrate(tiny_bundle, site_sample, tmp_path / "c", positive="tumour", progress=False)


def test_serve_and_dicom_node_show_the_decision(recalibrated, sim_data, tmp_path):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    from medclf.serve.app import create_app
    from medclf.serve.dicom_node import DicomNode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    b = load_bundle(recalibrated)
    png = sorted((sim_data / "test" / "normal").glob("*.png"))[0]
    with TestClient(create_app(b, audit_db=str(tmp_path / "audit.db"))) as client:
        body = client.post("/v1/predict", files={"file": ("x.png", png.read_bytes(), "image/png")}).json()
    assert body["decision"]["group"] == "abnormal" and body["decision"]["label"] in ("abnormal", "normal")

    ds = dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    b.ood.threshold = 1e9  # MR_small is a stranger to this model: an OOD input's SR carries no decision
    with DicomNode(b, tmp_path / "node", port=0, ae_title="MEDCLF") as node:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDCLF")
        try:
            assert assoc.send_c_store(ds).Status == 0
        finally:
            assoc.release()
    result = json.loads((tmp_path / "node" / f"{ds.SOPInstanceUID}.json").read_text())
    assert result["decision"]["threshold"] == b.manifest["operating_point"]["threshold"]
    sr = dcmread(tmp_path / "node" / f"{ds.SOPInstanceUID}.sr.dcm")
    assert result["ood"] is False

    def texts(items):  # every text and code meaning in the SR's content tree
        for item in items:
            for key in ("TextValue", "CodeMeaning", "UID"):
                if key in item:
                    yield str(item.get(key))
            for seq in ("ConceptCodeSequence", "ConceptNameCodeSequence", "ContentSequence"):
                if seq in item:
                    yield from texts(item.get(seq))

    threshold = f"threshold: {result['decision']['threshold']:.6g}"
    assert threshold in set(texts(sr.ContentSequence)), "the operating point's group is missing from the SR"


def test_web_page_shows_the_decision(recalibrated, sim_data, tmp_path):
    import socket
    import threading
    import time

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} is not installed (Debian package 'chromium'; `make test` installs it)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed"
    )
    import uvicorn

    from medclf.serve.app import create_app

    from .test_browser import CHROMIUM_ARGS

    app = create_app(str(recalibrated), audit_db=str(tmp_path / "audit.db"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not srv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        image = sorted((sim_data / "test" / "tumour").glob("*.png"))[0]
        [expected] = load_bundle(recalibrated).predict([image])
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{sock.getsockname()[1]}/")
            page.set_input_files("#file", str(image))
            decision = page.locator("#decision")
            sync_api.expect(decision).to_be_visible(timeout=60_000)
            sync_api.expect(decision).to_contain_text(
                f"operating point: {expected['decision']['label']} (P(abnormal)"
            )
            browser.close()
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
