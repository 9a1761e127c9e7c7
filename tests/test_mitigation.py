"""Shortcut check inside training and the mitigation it switches on (medclf.mitigation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medclf.errors import ConfigError
from medclf.mitigation import check_mode, group_balance_weights
from tests.test_shortcuts import confounded_dataset

from .inprocess import run_medclf


def test_group_balance_weights_balance_groups_within_each_class():
    labels = np.array([0] * 10 + [1] * 6)
    groups = ["a"] * 8 + ["b"] * 2 + ["a"] * 3 + ["b"] * 3
    full = group_balance_weights(labels, groups, power=1.0)
    # Within class 0 both groups now weigh the same; class totals keep their sizes (10 and 6).
    assert full[:8].sum() == pytest.approx(full[8:10].sum())
    assert full[:10].sum() == pytest.approx(10 * full.mean()) and full[10:].sum() == pytest.approx(
        6 * full.mean()
    )
    assert np.allclose(full[10:], full[10])  # class 1 was balanced already
    tempered = group_balance_weights(labels, groups)
    assert 1 < tempered[8] / tempered[0] < full[8] / full[0]
    assert np.allclose(group_balance_weights(labels, groups, power=0.0), 1.0)


def test_mitigation_mode_is_checked():
    assert check_mode("auto") == "auto"
    with pytest.raises(ConfigError, match="--shortcut-mitigation must be one of auto, on, off"):
        check_mode("maybe")


@pytest.fixture(scope="module")
def confounded(tmp_path_factory):
    return confounded_dataset(tmp_path_factory.mktemp("confounded") / "data", n=30)


def test_training_flags_the_confound_and_switches_the_mitigation_on(confounded, tmp_path):
    from medclf.training import train

    result = train(
        confounded, tmp_path / "m", epochs=2, size=32, batch_size=16, arch="compact-s", progress=False
    )
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    sc = manifest["shortcuts"]
    assert sc["checked"] and sc["flagged"] and sc["mitigation"] == "on" and sc["mode"] == "auto"
    assert set(sc["per_class"]) == {"normal", "tumour"} and sc["per_class"]["tumour"]["auc"] >= 0.75
    assert sc["balance_by"] and sc["balance_by"][0] in sc["flagged_keys"]
    recipe = manifest["recipe"]
    assert recipe["augment"].endswith("+decue") and recipe["shortcut_mitigation"] == "on"
    assert any("shortcut mitigation on" in r for r in result.plan.reasons)
    card = (result.bundle / "MODEL_CARD.md").read_text()
    assert "possible shortcut" in card and "learn the source instead of the disease" in card

    from medclf.evaluation.runner import evaluate

    evaluate(result.bundle, confounded, tmp_path / "eval", split="test", progress=False)
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "Shortcut check (training data)" in html and "possible shortcut" in html


def test_mitigation_off_still_warns_but_changes_nothing(confounded, tmp_path):
    from medclf.training import train

    result = train(
        confounded,
        tmp_path / "m",
        epochs=1,
        size=32,
        batch_size=16,
        arch="compact-s",
        augment="light",
        shortcut_mitigation="off",
        progress=False,
    )
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    assert manifest["shortcuts"]["flagged"] and manifest["shortcuts"]["mitigation"] == "off"
    assert manifest["recipe"]["augment"] == "light" and manifest["recipe"]["balance_by"] == []


def test_unflagged_data_trains_as_before(tiny_bundle):
    manifest = json.loads((tiny_bundle / "bundle.json").read_text())
    sc = manifest["shortcuts"]
    assert sc["checked"] and not sc["flagged"] and sc["mitigation"] == "off"
    assert "decue" not in manifest["recipe"]["augment"]


def test_cli_refuses_an_unknown_mitigation_mode_in_one_line(sim_data, tmp_path):
    proc = run_medclf("train", sim_data, "--out", tmp_path / "b", "--shortcut-mitigation", "maybe")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--shortcut-mitigation must be one of" in proc.stderr
