"""The traditional-ML baseline: features, selection on validation only, evaluate-compatible outputs."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from scipy import ndimage
from skimage.feature import graycomatrix, graycoprops

from medclf import traditional as bl
from medclf.errors import ConfigError

from .inprocess import run_medclf

CLASSES = ("fine", "smooth")


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth blobs (low-pass noise) or fine grain (high-frequency noise), both stretched to 0..255, so
    only texture tells the classes apart."""
    noise = rng.standard_normal((size, size))
    img = ndimage.gaussian_filter(noise, 3.0 if kind == "smooth" else 0.6)
    lo, hi = np.percentile(img, [1, 99])
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def make_textures(
    root: Path,
    *,
    n_per_class: int = 40,
    n_test: int = 10,
    size: int = 32,
    seed: int = 0,
    swap_test_labels: bool = False,
    val_copy: bool = False,
) -> Path:
    """``root/{train,test}/{fine,smooth}/*.png``; ``swap_test_labels`` files each test image under the
    other class; ``val_copy`` adds ``root/val`` holding 5 images per class plus one byte copy of a train image."""
    rng = np.random.default_rng(seed)
    for c, kind in enumerate(CLASSES):
        for i in range(n_per_class):
            split = "test" if i < n_test else "train"
            if val_copy and n_test <= i < n_test + 5:
                split = "val"
            label = CLASSES[1 - c] if (split == "test" and swap_test_labels) else kind
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(_texture(kind, rng, size)).save(folder / f"{kind}_{i:03d}.png")
    if val_copy:
        src = sorted((root / "train" / "smooth").glob("*.png"))[0]
        shutil.copyfile(src, root / "val" / "smooth" / "copy_of_train.png")
    return root


@pytest.fixture(scope="module")
def textures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_textures(tmp_path_factory.mktemp("tex") / "data")


