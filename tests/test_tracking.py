"""Experiment tracking with MLflow (``--track``, medclf.tracking), read back with MLflow's own client from a
local SQLite store: runs, per-epoch metrics, parameters, the model registry, resume, nested runs, errors."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from medclf import budget, folds, planner, training
from medclf.bundle import load_bundle
from medclf.folds import train_folds
from medclf.tracking import local_store_uri, track
from medclf.training import selection

from .inprocess import run_medclf

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
ENV.pop("MLFLOW_TRACKING_URI", None)
KW = dict(epochs=2, size=24, batch_size=16, arch="compact-s", progress=False)
TRAIN_ARGS = ["--epochs", "2", "--size", "24", "--batch-size", "16", "--arch", "compact-s", "--no-progress"]


def medclf(*args, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "medclf", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=600,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def medclf_here(*args, cwd=None):
    """The same command in this process (tests/inprocess.py): no second import of PyTorch and MLflow."""
    proc = run_medclf(*args, cwd=cwd, env={"PYTHONWARNINGS": "ignore"})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(client: MlflowClient, experiment: str = "medclf") -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_train_track_logs_the_run_and_registers_the_bundle_in_the_local_store(sim_data, tmp_path):
    proc = medclf_here("train", sim_data, "--out", "model", *TRAIN_ARGS, "--track", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The embedded default: a SQLite store under runs/mlruns of the current folder, no server.
    assert (tmp_path / "runs" / "mlruns" / "mlflow.db").is_file()
    client = _client(local_store_uri(tmp_path))
    [run] = _runs(client)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "train model"
    assert _steps(client, run_id, "val_auc") == [1, 2] and _steps(client, run_id, "loss") == [1, 2]
    assert {"val.auc", "val.accuracy", "val.ece", "best_epoch"} <= set(run.data.metrics)
    assert any(k.startswith("data.counts.train.") for k in run.data.metrics)
    params = run.data.params
    assert params["settings.epochs"] == "2" and params["config.batch_size"] == "16"
    assert params["plan.arch"] == "compact-s" and params["plan.spec.size"] == "[24, 24]"
    assert params["system.device"] == "cpu" and int(params["system.torch_threads"]) >= 1
    assert "system.cpu_model" in params and "system.cpu_flags" in params

    bundle = load_bundle(tmp_path / "model")
    assert run.data.tags["medclf.bundle_sha256"] == bundle.sha256
    artefacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"bundle", "plots", "audit_summary.json", "plan.json", "system.json"} <= artefacts
    in_bundle = {Path(a.path).name for a in client.list_artifacts(run_id, "bundle")}
    assert {"bundle.json", "model.safetensors", "MODEL_CARD.md"} <= in_bundle
    audit = json.loads(
        Path(client.download_artifacts(run_id, "audit_summary.json", str(tmp_path))).read_text()
    )
    assert {"data", "sanity"} <= set(audit)

    [version] = client.search_model_versions("name='model'")
    assert version.run_id == run_id and version.tags["bundle_sha256"] == bundle.sha256
    assert run.data.tags["medclf.model_version"] == str(version.version) == "1"
    # The registered version's artefact is the bundle itself: downloaded, it verifies as the same bundle.
    source = client.get_model_version_download_uri("model", version.version)
    got = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "download"))
    assert load_bundle(got).sha256 == bundle.sha256
    assert not (tmp_path / "model.ckpt").exists() and not (tmp_path / "model.mlflow.json").exists()
    assert "MLflow: run" in proc.stderr and "version 1" in proc.stderr


def test_an_interrupted_and_resumed_training_continues_the_same_run(sim_data, tmp_path, monkeypatch):
    uri, out = _store(tmp_path), tmp_path / "part"
    kw = dict(KW, epochs=3)
    calls = {"n": 0}
    original = training.Loop.train_epoch

    def crash_in_second_epoch(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self)

    monkeypatch.setattr(training.Loop, "train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt), track("train", out, uri=uri):
        training.train(sim_data, out, **kw)
    client = _client(uri)
    [killed] = _runs(client)
    assert killed.info.status == "KILLED" and _steps(client, killed.info.run_id, "loss") == [1]
    saved = json.loads((tmp_path / "part.mlflow.json").read_text())
    assert saved["run_id"] == killed.info.run_id

    monkeypatch.setattr(training.Loop, "train_epoch", original)
    with track("train", out, uri=uri, resume=True):
        training.train(sim_data, out, resume=True, **kw)
    [run] = _runs(client)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "loss") == [1, 2, 3]
    assert run.data.tags["medclf.resumes"] == "1" and "medclf.error" in run.data.tags  # the interruption
    [version] = client.search_model_versions("name='part'")
    assert version.run_id == run.info.run_id and not (tmp_path / "part.mlflow.json").exists()


def test_leftover_budget_members_are_nested_runs(sim_data, tmp_path, monkeypatch):
    # As tests/test_leftover.py: validation AUC falls after the first epoch, so every run stops early.
    calls = itertools.count()
    monkeypatch.setattr(selection, "_auc", lambda y, p, k: 0.9 - 0.01 * next(calls))
    monkeypatch.setattr(budget, "LEFTOVER_FUSION_S", 1.0)
    monkeypatch.setattr(folds, "MAX_LEFTOVER_MEMBERS", 2)
    monkeypatch.setattr(planner, "measure_throughput", lambda *a, **k: 2000.0)
    uri, out = _store(tmp_path), tmp_path / "model"
    kw = dict(size=24, arch="compact-s", batch_size=16, patience=2, progress=False)
    with track("train", out, uri=uri):
        folds.train(sim_data, out, time_budget="40s", **kw)  # the path that trains leftover members
    assert load_bundle(out).arch == "ensemble"
    client = _client(uri)
    runs = _runs(client)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    [member] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert member.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert member.data.tags["medclf.member"] == "member-1" and member.info.status == "FINISHED"
    assert _steps(client, member.info.run_id, "val_auc") == [1, 2, 3]  # patience 2 after the best epoch
    assert member.data.params["config.seed"] == "1" and "val.auc" in member.data.metrics
    assert parent.data.tags["medclf.arch"] == "ensemble" and parent.data.tags["medclf.model_version"] == "1"


def test_folds_are_nested_runs_of_the_ensemble_run(sim_data, tmp_path):
    uri, out = _store(tmp_path), tmp_path / "bagged"
    with track("train", out, uri=uri, bagging=True):
        train_folds(sim_data, out, folds=2, **dict(KW, epochs=1))
    client = _client(uri)
    runs = _runs(client)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["medclf.member"] for r in folds) == ["fold-0", "fold-1"]
    assert all(_steps(client, r.info.run_id, "loss") == [1] for r in folds)
    # K folds share no validation sample here, so the ensemble itself has no validation metrics.
    assert parent.data.tags["medclf.arch"] == "ensemble" and parent.data.tags["medclf.model_version"] == "1"
    assert not (tmp_path / "bagged.folds").exists()


def test_evaluate_track_is_its_own_run_tagged_with_the_bundle(tiny_bundle, sim_data, tmp_path):
    uri = _store(tmp_path)
    sha = load_bundle(tiny_bundle).sha256
    # A training run that made this bundle, as `train --track` records it: evaluate links to it.
    client = _client(uri)
    exp = client.create_experiment("medclf", artifact_location=(tmp_path / "artifacts").as_uri())
    trained = client.create_run(exp, tags={"medclf.job": "train", "medclf.bundle_sha256": sha})
    proc = medclf_here(
        "evaluate", tiny_bundle, sim_data, "--out", tmp_path / "eval", "--no-progress", "--tracking-uri", uri
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = [r for r in _runs(client) if r.data.tags.get("medclf.job") == "evaluate"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["medclf.bundle_sha256"] == sha
    assert run.data.tags["medclf.source_run_id"] == trained.info.run_id
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert run.data.metrics["test.auc"] == pytest.approx(metrics["auc"])
    assert run.data.metrics["test.ci.auc_low"] <= metrics["auc"] <= run.data.metrics["test.ci.auc_high"]
    assert run.data.params["settings.split"] == "test"
    evaluation = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"metrics.json", "report.html", "roc.png"} <= evaluation and "predictions.csv" not in evaluation
    assert not client.search_model_versions(), "an evaluation registers nothing"


def test_export_track_logs_the_distillation_as_a_nested_run(tiny_bundle, sim_data, tmp_path):
    from medclf.api import export

    uri, out = _store(tmp_path), tmp_path / "small"
    with track("export", out, uri=uri, params={"student": "compact-s"}):
        export(tiny_bundle, out, data=sim_data, student="compact-s", epochs=1, progress=False)
    client = _client(uri)
    runs = _runs(client)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    [distill] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert distill.data.tags["medclf.member"] == "distill" and distill.info.status == "FINISHED"
    assert _steps(client, distill.info.run_id, "val_auc") == [1]
    assert parent.data.params["compression.steps"] == "distill"
    assert parent.data.tags["medclf.source_sha256"] == load_bundle(tiny_bundle).sha256
    [version] = client.search_model_versions("name='small'")
    assert version.tags["bundle_sha256"] == load_bundle(tmp_path / "small").sha256


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri", ["bogus://nowhere", "http://127.0.0.1:{port}"])
def test_an_unusable_tracking_uri_is_one_line_and_exit_2_before_any_work(sim_data, tmp_path, uri):
    uri = uri.format(port=_closed_port())
    # One refusal in a real process (nothing else reaches its stderr), the other in this one.
    run = medclf if uri.startswith("bogus") else medclf_here
    proc = run("train", sim_data, "--out", tmp_path / "model", *TRAIN_ARGS, "--tracking-uri", uri)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tracking-uri" in lines[0] and uri in lines[0], proc.stderr
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.ckpt").exists()


def test_nothing_imports_mlflow_unless_a_job_is_tracked():
    code = (
        "import sys, medclf.cli, medclf.training, medclf.compress.finetune, medclf.tracking; "
        "print('mlflow' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr
