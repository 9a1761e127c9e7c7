"""The simulated brain MRI generator: arrays, datasets on disk, and that the task needs spatial reasoning."""

from __future__ import annotations

import csv
import hashlib
import socket
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medclf.data import simulate
from medclf.data.simulate import (
    BRAIN,
    CLASSES,
    DIFFICULTIES,
    FOV_MM,
    LESION,
    OEDEMA,
    make_dataset,
    render_case,
    render_case_with_labels,
    sample_case_params,
    simulate_case,
)


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _manifest(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_template_loads_from_the_installed_wheel_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulator must never touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    simulate._template.cache_clear()
    tpl = simulate._template()
    # T1 ordering of the template's tissue levels: CSF < grey < white matter.
    assert 0 < tpl.csf < tpl.gm < tpl.wm_level <= 1
    assert tpl.candidates.shape[0] == 3 and tpl.candidates.shape[1] > 1000


@pytest.mark.parametrize("label", CLASSES)
def test_2d_cases_are_float32_images_in_unit_range(label: str) -> None:
    img = simulate_case(label, rng=np.random.default_rng(1), size=64)
    assert img.shape == (64, 64) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    # A head in the middle of a dark background, not a blank or saturated image.
    centre, corner = img[24:40, 24:40].mean(), img[:6, :6].mean()
    assert centre > 0.2 and corner < 0.15


def test_3d_case_shape() -> None:
    vol = simulate_case("tumour", rng=np.random.default_rng(2), dims=3, size=32)
    assert vol.shape == (32, 32, 32) and vol.dtype == np.float32
    assert vol.min() >= 0.0 and vol.max() <= 1.0
    assert vol[12:20, 12:20, 12:20].mean() > 0.2 > vol[:3, :3, :3].mean()


def test_cases_are_deterministic_for_a_seed_and_vary_across_seeds() -> None:
    a = simulate_case("oedema", rng=np.random.default_rng(7), size=48)
    b = simulate_case("oedema", rng=np.random.default_rng(7), size=48)
    c = simulate_case("oedema", rng=np.random.default_rng(8), size=48)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01


def test_bad_arguments_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown class"):
        simulate_case("glioma", rng=rng)
    with pytest.raises(ValueError, match="dims"):
        simulate_case("normal", rng=rng, dims=4)
    with pytest.raises(ValueError, match="split names"):
        make_dataset("unused", splits={"training": 1.0})
    with pytest.raises(ValueError, match="add up to 1"):
        make_dataset("unused", splits={"train": 0.5, "test": 0.3})
    with pytest.raises(ValueError, match="slices_per_patient"):
        make_dataset("unused", dims=3, slices_per_patient=2)
    with pytest.raises(ValueError, match="unknown difficulty"):
        simulate_case("tumour", rng=rng, difficulty="easy")
    with pytest.raises(ValueError, match="unknown difficulty"):
        make_dataset("unused", difficulty="easy")


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
@pytest.mark.parametrize("label", ["tumour", "oedema"])
def test_the_lesion_is_really_there_and_inside_the_brain(label: str, difficulty: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(4):
        params = sample_case_params(label, rng=rng, size=64, difficulty=difficulty)
        img, labels = render_case_with_labels(params)
        clean, clean_labels = render_case_with_labels(params, lesion=False)
        assert not np.isin(clean_labels, [OEDEMA, LESION]).any()
        # Same anatomy, pose, acquisition and noise: every difference is the pathology (or its mass effect).
        diff = np.abs(img - clean)
        core = labels == (LESION if label == "tumour" else OEDEMA)
        assert core.sum() >= 10
        assert diff[core].mean() > 0.02
        # It sits in the brain, never in the scalp or the air around the head.
        assert (clean_labels[core] == BRAIN).mean() > 0.9
        assert diff[clean_labels == 0].mean() < 0.2 * diff[core].mean()
        np.testing.assert_array_equal(diff[0, :4, :4], 0.0)


def test_a_normal_case_has_nothing_to_remove() -> None:
    params = sample_case_params("normal", rng=np.random.default_rng(4), size=48)
    assert params.lesion is None
    np.testing.assert_array_equal(render_case(params), render_case(params, lesion=False))


def test_hard_is_the_default_and_moderate_is_a_different_draw() -> None:
    """``difficulty="hard"`` is the original simulator (the default); the other levels change the lesion."""
    for label in CLASSES:
        default = simulate_case(label, rng=np.random.default_rng(5), size=48)
        hard = simulate_case(label, rng=np.random.default_rng(5), size=48, difficulty="hard")
        moderate = simulate_case(label, rng=np.random.default_rng(5), size=48, difficulty="moderate")
        np.testing.assert_array_equal(default, hard)
        assert moderate.shape == hard.shape and moderate.dtype == np.float32
        assert not np.array_equal(moderate, hard)  # blur and noise ranges differ even without a lesion


def _lesion_stats(label: str, difficulty: str, n: int = 10) -> tuple[float, float]:
    """Median area (pixels) and median contrast (mean |with - without lesion|) of the class's pathology."""
    rng = np.random.default_rng(11)
    areas, contrasts = [], []
    for _ in range(n):
        params = sample_case_params(label, rng=rng, size=48, difficulty=difficulty)
        img, labels = render_case_with_labels(params)
        region = labels >= (LESION if label == "tumour" else OEDEMA)
        areas.append(region.sum())
        contrasts.append(
            np.abs(img - render_case(params, lesion=False))[region].mean() if region.any() else 0.0
        )
    return float(np.median(areas)), float(np.median(contrasts))


@pytest.mark.parametrize("label", ["tumour", "oedema"])
def test_moderate_lesions_are_more_conspicuous_than_hard_ones(label: str) -> None:
    hard_area, hard_contrast = _lesion_stats(label, "hard")
    area, contrast = _lesion_stats(label, "moderate")
    assert area > 1.1 * hard_area
    assert contrast > 1.1 * hard_contrast


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_intensity_statistics_alone_do_not_separate_the_classes(difficulty: str) -> None:
    """A histogram-level rule (mean, std, percentiles) must stay near chance: the classes need spatial cues."""
    rng = np.random.default_rng(2024)
    n = 60
    feats, y = [], []
    for _ in range(n):
        for k, label in enumerate(CLASSES):
            img = simulate_case(label, rng=rng, size=64, difficulty=difficulty)
            feats.append([img.mean(), img.std(), *np.percentile(img, np.linspace(5, 95, 10))])
            y.append(k)
    x, y_arr = np.asarray(feats), np.asarray(y)
    order = np.random.default_rng(0).permutation(len(y_arr))
    train, test = order[: len(order) // 2], order[len(order) // 2 :]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[train], y_arr[train])
    score = balanced_accuracy_score(y_arr[test], clf.predict(x[test]))
    assert score < 0.6, (
        f"{difficulty}: intensity statistics separate the classes (balanced accuracy {score:.2f})"
    )


def test_folder_dataset_layout_and_determinism(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "a", n_per_class=4, size=32, seed=5)
    files = sorted(out.rglob("*.png"))
    assert len(files) == 12
    for split, per_class in (("train", 3), ("test", 1)):  # 4 * 0.7 -> 3 train, 1 test per class
        for label in CLASSES:
            assert len(list((out / split / label).glob("p*.png"))) == per_class
    with Image.open(files[0]) as im:
        assert im.mode == "L" and im.size == (32, 32)
    assert not (out / "manifest.csv").exists()
    # Byte-identical on a second run; a different seed gives different images.
    assert _digest(out) == _digest(make_dataset(tmp_path / "b", n_per_class=4, size=32, seed=5))
    other = _digest(make_dataset(tmp_path / "c", n_per_class=4, size=32, seed=6))
    assert set(other.values()) != set(_digest(out).values())
    # The difficulty changes the pixels, never the layout, the names or the splits.
    moderate = _digest(make_dataset(tmp_path / "m", n_per_class=4, size=32, seed=5, difficulty="moderate"))
    assert moderate.keys() == _digest(out).keys() and moderate != _digest(out)


def test_no_split_level_and_manifest(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "d", n_per_class=2, size=32, splits=None, manifest=True)
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == sorted(CLASSES)
    rows = _manifest(out)
    assert list(rows[0]) == ["path", "label", "patient_id", "split"]
    assert len(rows) == 6 and all(r["split"] == "" for r in rows)
    for r in rows:
        assert (out / r["path"]).is_file() and r["path"].split("/")[0] == r["label"]
        assert Path(r["path"]).stem == r["patient_id"]


def test_slices_of_a_patient_stay_together(tmp_path: Path) -> None:
    splits = {"train": 0.6, "val": 0.2, "test": 0.2}
    out = make_dataset(
        tmp_path / "e", n_per_class=5, size=32, splits=splits, slices_per_patient=3, manifest=True
    )
    rows = _manifest(out)
    assert len(rows) == 5 * 3 * len(CLASSES)
    by_patient: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_patient[r["patient_id"]].append(r)
        assert r["path"] == f"{r['split']}/{r['label']}/{Path(r['path']).name}"
        assert Path(r["path"]).name.startswith(r["patient_id"] + "_s")
    assert len(by_patient) == 15
    for pid, group in by_patient.items():
        assert sorted(Path(r["path"]).stem for r in group) == [f"{pid}_s{s}" for s in range(3)]
        assert len({r["split"] for r in group}) == 1 and len({r["label"] for r in group}) == 1
    # Stratified by class over patients: 3 train, 1 val, 1 test patients of each class.
    for label in CLASSES:
        counts = defaultdict(int)
        for group in by_patient.values():
            if group[0]["label"] == label:
                counts[group[0]["split"]] += 1
        assert counts == {"train": 3, "val": 1, "test": 1}
    # Adjacent slices of one patient are the same head 3 mm apart: much closer than two patients.
    group = next(iter(by_patient.values()))
    s0, s1 = (
        np.asarray(Image.open(out / r["path"]), dtype=float)
        for r in sorted(group, key=lambda r: r["path"])[:2]
    )
    stranger = next(g for g in by_patient.values() if g is not group)[0]
    s_other = np.asarray(Image.open(out / stranger["path"]), dtype=float)
    assert np.abs(s0 - s1).mean() < 0.6 * np.abs(s0 - s_other).mean()


def test_3d_dataset_is_readable_nifti(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "f", n_per_class=1, dims=3, size=24, splits={"test": 1.0})
    files = sorted(out.rglob("*.nii.gz"))
    assert [f.parent.name for f in files] == sorted(CLASSES)
    img = nib.load(files[0])
    assert img.shape == (24, 24, 24) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.header.get_zooms(), [FOV_MM / 24] * 3)
    data = np.asarray(img.dataobj)
    assert data.max() > 100 and data[:2, :2, :2].mean() < 40
    again = make_dataset(tmp_path / "g", n_per_class=1, dims=3, size=24, splits={"test": 1.0})
    assert _digest(out) == _digest(again)


def test_an_existing_dataset_is_only_replaced_on_request(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "h", n_per_class=1, size=32, splits=None)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_dataset(out, n_per_class=1, size=32)
    make_dataset(out, n_per_class=1, size=32, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not any((out / c).exists() for c in CLASSES)  # the old class-folder layout is gone
    assert len(list(out.rglob("*.png"))) == 3
