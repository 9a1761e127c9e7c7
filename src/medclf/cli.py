"""The ``medclf`` command: a thin Typer layer, one command = one call into the Python API.

Every :class:`~medclf.errors.MedclfError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from medclf.errors import MedclfError

app = typer.Typer(
    name="medclf",
    help="Deep-learning classification of medical images: audit, train, evaluate, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)


@app.command()
def audit(
    data: Annotated[str, typer.Argument(help="Dataset: folder, CSV manifest or MedMNIST .npz")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the JSON report")] = Path(
        "audit.json"
    ),
    workers: Annotated[int, typer.Option(help="Decoding processes")] = 2,
    near_threshold: Annotated[
        float | None, typer.Option(help="Correlation at which two images count as copies")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    shift: Annotated[
        bool, typer.Option(help="Check, class by class, whether val/test differ in distribution from train")
    ] = True,
    shortcuts: Annotated[
        bool,
        typer.Option(
            help="Check how well acquisition cues alone (size, format, scanner...) predict each class"
        ),
    ] = True,
) -> None:
    """Counts, unreadable files, exact and near duplicates, leakage between splits, label conflicts, shift,
    shortcuts."""
    from medclf.api import audit as run_audit

    report = run_audit(
        data,
        workers=workers,
        near_threshold=near_threshold,
        progress=progress,
        check_shift=shift,
        check_shortcut=shortcuts,
    )
    report.render(Console())
    report.write_json(out)
    err.print(f"Audit written to {out}")


@app.command()
def fetch(
    name: Annotated[str, typer.Argument(help="MedMNIST dataset, e.g. pneumoniamnist, breastmnist")],
    size: Annotated[int, typer.Option(help="Image size: 28, 64, 128 or 224 (3D sets: 28 or 64)")] = 28,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the .npz into")] = Path("."),
    mirror: Annotated[
        str | None, typer.Option(help="Base URL of a copy of the MedMNIST files, instead of Zenodo")
    ] = None,
) -> None:
    """Download an official MedMNIST file at any published size; its checksum is verified."""
    from medclf.data.fetch import fetch_medmnist, medmnist_filename

    err.print(f"Fetching {medmnist_filename(name, size)} from {mirror or 'Zenodo (record 10519652)'}...")
    path = fetch_medmnist(name, size, out, mirror=mirror)
    err.print(f"{path}: checksum verified")


@app.command()
def train(
    data: Annotated[str, typer.Argument(help="Dataset: folder, CSV manifest or MedMNIST .npz")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write")],
    arch: Annotated[
        str | None, typer.Option(help="Architecture (see `medclf models`); default: planner")
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="Input size in pixels (square/cube); default: planner")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs; default: what fits the time budget")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Global batch size, split across torchrun processes; default: planner")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW)")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
    time_budget: Annotated[
        str | None, typer.Option(help="Wall-time budget, e.g. 90s, 10m, 2h (default 10m)")
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(help="Augmentation preset: none, light, standard, mri, xray, strong (default: planner)"),
    ] = None,
    mix: Annotated[str | None, typer.Option(help="Batch mixing: none, mixup, cutmix (default none)")] = None,
    mix_alpha: Annotated[
        float | None, typer.Option(help="Beta(alpha, alpha) of --mix (default: mixup 0.4, cutmix 1.0)")
    ] = None,
    denoise: Annotated[str | None, typer.Option(help="Denoising: none, nlm, gaussian, median")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON or TOML file of training settings")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from <out>.ckpt after an interruption")] = False,
    workers: Annotated[int | None, typer.Option(help="Decoding processes")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Where preprocessed tensors are cached")] = None,
    include_train_copies: Annotated[
        bool, typer.Option(help="Keep validation samples that copy training samples in model selection")
    ] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Fine-tune from this bundle (same architecture and preprocessing)")
    ] = None,
    freeze: Annotated[
        str | None, typer.Option(help="With --init-from: layer groups kept frozen, e.g. stem,layer1,layer2")
    ] = None,
    slices_as_channels: Annotated[
        int | None,
        typer.Option(help="Volumes as 2.5D: K axial slabs as channels of a 2D network (0: always 3D)"),
    ] = None,
    amp: Annotated[str | None, typer.Option(help="Mixed precision: auto, bf16, fp16, off")] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the network")
    ] = None,
    stream: Annotated[
        str | None, typer.Option(help="Stream training data from the disk cache: auto, on, off")
    ] = None,
    memory_limit: Annotated[
        str | None, typer.Option(help="Memory the cached training data may fill, e.g. 8G (default: free RAM)")
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(help="K-fold bagging: K runs on complementary folds, fused into one ensemble"),
    ] = None,
    members: Annotated[
        int | None,
        typer.Option(help="Seed bagging: K runs with different seeds, one validation split, fused into one"),
    ] = None,
    fusion: Annotated[
        str,
        typer.Option(
            help="With --folds or --members: mean, weighted or stacking (fitted on a shared validation split)"
        ),
    ] = "mean",
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    shortcut_mitigation: Annotated[
        str | None,
        typer.Option(
            help="auto (on when the shortcut check flags acquisition cues), on, off: randomise acquisition "
            "cues in augmentation and balance sampling over class x acquisition group"
        ),
    ] = None,
) -> None:
    """Train a classifier and write a verified model bundle. With no options a planner decides.

    Several processes or GPUs: `torchrun --nproc_per_node N -m medclf train DATA ...` (README, Scaling out).
    """
    from medclf.api import train as run_train
    from medclf.training import TrainConfig

    cfg = TrainConfig.from_file(config) if config else TrainConfig()
    settings: dict[str, Any] = {
        "arch": arch,
        "size": size,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "time_budget": time_budget,
        "augment": augment,
        "mix": mix,
        "mix_alpha": mix_alpha,
        "denoise": denoise,
        "workers": workers,
        "cache_dir": cache_dir,
        "device": device,
        "init_from": str(init_from) if init_from else None,
        "freeze": freeze,
        "slices_as_channels": slices_as_channels,
        "amp": amp,
        "compile": compile,
        "stream": stream,
        "memory_limit": memory_limit,
        "shortcut_mitigation": shortcut_mitigation,
    }
    if include_train_copies:
        settings["include_train_copies"] = True
    cfg = cfg.updated({k: v for k, v in settings.items() if v is not None})
    if folds is not None and members is not None:
        raise MedclfError("choose --folds or --members, not both")
    if members is not None:
        from medclf.api import train_members

        train_members(
            data,
            out,
            members=members,
            method=fusion,
            config=cfg,
            resume=resume,
            progress=progress,
            console=err,
        )
        return
    if folds is not None:
        from medclf.api import train_folds

        train_folds(
            data, out, folds=folds, method=fusion, config=cfg, resume=resume, progress=progress, console=err
        )
        return
    run_train(data, out, config=cfg, resume=resume, progress=progress, console=err)


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    data: Annotated[str, typer.Argument(help="Dataset holding the split to evaluate")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder")] = Path("eval"),
    split: Annotated[str, typer.Option(help="Split to evaluate: test, val or train")] = "test",
    include_train_copies: Annotated[
        bool, typer.Option(help="Headline figures on the whole split, copies of training samples included")
    ] = False,
    workers: Annotated[int | None, typer.Option(help="Decoding processes")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Where preprocessed tensors are cached")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    engine: Annotated[
        str, typer.Option(help="torch, onnx, onnx-fp32, onnx-int8 or auto (ONNX when the bundle has it)")
    ] = "auto",
    tta: Annotated[
        bool, typer.Option("--tta", help="Test-time augmentation: average over flips and small shifts")
    ] = False,
    robustness: Annotated[
        bool, typer.Option("--robustness", help="Also measure accuracy under FGSM and PGD attacks")
    ] = False,
) -> None:
    """metrics.json, predictions.csv, ROC/confusion/reliability plots and report.html for one split."""
    from medclf.api import evaluate as run_evaluate

    run_evaluate(
        bundle,
        data,
        out,
        split=split,
        include_train_copies=include_train_copies,
        workers=workers,
        cache_dir=cache_dir,
        progress=progress,
        console=err,
        engine=engine,
        tta=tta,
        robustness=robustness,
    )


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    inputs: Annotated[list[str], typer.Argument(help="Image files and/or folders (searched recursively)")],
    format: Annotated[str, typer.Option("--format", "-f", help="json or csv")] = "json",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="torch, onnx, onnx-fp32, onnx-int8 or auto (ONNX when the bundle has it)")
    ] = "auto",
    tta: Annotated[
        bool, typer.Option("--tta", help="Test-time augmentation: average over flips and small shifts")
    ] = False,
    explain: Annotated[
        Path | None, typer.Option("--explain", help="Also write one heatmap PNG per input into this folder")
    ] = None,
    explain_method: Annotated[
        str, typer.Option(help="With --explain: auto, gradcam, gradcampp or occlusion")
    ] = "auto",
) -> None:
    """Classify images. Exit code 2 if any input was refused (the others still get answers)."""
    from medclf.bundle import load_bundle

    if format not in ("json", "csv"):
        raise MedclfError(f"--format must be json or csv, not {format!r}")
    b = load_bundle(bundle)
    results = b.predict(inputs, engine=engine, tta=tta)
    if explain is not None:
        # Explain the class each prediction chose; the heatmap's path joins that input's entry.
        chosen = {r["path"]: r["predicted"] for r in results if "predicted" in r}
        heatmaps = {
            r["path"]: r["heatmap"]
            for r in b.explain(inputs, explain, method=explain_method, targets=chosen)
            if "heatmap" in r
        }
        for r in results:
            if r["path"] in heatmaps:
                r["heatmap"] = heatmaps[r["path"]]
    text = _as_csv(results, b.classes) if format == "csv" else json.dumps(results, indent=2)
    if out:
        out.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    else:
        sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    refused = [r for r in results if "error" in r]
    for r in refused:
        err.print(f"[red]refused[/] {r['error']}", highlight=False)
    for r in results:
        if r.get("ood"):
            err.print(f"[yellow]warning[/] {r['path']}: {r['warning']}", highlight=False)
    if not results:
        raise MedclfError("no input files found")
    if refused:
        raise typer.Exit(2)


def _as_csv(results: list[dict[str, Any]], classes: list[str]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "predicted", "confidence", *[f"prob_{c}" for c in classes], "ood", "error"])
    for r in results:
        if "error" in r:
            w.writerow([r["path"], "", "", *[""] * len(classes), "", r["error"]])
        else:
            probs = [f"{r['probabilities'][c]:.6f}" for c in classes]
            ood = "" if "ood" not in r else str(r["ood"]).lower()
            w.writerow([r["path"], r["predicted"], f"{r['confidence']:.6f}", *probs, ood, ""])
    return buf.getvalue()


@app.command()
def ensemble(
    bundles: Annotated[list[Path], typer.Argument(help="Member bundles (folders or .zip), at least two")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Ensemble bundle folder to write")],
    data: Annotated[str, typer.Option(help="The dataset the members were trained on (for validation)")],
    method: Annotated[str, typer.Option(help="mean, weighted (fitted on validation) or stacking")] = "mean",
    calibrate: Annotated[
        bool, typer.Option(help="Fit the ensemble's temperature on the shared validation samples")
    ] = True,
    workers: Annotated[int | None, typer.Option(help="Decoding processes")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Where preprocessed tensors are cached")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Fuse trained bundles into one ensemble bundle; weights and meta-learner come from validation only."""
    from medclf.api import ensemble as run_ensemble

    run_ensemble(
        bundles,
        out,
        data=data,
        method=method,
        calibrate=calibrate,
        workers=workers,
        cache_dir=cache_dir,
        progress=progress,
        console=err,
    )


