"""MODEL_CARD.md: every bundle writer produces one from its manifest, with the sections users expect."""

from __future__ import annotations

from medclf.bundle import load_bundle
from medclf.compress.pipeline import export_bundle
from medclf.model_card import MODEL_CARD, model_card

SECTIONS = (
    "## Intended use",
    "## Model",
    "## Data",
    "## Evaluation",
    "## Shortcut check",
    "## Subgroups",
    "## Out-of-distribution guard",
    "## Limitations",
)


def _manifest(**extra):
    m = {
        "model": {"arch": "compact", "kwargs": {}, "spatial_dims": 2},
        "classes": ["normal", "tumour"],
        "input": {"shape": [1, 32, 32]},
        "data": {"source": "brain", "kind": "folder", "counts": {"train": {"normal": 10, "tumour": 12}}},
        "recipe": {"time_budget_s": 600, "seconds": 590, "epochs_run": 7, "best_epoch": 6,
                   "schedule": {"mode": "clock", "planned_epochs": 7, "completed": True}},
        "metrics": {"val": {"n": 40, "accuracy": 0.9, "auc": 0.95, "balanced_accuracy": 0.88,
                            "ci": {"accuracy": [0.8, 0.97], "auc": [0.9, 0.99], "level": 0.95},
                            "per_class": {"normal": {"support": 20, "sensitivity": 0.9, "specificity": 0.85,
                                                     "auc": 0.95}}}},
        "sanity": {"passed": True, "majority": {"class": "tumour", "accuracy": 0.55}, "baseline": {"accuracy": 0.7}},
        "ood": {"method": "mahalanobis", "threshold": 3.2},
    }  # fmt: skip
    m.update(extra)
    return m


def test_the_card_has_every_section_and_the_figures_with_intervals():
    card = model_card(_manifest())
    positions = [card.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert "Not for diagnosis" in card
    assert "Accuracy 0.900 (0.800-0.970)" in card and "AUC 0.950 (0.900-0.990)" in card
    assert "| normal | 20 | 0.900 | 0.850 | 0.950 |" in card
    assert "Sanity gate: passed" in card and "majority class (tumour) accuracy 0.550" in card
    assert "completed (learning rate annealed)" in card and "threshold 3.200" in card


def test_warnings_reach_the_card():
    card = model_card(
        _manifest(
            sanity={"passed": False, "warnings": ["no better than the majority class"], "majority": {}},
            shortcuts={
                "checked": True,
                "flagged": True,
                "threshold": 0.8,
                "flagged_keys": ["size"],
                "per_class": {"normal": {"auc": 0.99, "ci": [0.97, 1.0], "flagged": True, "cues": ["width"]}},
                "mitigation": "on",
            },
            recipe={"schedule": {"mode": "clock", "completed": False}, "time_budget_s": 120},
        )
    )
    assert "**Sanity gate FAILED**" in card and "no better than the majority class" in card
    assert "possible shortcut" in card and "cue-only AUC 0.990 (95% CI 0.970-1.000) **flagged**" in card
    assert "medclf evaluate BUNDLE DATA --by size" in card
    assert "cut before it annealed" in card
    assert "may have learnt the source" in card.split("## Limitations")[1]


def test_a_manifest_with_missing_sections_still_gives_a_card():
    card = model_card({"classes": ["a", "b"]})
    assert (
        all(s in card for s in ("## Intended use", "## Limitations"))
        and "n/a" not in card.split("# Model")[0]
    )


def test_training_and_export_write_their_own_card(tiny_bundle, tmp_path):
    trained = load_bundle(tiny_bundle)
    card = trained.read_file(MODEL_CARD).decode()
    assert all(s in card for s in SECTIONS) and str(trained.manifest["metrics"]["val"]["n"]) in card
    exported = export_bundle(tiny_bundle, tmp_path / "onnx", onnx=True, progress=False).bundle
    card = load_bundle(exported).read_file(MODEL_CARD).decode()
    assert "Compressed from bundle " + trained.sha256[:12] in card


def test_info_prints_the_card(tiny_bundle, capsys, monkeypatch):
    from medclf import cli

    monkeypatch.setattr("sys.argv", ["medclf"])
    for args, expected in (([], "model card  MODEL_CARD.md"), (["--card"], "## Intended use")):
        try:
            cli.main(["info", str(tiny_bundle), *args])
        except SystemExit as exc:
            assert exc.code == 0
        assert expected in capsys.readouterr().out
