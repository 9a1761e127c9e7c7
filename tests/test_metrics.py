"""compute_metrics: definitions against scikit-learn, hand-computed cases, bootstrap CIs, degenerate inputs."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medclf.metrics.classification import compute_metrics, expected_calibration_error, weighted_auc


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _noisy(n: int, k: int, signal: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities whose true class gets ``signal`` extra logit."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += signal
    return y, _softmax(z)


def _from_predictions(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    probs = np.full((len(pred), k), 0.2 / (k - 1))
    probs[np.arange(len(pred)), pred] = 0.8
    return probs


def test_perfect_classifier():
    y, _ = _noisy(300, 3, 0.0)
    probs = _from_predictions(y, y, 3)
    m = compute_metrics(y, probs, ["a", "b", "c"], n_bootstrap=100)
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["auc"] == 1.0
    assert m["ci"]["accuracy"] == [1.0, 1.0] and m["ci"]["auc"] == [1.0, 1.0]
    assert all(v["sensitivity"] == 1.0 and v["specificity"] == 1.0 for v in m["per_class"].values())
    assert m["ece"] == pytest.approx(0.2)  # always right at confidence 0.8


def test_random_classifier_auc_is_one_half():
    y, probs = _noisy(6000, 4, 0.0)
    m = compute_metrics(y, probs, list("abcd"), n_bootstrap=200)
    assert m["auc"] == pytest.approx(0.5, abs=0.03)
    assert m["accuracy"] == pytest.approx(0.25, abs=0.03)
    assert m["ci"]["auc"][0] < 0.5 < m["ci"]["auc"][1]


def test_binary_auc_is_auc_of_class_one():
    y, probs = _noisy(500, 2, 1.0)
    m = compute_metrics(y, probs, ["benign", "malignant"], n_bootstrap=0)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-12)
    # One-vs-rest of either class is the same ranking, so both per-class AUCs equal the binary AUC.
    assert m["per_class"]["benign"]["auc"] == pytest.approx(m["auc"])
    assert m["per_class"]["malignant"]["auc"] == pytest.approx(m["auc"])


def test_multiclass_auc_is_medmnist_macro_one_vs_rest():
    y, probs = _noisy(800, 4, 1.0, seed=3)
    m = compute_metrics(y, probs, list("abcd"), n_bootstrap=0)
    per = [roc_auc_score(y == c, probs[:, c]) for c in range(4)]  # MedMNIST's getAUC loop
    assert m["auc"] == pytest.approx(np.mean(per), abs=1e-12)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert [m["per_class"][c]["auc"] for c in "abcd"] == pytest.approx(per)


def test_per_class_figures_on_a_hand_computed_confusion_matrix():
    # True class 0: 5 right, 1 as class 1; class 1: 2 as 0, 6 right, 2 as 2; class 2: 1 as 1, 3 right.
    cm = np.array([[5, 1, 0], [2, 6, 2], [0, 1, 3]])
    y = np.repeat([0, 0, 1, 1, 1, 2, 2], [5, 1, 2, 6, 2, 1, 3])
    pred = np.repeat([0, 1, 0, 1, 2, 1, 2], [5, 1, 2, 6, 2, 1, 3])
    m = compute_metrics(y, _from_predictions(y, pred, 3), ["x", "y", "z"], n_bootstrap=0)
    assert m["confusion_matrix"] == cm.tolist()
    assert m["n"] == 20 and m["accuracy"] == pytest.approx(14 / 20)
    pc = m["per_class"]
    # class x: TP 5, FN 1, FP 2, TN 20 - 6 - 2 = 12
    assert pc["x"]["sensitivity"] == pytest.approx(5 / 6)
    assert pc["x"]["specificity"] == pytest.approx(12 / 14)
    assert pc["x"]["precision"] == pytest.approx(5 / 7)
    assert pc["x"]["f1"] == pytest.approx(2 * 5 / (2 * 5 + 2 + 1))
    # class y: TP 6, FN 4, FP 2, TN 8; class z: TP 3, FN 1, FP 2, TN 14
    assert pc["y"]["sensitivity"] == pytest.approx(6 / 10)
    assert pc["y"]["specificity"] == pytest.approx(8 / 10)
    assert pc["z"]["specificity"] == pytest.approx(14 / 16)
    assert [pc[c]["support"] for c in "xyz"] == [6, 10, 4]
    assert m["balanced_accuracy"] == pytest.approx((5 / 6 + 6 / 10 + 3 / 4) / 3)


def test_binary_decision_is_argmax_with_ties_to_class_zero():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.5, 0.5], [0.49, 0.51], [0.6, 0.4], [0.2, 0.8]])
    m = compute_metrics(y, probs, ["neg", "pos"], n_bootstrap=0)
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]


def test_ece_hand_computed():
    # Four samples at confidence 0.9 (one bin), two right: |0.5 - 0.9| = 0.4.
    probs = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(np.array([0, 0, 1, 1]), probs) == pytest.approx(0.4)


def test_ece_small_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    p1 = rng.random(20000)
    y = (rng.random(20000) < p1).astype(int)  # labels drawn from the stated probabilities
    calibrated = np.c_[1 - p1, p1]
    assert expected_calibration_error(y, calibrated) < 0.02
    sharp = calibrated**6
    sharp /= sharp.sum(axis=1, keepdims=True)
    assert expected_calibration_error(y, sharp) > 0.1
    m = compute_metrics(y, calibrated, ["a", "b"], n_bootstrap=0)
    assert m["ece"] == pytest.approx(expected_calibration_error(y, calibrated))


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    widths = {}
    for n in (200, 5000):
        y, probs = _noisy(n, 3, 1.0, seed=n)
        m = compute_metrics(y, probs, ["a", "b", "c"], n_bootstrap=300, seed=1)
        for key in ("accuracy", "auc", "balanced_accuracy"):
            lo, hi = m["ci"][key]
            assert lo <= m[key] <= hi, (n, key)
        widths[n] = {k: m["ci"][k][1] - m["ci"][k][0] for k in ("accuracy", "auc")}
        assert m["ci"]["n_bootstrap"] == 300 and m["ci"]["level"] == 0.95
    for key in ("accuracy", "auc"):
        # The width goes as 1/sqrt(n): 25x the samples, ~1/5 the width.
        assert widths[5000][key] < 0.35 * widths[200][key]


def test_weighted_auc_matches_sklearn_with_ties_and_repeats():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 1)  # many ties
    positive = rng.random(300) < 0.3
    weights = rng.integers(0, 4, size=(20, 300))
    expected = [roc_auc_score(positive, scores, sample_weight=w) for w in weights]
    assert weighted_auc(scores, positive, weights) == pytest.approx(expected, abs=1e-12)
    no_pos = np.where(positive, 0, 1)[None, :]
    assert np.isnan(weighted_auc(scores, positive, no_pos)[0])


def test_deterministic_for_a_seed():
    y, probs = _noisy(300, 3, 1.0)
    a = compute_metrics(y, probs, ["a", "b", "c"], n_bootstrap=200, seed=7)
    b = compute_metrics(y, probs, ["a", "b", "c"], n_bootstrap=200, seed=7)
    c = compute_metrics(y, probs, ["a", "b", "c"], n_bootstrap=200, seed=8)
    assert json.dumps(a) == json.dumps(b)
    assert a["ci"] != c["ci"]


def test_json_serialisable_plain_types():
    y, probs = _noisy(200, 3, 1.0)
    m = compute_metrics(y.astype(np.int32), probs.astype(np.float32), ["a", "b", "c"], n_bootstrap=50)
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m

    def walk(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and walk(x) for k, x in v.items())
        if isinstance(v, list):
            return all(walk(x) for x in v)
        return v is None or type(v) in (int, float, str, bool)

    assert walk(m)


def test_float32_softmax_gives_no_warnings():
    y, probs = _noisy(300, 4, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics(y, probs.astype(np.float32), list("abcd"), n_bootstrap=20)


def test_absent_class():
    y, probs = _noisy(600, 4, 1.0)
    keep = y != 2
    y, probs = y[keep], probs[keep]
    m = compute_metrics(y, probs, list("abcd"), n_bootstrap=100)
    assert m["per_class"]["c"]["auc"] is None
    assert m["per_class"]["c"]["sensitivity"] is None and m["per_class"]["c"]["support"] == 0
    present = [roc_auc_score(y == c, probs[:, c]) for c in (0, 1, 3)]
    assert m["auc"] == pytest.approx(np.mean(present))
    assert any("absent" in n and "c" in n for n in m["notes"])
    assert m["ci"]["auc"] is not None and m["ci"]["n_bootstrap"] == 100
    json.dumps(m, allow_nan=False)


def test_single_class_present_has_no_auc():
    y = np.zeros(50, dtype=int)
    probs = _softmax(np.random.default_rng(0).normal(size=(50, 2)))
    m = compute_metrics(y, probs, ["neg", "pos"], n_bootstrap=50)
    assert m["auc"] is None and m["ci"]["auc"] is None
    assert m["ci"]["accuracy"] is not None
    assert any("AUC is undefined" in n for n in m["notes"])
    json.dumps(m, allow_nan=False)


def test_rare_class_resamples_are_skipped_and_counted():
    y, probs = _noisy(60, 3, 1.0)
    y[:] = np.where(y == 2, 0, y)
    y[0] = 2  # a single sample of class 2: ~37% of resamples miss it
    m = compute_metrics(y, probs, ["a", "b", "c"], n_bootstrap=200)
    assert 0 < m["ci"]["n_bootstrap"] < 200
    assert any("skipped" in n for n in m["notes"])


def test_invalid_inputs():
    with pytest.raises(ValueError, match="zero samples"):
        compute_metrics(np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.array([0, 1]), np.full((2, 3), 1 / 3), ["a", "b"])
    with pytest.raises(ValueError, match="lie in"):
        compute_metrics(np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"])
    with pytest.raises(ValueError, match="logits"):
        compute_metrics(np.array([0, 1]), np.array([[2.0, -1.0], [0.3, 0.1]]), ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        compute_metrics(np.array([0, 1]), np.full((2, 2), 0.5), ["a", "a"])
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(np.array([0, 1]), np.array([[np.nan, 0.5], [0.5, 0.5]]), ["a", "b"])


def test_bootstrap_is_fast():
    y, probs = _noisy(1300, 4, 1.0)
    compute_metrics(y[:50], probs[:50], list("abcd"), n_bootstrap=10)  # warm-up imports
    t = time.perf_counter()
    compute_metrics(y, probs, list("abcd"), n_bootstrap=1000)
    # ~0.2 s on one core; generous bound for a loaded shared machine.
    assert time.perf_counter() - t < 3.0