@app.command()
def export(
    bundle: Annotated[Path, typer.Argument(help="Model bundle to compress (folder or .zip)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write")],
    data: Annotated[
        str | None, typer.Option(help="The training data (for int8 calibration, fine-tuning, distillation)")
    ] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Add model.onnx (checked against PyTorch)")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Add model.int8.onnx (static int8, calibrated)")] = (
        False
    ),
    prune: Annotated[
        float | None, typer.Option(help="Remove this fraction of channels (e.g. 0.5), then fine-tune")
    ] = None,
    distill_from: Annotated[
        Path | None, typer.Option(help="Teacher bundle for knowledge distillation (default: BUNDLE)")
    ] = None,
    student: Annotated[
        str | None, typer.Option(help="Distil into a fresh network of this architecture, e.g. compact-s")
    ] = None,
    student_kwargs: Annotated[
        str | None, typer.Option(help="Architecture arguments of the student as JSON, e.g. '{\"width\": 12}'")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Epochs of fine-tuning / distillation (default: a quarter of the source's after pruning, "
            "1.5x its epochs for a fresh --student)"
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of fine-tuning / distillation")] = None,
    time_budget: Annotated[
        str | None, typer.Option(help="Wall-time limit of fine-tuning / distillation, e.g. 5m")
    ] = None,
    int8_format: Annotated[str, typer.Option(help="qdq or qoperator")] = "qdq",
    calibration_samples: Annotated[int, typer.Option(help="Training samples for int8 calibration")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    workers: Annotated[int | None, typer.Option(help="Decoding processes")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Where preprocessed tensors are cached")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Compress a bundle: distil, prune, export to ONNX, quantise to int8; records accuracy before/after."""
    from medclf.api import export as run_export

    run_export(
        bundle,
        out,
        data=data,
        onnx=onnx,
        int8=int8,
        prune=prune,
        distill_from=distill_from,
        student=student,
        student_kwargs=_json_option("--student-kwargs", student_kwargs),
        epochs=epochs,
        lr=lr,
        time_budget=time_budget,
        int8_format=int8_format,
        calibration_samples=calibration_samples,
        seed=seed,
        workers=workers,
        cache_dir=cache_dir,
        progress=progress,
        console=err,
    )


def _json_option(name: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MedclfError(f"{name} must be JSON, e.g. '{{\"width\": 12}}' ({exc})") from None


@app.command()
def info(bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")]) -> None:
    """Verify a bundle's integrity and show what it holds."""
    from medclf.bundle import load_bundle

    b = load_bundle(bundle)
    m = b.manifest
    val = m.get("metrics", {}).get("val", {})
    print(f"bundle      {b.path}")
    print(f"sha256      {b.sha256}  (all {len(m['files'])} file hashes verified)")
    fusion = m.get("ensemble")
    if fusion:
        archs = ", ".join(f"{r['arch']} {r['size']}" for r in fusion["members"])
        print(f"model       ensemble ({fusion['method']}) of {archs}, input {list(b.spec.input_shape)}")
    else:
        print(f"model       {b.arch} {m['model'].get('kwargs', {})}, input {list(b.spec.input_shape)}")
    print(f"calibration temperature {b.temperature:.4g}")
    print(f"classes     {', '.join(b.classes)}")
    print(f"created     {m.get('created')}  medclf {m.get('versions', {}).get('medclf')}")
    print(f"validation  n={val.get('n')} accuracy={val.get('accuracy')} auc={val.get('auc')}")
    from medclf.engines import available_engines

    print(f"engines     {', '.join(available_engines(m['files']))} (default: {b.engine()})")


@app.command()
def models() -> None:
    """List the registered architectures."""
    from medclf.models import list_models, model_info

    for name in list_models():
        print(f"{name:14s} {model_info(name).description}")


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the demo's data, bundle and report")
    ] = Path("demo-out"),
    n_per_class: Annotated[int, typer.Option(help="Simulated cases per class")] = 200,
    time_budget: Annotated[str, typer.Option(help="Training time budget")] = "120s",
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
) -> None:
    """Simulated brain MRI (from the MNI152 template): audit, train, evaluate, report, predict."""
    from medclf.demo import run_demo

    run_demo(out, n_per_class=n_per_class, time_budget=time_budget, seed=seed, console=err)


@app.command()
def baseline(
    data: Annotated[str, typer.Argument(help="Dataset: folder, CSV manifest or MedMNIST .npz (2D)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder")] = Path("baseline"),
    size: Annotated[
        int | None, typer.Option(help="Image size for the features; default: native up to 64 px, else 128")
    ] = None,
    methods: Annotated[
        str, typer.Option(help="Comma-separated classifiers among logreg, rf, svm, gbm")
    ] = "logreg,rf,svm",
    seed: Annotated[int, typer.Option(help="Random seed (validation split, forests, SVM)")] = 0,
    workers: Annotated[int | None, typer.Option(help="Processes for decoding and features")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Where preprocessed tensors are cached")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Traditional-ML baseline: GLCM/LBP/HOG/intensity features and classical classifiers chosen on
    validation AUC; writes the evaluate outputs for the test split and baseline.json."""
    from medclf.api import baseline as run_baseline

    run_baseline(
        data,
        out,
        size=size,
        methods=methods,
        seed=seed,
        workers=workers,
        cache_dir=cache_dir,
        progress=progress,
        console=err,
    )


@app.command("dicom-node")
def dicom_node(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the result JSON and DICOM SR files")],
    port: Annotated[int, typer.Option(help="TCP port to listen on")] = 11112,
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title (called AE)")] = "MEDCLF",
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
) -> None:
    """DICOM Storage SCP: answers C-ECHO, classifies each image received by C-STORE and writes
    <SOPInstanceUID>.json and <SOPInstanceUID>.sr.dcm to --out. Stop with Ctrl-C."""
    import logging

    from medclf.serve.dicom_node import run_dicom_node

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    run_dicom_node(bundle, out, port=port, ae_title=ae_title, host=host)


@app.command()
def explain(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    image: Annotated[Path, typer.Argument(help="One image file (DICOM, NIfTI, PNG, JPEG, TIFF)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write: the input with the heatmap")] = Path(
        "heatmap.png"
    ),
    method: Annotated[
        str, typer.Option(help="auto (Grad-CAM, else occlusion), gradcam, gradcampp, occlusion")
    ] = "auto",
    target: Annotated[str | None, typer.Option(help="Class to explain (default: the predicted one)")] = None,
) -> None:
    """Heatmap of what drove the prediction, drawn over the preprocessed input, with the predicted class."""
    from medclf.bundle import load_bundle
    from medclf.explain import explain_image

    e = explain_image(load_bundle(bundle), image, method=method, target=target, out=out)
    print(json.dumps({"path": str(image), **e.to_dict(), "heatmap": str(out)}, indent=2))


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    host: Annotated[
        str, typer.Option(help="Address to listen on; off loopback, --api-key-file is required")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes (each loads the model)")] = 1,
    threads: Annotated[int, typer.Option(help="Inference threads per process")] = 2,
    torch_threads: Annotated[
        int | None, typer.Option(help="PyTorch threads per inference thread (default: CPUs / threads)")
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(help="Hashed API keys (`medclf serve-keys add`); then every /v1 call needs one"),
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted (413 beyond)")] = 64.0,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take (upload + prediction)")] = 60.0,
    queue: Annotated[
        int, typer.Option(help="Predict requests admitted at once per process (429 beyond)")
    ] = 64,
    audit_db: Annotated[Path, typer.Option(help="SQLite audit log (one row per API request)")] = Path(
        "medclf-audit.db"
    ),
    explain_method: Annotated[
        str, typer.Option(help="Heatmaps for ?explain=true: auto, gradcam, gradcampp, occlusion")
    ] = "auto",
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    engine: Annotated[
        str, typer.Option(help="torch, onnx, onnx-fp32, onnx-int8 or auto (ONNX when the bundle has it)")
    ] = "auto",
    tta: Annotated[
        bool, typer.Option("--tta", help="Test-time augmentation: average over flips and small shifts")
    ] = False,
) -> None:
    """HTTP API (POST /v1/predict, GET /v1/model, /healthz, /readyz, /docs) and the web page at /."""
    from medclf.serve.app import ServeSettings, run

    settings = ServeSettings(
        max_upload_mb=max_upload_mb,
        request_timeout_s=timeout,
        queue=queue,
        threads=threads,
        torch_threads=torch_threads,
        api_key_file=str(api_key_file) if api_key_file else None,
        audit_db=str(audit_db),
        explain_method=explain_method,
        engine=engine,
        tta=tta,
    )
    run(bundle, host=host, port=port, workers=workers, settings=settings, log_level=log_level)


serve_keys_app = typer.Typer(help="API keys for `medclf serve`: stored as sha256 hashes, shown once.")
app.add_typer(serve_keys_app, name="serve-keys")


@serve_keys_app.command("add")
def serve_keys_add(
    key_file: Annotated[Path, typer.Argument(help="Key file (created when missing, mode 0600)")],
    key_id: Annotated[str | None, typer.Option("--id", help="A name for the key (default: random)")] = None,
) -> None:
    """Make a new API key, store only its hash, and print the key once."""
    from medclf.serve.auth import add_key

    new_id, key = add_key(key_file, key_id)
    err.print(f"Added key {new_id!r} to {key_file}. It is shown only now; store it safely:", highlight=False)
    print(key)


@serve_keys_app.command("list")
def serve_keys_list(key_file: Annotated[Path, typer.Argument(help="Key file")]) -> None:
    """The key ids in a key file."""
    from medclf.serve.auth import read_key_file

    for key_id in read_key_file(key_file):
        print(key_id)


@serve_keys_app.command("remove")
def serve_keys_remove(
    key_file: Annotated[Path, typer.Argument(help="Key file")],
    key_id: Annotated[str, typer.Argument(help="Id of the key to revoke")],
) -> None:
    """Revoke a key (a running server notices the change at its next request)."""
    from medclf.serve.auth import remove_key

    remove_key(key_file, key_id)
    err.print(f"Removed key {key_id!r} from {key_file}", highlight=False)


audit_log_app = typer.Typer(help="The audit log that `medclf serve` writes.")
app.add_typer(audit_log_app, name="audit-log")


@audit_log_app.command("show")
def audit_log_show(
    db: Annotated[Path, typer.Option(help="The SQLite audit log")] = Path("medclf-audit.db"),
    limit: Annotated[int, typer.Option(help="Newest rows to show")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """Print the newest requests: time, status, key id, result, latency, hashes, error reason."""
    from medclf.serve.auditlog import format_rows, read_rows

    rows = read_rows(db, limit=limit)
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_rows(rows))


@app.command()
def deid(
    src: Annotated[Path, typer.Argument(help="DICOM file or folder to de-identify (never modified)")],
    out: Annotated[Path, typer.Argument(help="Output file, or folder mirroring the input folder")],
    salt_file: Annotated[
        Path | None,
        typer.Option(help="Secret salt for UID remapping (else $MEDCLF_DEID_SALT, else random per run)"),
    ] = None,
    allow_burned_in: Annotated[
        bool, typer.Option(help="Also write images flagged BurnedInAnnotation=YES (check them by eye)")
    ] = False,
    report: Annotated[Path | None, typer.Option(help="Write what was done as JSON")] = None,
) -> None:
    """De-identify DICOM (PS3.15 Basic Application Level Confidentiality Profile). Exit code 2 if any
    DICOM file was refused (burned-in annotation, damaged file); non-DICOM files are listed as skipped."""
    from medclf.privacy import deidentify

    result = deidentify(
        src,
        out,
        salt_file=salt_file,
        allow_burned_in=allow_burned_in,
        log=lambda line: err.print(line, highlight=False, markup=False),
    )
    if report:
        report.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    err.print(
        f"de-identified {len(result.written)} DICOM file(s) into {out}; skipped {len(result.skipped)} "
        f"non-DICOM, refused {len(result.refused)}",
        highlight=False,
    )
    if result.refused:
        raise typer.Exit(2)
    if not result.written:
        raise MedclfError(f"{src}: no DICOM file found")


def main() -> None:
    """Entry point of the console script: user errors exit 2 with one line, never a traceback."""
    # A decoder plugin written in Rust (pylibjpeg-rle) panics on some malformed data before medclf turns
    # the failure into a refusal: keep its panic to one line, never a backtrace.
    os.environ["RUST_BACKTRACE"] = "0"
    try:
        # With standalone_mode=False click returns the code of a typer.Exit instead of exiting.
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except MedclfError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