@pytest.fixture(scope="module")
def baseline_run(textures: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("baseline") / "out"
    metrics = bl.run_baseline(textures, out, workers=1, progress=False)
    return out, metrics


# ----------------------------------------------------------------------------- features


def test_feature_layout_is_contiguous_and_named() -> None:
    layout = bl.feature_layout()
    assert [b["name"] for b in layout] == [
        "intensity_hist",
        "intensity_stats",
        "glcm",
        "lbp_8_1",
        "lbp_16_2",
        "hog",
    ]
    assert layout[0]["start"] == 0 and layout[-1]["stop"] == bl.N_FEATURES
    assert all(a["stop"] == b["start"] for a, b in itertools.pairwise(layout))
    names = bl.feature_names()
    assert len(names) == len(set(names)) == bl.N_FEATURES == 1872
    assert names[layout[2]["start"]] == "glcm_contrast_d1_mean"
    assert names[layout[3]["start"] - 1] == "glcm_ASM_d4_range"


def test_features_of_one_image_are_finite_and_sensible() -> None:
    rng = np.random.default_rng(1)
    img = _texture("smooth", rng, 48).astype(np.float32) / 255
    f = bl.image_features(img)
    assert f.shape == (bl.N_FEATURES,) and f.dtype == np.float32 and np.isfinite(f).all()
    blocks = {b["name"]: f[b["start"] : b["stop"]] for b in bl.feature_layout()}
    for name in ("intensity_hist", "lbp_8_1", "lbp_16_2"):
        assert blocks[name].sum() == pytest.approx(1.0, abs=1e-5)
    assert blocks["intensity_stats"][0] == pytest.approx(img.mean(), abs=1e-5)
    # A constant image (no texture, no gradient) must not produce NaN.
    assert np.isfinite(bl.image_features(np.full((32, 32), 0.5, np.float32))).all()


def test_vectorised_glcm_properties_match_scikit_image() -> None:
    rng = np.random.default_rng(2)
    q = [rng.integers(0, 8, (20, 20), dtype=np.uint8), np.zeros((20, 20), np.uint8)]
    glcm = np.stack(
        [graycomatrix(x, [1, 3], [0, np.pi / 2], levels=8, symmetric=True, normed=True) for x in q]
    )
    props = bl.glcm_properties(glcm)
    for n in range(len(q)):
        for k, name in enumerate(bl.GLCM_PROPS):
            np.testing.assert_allclose(props[n, k], graycoprops(glcm[n], name), atol=1e-10)


def test_features_do_not_depend_on_chunking_or_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    imgs = (np.stack([_texture(k, rng, 24) for k in CLASSES * 4]) / 255).astype(np.float16)
    whole = bl.extract_features(imgs, workers=1)
    monkeypatch.setattr(bl, "CHUNK", 3)
    monkeypatch.setattr(bl, "PARALLEL_MIN_PIXELS", 0)
    np.testing.assert_array_equal(bl.extract_features(imgs[:, None], workers=1), whole)
    np.testing.assert_array_equal(bl.extract_features(imgs, workers=2), whole)


def test_every_method_fits_and_absent_classes_get_zero_probability() -> None:
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((3, 6)) * 3
    # 30 per class: gradient boosting needs 20 samples per leaf before it splits at all.
    y_train, y_val = np.repeat([0, 1, 2], 30), np.repeat([0, 1, 2], 4)
    x_train = centres[y_train] + rng.standard_normal((90, 6))
    x_val = centres[y_val] + rng.standard_normal((12, 6))
    # Four classes, the last never seen: its column must be 0, the AUC the mean over present classes.
    model, best, table = bl.select_model(x_train, y_train, x_val, y_val, 4, methods=bl.METHODS, seed=0)
    assert [c.method for c in table] == [m for m in bl.METHODS for _ in bl.GRIDS[m]]
    assert all(c.val_auc is not None and c.val_auc > 0.9 for c in table)
    assert best.key() == max(c.key() for c in table)
    probs = bl._full_probs(model, x_val, 4)
    assert probs.shape == (12, 4) and (probs[:, 3] == 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert bl.validation_auc(np.zeros(5, int), np.full((5, 2), 0.5)) is None


# ----------------------------------------------------------------------------- the command


def test_baseline_separates_textures_and_writes_evaluate_outputs(baseline_run: tuple[Path, dict]) -> None:
    out, metrics = baseline_run
    assert metrics["auc"] >= 0.95 and metrics["accuracy"] >= 0.85
    assert metrics["split"] == "test" and metrics["n"] == 20 and "all_samples" in metrics
    for name in (
        "metrics.json",
        "predictions.csv",
        "roc.png",
        "confusion.png",
        "reliability.png",
        "report.html",
    ):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["auc"] == metrics["auc"] and "baseline" not in on_disk
    with (out / "predictions.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "label", "predicted", "train_copy", "prob_fine", "prob_smooth", "error"]
    assert len(rows) == 21

    summary = json.loads((out / "baseline.json").read_text())
    assert summary == json.loads(json.dumps(metrics["baseline"]))
    expected = [(m, p) for m in bl.DEFAULT_METHODS for p in bl.GRIDS[m]]
    assert [(c["method"], c["params"]) for c in summary["candidates"]] == expected
    best = max(summary["candidates"], key=lambda c: (c["val_auc"], c["val_accuracy"]))
    assert summary["selected"]["val_auc"] == best["val_auc"]
    assert summary["features"]["n_features"] == bl.N_FEATURES
    assert summary["preprocessing"]["size"] == [32, 32] and summary["preprocessing"]["channels"] == 1
    assert summary["n"] == {
        "train": 51,
        "val": 9,
        "val_train_copies_left_out": 0,
        "test": 20,
        "unreadable": 0,
    }
    assert {"decode_seconds", "features_seconds", "fit_seconds", "total_seconds"} <= set(summary["times"])
    html = (out / "report.html").read_text()
    for heading in ("Baseline model selection", "Selected model", "Features", "Times (s)"):
        assert heading in html


def test_selection_sees_validation_only_and_never_the_test_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_textures(tmp_path / "a", val_copy=True)
    swapped = make_textures(tmp_path / "b", val_copy=True, swap_test_labels=True)
    calls: list[np.ndarray] = []
    real = bl.validation_auc

    def spy(y: np.ndarray, probs: np.ndarray) -> float | None:
        calls.append(np.asarray(y).copy())
        return real(y, probs)

    monkeypatch.setattr(bl, "validation_auc", spy)
    m1 = bl.run_baseline(data, tmp_path / "o1", methods=("logreg",), workers=1, progress=False)
    # Scored on the 10 validation images: the 11th, a copy of a training image, is left out.
    assert len(calls) == len(bl.GRIDS["logreg"])
    assert all(len(y) == 10 and sorted(y.tolist()) == [0] * 5 + [1] * 5 for y in calls)
    assert m1["baseline"]["n"]["val_train_copies_left_out"] == 1

    # Flipping every test label changes the test score but not a single number of the selection.
    m2 = bl.run_baseline(swapped, tmp_path / "o2", methods=("logreg",), workers=1, progress=False)
    assert m1["baseline"]["selected"] == m2["baseline"]["selected"]
    strip = [{k: v for k, v in c.items() if k != "fit_seconds"} for c in m1["baseline"]["candidates"]]
    assert strip == [{k: v for k, v in c.items() if k != "fit_seconds"} for c in m2["baseline"]["candidates"]]
    assert m1["auc"] == pytest.approx(1 - m2["auc"])


def test_unknown_method_and_3d_data_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="valid methods: logreg, rf, svm, gbm"):
        bl.check_methods("logreg,xgboost")
    assert bl.check_methods("SVM, gbm,svm") == ("svm", "gbm")
    vol = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 16), dtype=np.uint8)
    lab = np.array([[0], [1]] * 3)
    path = tmp_path / "vols.npz"
    np.savez(path, train_images=vol, train_labels=lab, test_images=vol[:2], test_labels=lab[:2])
    with pytest.raises(ConfigError, match="2D images only"):
        bl.run_baseline(path, tmp_path / "out", workers=1, progress=False)


def test_cli_unknown_method_is_exit_2_without_traceback(textures: Path, tmp_path: Path) -> None:
    proc = run_medclf("baseline", textures, "--out", tmp_path / "o", "--methods", "rf,knn")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "'knn'" in proc.stderr and "logreg, rf, svm, gbm" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_test_copies_of_any_training_image_are_left_out_as_evaluate_does(tmp_path: Path) -> None:
    """The validation part carved out of the training split is training data too: a test image copying
    one of its images is a copy, exactly as `medclf evaluate` counts it."""
    data = make_textures(tmp_path / "data", n_per_class=30, n_test=6)
    train_files = sorted((data / "train").rglob("*.png"))
    for f in train_files:  # a byte copy of every training image in the test split
        shutil.copyfile(f, data / "test" / f.parent.name / f"copy_{f.name}")
    metrics = bl.run_baseline(data, tmp_path / "out", methods="logreg", workers=1, progress=False)
    summary = metrics["baseline"]
    assert summary["n"]["val"] > 0  # part of the training split became validation...
    assert metrics["n_removed_duplicates"] == len(train_files)  # ...and copies of it are still removed
    assert metrics["n"] == 12
    with (tmp_path / "out" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert all((r["train_copy"] == "True") == Path(r["path"]).name.startswith("copy_") for r in rows)
