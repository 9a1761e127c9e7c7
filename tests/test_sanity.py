"""The sanity gate (medclf.sanity): majority class, thumbnail baseline, cut schedule; --strict; reports."""

from __future__ import annotations

import json

import numpy as np

from medclf import sanity

REFS = {
    "majority": {"class": "benign", "accuracy": 0.70},
    "baseline": {"method": "logistic regression on 256-value thumbnails", "auc": 0.80, "accuracy": 0.75},
}
DONE = {"completed": True, "stop_reason": "completed", "epochs_run": 20, "planned_epochs": 20}


def test_a_clearly_better_model_passes():
    v = sanity.judge({"accuracy": 0.90, "auc": 0.93, "n": 100}, REFS, DONE)
    assert v.passed and not v.warnings


def test_below_the_majority_class_or_the_baseline_or_a_cut_schedule_fails():
    worse = sanity.judge({"accuracy": 0.44, "auc": 0.83, "balanced_accuracy": 0.55, "n": 78}, REFS, DONE)
    assert not worse.passed and "always answering 'benign'" in worse.warnings[0]
    # Above the majority class, but not by more than one standard error (0.70 +- 0.046 at n=100).
    assert not sanity.judge({"accuracy": 0.74, "auc": 0.9, "n": 100}, REFS, DONE).passed
    linear = sanity.judge({"accuracy": 0.90, "auc": 0.79, "n": 100}, REFS, DONE)
    assert not linear.passed and "linear model" in linear.warnings[0]
    cut = {"completed": False, "stop_reason": "time_budget", "epochs_run": 2, "planned_epochs": 20}
    cut["final_lr_factor"] = 0.8
    v = sanity.judge({"accuracy": 0.90, "auc": 0.93, "n": 100}, REFS, cut)
    assert not v.passed and "2 of 20" in v.warnings[0]
    # An early stop is a decision, not a cut.
    early = {**cut, "stop_reason": "early_stop"}
    assert sanity.judge({"accuracy": 0.90, "auc": 0.93, "n": 100}, REFS, early).passed


def test_thumbnails_and_baselines_on_2d_and_3d_rows():
    rng = np.random.default_rng(0)
    assert sanity.thumbnails(rng.random((5, 1, 28, 28)).astype(np.float16), np.arange(5)).shape == (5, 256)
    assert sanity.thumbnails(rng.random((3, 16, 28, 28)), np.arange(3)).shape == (3, 256)
    assert sanity.thumbnails(rng.random((3, 3, 28, 28)), np.arange(3), chunk_bytes=1).shape == (3, 192)
    assert sanity.thumbnails(rng.random((3, 1, 16, 16, 16)), np.array([2, 0])).shape == (2, 64)
    # A bright square marks class 1: the thumbnail baseline finds it, the majority class cannot.
    x = rng.random((200, 1, 16, 16)).astype(np.float32) * 0.2
    y = np.arange(200) % 2
    x[y == 1, :, 4:12, 4:12] += 0.5
    refs = sanity.baselines(x, np.arange(150), np.arange(150, 200), y, ["a", "b"])
    assert refs["majority"]["accuracy"] == 0.5 and refs["baseline"]["auc"] > 0.95


def _noise_npz(path):
    """Pure noise with 85 % of one class: nothing to learn, so no model is clearly above the majority."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 120), ("val", 40), ("test", 40)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 16, 16), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random(n) < 0.15).astype(np.int64).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def test_strict_training_exits_3_with_a_bundle_and_every_report_says_why(tmp_path):
    from typer.testing import CliRunner

    from medclf.cli import app
    from medclf.evaluation.runner import evaluate

    data = _noise_npz(tmp_path / "noise.npz")
    out = tmp_path / "m"
    runner = CliRunner()
    args = [
        "train",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--size",
        "16",
        "--no-progress",
        "--strict",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == sanity.EXIT_CODE, result.output
    assert "WARNING: the sanity check failed" in result.output
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["sanity"]["passed"] is False and manifest["sanity"]["warnings"]
    assert (
        manifest["sanity"]["majority"]["accuracy"] > 0.7 and manifest["sanity"]["baseline"]["auc"] is not None
    )
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "sanity      FAILED" in info.output
    metrics = evaluate(out, data, tmp_path / "ev", progress=False, n_bootstrap=10)
    assert metrics["training_warnings"] == manifest["sanity"]["warnings"]
    report = (tmp_path / "ev" / "report.html").read_text()
    assert "failed its training sanity check" in report and "Sanity gate (validation)" in report


def test_a_passed_gate_without_references_says_what_it_checked():
    from medclf import reporting

    class Lines(reporting.Reporter):
        def __init__(self):
            self.lines = []

        def print(self, *objects, highlight=None, markup=None):
            self.lines += [str(o) for o in objects]

    findings = {"passed": True, "model": {"auc": 0.9}, "majority": {}, "baseline": {"error": "2-D labels"}}
    with reporting.use(Lines()) as rep:
        sanity.render(findings)
        sanity.render({"passed": True, "model": {"accuracy": 0.9, "auc": 0.93}, **REFS})
    assert "the schedule ran as planned" in rep.lines[0] and "n/a" not in rep.lines[0]
    assert "accuracy 0.900 vs 0.700 (majority class), AUC 0.930 vs 0.800" in rep.lines[1]
