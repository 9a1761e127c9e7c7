"""Fusion: an ensemble is a bundle like any other; what is fitted comes from validation only; K-fold bagging."""

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from medclf.api import load_bundle
from medclf.bundle import zip_bundle
from medclf.data.cache import prepare
from medclf.data.simulate import make_dataset
from medclf.data.sources import load_source
from medclf.errors import ConfigError, DataError
from medclf.evaluation.runner import evaluate
from medclf.folds import train_folds
from medclf.fusion import ensemble, fit_stacking, fit_weights, member_validation_splits
from medclf.metrics.calibration import apply_temperature
from medclf.models.ensemble import LOG_FLOOR
from medclf.training import train

from .inprocess import run_medclf

TINY = dict(epochs=2, batch_size=16, arch="compact-s", progress=False)


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    """Simulated MRI with a validation split of its own (~22 samples), shared by all members."""
    splits = {"train": 0.55, "val": 0.25, "test": 0.2}
    return make_dataset(tmp_path_factory.mktemp("fusion") / "data", n_per_class=30, size=64, splits=splits)


@pytest.fixture(scope="module")
def members(val_data, tmp_path_factory):
    """Three tiny members with different seeds; the third at a smaller input size."""
    root = tmp_path_factory.mktemp("members")
    return [
        train(val_data, root / f"m{seed}", size=size, seed=seed, **TINY).bundle
        for seed, size in ((0, 32), (1, 32), (2, 24))
    ]


def _val_rows(data, spec):
    """The validation samples minus copies of training samples, computed without medclf.fusion."""
    samples = load_source(data, default_split="train")
    prepared = prepare(samples, spec, progress=False)
    rows = prepared.ok & (np.array(samples.splits) == "val") & (samples.labels >= 0) & ~prepared.train_copy
    return np.flatnonzero(rows), samples, prepared


def test_mean_ensemble_averages_the_members(members, val_data, tmp_path):
    result = ensemble(members[:2], tmp_path / "mean", data=val_data, method="mean", progress=False)
    b = load_bundle(result.bundle)
    parts = [load_bundle(m) for m in members[:2]]
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    average = np.mean([p.predict_tensors(x) for p in parts], axis=0)
    assert np.abs(b.predict_tensors(x, calibrated=False) - average).max() < 1e-6
    # The ensemble's own temperature, fitted on the shared validation samples, acts on top.
    assert result.n_fit >= 20 and b.temperature == pytest.approx(result.temperature)
    assert np.abs(b.predict_tensors(x) - apply_temperature(np.log(average), b.temperature)).max() < 1e-6

    m = b.manifest
    assert m["model"]["arch"] == "ensemble" and m["ensemble"]["method"] == "mean"
    assert m["ensemble"]["weights"] == pytest.approx([0.5, 0.5])
    assert [r["sha256"] for r in m["ensemble"]["members"]] == [p.sha256 for p in parts]
    assert m["ensemble"]["fit_set"]["n"] == result.n_fit == m["metrics"]["val"]["n"]
    assert all(r["val"]["n"] == result.n_fit for r in m["ensemble"]["members"])
    assert {"ece", "ece_uncalibrated", "temperature"} <= set(m["metrics"]["val"])
    # Training samples of every member are known to `evaluate`.
    train_hashes = set().union(*(json.loads((p.path / "train_hashes.json").read_text()) for p in parts))
    assert set(json.loads((b.path / "train_hashes.json").read_text())) == train_hashes
    # ... and so are their signatures (near copies), the same row for the same training image.
    from medclf.data.references import read_train_references

    fused = read_train_references(b.path, m["files"]).by_hash
    for p in parts:
        for h, sig in read_train_references(p.path, p.manifest["files"]).by_hash.items():
            np.testing.assert_array_equal(fused[h], sig)


def test_an_ensemble_is_a_bundle_like_any_other(members, val_data, tmp_path):
    result = ensemble(members, tmp_path / "weighted", data=val_data, method="weighted", progress=False)
    w = np.array(result.weights)
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-6)
    b = load_bundle(zip_bundle(result.bundle))
    assert np.allclose(b.model.weights.numpy(), w, atol=1e-7)
    assert b.spec.size == (32, 32), "the input has the largest member size; smaller members resample it"
    assert b.manifest["ensemble"]["input_resampling"]

    metrics = evaluate(b, val_data, tmp_path / "eval", n_bootstrap=20, progress=False, tta=True)
    assert metrics["n"] > 0 and 0 <= metrics["auc"] <= 1 and metrics["tta"]["transforms"]
    assert (tmp_path / "eval" / "report.html").read_text().count("Ensemble members") == 1
    files = sorted((val_data / "test" / "oedema").glob("*.png"))[:2]
    answers = b.predict(files)
    assert [a["path"] for a in answers] == [str(f) for f in files]
    assert all(abs(sum(a["probabilities"].values()) - 1) < 1e-9 for a in answers)
    # An ensemble has its own out-of-distribution guard, like any bundle.
    assert b.manifest["ood"]["version"] == 2 and all("ood" in a and "ood_score" in a for a in answers)
    noise = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    assert b.predict([noise])[0]["ood"] is True


