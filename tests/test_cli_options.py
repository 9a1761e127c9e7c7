"""The command line's options are declared once (medclf.cli_options) and reach the API as given."""

import json
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest

from medclf.cli_options import MANIFEST, PRETRAINING, TRAINING, manifest_options
from medclf.data.sources import ManifestOptions
from medclf.pretrain import PretrainConfig
from medclf.training import TrainConfig

from .inprocess import run_medclf


def test_the_option_tables_name_the_settings_they_set():
    assert {o.name for o in TRAINING} <= {f.name for f in fields(TrainConfig)}
    assert {o.name for o in PRETRAINING} <= {f.name for f in fields(PretrainConfig)}
    every_option = manifest_options({o.name: "x" for o in MANIFEST})
    assert every_option is not None and set(every_option) == {f.name for f in fields(ManifestOptions)}


def test_train_hands_over_only_the_options_given(monkeypatch, tmp_path):
    """An option left alone keeps the config file's value (a flag's default included), one given overrides
    it (--no-compile too), paths become strings and the manifest options one dict."""
    import medclf.api

    seen = {}

    def fake_train(data, out, *, config, **_run):
        seen["config"] = config
        return SimpleNamespace(sanity=None)

    monkeypatch.setattr(medclf.api, "train", fake_train)
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"include_train_copies": True, "compile": True, "epochs": 3, "lr": 0.1}))
    args = ["--config", config, "--no-compile", "--epochs", "5", "--init-from", tmp_path / "backbone"]
    args += ["--split-file", tmp_path / "splits.csv", "--no-finding-label", "Normal"]
    proc = run_medclf("train", tmp_path / "data", "--out", tmp_path / "model", *args)
    assert proc.returncode == 0, proc.stderr
    cfg = seen["config"]
    assert cfg.include_train_copies is True and cfg.lr == 0.1
    assert cfg.compile is False and cfg.epochs == 5 and cfg.init_from == str(tmp_path / "backbone")
    assert cfg.manifest == {"split_file": str(tmp_path / "splits.csv"), "no_finding": "Normal"}


def test_out_of_range_numbers_are_refused_in_one_line_before_any_data_is_read(tmp_path):
    """A negative or nan learning rate failed inside the optimiser (a traceback, after decoding)."""
    data = tmp_path / "absent"  # never read: the settings are refused first
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"label_smoothing": 1.0, "weight_decay": 0.01}))
    for command, args, message in [
        ("train", ["--lr", "-1"], "--lr must be a finite number > 0, not -1.0"),
        ("train", ["--lr", "nan"], "--lr must be a finite number > 0"),
        ("train", ["--config", config], "--label-smoothing must be a finite number >= 0 and < 1, not 1.0"),
        ("pretrain", ["--lr", "0"], "--lr must be a finite number > 0"),
        ("pretrain", ["--temperature", "nan"], "--temperature must be a finite number > 0"),
    ]:
        proc = run_medclf(command, data, "--out", tmp_path / "out", *args)
        assert proc.returncode == 2, (command, args, proc.stdout, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_out_in_the_data_or_unwritable_is_refused_before_any_work(tmp_path):
    """A bundle (or its checkpoint) written into a data folder becomes part of the data (a checkpoint folder
    turned into a class); a refusal only when the bundle is saved left the checkpoint there."""
    from PIL import Image

    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(data / cls / f"{i}.png")
    (tmp_path / "afile").write_text("keep me")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    for command in ("train", "pretrain"):
        for out, message in [
            (data / "out", "inside the data source"),
            (data / "a", "exists and is not a bundle"),
            (tmp_path / "afile", "exists and is not a bundle"),
            (tmp_path / "afile" / "sub", "is a file, not a folder"),
        ]:
            proc = run_medclf(command, data, "--out", out, "--epochs", "1", "--seed", "0")
            assert proc.returncode == 2 and message in proc.stderr, (command, out, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "afile").read_text() == "keep me"
    for command in ("train", "pretrain"):
        proc = run_medclf(command, data, "--out", tmp_path / "o", "--seed", "-1")
        assert proc.returncode == 2 and "--seed must be a finite number >= 0" in proc.stderr, proc.stderr


def test_an_out_beside_a_manifest_is_not_in_the_data(tmp_path):
    """A folder holding a manifest.csv lists its images: nothing written beside it is read as data."""
    from medclf.bundle import check_out
    from medclf.errors import ConfigError

    (tmp_path / "manifest.csv").write_text("path,label\nx.png,a\n")
    check_out(tmp_path / "runs" / "model", [tmp_path])
    check_out(tmp_path / "runs" / "model", [tmp_path / "manifest.csv"])
    (tmp_path / "manifest.csv").unlink()  # now a folder medclf scans for images
    with pytest.raises(ConfigError, match="inside the data source"):
        check_out(tmp_path / "runs" / "model", [tmp_path])
