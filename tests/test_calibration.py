"""Temperature scaling: the fit, what training stores, what evaluate reports."""

import json
import shutil

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from medclf.api import load_bundle
from medclf.bundle import update_bundle
from medclf.data.cache import prepare
from medclf.data.sources import load_source
from medclf.evaluation.plots import plot_reliability
from medclf.evaluation.runner import evaluate
from medclf.metrics.calibration import (
    MIN_SAMPLES,
    T_BOUNDS,
    apply_temperature,
    fit_temperature,
    fit_temperature_from_probs,
)
from medclf.metrics.classification import expected_calibration_error


def _calibrated_sample(n=20000, k=4, seed=0):
    """Logits z and labels drawn from softmax(z): z is perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, k))
    p = softmax(z, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return z, y


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_a_known_temperature(true_t):
    z, y = _calibrated_sample()
    # A network whose logits are z * T is over- (T > 1) or under-confident (T < 1) by exactly T.
    fit = fit_temperature(z * true_t, y)
    assert fit.temperature == pytest.approx(true_t, rel=0.05)
    assert fit.nll_after < fit.nll_before
    assert fit.ece_after < fit.ece_before
    assert fit.n == len(y) and fit.note is None


def test_log_probabilities_are_as_good_as_logits():
    z, y = _calibrated_sample(n=4000, seed=1)
    z = 3.0 * z
    from_logits = fit_temperature(z, y).temperature
    from_probs = fit_temperature_from_probs(softmax(z, axis=1), y).temperature
    assert from_probs == pytest.approx(from_logits, rel=1e-3)
    # softmax(log_softmax(z) / T) == softmax(z / T): the per-row constant cancels.
    assert np.allclose(apply_temperature(log_softmax(z, axis=1), 1.7), apply_temperature(z, 1.7), atol=1e-12)


def test_degenerate_validation_leaves_temperature_one():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 2))
    y = z.argmax(axis=1)
    fit = fit_temperature(z, y)  # no errors: the NLL falls forever as T -> 0
    assert fit.temperature == 1.0 and "no validation errors" in fit.note
    y[:5] = 1 - y[:5]
    assert fit_temperature(z, y).temperature != 1.0
    few = fit_temperature(z[: MIN_SAMPLES - 1], y[: MIN_SAMPLES - 1])
    assert few.temperature == 1.0 and "too few" in few.note
    empty = fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int))
    assert empty.temperature == 1.0 and empty.n == 0
    # Pure noise: the best temperature flattens everything, at most to the upper bound.
    noise = fit_temperature(rng.normal(size=(500, 3)) * 5, rng.integers(0, 3, 500))
    assert 1.0 < noise.temperature <= T_BOUNDS[1]


def test_scaling_lowers_ece_of_a_miscalibrated_network():
    # Simulated network outputs: 3 classes, overconfident by a factor 3, on a validation set of 300.
    z, y = _calibrated_sample(n=300, k=3, seed=3)
    fit = fit_temperature(3.0 * z, y)
    assert fit.ece_after <= fit.ece_before / 2
    # ... and what it learnt carries over to unseen samples of the same network.
    z_new, y_new = _calibrated_sample(n=5000, k=3, seed=4)
    before = expected_calibration_error(y_new, softmax(3.0 * z_new, axis=1))
    after = expected_calibration_error(y_new, apply_temperature(3.0 * z_new, fit.temperature))
    assert after < before / 2


def test_training_stores_the_fit(tiny_bundle):
    m = load_bundle(tiny_bundle).manifest
    cal, val = m["calibration"], m["metrics"]["val"]
    assert T_BOUNDS[0] <= cal["temperature"] <= T_BOUNDS[1]
    assert cal["n"] == val["n"] and cal["nll_after"] <= cal["nll_before"]
    assert val["temperature"] == cal["temperature"]
    # The validation figures are those of the calibrated model.
    assert val["ece"] == pytest.approx(cal["ece_after"], abs=1e-6)
    assert val["ece_uncalibrated"] == pytest.approx(cal["ece_before"], abs=1e-6)
    if cal["n"] < MIN_SAMPLES:  # the fixture's validation split holds 8 samples
        assert cal["temperature"] == 1.0 and "too few" in cal["note"]


def test_evaluate_reports_ece_before_and_after(tiny_bundle, sim_data, tmp_path):
    # A copy of the fixture with a temperature set (its own validation split is too small to fit one).
    shutil.copytree(tiny_bundle, tmp_path / "model")
    b = load_bundle(update_bundle(tmp_path / "model", {"calibration": {"temperature": 2.5}}))
    metrics = evaluate(b, sim_data, tmp_path / "eval", n_bootstrap=50, progress=False)
    assert metrics["temperature"] == pytest.approx(b.temperature)
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["ece_uncalibrated"] == metrics["ece_uncalibrated"]

    samples = load_source(sim_data, default_split="test")
    prepared = prepare(samples, b.spec, progress=False)
    test = np.flatnonzero(np.array(samples.splits) == "test")
    x = np.asarray(prepared.tensors[test])
    y = samples.labels[test]
    before = b.predict_tensors(x, calibrated=False)
    after = b.predict_tensors(x)
    everything = metrics["all_samples"]
    assert everything["n"] == len(test)
    assert everything["ece_uncalibrated"] == pytest.approx(expected_calibration_error(y, before), abs=1e-9)
    assert everything["ece"] == pytest.approx(expected_calibration_error(y, after), abs=1e-9)
    assert not np.allclose(before, after)
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "ECE before temperature scaling" in html and "Temperature (fitted on validation)" in html


def test_reliability_diagram_draws_both_curves(tmp_path):
    z, y = _calibrated_sample(n=2000, seed=2)
    sharp = softmax(3 * z, axis=1)
    one = plot_reliability(y, softmax(z, axis=1), tmp_path / "one.png")
    both = plot_reliability(
        y, softmax(z, axis=1), tmp_path / "both.png", uncalibrated_probs=sharp, temperature=3.0
    )
    assert one.stat().st_size > 0 and both.read_bytes() != one.read_bytes()
