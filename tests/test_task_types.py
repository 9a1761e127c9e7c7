"""Multi-label and ordinal building blocks: heads and losses, metrics with (patient) bootstrap intervals, and
the patient-grouped multi-label split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score

from medclf.data.splits import carve_multilabel
from medclf.errors import DataError
from medclf.metrics.classification import compute_metrics
from medclf.metrics.multilabel import choose_thresholds, multilabel_metrics
from medclf.metrics.ordinal import _weighted_qwk, ordinal_metrics
from medclf.metrics.resample import resample_weights, resampling_units, weighted_average_precision
from medclf.models.tasks import (
    MAX_POSITIVE_WEIGHT,
    asymmetric_loss,
    corn_loss,
    corn_probabilities,
    median_grade,
    positive_weights,
    task_head,
)


def _multilabel(n=240, n_labels=4, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < [0.3, 0.15, 0.08, 0.4][:n_labels]).astype(int)
    y[:, 1] |= y[:, 0] & (rng.random(n) < 0.5)  # findings co-occur
    p = np.clip(0.25 + 0.45 * y + 0.3 * rng.standard_normal((n, n_labels)), 0, 1)
    return y, p


# --- resampling -------------------------------------------------------------------------------------------


def test_weighted_average_precision_matches_scikit_learn_row_by_row():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(60), 1)  # ties, as sigmoid outputs of a small model have
    positive = rng.random(60) < 0.3
    w = rng.integers(0, 4, size=(5, 60)).astype(float)
    got = weighted_average_precision(scores, positive, w)
    want = [average_precision_score(positive, scores, sample_weight=row) for row in w]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_patients_images_are_drawn_together():
    units = resampling_units(["a", "a", "b", None, None, "b"], 6)
    for w in resample_weights(units, 50, np.random.default_rng(0)):
        assert (w[:, 0] == w[:, 1]).all() and (w[:, 2] == w[:, 5]).all()
        assert w.sum(axis=1).min() > 0
    with pytest.raises(ValueError, match="patient ids"):
        resampling_units(["a"], 2)


# --- multi-label metrics ----------------------------------------------------------------------------------


def test_multilabel_metrics_agree_with_scikit_learn_and_intervals_hold_the_point():
    y, p = _multilabel()
    names = ["Effusion", "Atelectasis", "Nodule", "Infiltration"]
    m = multilabel_metrics(y, p, names, n_bootstrap=200, seed=0)
    for j, name in enumerate(names):
        entry = m["per_label"][name]
        assert entry["auc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        assert entry["ap"] == pytest.approx(average_precision_score(y[:, j], p[:, j]))
        lo, hi = entry["ci"]["auc"]
        assert lo <= entry["auc"] <= hi
    assert m["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(4)]))
    assert m["micro_auc"] == pytest.approx(roc_auc_score(y.ravel(), p.ravel()))
    assert m["map"] == pytest.approx(np.mean([average_precision_score(y[:, j], p[:, j]) for j in range(4)]))
    assert m["ci"]["macro_auc"][0] <= m["macro_auc"] <= m["ci"]["macro_auc"][1]
    assert any("0.5" in note for note in m["notes"])  # no operating points given: said so


def test_operating_points_come_from_validation_and_are_used_on_test():
    y_val, p_val = _multilabel(seed=2)
    y_test, p_test = _multilabel(seed=3)
    thresholds, notes = choose_thresholds(y_val, p_val, rule="sensitivity", sensitivity=0.9)
    assert not notes
    for j in range(4):  # the highest threshold that keeps validation sensitivity >= 0.9
        pos = y_val[:, j] == 1
        assert (p_val[pos, j] >= thresholds[j]).mean() >= 0.9
        above = p_val[pos, j][p_val[pos, j] > thresholds[j]]
        assert len(above) / pos.sum() < 0.9
    m = multilabel_metrics(y_test, p_test, list("abcd"), thresholds=thresholds, n_bootstrap=0)
    j = 2
    pos = y_test[:, j] == 1
    assert m["per_label"]["c"]["threshold"] == pytest.approx(thresholds[j])
    assert m["per_label"]["c"]["sensitivity"] == pytest.approx((p_test[pos, j] >= thresholds[j]).mean())
    youden, _ = choose_thresholds(y_val, p_val)
    assert youden.shape == (4,) and not np.allclose(youden, 0.5)


def test_a_finding_without_positives_has_no_auc_and_says_so():
    y, p = _multilabel()
    y[:, 2] = 0
    m = multilabel_metrics(
        y, p, list("abcd"), n_bootstrap=50, patient_ids=[str(i // 2) for i in range(len(y))]
    )
    assert m["per_label"]["c"]["auc"] is None and m["per_label"]["c"]["sensitivity"] is None
    assert any(note.startswith("c: no positives") for note in m["notes"])
    assert m["n_patients"] == len(y) // 2 and m["ci"]["unit"] == "patient"
    with pytest.raises(ValueError, match="sigmoid outputs"):
        multilabel_metrics(y, p * 3 - 1, list("abcd"))
    with pytest.raises(ValueError, match="0 or 1"):
        multilabel_metrics(y * 2, p, list("abcd"))


# --- ordinal metrics --------------------------------------------------------------------------------------


def test_ordinal_metrics_median_grade_mae_and_kappa():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    logits = -((np.arange(5)[None, :] - (y + rng.normal(0, 0.8, 300))[:, None]) ** 2)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = ordinal_metrics(y, p, [f"KL{k}" for k in range(5)], n_bootstrap=200)
    grade = median_grade(p)
    assert m["mae"] == pytest.approx(np.abs(grade - y).mean())
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, grade, weights="quadratic"))
    assert m["within_one_accuracy"] >= m["accuracy"]
    assert m["ci"]["qwk"][0] <= m["qwk"] <= m["ci"]["qwk"][1]
    # MedMNIST's figures: macro one-vs-rest AUC and argmax accuracy, as compute_metrics gives them.
    reference = compute_metrics(y, p, [f"KL{k}" for k in range(5)], n_bootstrap=0)
    assert m["auc"] == pytest.approx(reference["auc"]) and m["argmax_accuracy"] == pytest.approx(
        reference["accuracy"]
    )
    assert np.array(m["confusion_matrix"]).sum() == 300


def test_median_grade_is_the_grade_where_the_cumulative_probability_reaches_one_half():
    p = np.array([[0.6, 0.2, 0.2], [0.3, 0.15, 0.55], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0 - 1e-9]])
    assert median_grade(p).tolist() == [0, 2, 1, 2]


def test_weighted_kappa_with_unit_weights_is_cohens_quadratic_kappa():
    rng = np.random.default_rng(4)
    y, g = rng.integers(0, 4, 80), rng.integers(0, 4, 80)
    w = np.vstack([np.ones(80), rng.integers(0, 3, 80)])
    got = _weighted_qwk(y, g, 4, w)
    assert got[0] == pytest.approx(cohen_kappa_score(y, g, weights="quadratic"))
    assert got[1] == pytest.approx(cohen_kappa_score(y, g, weights="quadratic", sample_weight=w[1]))


def test_ordinal_input_is_checked():
    with pytest.raises(ValueError, match="distribution"):
        ordinal_metrics(np.array([0, 1]), np.array([[0.5, 0.6], [0.2, 0.8]]), ["0", "1"])
    with pytest.raises(ValueError, match=r"integers in 0\.\.1"):
        ordinal_metrics(np.array([0, 2]), np.array([[0.5, 0.5], [0.2, 0.8]]), ["0", "1"])


# --- heads and losses -------------------------------------------------------------------------------------


def test_corn_probabilities_are_distributions_with_non_crossing_cumulatives():
    logits = torch.randn(50, 4) * 3
    p = corn_probabilities(logits)
    assert p.shape == (50, 5) and (p >= 0).all()
    torch.testing.assert_close(p.sum(dim=1), torch.ones(50))
    assert task_head("ordinal").outputs(5) == 4 and task_head("multilabel").outputs(14) == 14
    with pytest.raises(ValueError, match="unknown task"):
        task_head("regression")


def test_corn_loss_uses_each_task_on_the_images_past_the_previous_grade():
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.5, -0.5]])
    grades = torch.tensor([0, 2])
    # Image 0 (grade 0) only takes part in task 0 (target 0); image 1 (grade 2) in tasks 0, 1 (target 1) and 2
    # (target 0).
    terms = [
        F.binary_cross_entropy_with_logits(torch.tensor(0.3), torch.tensor(0.0)),
        F.binary_cross_entropy_with_logits(torch.tensor(1.5), torch.tensor(1.0)),
        F.binary_cross_entropy_with_logits(torch.tensor(0.5), torch.tensor(1.0)),
        F.binary_cross_entropy_with_logits(torch.tensor(-0.5), torch.tensor(0.0)),
    ]
    torch.testing.assert_close(corn_loss(logits, grades), torch.stack(terms).mean())


def test_a_linear_corn_head_learns_grades_from_a_latent_severity():
    torch.manual_seed(0)
    x = torch.randn(600, 3)
    severity = x @ torch.tensor([1.5, -1.0, 0.5])
    grades = torch.bucketize(severity, torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    head = torch.nn.Linear(3, 4)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        corn_loss(head(x), grades).backward()
        opt.step()
    predicted = median_grade(corn_probabilities(head(x)).detach().numpy())
    assert np.abs(predicted - grades.numpy()).mean() < 0.3


def test_asymmetric_loss_reduces_to_binary_cross_entropy_without_focusing():
    logits, targets = torch.randn(8, 5), (torch.rand(8, 5) < 0.3).float()
    plain = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1).mean()
    torch.testing.assert_close(
        asymmetric_loss(logits, targets, gamma_neg=0, clip=0), plain, rtol=1e-5, atol=1e-5
    )
    # Focusing: an easy negative (p = 0.02 < clip) contributes nothing.
    easy = asymmetric_loss(torch.tensor([[-4.0]]), torch.tensor([[0.0]]))
    assert float(easy) == 0.0


def test_positive_weights_follow_rarity_within_bounds():
    y = np.zeros((1000, 3), dtype=int)
    y[:100, 0] = 1  # 1 in 10
    y[:2, 1] = 1  # 1 in 500: capped
    w = positive_weights(y)
    assert w[0] == pytest.approx(9.0) and w[1] == MAX_POSITIVE_WEIGHT and w[2] == 1.0


# --- patient-grouped multi-label split --------------------------------------------------------------------


def test_multilabel_split_keeps_patients_together_and_every_finding_near_its_share():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3}" for i in range(900)]  # 3 images per patient
    y, _ = _multilabel(n=900, seed=5)
    y[:, 2] = 0
    y[rng.choice(900, 30, replace=False), 2] = 1  # a rare finding
    held = carve_multilabel(y, patients, 0.2, seed=1)
    held_patients = {patients[i] for i in held}
    kept_patients = {patients[i] for i in set(range(900)) - set(held.tolist())}
    assert not held_patients & kept_patients
    assert abs(len(held) / 900 - 0.2) < 0.03
    for j in range(4):
        share = y[held, j].sum() / y[:, j].sum()
        assert abs(share - 0.2) < 0.08, (j, share)
    assert (carve_multilabel(y, patients, 0.2, seed=1) == held).all()
    with pytest.raises(DataError, match="too few"):
        carve_multilabel(y[:1], [None], 0.2, seed=0)


# --- the task the data declare ----------------------------------------------------------------------------


def _folders(root, names, n=2):
    from PIL import Image

    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), color=10 * i).save(root / name / f"{i}.png")
    return root


def test_grade_folders_are_ordinal_and_ordered_numerically(tmp_path):
    from medclf.data.sources import infer_task, load_source

    grades = load_source(_folders(tmp_path / "kl", [str(k) for k in range(11)]))
    assert grades.task == "ordinal"
    assert grades.classes == [str(k) for k in range(11)]  # "10" after "9", not after "1"
    ten = [i for i, ref in enumerate(grades.refs) if "/10/" in ref]
    assert set(grades.labels[ten].tolist()) == {10}
    named = load_source(_folders(tmp_path / "named", ["glioma", "meningioma", "notumor"]))
    assert named.task == "multiclass" and infer_task(named)[0] == "multiclass"
    assert load_source(tmp_path / "kl", task="multiclass").task == "multiclass"


def test_retinamnist_is_ordinal_and_two_grades_are_refused(tmp_path):
    from medclf.data.sources import load_source
    from medclf.errors import ConfigError

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 5), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 5).reshape(-1, 1)
    np.savez(tmp_path / "retinamnist.npz", **arrays)
    assert load_source(tmp_path / "retinamnist.npz").task == "ordinal"
    with pytest.raises(DataError, match="at least 3"):
        load_source(_folders(tmp_path / "two", ["0", "1"]), task="ordinal")
    with pytest.raises(ConfigError, match="unknown task"):
        load_source(tmp_path / "retinamnist.npz", task="regression")


# --- an ordinal network: CORN outputs behind an ordinary softmax interface --------------------------------


def test_cross_entropy_on_corn_log_probabilities_is_corns_per_image_task_sum():
    from medclf.models.tasks import corn_log_probabilities

    torch.manual_seed(0)
    logits, grades = torch.randn(64, 4) * 2, torch.randint(0, 5, (64,))
    logp = corn_log_probabilities(logits)
    torch.testing.assert_close(logp.exp(), corn_probabilities(logits))
    pairs = sum(min(int(g), 3) + 1 for g in grades)  # image of grade g takes part in tasks 0..min(g, K-2)
    torch.testing.assert_close(F.cross_entropy(logp, grades), corn_loss(logits, grades) * pairs / 64)
    torch.testing.assert_close(torch.softmax(logp, dim=1), logp.exp())  # softmax downstream changes nothing


def test_a_corn_model_keeps_the_plain_networks_weights_names_and_survives_copies_and_export(tmp_path):
    import copy

    import onnxruntime as ort

    from medclf.compress.onnx_export import export_onnx
    from medclf.models import create_model

    torch.manual_seed(0)
    ordinal = create_model("compact", 1, 5, 2, head="corn", width=8).eval()
    plain = create_model("compact", 1, 4, 2, width=8)
    assert list(ordinal.state_dict()) == list(plain.state_dict())
    x = torch.rand(3, 1, 32, 32)
    out = ordinal(x)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(3))
    torch.testing.assert_close(copy.deepcopy(ordinal)(x), out)  # EMA and ensembles deep-copy the model
    export_onnx(ordinal, (1, 32, 32), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, out.detach().numpy(), atol=1e-4)
    from medclf.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 3 grades"):
        create_model("compact", 1, 2, 2, head="corn")
    with pytest.raises(ConfigError, match="unknown output head"):
        create_model("compact", 1, 3, 2, head="sigmoid")


def test_training_on_grades_writes_an_ordinal_bundle_whose_predictions_are_grade_distributions(
    sim_data, tmp_path
):
    from medclf.bundle import load_bundle
    from medclf.training import train

    result = train(
        sim_data,
        tmp_path / "model",
        epochs=2,
        size=32,
        batch_size=16,
        arch="compact-s",
        task="ordinal",
        progress=False,
    )
    b = load_bundle(result.bundle)
    assert b.manifest["task"] == "ordinal" and b.manifest["model"]["kwargs"]["head"] == "corn"
    assert any("CORN head" in reason for reason in result.plan.reasons)
    assert result.plan.class_weights == "none", "grades are learnt at the training prior by default"
    grades = result.val_metrics["ordinal"]
    assert grades["decision_rule"].startswith("median") and 0 <= grades["mae"] <= 2
    x = torch.rand(4, *b.manifest["input"]["shape"])
    with torch.no_grad():
        logp = b.model(x)
    assert logp.shape == (4, 3)
    torch.testing.assert_close(logp.exp().sum(dim=1), torch.ones(4))
    from medclf.api import evaluate, predict

    image = next(p for p in sim_data.rglob("*.png"))
    answer = predict(result.bundle, [image])[0]
    assert answer["grade"]["rule"].startswith("median") and answer["predicted"] == answer["grade"]["grade"]
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    metrics = evaluate(result.bundle, sim_data, tmp_path / "eval", n_bootstrap=50)
    assert metrics["ordinal"]["decision_rule"].startswith("median")
    assert "Grades" in (tmp_path / "eval" / "report.html").read_text()
    plain = train(
        sim_data, tmp_path / "plain", epochs=1, size=32, batch_size=16, arch="compact-s", progress=False
    )
    assert (
        load_bundle(plain.bundle).manifest["task"] == "multiclass" and plain.plan.class_weights == "balanced"
    )
    # Ensembles keep the task (mean of the members' grade distributions), and refuse to mix tasks.
    from medclf.errors import ConfigError
    from medclf.fusion import ensemble

    second = train(
        sim_data, tmp_path / "second", epochs=1, size=32, batch_size=16, arch="compact-s", task="ordinal",
        seed=1, progress=False,
    )  # fmt: skip
    fused = ensemble([result.bundle, second.bundle], tmp_path / "fused", data=sim_data, progress=False)
    assert load_bundle(fused.bundle).manifest["task"] == "ordinal"
    assert "grade" in predict(fused.bundle, [image])[0]
    with pytest.raises(ConfigError, match="share their task"):
        ensemble([result.bundle, plain.bundle], tmp_path / "mixed", data=sim_data, progress=False)
    assert "head" not in load_bundle(plain.bundle).manifest["model"]["kwargs"]
