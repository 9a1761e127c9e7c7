"""Training end to end on simulated data: bundle, determinism, resume, planner, time budget parsing."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medclf import training
from medclf.api import load_bundle
from medclf.errors import ConfigError
from medclf.training import TrainConfig, parse_duration, train


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("10m") == 600 and parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400 and parse_duration(45) == 45 and parse_duration("120") == 120
    for bad in ("ten minutes", "10x", "-5", "0"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_config_file_and_unknown_settings(tmp_path):
    (tmp_path / "c.json").write_text('{"epochs": 3, "time_budget": "2m"}')
    cfg = TrainConfig.from_file(tmp_path / "c.json")
    assert cfg.epochs == 3 and cfg.time_budget == 120
    (tmp_path / "c.toml").write_text("[train]\narch = 'resnet18'\n")
    assert TrainConfig.from_file(tmp_path / "c.toml").arch == "resnet18"
    (tmp_path / "bad.json").write_text('{"epoch": 3}')
    with pytest.raises(ConfigError, match="unknown training settings: epoch"):
        TrainConfig.from_file(tmp_path / "bad.json")


def test_bundle_from_training(tiny_bundle):
    b = load_bundle(tiny_bundle)
    m = b.manifest
    assert b.classes == ["normal", "oedema", "tumour"]
    assert b.spec.size == (32, 32) and m["model"]["arch"] == "compact-s"
    assert m["recipe"]["epochs_run"] == 2 and len(m["history"]) == 2
    assert 0.0 <= m["metrics"]["val"]["auc"] <= 1.0
    assert "train_hashes.json" in m["files"]
    assert not tiny_bundle.with_name(tiny_bundle.name + ".ckpt").exists(), "checkpoints are cleaned up"


def test_same_seed_same_weights(sim_data, tmp_path):
    kw = dict(epochs=2, size=24, batch_size=16, arch="compact-s", progress=False, seed=3)
    a = train(sim_data, tmp_path / "a", **kw)

    def on_epoch(row, model, plan):  # the loop's epoch hook adds to the history, never changes training
        torch.rand(8)
        return {"seen": row["epoch"]}

    b = train(sim_data, tmp_path / "b", epoch_callback=on_epoch, **kw)
    assert [h["seen"] for h in b.history] == [1, 2] and "seen" not in a.history[0]
    wa, wb = _weights(a.bundle), _weights(b.bundle)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(sim_data, tmp_path / "c", **{**kw, "seed": 4})
    assert not all(torch.equal(wa[k], _weights(c.bundle)[k]) for k in wa)


@pytest.mark.parametrize("mix", [None, "cutmix"])
def test_resume_after_interruption_matches_uninterrupted_run(sim_data, tmp_path, monkeypatch, mix):
    kw = dict(epochs=4, size=24, batch_size=16, arch="compact-s", progress=False, seed=1, ema=False, mix=mix)
    full = train(sim_data, tmp_path / "full", **kw)
    recipe = json.loads((full.bundle / "bundle.json").read_text())["recipe"]
    assert (recipe["mix"], recipe["mix_alpha"]) == (("cutmix", 1.0) if mix else ("none", 0.0))

    calls = {"n": 0}
    original = training.Loop.train_epoch

    def crash_in_third_epoch(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self)

    monkeypatch.setattr(training.Loop, "train_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(sim_data, tmp_path / "part", **kw)
    ckpt = tmp_path / "part.ckpt"
    assert (ckpt / "last.safetensors").exists() and not (tmp_path / "part").exists()
    monkeypatch.setattr(training.Loop, "train_epoch", original)
    resumed = train(sim_data, tmp_path / "part", resume=True, **kw)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert np.allclose([h["loss"] for h in resumed.history], [h["loss"] for h in full.history], rtol=1e-5)
    wf, wr = _weights(full.bundle), _weights(resumed.bundle)
    assert all(torch.allclose(wf[k].float(), wr[k].float(), atol=1e-6) for k in wf)


def test_resume_without_checkpoint_is_a_clear_error(sim_data, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(sim_data, tmp_path / "x", resume=True, epochs=1, progress=False)


def test_planner_fits_the_time_budget(sim_data, tmp_path, capsys):
    result = train(sim_data, tmp_path / "planned", time_budget="40s", progress=False)
    # medclf.training.train makes one model; medclf.train (medclf.folds.train) bags the time left.
    assert not result.members and load_bundle(result.bundle).arch != "ensemble"
    plan = result.plan
    assert plan.spec.size[0] <= 64 and plan.epochs >= 1
    assert plan.throughput and plan.throughput > 0
    assert result.seconds < 40 * 1.25
    assert any("img/s measured" in r for r in plan.reasons)


def _shapes_dataset(root, n_per_class=50, size=32, seed=0):
    """Discs vs rings of equal brightness at random places on noise: needs spatial features to tell apart."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", n_per_class), ("test", n_per_class // 2)):
        for cls in ("disc", "ring"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                cy, cx = rng.uniform(9, size - 9, 2)
                r = np.hypot(yy - cy, xx - cx)
                shape = (r < 6) if cls == "disc" else ((r > 4) & (r < 7))
                img = 0.2 + 0.1 * rng.standard_normal((size, size)) + rng.uniform(0.4, 0.7) * shape
                PILImage.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
                    root / split / cls / f"{i}.png"
                )
    return root


def test_learns_a_spatial_task(tmp_path):
    from medclf.evaluation.runner import evaluate

    data = _shapes_dataset(tmp_path / "d")
    res = train(data, tmp_path / "m", epochs=30, size=32, progress=False)
    metrics = evaluate(res.bundle, data, tmp_path / "eval", progress=False)
    assert metrics["auc"] > 0.9 and metrics["accuracy"] > 0.8, metrics


def test_3d_volumes_train_3d_networks_without_flags(tmp_path):
    from medclf.data.simulate import make_dataset

    data = make_dataset(tmp_path / "vol", n_per_class=4, dims=3, size=24, seed=2)
    res = train(data, tmp_path / "m3d", epochs=1, progress=False, time_budget="60s")
    b = load_bundle(res.bundle)
    assert b.spec.spatial_dims == 3 and b.manifest["model"]["spatial_dims"] == 3
    assert len(b.spec.size) == 3
    out = b.predict(sorted((data / "test").rglob("*.nii.gz"))[:2])
    assert all("predicted" in r for r in out)


def test_3d_npz_and_csv_manifest_with_patients(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 16, 16, 16), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(tmp_path / "vol3d.npz", **arrays)
    # size 16: the planner would upsample these 16^3 volumes to 64^3, 64 times the voxels, for nothing here
    res = train(tmp_path / "vol3d.npz", tmp_path / "npz3d", epochs=1, size=16, progress=False)
    assert load_bundle(res.bundle).spec.spatial_dims == 3

    from PIL import Image as PILImage

    rows = ["path,label,patient_id"]
    for i in range(24):
        PILImage.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'a' if i % 2 else 'b'},p{i // 2}")
    (tmp_path / "m.csv").write_text("\n".join(rows))
    res = train(tmp_path / "m.csv", tmp_path / "csvm", epochs=1, size=16, progress=False)
    assert load_bundle(res.bundle).classes == ["a", "b"]


def test_time_left_after_an_early_stop_trains_more_members(sim_data, tmp_path):
    """A small dataset converges early: the rest of the budget becomes more members of a mean ensemble
    (medclf.train, that is medclf.folds.train; medclf.training.train makes one model)."""
    from medclf.folds import train as train_with_leftover

    out = tmp_path / "auto"
    kw = dict(size=32, arch="compact-s", batch_size=16, patience=2, progress=False)
    result = train_with_leftover(sim_data, out, time_budget="45s", **kw)
    assert result.stop_reason == "early_stop"
    b = load_bundle(out)
    assert b.arch == "ensemble" and b.manifest["ensemble"]["method"] == "mean"
    assert len(b.manifest["ensemble"]["members"]) >= 2
    assert "early stop" in b.manifest["recipe"]["bagging"]
    assert result.seconds < 45 * 1.25
    assert not out.with_name("auto.folds").exists()
    # members=1 keeps a single model, as does a fixed number of epochs.
    single = train_with_leftover(sim_data, tmp_path / "one", time_budget="45s", members=1, **kw)
    assert single.stop_reason == "early_stop" and load_bundle(single.bundle).arch == "compact-s"


def test_class_weights_are_balanced_or_left_to_the_prior():
    from medclf.models import create_model
    from medclf.planner import Plan
    from medclf.preprocess import PreprocessSpec
    from medclf.schedule import Schedule
    from medclf.training.optimisation import build_optimisation

    labels = np.array([0] * 6 + [1] * 3 + [2])
    plan = Plan(
        arch="compact-s", arch_kwargs={}, spec=PreprocessSpec(size=(16, 16)), batch_size=4, epochs=1,
        lr=1e-3, weight_decay=0.0, augment="none", amp="off", channels_last=False, ema=False, patience=0,
        label_smoothing=0.0,
    )  # fmt: skip
    assert plan.class_weights == "balanced", "bundles made before the setting were balanced"

    def weights(plan):
        model = create_model("compact-s", 1, 3, 2)
        opt = build_optimisation(
            model, [], plan, Schedule(3, 1, 1), labels, 3, multilabel_loss=None, device="cpu"
        )
        return opt.class_weights

    assert weights(plan).tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])  # n / (K n_c)
    plan.class_weights = "none"
    assert weights(plan) is None
    assert Plan.from_dict(plan.to_dict()).class_weights == "none"
    assert TrainConfig().updated({"class_weights": "none"}).overrides()["class_weights"] == "none"
    with pytest.raises(ConfigError, match="--class-weights must be balanced or none"):
        TrainConfig().updated({"class_weights": "inverse"})
