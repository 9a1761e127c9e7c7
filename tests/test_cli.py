"""The command line: outputs, exit codes, and no tracebacks for bad input."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from .inprocess import run_medclf

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


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
    """The same command in this process (tests/inprocess.py), for tests of what a command does rather than
    of the process around it: the exit codes and one-line errors above keep their real processes."""
    proc = run_medclf(*args, cwd=cwd)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_help_lists_the_commands():
    proc = medclf("--help")
    assert proc.returncode == 0
    for cmd in ("audit", "train", "evaluate", "predict", "demo", "info", "models"):
        assert cmd in proc.stdout


def test_bare_command_prints_usage_and_exits_2():
    proc = medclf()
    assert proc.returncode == 2
    assert "Usage" in proc.stdout + proc.stderr and "train" in proc.stdout + proc.stderr


def test_version_option():
    import medclf as package

    proc = medclf("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"medclf {package.__version__}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trian"], "No such command 'trian'"),
        (["--bogus"], "No such option: --bogus"),
        (["train"], "Missing argument"),
        (["train", "data", "--out", "b", "--epochs", "abc"], "Invalid value for '--epochs'"),
        (["train", "data", "--out"], "requires an argument"),
        (["serve-keys"], "Missing command"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, expected, tmp_path):
    proc = medclf(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0] and lines[0].startswith("medclf")
    assert proc.stdout == ""


def test_missing_data_is_exit_2_with_a_message(tmp_path):
    proc = medclf("train", tmp_path / "nope", "--out", tmp_path / "b")
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr


def test_bad_option_value_is_exit_2(tmp_path, sim_data):
    proc = medclf_here("train", sim_data, "--out", tmp_path / "b", "--time-budget", "soon")
    assert proc.returncode == 2 and "cannot read the duration" in proc.stderr
    proc = medclf_here("train", sim_data, "--out", tmp_path / "b", "--arch", "nonet", "--epochs", "1")
    assert proc.returncode == 2 and "unknown architecture" in proc.stderr
    proc = medclf_here("train", sim_data, "--out", tmp_path / "b", "--mix", "cutmix", "--mix-alpha", "-1")
    assert proc.returncode == 2 and "--mix-alpha must be a positive number" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_predict_answers_good_files_and_refuses_bad_ones(tiny_bundle, sim_data, tmp_path):
    good = sorted((sim_data / "test" / "tumour").glob("*.png"))[:2]
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    proc = medclf("predict", tiny_bundle, *good, bad)
    assert proc.returncode == 2
    results = json.loads(proc.stdout)
    assert [r["path"] for r in results] == [str(p) for p in (*good, bad)]
    for r in results[:2]:
        assert set(r["probabilities"]) == {"normal", "oedema", "tumour"}
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-6
        assert r["predicted"] == max(r["probabilities"], key=r["probabilities"].get)
    assert "error" in results[2] and results[2]["reason"] == "unsupported_format"
    assert "notes.png" in proc.stderr


def test_predict_warns_about_an_image_unlike_the_training_data(tiny_bundle, sim_data, tmp_path):
    checker = tmp_path / "checker.png"
    PILImage.fromarray((np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)).save(checker)
    normal = sorted((sim_data / "test").rglob("*.png"))[0]
    proc = medclf_here("predict", tiny_bundle, normal, checker)
    assert proc.returncode == 0, proc.stderr  # a warning, not a refusal: the answer is still given
    results = json.loads(proc.stdout)
    assert results[1]["ood"] is True and "unlike the images" in results[1]["warning"]
    assert f"warning {checker}" in " ".join(proc.stderr.split())


def test_predict_folder_csv_and_exit_0(tiny_bundle, sim_data, tmp_path):
    out = tmp_path / "p.csv"
    proc = medclf_here("predict", tiny_bundle, sim_data / "test" / "normal", "--format", "csv", "--out", out)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list((sim_data / "test" / "normal").glob("*.png")))
    assert {"path", "predicted", "prob_normal", "prob_tumour"} <= set(rows[0])


def test_tampered_bundle_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    f = copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01
    f.write_bytes(bytes(data))
    proc = medclf_here("info", copy)
    assert proc.returncode == 2 and "integrity check failed" in proc.stderr
    assert "model.safetensors" in proc.stderr
    assert medclf_here("info", tiny_bundle).returncode == 0


def test_evaluate_writes_everything(tiny_bundle, sim_data, tmp_path):
    # plant a byte copy of a training image in the test split: it must be flagged and left out
    data = tmp_path / "data"
    shutil.copytree(sim_data, data)
    src = sorted((data / "train" / "tumour").glob("*.png"))[0]
    shutil.copyfile(src, data / "test" / "tumour" / "leaked.png")
    out = tmp_path / "eval"
    proc = medclf_here("evaluate", tiny_bundle, data, "--out", out)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "accuracy",
        "balanced_accuracy",
        "auc",
        "per_class",
        "confusion_matrix",
        "ece",
        "n",
        "n_removed_duplicates",
        "ci",
        "all_samples",
    ):
        assert key in m
    n_test = len(list((data / "test").rglob("*.png")))
    assert m["n_removed_duplicates"] == 1 and m["n"] == n_test - 1 and m["all_samples"]["n"] == n_test
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == n_test
    assert {"path", "label", "predicted", "train_copy", "prob_normal", "prob_oedema", "prob_tumour"} <= set(
        rows[0]
    )
    leaked = [r for r in rows if r["path"].endswith("leaked.png")]
    assert leaked and leaked[0]["train_copy"] == "True"
    for f in ("roc.png", "confusion.png", "report.html"):
        assert (out / f).stat().st_size > 0


def test_evaluate_missing_split(tiny_bundle, sim_data):
    proc = medclf_here("evaluate", tiny_bundle, sim_data, "--split", "val", "--out", "unused")
    assert proc.returncode == 2 and "no 'val' split" in proc.stderr


def test_audit_command(sim_data, tmp_path):
    out = tmp_path / "audit.json"
    proc = medclf_here("audit", sim_data, "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report and "counts" in json.dumps(report)
    assert set(report["split_shift"]) == {"warn_auc", "min_per_side", "results"}
    proc = medclf_here("audit", sim_data, "--out", out, "--no-progress", "--no-shift")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["split_shift"] is None


def test_models_command():
    proc = medclf_here("models")
    assert proc.returncode == 0 and "resnet18" in proc.stdout and "densenet121" in proc.stdout


# --- pydicom's own test files: the lossless encodings of MR_small give the same answer -------------------

LOSSLESS = [
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
]


def _testdata(name):
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(p)


def test_pydicom_files(tiny_bundle, tmp_path):
    files = [_testdata(n) for n in LOSSLESS] + [_testdata("CT_small.dcm")]
    # an extension must not matter: the content decides
    renamed = tmp_path / "mr_small.png"
    shutil.copyfile(files[0], renamed)
    proc = medclf_here("predict", tiny_bundle, *files, renamed)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    probs = np.array([[r["probabilities"][c] for c in sorted(r["probabilities"])] for r in results])
    mr = np.vstack([probs[: len(LOSSLESS)], probs[-1:]])
    assert np.allclose(mr, mr[0], atol=1e-6), "lossless encodings of one image must give one answer"
    truncated = _testdata("MR_truncated.dcm")
    proc = medclf_here("predict", tiny_bundle, truncated)
    assert proc.returncode == 2
    err = json.loads(proc.stdout)[0]
    assert "error" in err and "truncat" in err["error"].lower()


def test_python_api_mirrors_the_cli(tiny_bundle, sim_data):
    import medclf

    b = medclf.load_bundle(tiny_bundle)
    img = np.asarray(PILImage.open(sorted((sim_data / "test" / "normal").glob("*.png"))[0]))
    out = b.predict([img, sorted((sim_data / "test" / "normal").glob("*.png"))[0]])
    assert out[0]["probabilities"] == pytest.approx(out[1]["probabilities"], abs=1e-6)
    assert callable(medclf.train) and callable(medclf.evaluate) and callable(medclf.audit)


def test_demo_runs_end_to_end_small(tmp_path):
    from medclf.demo import run_demo

    metrics = run_demo(tmp_path / "demo", n_per_class=12, time_budget="15s", size=64)
    assert metrics["n_removed_duplicates"] == 2, "the two planted copies must be found and left out"
    assert (tmp_path / "demo" / "eval" / "report.html").exists()
    assert (tmp_path / "demo" / "audit.json").exists()


def test_predict_folder_survives_a_file_rewritten_while_read(tiny_bundle, sim_data, tmp_path, monkeypatch):
    # Another process truncates a NIfTI between sniffing and decoding (the race that raised struct.error
    # and ended a folder run): that file gets an error entry, the others keep their answers.
    import nibabel as nib

    import medclf
    import medclf.io as mio

    folder = tmp_path / "incoming"
    folder.mkdir()
    good = sorted((sim_data / "test" / "normal").glob("*.png"))[:2]
    for g in good:
        shutil.copy(g, folder / g.name)
    scan = folder / "zz-scan.nii"
    nib.save(nib.Nifti1Image(np.ones((64, 64, 1), np.float32), np.eye(4)), scan)
    real_sniff = mio.sniff

    def sniff_then_truncate(path, size=None):
        sniffed = real_sniff(path, size)
        if Path(path).name == scan.name:
            Path(path).write_bytes(b"")
        return sniffed

    monkeypatch.setattr(mio, "sniff", sniff_then_truncate)
    results = medclf.predict(tiny_bundle, [folder])
    assert [Path(r["path"]).name for r in results] == sorted([g.name for g in good] + [scan.name])
    assert all("probabilities" in r for r in results[:2])
    assert results[2]["reason"] in ("truncated", "changed_while_reading"), results[2]
