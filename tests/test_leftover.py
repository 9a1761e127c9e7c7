"""The leftover budget never destroys work: extra members share the first member's plan, and when they
cannot be fused the best single member is kept."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medclf import budget, folds, planner
from medclf.api import load_bundle
from medclf.training import selection


@pytest.fixture
def quick_leftover(monkeypatch):
    """Make the leftover-members path run in seconds: validation AUC falls after the first epoch (so
    every run stops early after `patience` epochs), fusion needs little time, at most 2 members."""
    calls = itertools.count()
    monkeypatch.setattr(selection, "_auc", lambda y, p, k: 0.9 - 0.01 * next(calls))
    monkeypatch.setattr(budget, "LEFTOVER_FUSION_S", 1.0)
    monkeypatch.setattr(folds, "MAX_LEFTOVER_MEMBERS", 2)


def _volumes_npz(path, n_train=48, side=16):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("val", 16), ("test", 8)):
        labels = np.arange(n) % 2
        vols = rng.integers(0, 120, (n, side, side, side), dtype=np.uint8)
        vols[labels == 1, 4:12, 4:12, 4:12] += 100  # a bright cube: something to learn
        arrays[f"{split}_images"] = vols
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def test_3d_data_whose_plan_fell_back_to_2_5d_ends_with_a_fused_bundle(tmp_path, monkeypatch, quick_leftover):
    """The reported failure: the planner chose 2.5D, early stopping left time, the leftover members were
    planned alone, came out 3D, and fusing them failed: no bundle at all after the whole budget."""

    # A machine on which 3D is far too slow for the budget and 2D fast at the native 16 px (no real timing).
    def measured(plan, size, arch_kwargs, **kw):
        if plan.spec.spatial_dims == 3:
            return 0.5
        return 2000.0 if size <= 16 else 1.0

    monkeypatch.setattr(planner, "measure_throughput", measured)
    data = _volumes_npz(tmp_path / "vol.npz")
    out = tmp_path / "model"
    result = folds.train(data, out, time_budget="40s", patience=2, batch_size=8, progress=False)
    assert result.stop_reason == "early_stop" and result.leftover_failure is None
    b = load_bundle(out)
    assert b.arch == "ensemble" and len(b.manifest["ensemble"]["members"]) == 2
    assert b.spec.spatial_dims == 2 and b.spec.slices_as_channels  # 2.5D, as the first member
    assert "sanity" in b.manifest
    # The fused bundle still says how its members were fine-tuned (here: from scratch, no probe).
    assert b.manifest["leftover"]["first_member"]["linear_probe"] == 0.0
    vol = np.random.default_rng(1).integers(0, 255, (16, 16, 16), dtype=np.uint8)
    assert "predicted" in b.predict([vol])[0]


def test_when_fusion_fails_the_best_single_member_is_kept(sim_data, tmp_path, monkeypatch, quick_leftover):
    import medclf.fusion

    monkeypatch.setattr(planner, "measure_throughput", lambda *a, **k: 2000.0)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated fusion failure")

    monkeypatch.setattr(medclf.fusion, "ensemble", broken)
    out = tmp_path / "model"
    kw = dict(size=24, arch="compact-s", batch_size=16, patience=2, progress=False)
    result = folds.train(sim_data, out, time_budget="40s", **kw)
    assert result.leftover_failure and "simulated fusion failure" in result.leftover_failure
    b = load_bundle(out)  # verified: a whole bundle, not a half-written one
    assert b.arch == "compact-s"
    leftover = b.manifest["leftover"]
    assert leftover["members"] == 2 and "simulated fusion failure" in leftover["failure"]
    assert leftover["kept"] in ("member-0", "member-1")
    assert not out.with_name("model.folds").exists()


def test_an_extra_member_is_priced_at_the_time_the_first_took_to_reach_its_best_epoch():
    """Not at its whole run: the epochs spent waiting out the patience bought nothing."""
    history = [{"seconds": 10.0} for _ in range(40)]  # best at epoch 10, stopped at 40
    assert folds.leftover_member_seconds(history, best_epoch=10) == pytest.approx(100 * 1.15 + 5)
    assert folds.leftover_member_seconds(history, best_epoch=40) == pytest.approx(400 * 1.15 + 5)
    assert folds.leftover_member_seconds([], best_epoch=0) == pytest.approx(1.15 + 5)
