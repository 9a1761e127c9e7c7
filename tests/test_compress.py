"""Compression (medclf export) and inference engines: ONNX parity, int8, structured pruning, distillation,
engine choice, and integrity of the exported files."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from medclf.api import load_bundle
from medclf.compress import export_bundle
from medclf.compress.pipeline import default_epochs
from medclf.compress.prune import n_params, prune_model
from medclf.errors import BundleError, ConfigError
from medclf.models import create_model

pytestmark = pytest.mark.slow


def _val_tensors(bundle, data):
    from medclf.compress.data import load_training_data

    td = load_training_data(bundle, data, progress=False)
    return td.tensors(td.val_idx)


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, sim_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "int8"
    export_bundle(
        tiny_bundle, out, data=sim_data, onnx=True, int8=True, calibration_samples=32, progress=False
    )
    return out


def test_onnx_matches_pytorch_and_is_recorded(int8_bundle, sim_data, tiny_bundle):
    b = load_bundle(int8_bundle)
    # The training references travel with the compressed model (evaluate removes copies of training images).
    for name in ("train_hashes.json", "train_signatures.safetensors"):
        assert b.manifest["files"][name] == load_bundle(tiny_bundle).manifest["files"][name]
    onnx_step = next(s for s in b.manifest["compression"]["steps"] if s["step"] == "onnx")
    assert onnx_step["parity"]["max_abs_prob_diff"] <= 1e-4
    assert onnx_step["parity"]["samples"].startswith("validation samples")
    x = _val_tensors(b, sim_data)
    p_torch = b.predict_tensors(x, engine="torch")
    p_onnx = b.predict_tensors(x, engine="onnx-fp32", batch_size=7)  # ragged batches: the axis is dynamic
    assert np.abs(p_torch - p_onnx).max() <= 1e-4
    one = b.predict_tensors(x[:1], engine="onnx-fp32")
    assert one.shape == (1, len(b.classes)) and np.allclose(one.sum(), 1.0)


def test_temperature_is_applied_the_same_by_every_engine(int8_bundle, sim_data, tmp_path):
    from medclf.bundle import update_bundle

    hot = tmp_path / "hot"
    shutil.copytree(int8_bundle, hot)
    update_bundle(hot, {"calibration": {"temperature": 3.0}})
    b = load_bundle(hot)
    x = _val_tensors(b, sim_data)
    p_torch, p_onnx = b.predict_tensors(x, engine="torch"), b.predict_tensors(x, engine="onnx-fp32")
    assert np.abs(p_torch - p_onnx).max() <= 1e-4
    cold = load_bundle(int8_bundle).predict_tensors(x, engine="torch")
    assert p_torch.max() < cold.max()  # a temperature above 1 really softened the probabilities


def test_int8_bundle_loads_predicts_and_records_validation(int8_bundle, sim_data):
    b = load_bundle(int8_bundle)
    assert b.engine() == "onnx-int8" and b.engine("onnx") == "onnx-int8"
    step = next(s for s in b.manifest["compression"]["steps"] if s["step"] == "int8")
    assert {"val_before", "val_after", "accuracy_drop", "calibration"} <= set(step)
    assert step["calibration"]["split"] == "train"
    from medclf.compress.quantize import cpu_has_vnni

    assert step["reduce_range"] is (not cpu_has_vnni())  # 7-bit weights where 8-bit ones could saturate
    assert (int8_bundle / "model.int8.onnx").stat().st_size < (int8_bundle / "model.onnx").stat().st_size
    images = sorted((sim_data / "test").rglob("*.png"))[:6]
    results = b.predict(images)
    assert len(results) == 6 and all("error" not in r for r in results)
    for r in results:
        assert r["predicted"] in b.classes and abs(sum(r["probabilities"].values()) - 1) < 1e-6
    # The quantised model gives nearly the full-precision probabilities. (Not argmax agreement: this 2-epoch
    # model's class probabilities lie within a few 1e-3 of each other, so a tiny rounding flips its argmax.)
    assert step["max_abs_prob_diff_vs_fp32"] <= 0.05
    assert 0.0 <= step["agreement_with_fp32"] <= 1.0


def test_ood_guard_runs_on_the_onnx_graph_not_on_pytorch(int8_bundle, sim_data, monkeypatch):
    import medclf.ood

    images = sorted((sim_data / "test").rglob("*.png"))[:4]
    b = load_bundle(int8_bundle)
    assert b.manifest.get("ood") and b.manifest["compression"]["ood"]["refit"] is False
    with_torch = b.predict(images, engine="torch")

    def no_torch(*_a, **_k):
        raise AssertionError("the PyTorch model ran")

    monkeypatch.setattr(medclf.ood, "penultimate_features", no_torch)
    with_onnx = load_bundle(int8_bundle).predict(images, engine="onnx-fp32")
    for t, o in zip(with_torch, with_onnx, strict=True):
        assert o["ood_score"] == pytest.approx(t["ood_score"], rel=1e-3, abs=1e-3)
        assert o["ood"] == t["ood"]


def test_engine_choice_in_evaluate(int8_bundle, sim_data, tmp_path):
    from medclf.evaluation.runner import evaluate

    m_onnx = evaluate(
        int8_bundle, sim_data, tmp_path / "e1", engine="onnx-fp32", n_bootstrap=0, progress=False
    )
    m_torch = evaluate(int8_bundle, sim_data, tmp_path / "e2", engine="torch", n_bootstrap=0, progress=False)
    assert m_onnx["engine"] == "onnx-fp32" and m_torch["engine"] == "torch"
    assert m_onnx["accuracy"] == pytest.approx(m_torch["accuracy"])


def _cli(monkeypatch, capsys, *args):
    """Run the ``medclf`` command in this process; return (exit code, stdout, stderr)."""
    from medclf.cli import main

    monkeypatch.setattr(sys, "argv", ["medclf", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_engine_onnx_gives_the_same_classes_as_torch(int8_bundle, sim_data, monkeypatch, capsys):
    images = sorted((sim_data / "test").rglob("*.png"))[:5]
    classes = {}
    for engine in ("onnx", "onnx-fp32", "torch"):
        code, out, err = _cli(monkeypatch, capsys, "predict", int8_bundle, *images, "--engine", engine)
        assert code == 0, err
        classes[engine] = [r["predicted"] for r in json.loads(out)]
    assert classes["onnx-fp32"] == classes["torch"]
    assert len(classes["onnx"]) == 5  # int8: close to, not necessarily equal to, full precision


def test_engine_the_bundle_cannot_run_is_refused(tiny_bundle, monkeypatch, capsys):
    b = load_bundle(tiny_bundle)
    assert b.engine("auto") == "torch"
    with pytest.raises(BundleError, match="no ONNX model"):
        b.predict_tensors(np.zeros((1, *b.spec.input_shape), np.float32), engine="onnx")
    with pytest.raises(ConfigError, match="unknown engine"):
        b.engine("tensorrt")
    code, _, err = _cli(monkeypatch, capsys, "predict", tiny_bundle, tiny_bundle, "--engine", "onnx-int8")
    assert code == 2 and "Traceback" not in err and "model.int8.onnx" in err


def test_tampered_onnx_is_refused(int8_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(int8_bundle, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx"):
        load_bundle(bad)
    # Swapped after loading: the engine checks the bytes it is about to run.
    shutil.rmtree(bad)
    shutil.copytree(int8_bundle, bad)
    b = load_bundle(bad)
    (bad / "model.int8.onnx").write_bytes((bad / "model.onnx").read_bytes())
    with pytest.raises(BundleError, match=r"model\.int8\.onnx"):
        b.predict_tensors(np.zeros((1, *b.spec.input_shape), np.float32), engine="onnx-int8")


@pytest.mark.parametrize("dims", [2, 3])
def test_pruning_nothing_changes_nothing_and_pruning_half_quarters_the_parameters(dims):
    torch.manual_seed(0)
    model = create_model("compact-s", 1, 3, dims).eval()
    for m in model.modules():  # trained-looking batch norms, so the channel ranking is not a tie
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.weight.data.uniform_(0.1, 1.0)
            m.running_var.uniform_(0.5, 2.0)
    args = {"arch": "compact-s", "in_channels": 1, "n_classes": 3, "spatial_dims": dims, "arch_kwargs": {}}
    x = torch.rand(2, 1, *([16] * dims))
    same = prune_model(model, 0.01, **args)
    assert same.params_after == n_params(model)
    assert torch.allclose(same.model(x), model(x), atol=1e-6)
    half = prune_model(model, 0.5, **args)
    assert half.arch_kwargs["widths"] == [8, 16, 32, 64]
    assert half.params_after < 0.3 * half.params_before
    assert half.model(x).shape == (2, 3)


def test_pruning_on_images_ranks_by_activation_and_re_estimates_batch_norm():
    from medclf.compress.prune import recalibrate_batch_norm

    torch.manual_seed(0)
    model = create_model("compact-s", 1, 3, 2).eval()
    x = np.random.default_rng(0).random((128, 1, 16, 16), dtype=np.float32)
    args = {"arch": "compact-s", "in_channels": 1, "n_classes": 3, "spatial_dims": 2, "arch_kwargs": {}}
    pruned = prune_model(model, 0.5, calibration=x, **args).model
    # After pruning, the stem's batch norm holds the statistics of its input on the calibration images.
    conv_out = pruned.stem[0](torch.from_numpy(x)).detach()
    assert torch.allclose(pruned.stem[1].running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4)
    # A channel whose output is always zero contributes nothing: it is among the channels removed.
    with torch.no_grad():
        model.layer1[0].bn1.weight[3] = 0.0
        model.layer1[0].bn1.bias[3] = -10.0  # after the ReLU: 0 on every image
    half = prune_model(model, 0.5, calibration=x, **args)
    assert half.arch_kwargs["mid_widths"][0] == 8 and (half.model.layer1[0].bn1.bias > -5).all()
    before = half.model.stem[1].running_var.clone()
    recalibrate_batch_norm(half.model, x)  # the same images give the same statistics
    assert torch.allclose(half.model.stem[1].running_var, before, atol=1e-5)


def test_pruned_bundle_is_smaller_and_rebuilds(tiny_bundle, sim_data, tmp_path):
    res = export_bundle(tiny_bundle, tmp_path / "pruned", data=sim_data, prune=0.5, epochs=1, progress=False)
    b = load_bundle(res.bundle)  # rebuilt from the widths stored in bundle.json
    src = load_bundle(tiny_bundle)
    assert n_params(b.model) < 0.4 * n_params(src.model)
    assert b.manifest["model"]["kwargs"]["widths"] == [8, 16, 32, 64]
    step = res.compression["steps"][0]
    assert step["step"] == "prune" and step["params_after"] == n_params(b.model)
    assert {"val_before_finetune", "val_after"} <= set(step) and res.compression["val_before"]
    assert b.manifest["metrics"]["val"]["n"] == step["val_after"]["n"]
    results = b.predict(sorted((sim_data / "test").rglob("*.png"))[:3])
    assert all(r["predicted"] in b.classes for r in results)


def test_distilled_student_is_smaller_and_works(tiny_bundle, sim_data, tmp_path):
    from medclf.training import train

    teacher = tmp_path / "teacher"
    train(sim_data, teacher, epochs=1, size=32, batch_size=16, arch="compact", progress=False)
    res = export_bundle(
        tiny_bundle,
        tmp_path / "student",
        data=sim_data,
        distill_from=teacher,
        student="compact-s",
        epochs=1,
        onnx=True,
        progress=False,
    )
    b = load_bundle(res.bundle)
    step = res.compression["steps"][0]
    assert step["step"] == "distill" and step["teacher"]["arch"] == "compact"
    assert step["size_ratio"] >= 3.5 and b.arch == "compact-s"
    assert n_params(b.model) * 3.5 <= n_params(load_bundle(teacher).model)
    assert {"val", "sha256"} <= set(step["teacher"]) and "val_after" in step
    assert b.engine() == "onnx-fp32"
    results = b.predict(sorted((sim_data / "test").rglob("*.png"))[:3])
    assert all(r["predicted"] in b.classes for r in results)


def test_default_epochs_scale_with_what_the_source_trained():
    trained_19 = {"recipe": {"epochs_run": 19}}
    assert default_epochs(trained_19, 40, fresh=True) == 29  # a fresh student: 1.5x, rounded up
    assert default_epochs(trained_19, 40, fresh=False) == 4  # fine-tuning after pruning: a quarter
    assert default_epochs({"recipe": {"epochs_run": 3}}, 40, fresh=False) == 2  # never below 2
    assert default_epochs({}, 10, fresh=True) == 15  # older bundles without the record: the plan's epochs


def test_export_refuses_what_it_cannot_do(tiny_bundle, sim_data, tmp_path):
    with pytest.raises(ConfigError, match="nothing to do"):
        export_bundle(tiny_bundle, tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="--data"):
        export_bundle(tiny_bundle, tmp_path / "x", int8=True, progress=False)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        export_bundle(tiny_bundle, tmp_path / "x", data=sim_data, prune=1.5, progress=False)
    with pytest.raises(ConfigError, match="--epochs must be at least 1"):
        export_bundle(
            tiny_bundle, tmp_path / "x", data=sim_data, student="compact-s", epochs=-1, progress=False
        )
    with pytest.raises(ConfigError, match="--lr must be greater than 0"):
        export_bundle(tiny_bundle, tmp_path / "x", data=sim_data, prune=0.5, lr=0.0, progress=False)
    assert not (tmp_path / "x").exists()
    resnet = create_model("resnet18", 1, 3, 2, small_input=True)
    with pytest.raises(ConfigError, match="not available for 'resnet18'"):
        prune_model(resnet, 0.5, arch="resnet18", in_channels=1, n_classes=3, spatial_dims=2, arch_kwargs={})


def test_onnx_export_without_data_checks_random_inputs(tiny_bundle, tmp_path):
    res = export_bundle(tiny_bundle, tmp_path / "o", onnx=True, progress=False)
    parity = res.compression["steps"][0]["parity"]
    assert parity["samples"].startswith("random inputs") and parity["max_abs_prob_diff"] <= 1e-4
    assert res.compression["val_before"] is None


def test_a_step_with_non_finite_gradients_is_skipped_not_taken(tiny_bundle, sim_data):
    from rich.console import Console

    from medclf import reporting
    from medclf.compress.data import load_training_data
    from medclf.compress.finetune import finetune, plan_from_manifest

    src = load_bundle(tiny_bundle)
    data = load_training_data(src, sim_data, progress=False)
    console = Console(record=True, width=200)
    with reporting.use(reporting.ConsoleReporter(console)):
        result = finetune(
            plan_from_manifest(src.manifest),
            data,
            epochs=1,
            lr=1e-3,
            loss_hook=lambda x, logits, ce: ce * float("nan"),  # every gradient NaN
            progress=False,
        )
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert "had non-finite gradients and were skipped" in console.export_text()
