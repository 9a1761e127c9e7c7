"""Tests for the dataset audit: decoding pass, signatures, duplicates, leakage flags and the report."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from rich.console import Console
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from medclf.data import scan as scan_mod
from medclf.data import signatures as signatures_mod
from medclf.data.audit import audit
from medclf.data.samples import SampleSet
from medclf.data.scan import scan, train_copy_flags
from medclf.data.signatures import NEAR_THRESHOLD, SIGNATURE_LEN, find_duplicates, image_signature, nearest
from medclf.data.sources import load_source
from medclf.io import Image

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def texture(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random texture in 0..255: structure like a scan, different for every seed."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=size / 16)
    x = (x - x.min()) / (x.max() - x.min())
    return (x * 255).astype(np.uint8)


def save(arr: np.ndarray, path: Path, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(arr).save(path, **kw)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Train/test class folders holding every kind of problem the audit must find, and clean images."""
    root = tmp_path / "data"
    tr, te = root / "train", root / "test"
    orig = save(texture(0), tr / "a" / "t0.png")
    save(texture(1), tr / "a" / "t1.jpg", quality=95)
    save(texture(2), tr / "b" / "t2.png")
    save(texture(3), tr / "b" / "t3.png")
    # The same picture under two classes (a label conflict inside train).
    save(texture(6), tr / "a" / "t6.png")
    shutil.copyfile(tr / "a" / "t6.png", tr / "b" / "t6_again.png")
    (tr / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    # Test: a byte copy, a re-encoded JPEG, a resized copy, and two genuinely new images.
    (te / "a").mkdir(parents=True)
    shutil.copyfile(orig, te / "a" / "copy_of_t0.png")
    save(texture(1), te / "a" / "t1_q50.jpg", quality=50)
    save(
        np.asarray(PILImage.fromarray(texture(2)).resize((48, 48), PILImage.BILINEAR)), te / "b" / "t2_48.png"
    )
    save(texture(4), te / "a" / "new4.png")
    save(texture(5), te / "b" / "new5.png")
    return root


def by_name(samples: SampleSet) -> dict[str, int]:
    return {Path(r).name: i for i, r in enumerate(samples.refs)}


# --------------------------------------------------------------------------------------------------
# Signatures and the pure duplicate functions
# --------------------------------------------------------------------------------------------------


def test_signature_is_normalised_and_invariant_to_intensity_scale() -> None:
    px = texture(0).astype(np.float32)[None]
    s1 = image_signature(Image(px, (1.0, 1.0), "png"))
    s2 = image_signature(Image(px * 3.0 + 10.0, (1.0, 1.0), "png"))
    rgb = image_signature(Image(np.repeat(px, 3, axis=0), (1.0, 1.0), "png"))
    assert s1.dtype == np.float32 and s1.shape == (SIGNATURE_LEN,)
    assert abs(float(np.linalg.norm(s1)) - 1.0) < 1e-5 and abs(float(s1.sum())) < 1e-3
    assert float(s1 @ s2) > 0.9999 and float(s1 @ rgb) > 0.9999


def test_signature_of_constant_image_and_volume() -> None:
    flat = image_signature(Image(np.full((1, 40, 30), 7.0, np.float32), (1.0, 1.0), "png"))
    assert not flat.any()
    vol = np.random.default_rng(0).normal(size=(1, 12, 20, 20)).astype(np.float32)
    sig = image_signature(Image(vol, (1.0, 1.0, 1.0), "nifti"))
    assert sig.shape == (SIGNATURE_LEN,) and abs(float(np.linalg.norm(sig)) - 1.0) < 1e-5


def test_find_duplicates_exact_near_and_flags() -> None:
    rng = np.random.default_rng(1)
    sig = rng.normal(size=(6, SIGNATURE_LEN)).astype(np.float32)
    sig[3] = sig[2] + 0.01 * rng.normal(size=SIGNATURE_LEN)  # a near copy of 2
    sig -= sig.mean(axis=1, keepdims=True)
    sig /= np.linalg.norm(sig, axis=1, keepdims=True)
    sig[5] = 0  # constant image: never a near duplicate
    hashes = ["h0", "h0", "h2", "h3", None, "h5"]
    ok = np.array([True, True, True, True, False, True])
    groups = find_duplicates(
        hashes,
        sig,
        ok,
        near_threshold=0.99,
        splits=["train", "test", "train", "val", "test", "val"],
        labels=[0, 1, 0, 0, 1, 1],
    )
    kinds = {(g.kind, tuple(g.members)) for g in groups}
    assert kinds == {("exact", (0, 1)), ("near", (2, 3))}
    exact = next(g for g in groups if g.kind == "exact")
    near = next(g for g in groups if g.kind == "near")
    assert exact.crosses_splits and exact.label_conflict and exact.splits == ["train", "test"]
    assert near.crosses_splits and not near.label_conflict


def test_near_components_in_blocks_match_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=(60, 64))
    # Chains of small perturbations, so components span several blocks.
    rows = [base[i // 4] + 0.08 * rng.normal(size=64) * (i % 4) for i in range(240)]
    x = np.array(rows, dtype=np.float32)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x[rng.permutation(len(x))]
    thr = 0.97
    sims = x @ x.T
    r, c = np.nonzero(sims >= thr)
    _, want = connected_components(coo_matrix((np.ones(len(r)), (r, c)), shape=(240, 240)), directed=False)
    # Tiny blocks and a tiny edge budget: exercises the blockwise product and the folding of edges.
    monkeypatch.setattr(signatures_mod, "_BLOCK_ELEMENTS", 16 * 240)
    monkeypatch.setattr(signatures_mod, "_MAX_PENDING_EDGES", 5)
    got = signatures_mod.near_components(x, np.ones(240, bool), thr)
    # Same partition, whatever the label numbering.
    assert len(set(zip(got.tolist(), want.tolist(), strict=True))) == len(set(want.tolist()))
    assert len(set(got.tolist())) == len(set(want.tolist())) < 240
    best, arg = nearest(x[:5], x[5:])
    assert np.allclose(best, sims[:5, 5:].max(axis=1), atol=1e-5) and (arg == sims[:5, 5:].argmax(1)).all()


# --------------------------------------------------------------------------------------------------
# The decoding pass and the report on real files
# --------------------------------------------------------------------------------------------------


def test_scan_and_audit_find_every_planted_problem(folder: Path, tmp_path: Path) -> None:
    samples = load_source(folder)
    idx = by_name(samples)
    sr = scan(samples, workers=2, progress=False)
    assert len(sr) == len(samples)
    broken = idx["broken.png"]
    assert not sr.ok[broken] and sr.reasons[broken] and sr.messages[broken]
    assert sr.ok.sum() == len(samples) - 1  # the scan went on past the corrupt file
    assert sr.shapes[idx["t2_48.png"]] == (48, 48) and sr.channels[idx["t0.png"]] == 1
    assert np.isfinite(sr.stats[idx["t0.png"]]).all() and np.isnan(sr.stats[broken]).all()

    flags = train_copy_flags(samples, sr)
    flagged = {Path(samples.refs[i]).name for i in np.flatnonzero(flags)}
    assert flagged == {"copy_of_t0.png", "t1_q50.jpg", "t2_48.png"}
    # Copies correlate far above the threshold and new images far below it: the test has margin.
    _, _, best = scan_mod.train_copy_matches(samples, sr)
    assert best[idx["t1_q50.jpg"]] > 0.999 and best[idx["t2_48.png"]] > 0.999
    assert best[idx["new4.png"]] < 0.9 and best[idx["new5.png"]] < 0.9

    report = audit(samples, scan_result=sr)
    d = report.to_dict()
    json.dumps(d)  # JSON-serialisable as is
    assert d["counts"]["train"] == {"a": 3, "b": 4} and d["counts"]["test"] == {"a": 3, "b": 2}
    assert [u["ref"] for u in d["unreadable"]] == ["train/b/broken.png"]
    dup = d["duplicates"]
    assert dup["exact_groups"] == 2 and dup["exact_cross_split_groups"] == 1
    assert dup["near_groups"] == 2 and dup["near_cross_split_groups"] == 2
    assert d["train_copies"]["per_split"]["test"] == {"of": 5, "exact": 1, "near_only": 2, "total": 3}
    conflicts = d["label_conflicts"]
    assert len(conflicts) == 1 and sorted(conflicts[0]["refs"]) == ["train/a/t6.png", "train/b/t6_again.png"]
    assert conflicts[0]["classes"] == ["a", "b"]
    assert d["sizes"]["2d"]["min"] == [48, 48] and d["sizes"]["2d"]["max"] == [64, 64]
    assert sorted(d["formats"].values()) == [2, 9]  # 9 PNG, 2 JPEG (the corrupt file is not counted)
    text = " ".join(d["warnings"])
    assert "3 of 5 test samples are copies of training samples" in text and "cannot be used" in text

    console = Console(record=True, width=140)
    report.render(console)
    out = console.export_text()
    assert "Samples per class and split" in out and "test copies of train" in out and "Warnings" in out
    path = report.write_json(tmp_path / "out" / "audit.json")
    assert json.loads(path.read_text())["duplicates"]["exact_groups"] == 2


def _double(image: Image) -> np.ndarray:
    return image.pixels * 2.0


class _BuggySet(SampleSet):
    """A source whose reader has a bug on one file."""

    def load(self, i: int) -> Image:
        if self.refs[i].endswith("new5.png"):
            raise ZeroDivisionError("oops")
        return super().load(i)


def test_scan_workers_extra_and_reader_bugs(folder: Path) -> None:
    samples = load_source(folder)
    buggy = _BuggySet(**{f: getattr(samples, f) for f in samples.__dataclass_fields__})
    one = scan(buggy, workers=1, extra=_double, progress=False)
    two = scan(buggy, workers=2, extra=_double, progress=False)
    bad = by_name(samples)["new5.png"]
    for sr in (one, two):
        assert sr.reasons[bad] == "reader_error" and "ZeroDivisionError" in (sr.messages[bad] or "")
        assert sr.extra is not None and sr.extra[bad] is None
    assert one.hashes == two.hashes and np.array_equal(one.ok, two.ok)
    assert np.allclose(one.signatures, two.signatures)
    good = int(np.flatnonzero(one.ok)[0])
    assert two.extra is not None
    assert np.array_equal(two.extra[good], buggy.load(good).pixels * 2.0)
    assert sum(x is not None for x in two.extra) == int(two.ok.sum())


def test_npz_source_and_extra_train_hashes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    imgs = np.stack([texture(100 + i, 28) for i in range(14)])
    train, val, test = imgs[:8], imgs[8:11], imgs[11:].copy()
    test[0] = train[5]  # an official-split leak, as pneumoniamnist has between train and val
    path = tmp_path / "toymnist.npz"
    np.savez(
        path,
        train_images=train,
        train_labels=rng.integers(0, 2, (8, 1)),
        val_images=val,
        val_labels=rng.integers(0, 2, (3, 1)),
        test_images=test,
        test_labels=rng.integers(0, 2, (3, 1)),
    )
    samples = load_source(path)
    sr = scan(samples, workers=2, progress=False)
    assert sr.ok.all() and sr.shapes[0] == (28, 28)
    flags = train_copy_flags(samples, sr)
    assert [samples.refs[i] for i in np.flatnonzero(flags)] == ["test/0"]
    assert not flags[samples.indices("train")].any()

    # Without the training split (e.g. evaluating a bundle), exact matching uses the stored hashes.
    held_out = samples.subset(samples.indices("test"))
    sr_test = scan(held_out, workers=1, progress=False)
    train_hashes = {h for i in samples.indices("train") if (h := sr.hashes[i]) is not None}
    assert not train_copy_flags(held_out, sr_test).any()
    got = train_copy_flags(held_out, sr_test, extra_train_hashes=train_hashes)
    assert got.tolist() == [True, False, False]
    sigs = sr.signatures[samples.indices("train")]
    assert train_copy_flags(held_out, sr_test, extra_train_signatures=sigs).tolist() == [True, False, False]


# --------------------------------------------------------------------------------------------------
# Real data (slow; run with MEDCLF_SLOW=1)
# --------------------------------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.skipif(os.environ.get("MEDCLF_SLOW") != "1", reason="slow real-data audit: set MEDCLF_SLOW=1")
def test_brain_tumor_mri_known_duplicates() -> None:
    root = DATASETS / "brain-tumor-mri"
    if not root.is_dir():
        pytest.skip(f"{root} is absent (shared datasets not available)")
    samples = load_source(root)
    report = audit(samples, progress=False)
    d = report.to_dict()
    # Published defect: 194 byte-identical groups, 79 across Training/Testing, 103 test files in Training.
    assert d["duplicates"]["exact_groups"] == 194
    assert d["duplicates"]["exact_cross_split_groups"] == 79
    test = d["train_copies"]["per_split"]["test"]
    assert test["exact"] == 103
    # About 480 test images are the same picture as a Training image (dataset notes).
    assert 450 <= test["total"] <= 520
    assert d["near_threshold"] == NEAR_THRESHOLD
