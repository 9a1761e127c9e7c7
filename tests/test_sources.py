"""Data sources and validation splits."""

import numpy as np
import pytest
from PIL import Image as PILImage

from medclf.data.sources import fingerprint_files, load_source
from medclf.data.splits import carve, ensure_validation
from medclf.errors import DataError


def _png(path, value=0, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    PILImage.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)


def test_class_folders(tmp_path):
    for cls in ("b_cls", "a_cls"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png")
    (tmp_path / "a_cls" / "notes.txt").write_text("not an image")
    (tmp_path / "a_cls" / ".hidden.png").write_bytes(b"x")
    s = load_source(tmp_path)
    assert s.classes == ["a_cls", "b_cls"] and len(s) == 6
    assert set(s.splits) == {"train"} and s.kind == "folder"
    assert load_source(tmp_path, default_split="test").splits[0] == "test"
    assert s.display_ref(0) == "a_cls/0.png"


def test_split_folders_any_case(tmp_path):
    for split in ("Training", "Testing"):
        for cls in ("x", "y"):
            _png(tmp_path / split / cls / "1.png")
    s = load_source(tmp_path)
    assert s.splits == ["train", "train", "test", "test"]
    assert s.summary() == {"train": {"x": 1, "y": 1}, "test": {"x": 1, "y": 1}}


def test_csv_manifest_with_patients(tmp_path):
    rows = ["path,label,patient_id,split"]
    for i in range(6):
        _png(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{'sick' if i % 2 else 'well'},p{i // 2},{'test' if i == 5 else 'train'}")
    (tmp_path / "m.csv").write_text("\n".join(rows))
    s = load_source(tmp_path / "m.csv")
    assert s.classes == ["sick", "well"] and s.patient_ids[0] == "p0" and s.splits[5] == "test"
    assert s.load(0).pixels.shape[1:] == (16, 16)


def test_csv_extra_columns_become_metadata(tmp_path):
    rows = ["path,label,Site,scanner"]
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png")
        rows.append(
            f"img/{i}.png,{'sick' if i % 2 else 'well'},{'A' if i < 2 else 'B'},{'' if i == 3 else 'GE'}"
        )
    (tmp_path / "m.csv").write_text("\n".join(rows))
    s = load_source(tmp_path / "m.csv")
    assert s.metadata == {"site": ["A", "A", "B", "B"], "scanner": ["GE", "GE", "GE", ""]}
    assert s.subset([3, 0]).metadata == {"site": ["B", "A"], "scanner": ["", "GE"]}
    assert load_source(tmp_path / "img" / "..").metadata == {}  # folders carry none


def test_csv_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="path,label"):
        load_source(tmp_path / "bad.csv")
    (tmp_path / "split.csv").write_text("path,label,split\na.png,x,holdout\n")
    with pytest.raises(DataError, match="unknown split"):
        load_source(tmp_path / "split.csv")
    with pytest.raises(DataError, match="no such file"):
        load_source(tmp_path / "missing")


def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 10), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    p = tmp_path / "pneumoniamnist.npz"
    np.savez(p, **arrays)
    s = load_source(p)
    assert s.classes == ["normal", "pneumonia"] and len(s) == 20 and s.refs[10] == "val/0"
    img = s.load(0)
    assert img.pixels.shape == (1, 28, 28)
    assert s.content_hash(0) != s.content_hash(1)
    fp = fingerprint_files(s)
    assert fp == fingerprint_files(load_source(p)) and fp != fingerprint_files(s.subset(range(5)))


def test_a_2d_npz_label_array_that_is_not_multi_hot_is_refused(tmp_path):
    # 2-D label arrays are multi-label findings (tests/test_multilabel.py); they must be 0/1.
    p = tmp_path / "chestmnist.npz"
    np.savez(p, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.full((3, 14), 2))
    with pytest.raises(DataError, match="0/1 findings"):
        load_source(p)


def test_carve_is_stratified_seeded_and_grouped():
    labels = np.array([0] * 80 + [1] * 20)
    a = carve(labels, [None] * 100, 0.2, seed=1)
    assert np.array_equal(a, carve(labels, [None] * 100, 0.2, seed=1))
    assert len(a) == 20 and (labels[a] == 1).sum() == 4
    pids = [f"p{i // 4}" for i in range(100)]
    held = set(carve(labels, pids, 0.2, seed=0).tolist())
    for p in set(pids):
        members = {i for i, q in enumerate(pids) if q == p}
        assert members <= held or not (members & held), "a patient was split across train and val"


def test_ensure_validation(tmp_path):
    for cls in ("x", "y"):
        for i in range(10):
            _png(tmp_path / cls / f"{i}.png")
    s = ensure_validation(load_source(tmp_path), fraction=0.2, seed=0)
    assert s.splits.count("val") == 4 and s.class_counts("val") == {"x": 2, "y": 2}


def test_special_files_are_listed_as_unreadable_not_skipped(tmp_path):
    """A FIFO (opening it would block), a dangling link and a looping link are audited, never hang."""
    import os

    import medclf

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            PILImage.fromarray((rng.random((32, 32)) * 255).astype("uint8")).save(tmp_path / c / f"{i}.png")
    os.mkfifo(tmp_path / "a" / "fifo.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "b" / "dangling.png")
    os.symlink(tmp_path / "b" / "loop.png", tmp_path / "b" / "loop.png")
    report = medclf.audit(tmp_path, progress=False).to_dict()
    reasons = {r["ref"]: r["reason"] for r in report["unreadable"]}
    assert reasons == {
        "a/fifo.png": "not_a_file",
        "b/dangling.png": "not_found",
        "b/loop.png": "symlink_loop",
    }