def test_weights_minimise_validation_log_loss():
    rng = np.random.default_rng(0)
    good = rng.uniform(0.7, 1.0, 200)  # probability of the true class, member by member
    poor = rng.uniform(0.0, 0.6, 200)
    w = fit_weights(np.stack([poor, good, poor[::-1]]))
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all() and w[1] > 0.9
    same = fit_weights(np.stack([good, good]))
    assert same == pytest.approx([0.5, 0.5], abs=1e-3)


def test_stacking_is_fitted_on_validation_predictions_only(members, val_data, tmp_path, monkeypatch):
    seen = []
    original = LogisticRegression.fit

    def spy(self, x, y, *args, **kwargs):
        seen.append((np.array(x), np.array(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    result = ensemble(members[:2], tmp_path / "stack", data=val_data, method="stacking", progress=False)
    monkeypatch.undo()
    b = load_bundle(result.bundle)

    rows, samples, prepared = _val_rows(val_data, b.spec)
    assert len(seen) == 1
    x_fit, y_fit = seen[0]
    assert np.array_equal(y_fit, samples.labels[rows]), "exactly the validation samples, in order"
    # Refit independently on the members' own validation predictions: the same meta-learner.
    features = np.concatenate(
        [
            np.maximum(np.log(load_bundle(m).predict_tensors(prepared.tensors[rows])), LOG_FLOOR)
            for m in members[:2]
        ],
        axis=1,
    )
    assert np.allclose(features, x_fit, atol=1e-4)
    ref = original(LogisticRegression(C=1.0, max_iter=5000, random_state=0), features, samples.labels[rows])
    assert np.allclose(b.model.stack.weight.detach().numpy(), ref.coef_, atol=1e-3)
    assert np.allclose(b.manifest["ensemble"]["stacking"]["coef"], ref.coef_, atol=1e-3)
    with torch.no_grad():
        fused = b.model(torch.from_numpy(np.asarray(prepared.tensors[rows], dtype=np.float32)))
    assert np.allclose(torch.softmax(fused, dim=1).numpy(), ref.predict_proba(features), atol=1e-4)


@pytest.mark.parametrize("k", [2, 3])
def test_stacking_layer_reproduces_the_meta_learner(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 300)
    # Two members of different skill: log-probabilities of noisy one-hot scores.
    logits = [np.eye(k)[y] * s + rng.normal(size=(300, k)) for s in (2.0, 0.5)]
    lp = np.stack([lg - np.log(np.exp(lg).sum(axis=1, keepdims=True)) for lg in logits])
    coef, intercept = fit_stacking(lp, y, n_classes=k)
    assert coef.shape == (k, 2 * k) and intercept.shape == (k,)
    ref = LogisticRegression(C=1.0, max_iter=5000, random_state=0).fit(
        lp.transpose(1, 0, 2).reshape(300, -1), y
    )
    layer = torch.nn.Linear(2 * k, k)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(coef))
        layer.bias.copy_(torch.from_numpy(intercept))
        mine = torch.softmax(layer(torch.from_numpy(lp.transpose(1, 0, 2).reshape(300, -1)).float()), dim=1)
    assert np.allclose(mine.numpy(), ref.predict_proba(lp.transpose(1, 0, 2).reshape(300, -1)), atol=1e-5)
    assert abs(coef).sum() > 1.0, "informative members get non-zero weights"


def test_refusals(members, val_data, sim_data, tmp_path):
    with pytest.raises(ConfigError, match="at least two"):
        ensemble(members[:1], tmp_path / "e", data=val_data)
    with pytest.raises(ConfigError, match="same bundle"):
        ensemble([members[0], members[0]], tmp_path / "e", data=val_data)
    with pytest.raises(ConfigError, match="unknown fusion method"):
        ensemble(members[:2], tmp_path / "e", data=val_data, method="vote")
    with pytest.raises(DataError, match="not the training split"):
        ensemble(members[:2], tmp_path / "e", data=sim_data, progress=False)
    with pytest.raises(ConfigError, match="use --fusion mean"):
        train_folds(sim_data, tmp_path / "f", folds=2, method="weighted", **TINY)
    assert not (tmp_path / "e").exists()


def test_k_fold_bagging_gives_one_ensemble_bundle(sim_data, tmp_path):
    out = tmp_path / "bagged"
    result = train_folds(sim_data, out, folds=2, size=32, keep_checkpoints=True, **TINY)
    b = load_bundle(result.bundle)
    fusion = b.manifest["ensemble"]
    assert b.arch == "ensemble" and len(fusion["members"]) == 2 and fusion["method"] == "mean"
    assert [r["val_fold"] for r in fusion["members"]] == [[0, 2], [1, 2]]
    # The folds partition the training split: no shared validation samples, so no ensemble temperature.
    samples = load_source(sim_data, default_split="train")
    folds = [
        np.array(member_validation_splits(samples, load_bundle(out.with_name("bagged.folds") / f"fold-{k}")))
        for k in range(2)
    ]
    train_split = np.array(samples.splits) == "train"
    assert ((folds[0] == "val") ^ (folds[1] == "val") == train_split).all()
    assert (
        result.n_fit == 0
        and b.temperature == 1.0
        and "0 validation samples shared" in b.manifest["calibration"]["note"]
    )
    oof = b.manifest["metrics"]["out_of_fold"]
    assert oof["n"] == int(train_split.sum()) and "out-of-fold" in oof["note"]
    # Weighting needs validation samples no member trained on.
    with pytest.raises(DataError, match="--method mean"):
        ensemble(
            [out.with_name("bagged.folds") / f"fold-{k}" for k in range(2)],
            tmp_path / "w",
            data=sim_data,
            method="weighted",
            progress=False,
        )
    # Resuming reuses the finished members, and the members' folder goes once the ensemble exists.
    again = train_folds(sim_data, out, folds=2, size=32, resume=True, **TINY)
    assert load_bundle(again.bundle).manifest["ensemble"]["members"] == fusion["members"]
    assert not out.with_name("bagged.folds").exists()


def test_seed_bagging_shares_one_validation_split(sim_data, tmp_path):
    from medclf.folds import train_members

    out = tmp_path / "seeds"
    result = train_members(sim_data, out, members=2, size=32, keep_checkpoints=True, **TINY)
    b = load_bundle(result.bundle)
    fusion = b.manifest["ensemble"]
    assert b.arch == "ensemble" and len(fusion["members"]) == 2 and fusion["method"] == "mean"
    runs = b.manifest["recipe"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and b.manifest["recipe"]["bagging"] == "seeds"
    # Each member's run and fine-tuning schedule outlive the members' folder (from scratch: no probe).
    for r, m in zip(runs, [out.with_name("seeds.folds") / f"member-{k}" for k in range(2)], strict=True):
        member_recipe = load_bundle(m).manifest["recipe"]
        assert r["epochs_run"] == len(load_bundle(m).manifest["history"]) >= 1
        assert r["best_epoch"] <= r["epochs_run"] and r["stop_reason"] and r["linear_probe"] == 0
        assert r["backbone_lr"] == member_recipe["backbone_lr"]
    member_dirs = [out.with_name("seeds.folds") / f"member-{k}" for k in range(2)]
    recipes = [load_bundle(m).manifest["recipe"] for m in member_dirs]
    assert [r["seed"] for r in recipes] == [0, 1] and {r["split_seed"] for r in recipes} == {0}
    samples = load_source(sim_data, default_split="train")
    splits = [member_validation_splits(samples, load_bundle(m)) for m in member_dirs]
    # One validation split: fusion weights or a meta-learner can be fitted on samples no member trained on.
    assert splits[0] == splits[1]
    assert result.n_fit == sum(s == "val" for s in splits[0]) > 0
    with pytest.raises(ConfigError, match="--members must be at least 2"):
        train_members(sim_data, tmp_path / "one", members=1, **TINY)


def test_command_line(members, val_data, tmp_path):
    def medclf(*args):
        proc = run_medclf(*args)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    out = tmp_path / "cli-ensemble"
    proc = medclf(
        "ensemble", *members[:2], "--data", val_data, "--out", out, "--method", "stacking", "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    card = (out / "MODEL_CARD.md").read_text()
    assert "Ensemble (stacking) of 2 members" in card and "## Evaluation" in card
    files = sorted((val_data / "test" / "tumour").glob("*.png"))[:2]
    proc = medclf("predict", out, *files, "--tta")
    assert proc.returncode == 0, proc.stderr
    assert [r["path"] for r in json.loads(proc.stdout)] == [str(f) for f in files]
