"""Tests for the split-shift check: a domain classifier per class between train and each other split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medclf.data.audit import audit
from medclf.data.scan import scan
from medclf.data.shift import WARN_AUC, domain_auc, layout_features, split_shift, warn_at
from medclf.data.signatures import SIGNATURE_LEN, image_signature
from medclf.data.sources import load_source
from medclf.io import Image


def scans(n: int, seed: int, *, framed: bool = False, size: int = 28) -> np.ndarray:
    """Smooth random textures (uint8); ``framed``: a darker band down the left edge, as when one site's
    images are framed differently, with nothing else changed."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2.5, 2.5))
    x = (x - x.min(axis=(1, 2), keepdims=True)) / np.ptp(x, axis=(1, 2), keepdims=True)
    if framed:
        x[:, :, : size // 5] *= 0.35
    return (x * 255).astype(np.uint8)


def write_npz(path: Path, n: int, *, shift_test_class0: bool) -> Path:
    """A MedMNIST-style file with two classes (class 1 brighter in the centre) and ``n`` images per class
    and split; optionally the test split's class 0 comes framed differently."""
    arrays = {}
    for k, split in enumerate(("train", "val", "test")):
        parts, labels = [], []
        for c in (0, 1):
            x = scans(n, seed=10 * k + c, framed=shift_test_class0 and split == "test" and c == 0)
            if c == 1:
                x[:, 10:18, 10:18] = np.minimum(255, x[:, 10:18, 10:18].astype(int) + 60).astype(np.uint8)
            parts.append(x)
            labels += [c] * n
        arrays[f"{split}_images"] = np.concatenate(parts)
        arrays[f"{split}_labels"] = np.array(labels)[:, None]
    np.savez(path, **arrays)
    return path


def to_features(x: np.ndarray) -> np.ndarray:
    sigs = [
        image_signature(Image(pixels=v[None].astype(np.float32), spacing=(1.0, 1.0), format="npz")) for v in x
    ]
    return layout_features(np.stack(sigs), np.zeros(len(x), dtype=bool))


def test_domain_auc_is_chance_for_one_distribution_and_high_for_a_shifted_one() -> None:
    a, b = scans(150, 1), scans(150, 2)
    shifted = scans(150, 3, framed=True)
    same, n = domain_auc(to_features(a), to_features(b))
    assert n == 150 and abs(same - 0.5) < 0.12
    differs, _ = domain_auc(to_features(a), to_features(shifted))
    assert differs > 0.9
    # Subsampled to max_per_side from each, so chance stays 0.5 with unequal sides.
    _, n = domain_auc(to_features(a), to_features(b[:50]), max_per_side=40)
    assert n == 40
    with pytest.raises(ValueError, match="at least 5"):
        domain_auc(to_features(a), to_features(b[:3]))


def test_layout_features_pool_2d_and_3d_signatures_to_64_cells() -> None:
    flat = np.zeros((1, SIGNATURE_LEN), np.float32)
    flat[0, :32] = 1.0  # the top row of a 32x32 signature: lands in the top row of 8x8 cells
    vol = np.zeros((1, SIGNATURE_LEN), np.float32)
    vol[0, :256] = 1.0  # the first of 4 slabs of 16x16: lands in the first 4x4 block
    f = layout_features(np.concatenate([flat, vol]), np.array([False, True]))
    assert f.shape == (2, 64)
    assert np.count_nonzero(f[0]) == 8 and np.all(f[0, :8] > 0)
    assert np.count_nonzero(f[1]) == 16 and np.all(f[1, :16] > 0)


def test_split_shift_skips_small_groups_and_orders_val_before_test() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 64)).astype(np.float32)
    splits = ["train"] * 100 + ["test"] * 50 + ["val"] * 50
    labels = np.array(([0] * 50 + [1] * 50) + [0] * 40 + [1] * 10 + [0] * 40 + [1] * 10)
    found = split_shift(feats, splits, labels, np.ones(200, bool), ["a", "b"])
    # Class b has 10 images in val and test: below the minimum, no figure rather than a noisy one.
    assert [(r.split, r.cls) for r in found] == [("val", "a"), ("test", "a")]
    assert all(abs(r.auc - 0.5) < 0.2 and not r.shifted for r in found)


def test_audit_warns_about_a_test_split_from_another_distribution(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "sitemnist.npz", 60, shift_test_class0=True)
    report = audit(load_source(path), workers=1, progress=False)
    results = {(r["split"], r["cls"]): r for r in report.data["split_shift"]["results"]}
    assert set(results) == {("val", "0"), ("val", "1"), ("test", "0"), ("test", "1")}
    assert results[("test", "0")]["shifted"] and results[("test", "0")]["auc"] >= WARN_AUC
    assert not any(r["shifted"] for k, r in results.items() if k != ("test", "0"))
    shift_warnings = [w for w in report.warnings if "differs from train" in w]
    assert len(shift_warnings) == 1 and shift_warnings[0].startswith("test differs from train within class 0")
    assert json.loads(json.dumps(report.to_dict()))["split_shift"]["warn_auc"] == WARN_AUC


def test_audit_without_shift_and_with_shift_check_off(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "samesite.npz", 60, shift_test_class0=False)
    samples = load_source(path)
    sr = scan(samples, workers=1, progress=False)
    report = audit(samples, scan_result=sr, progress=False)
    assert report.data["split_shift"]["results"] and not any(
        r["shifted"] for r in report.data["split_shift"]["results"]
    )
    assert not [w for w in report.warnings if "differs from train" in w]
    assert audit(samples, scan_result=sr, progress=False, check_shift=False).data["split_shift"] is None


def test_warning_bar_is_higher_on_small_sets() -> None:
    assert warn_at(30) == pytest.approx(0.801, abs=1e-3)
    assert warn_at(40) == pytest.approx(0.760, abs=1e-3)
    assert warn_at(68) == WARN_AUC and warn_at(500) == WARN_AUC


def test_split_shift_runs_its_classifiers_on_one_thread_and_shows_progress(monkeypatch) -> None:
    # On a machine where another process holds a core, OpenMP threads waiting for each other made one
    # check ~100x slower (issue 20): the classifiers run with every thread pool limited to one thread.
    from io import StringIO

    from rich.console import Console
    from threadpoolctl import threadpool_info

    import medclf.data.shift as shift
    from medclf import reporting

    seen: list[int] = []
    original = shift.cross_val_predict

    def recording(*args, **kw):
        seen.extend(p["num_threads"] for p in threadpool_info())
        return original(*args, **kw)

    monkeypatch.setattr(shift, "cross_val_predict", recording)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 64))
    splits = ["train"] * 100 + ["test"] * 100
    labels = np.zeros(200, dtype=int)
    buf = StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with reporting.use(reporting.ConsoleReporter(console)):
        found = shift.split_shift(feats, splits, labels, np.ones(200, bool), ["a"], progress=True)
    assert len(found) == 1 and seen and set(seen) == {1}
    assert "split shift check" in buf.getvalue()
