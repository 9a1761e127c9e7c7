"""The shortcut check: acquisition cues alone predicting the label (medclf.data.shortcuts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from medclf.data.audit import audit
from medclf.data.samples import SampleSet
from medclf.data.scan import scan
from medclf.data.shortcuts import (
    FLAG_AUC,
    ClassShortcut,
    _auc,
    _bootstrap_ci,
    _folds,
    check_shortcuts,
    cue_table,
    pixel_cues,
)
from medclf.data.sources import load_source


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # A blob on noise: the same content distribution for every class, so only acquisition can tell them apart.
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-(((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2))
    return np.clip(200 * blob + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)


def confounded_dataset(root: Path, n: int = 40, *, confounded: bool = True) -> Path:
    """Two classes of identical content; with ``confounded`` the 'tumour' images are 64x64 PNGs and the
    'normal' ones 52x44 JPEGs (two sources), otherwise both classes mix both sources."""
    rng = np.random.default_rng(0)
    for cls in ("normal", "tumour"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            source_a = (cls == "tumour") if confounded else bool(i % 2)
            if source_a:
                PILImage.fromarray(_noise(rng, 64, 64)).save(root / cls / f"{i}.png")
            else:
                PILImage.fromarray(_noise(rng, 44, 52)).save(root / cls / f"{i}.jpg", quality=70)
    return root


def test_pixel_cues_find_padding_and_histogram():
    img = np.full((1, 64, 80), 100.0, dtype=np.float32)
    img[0, 10:60, 5:80] = np.random.default_rng(0).uniform(50, 250, (50, 75))
    cues = pixel_cues(img)
    assert cues["pad_top"] == pytest.approx(10 / 64, abs=1e-3)
    assert cues["pad_bottom"] == pytest.approx(4 / 64, abs=1e-3)
    assert cues["pad_left"] == pytest.approx(5 / 80, abs=1e-3)
    assert cues["pad_right"] == 0.0
    assert sum(cues[f"hist_{k}"] for k in range(8)) == pytest.approx(1.0, abs=1e-3)
    assert pixel_cues(np.zeros((1, 16, 16), np.float32)) == {"value_min": 0.0, "value_max": 0.0}


def test_auc_and_bootstrap_agree_with_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    pos = rng.random(300) < 0.4
    score = np.round(rng.random(300) + 0.4 * pos, 1)  # ties on purpose
    assert _auc(pos, score) == pytest.approx(roc_auc_score(pos, score))
    boot = [rng.integers(0, 300, 300) for _ in range(50)]
    lo, hi = _bootstrap_ci(pos, score, boot)
    assert lo < _auc(pos, score) < hi


def test_folds_are_stratified_and_keep_patients_together():
    y = np.repeat([0, 1, 2], 20)
    groups = np.repeat(np.arange(30), 2)
    folds = _folds(y, groups, seed=0)
    for g in range(30):
        assert len(set(folds[groups == g].tolist())) == 1
    for f in range(5):
        assert set(y[folds == f].tolist()) == {0, 1, 2}


def test_confounded_sources_are_flagged_with_their_cues(tmp_path):
    samples = load_source(confounded_dataset(tmp_path / "data"))
    sr = scan(samples, workers=1, progress=False)
    report = check_shortcuts(samples, sr.cues)
    assert report.flagged
    for c in report.per_class:
        assert c.flagged and c.auc >= FLAG_AUC and c.ci[0] > 0.65
        assert {"size", "format"} & set(c.top_cues)
    assert {"size", "format"} <= set(report.flagged_keys)
    text = report.warnings()[0]
    assert "learn the source instead of the disease" in text and "will not reveal it" in text
    section = report.to_manifest()
    assert section["checked"] and section["flagged"] and set(section["per_class"]) == {"normal", "tumour"}
    json.dumps(section)


def test_mixed_sources_are_not_flagged(tmp_path):
    samples = load_source(confounded_dataset(tmp_path / "data", confounded=False))
    sr = scan(samples, workers=1, progress=False)
    report = check_shortcuts(samples, sr.cues)
    assert not report.flagged and report.warnings() == []
    assert all(c.auc < 0.7 for c in report.per_class)


def test_simulated_data_is_not_flagged(sim_data):
    rep = audit(load_source(sim_data), workers=1, progress=False, check_shift=False)
    sc = rep.data["shortcuts"]
    assert sc["checked"] and not sc["flagged"]
    assert not any("shortcut" in w for w in rep.warnings)


def test_constant_cues_of_npz_arrays_are_not_flagged():
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 255, (60, 28, 28), dtype=np.uint8)}
    samples = SampleSet(
        refs=[f"train/{i}" for i in range(60)],
        labels=np.arange(60) % 2,
        splits=["train"] * 60,
        patient_ids=[None] * 60,
        classes=["a", "b"],
        source="x.npz",
        kind="npz",
        arrays=arrays,
    )
    sr = scan(samples, workers=1, progress=False)
    assert sr.cues[0]["width"] == 28 and sr.cues[0]["format"] == "array"
    report = check_shortcuts(samples, sr.cues)
    assert not report.flagged
    # Size, mode and format are the same everywhere: no acquisition column survives.
    assert not {"size", "width", "format", "mode"} & set(report.cue_names)


def test_a_manifest_column_that_gives_the_label_away_is_named(tmp_path):
    rng = np.random.default_rng(3)
    rows = ["path,label,site"]
    for i in range(60):
        PILImage.fromarray(_noise(rng, 32, 32)).save(tmp_path / f"{i}.png")
        label = "tumour" if i % 2 else "normal"
        site = ("A" if i % 2 else "B") if i % 10 else "C"
        rows.append(f"{i}.png,{label},{site}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    samples = load_source(tmp_path / "m.csv")
    sr = scan(samples, workers=1, progress=False)
    report = check_shortcuts(samples, sr.cues)
    assert report.flagged and report.per_class[0].top_cues[0] == "column:site"
    assert report.flagged_keys[0] == "site"


def test_cue_table_drops_constant_columns_and_codes_categories():
    cues = [
        {"width": 10, "height": 10, "format": "png", "mode": "L", "bit_depth": 8},
        {"width": 12, "height": 10, "format": "png", "mode": "RGB", "bit_depth": 8},
        {"width": 12, "height": 10, "format": "png", "mode": "RGB"},
    ]
    table = cue_table(cues, {"site": ["a", "", "b"]})
    assert "format" not in table.names and "height" not in table.names
    # Present for some samples only: whether a value exists can itself tell sources apart.
    assert {"width", "size", "mode", "bit_depth", "column:site"} <= set(table.names)
    site = table.x[:, table.names.index("column:site")]
    assert np.isnan(site[1]) and site[0] != site[2]


def test_audit_report_shows_and_stores_the_shortcut_warning(tmp_path):
    from rich.console import Console

    samples = load_source(confounded_dataset(tmp_path / "data"))
    rep = audit(samples, workers=1, progress=False, check_shift=False)
    assert rep.data["shortcuts"]["flagged"]
    assert any("possible shortcut" in w for w in rep.warnings)
    console = Console(record=True, width=200)
    rep.render(console)
    text = console.export_text()
    assert "Shortcut check" in text and "possible shortcut" in text
    saved = json.loads(rep.write_json(tmp_path / "audit.json").read_text())
    assert saved["shortcuts"]["per_class"]["tumour"]["flagged"]


def test_every_named_cue_has_its_auc_in_the_record():
    """Style cues rank above the acquisition cues but are never named: a named cue past the tenth best must
    still have its AUC in ``cue_aucs`` (the audit's table reads it; RetinaMNIST crashed the render)."""
    style = {**{f"hist_{k}": 0.9 for k in range(8)}, "border_mean": 0.9, "border_std": 0.9}
    c = ClassShortcut("a", 50, 50, 0.7, (0.6, 0.8), 0.9, {**style, "pad_right": 0.64, "pad_top": 0.62}, False)
    record = c.to_dict()
    assert record["cues"] == ["pad_right", "pad_top"]
    assert {k: record["cue_aucs"][k] for k in record["cues"]} == {"pad_right": 0.64, "pad_top": 0.62}
    assert list(record["cue_aucs"])[:10] == list(style)  # the ten best still come first
