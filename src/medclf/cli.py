"""The ``medclf`` command: a thin Typer layer, one command = one call into the Python API.

Every :class:`~medclf.errors.MedclfError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from medclf.errors import MedclfError

if TYPE_CHECKING:
    from medclf.predictor import Predictor

app = typer.Typer(
    name="medclf",
    help="Deep-learning classification of medical images: audit, train, evaluate, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
_THREADS_HELP = "PyTorch/ONNX Runtime threads (default: the CPUs not busy with other processes)"


def _apply_threads(threads: int | None) -> None:
    from medclf import threads as threads_mod

    threads_mod.apply(threads)


# Trust options of the commands that run a bundle (predict, evaluate, info, serve, dicom-node).
TrustedKeysOption = Annotated[
    Path | None,
    typer.Option(
        "--trusted-keys",
        help="Folder of Ed25519 public keys (*.pub, *.pem) or one key file: refuse a bundle none of them signed",
    ),
]
BundleSha256Option = Annotated[
    str | None,
    typer.Option("--bundle-sha256", help="Refuse any bundle but the one with this sha256 (`medclf info`)"),
]


# Experiment tracking options of train, evaluate and export (medclf.tracking; README, Experiment tracking).
TrackOption = Annotated[
    bool,
    typer.Option(
        "--track", help="Log this run to MLflow (default store: sqlite:///runs/mlruns/mlflow.db, no server)"
    ),
]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking server or store, e.g. http://mlflow.team:5000 (implies --track; default "
        "$MLFLOW_TRACKING_URI, else the local store)",
    ),
]
ExperimentOption = Annotated[str, typer.Option("--experiment", help="MLflow experiment of the run")]
RegisteredModelOption = Annotated[
    str | None,
    typer.Option(
        "--registered-model",
        help="MLflow registered model the bundle becomes a version of (default: its folder name)",
    ),
]
_TRACKING_OPTIONS = ("track", "tracking_uri", "experiment", "registered_model")
# How to read a CSV manifest whose columns are not medclf's own (data.sources.ManifestOptions).
PathColumnOption = Annotated[
    str | None, typer.Option("--path-column", help="CSV column of image paths (default: path, Image Index)")
]
LabelColumnOption = Annotated[
    str | None, typer.Option("--label-column", help="CSV column of labels (default: label, Finding Labels)")
]
LabelSeparatorOption = Annotated[
    str | None,
    typer.Option(
        "--label-separator",
        help="Findings in one label cell are joined by this (multi-label; '|' recognised)",
    ),
]
PatientColumnOption = Annotated[
    str | None,
    typer.Option("--patient-column", help="CSV column of patient ids (default: patient_id, Patient ID)"),
]
SplitFileOption = Annotated[
    Path | None,
    typer.Option("--split-file", help="CSV of '<image>,split' rows (train/valid/test), e.g. NIH's"),
]
NoFindingOption = Annotated[
    str | None,
    typer.Option("--no-finding-label", help="Label meaning no finding: the empty set (default: No Finding)"),
]


def _manifest_options(
    path_column: str | None,
    label_column: str | None,
    label_separator: str | None,
    patient_column: str | None,
    split_file: Path | None,
    no_finding: str | None,
) -> dict[str, str] | None:
    """The manifest options given on the command line (None when none is)."""
    given = {
        "path_column": path_column,
        "label_column": label_column,
        "label_separator": label_separator,
        "patient_column": patient_column,
        "split_file": str(split_file) if split_file is not None else None,
        "no_finding": no_finding,
    }
    return {k: v for k, v in given.items() if v is not None} or None


def _trackable(job: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Run a command as one tracked MLflow job when --track or --tracking-uri is given; its other options
    are the run's ``settings.*`` parameters."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def run(**options: Any) -> None:
            if not (options.get("track") or options.get("tracking_uri")):
                return command(**options)
            from medclf.tracking import track

            settings = {k: v for k, v in options.items() if k not in _TRACKING_OPTIONS and v is not None}
            out = options.get("monai_bundle") or options.get("out")
            if out is None:  # export without --out: let the command say what is missing
                return command(**options)
            with track(
                job,
                out,
                uri=options.get("tracking_uri"),
                experiment=options.get("experiment"),
                registered_model=options.get("registered_model"),
                params={k: str(v) for k, v in settings.items()},
                resume=bool(options.get("resume")),
                bagging=options.get("folds") is not None or options.get("members") is not None,
                bundle=options.get("bundle") if job == "evaluate" else None,
                console=err,
            ) as tracker:
                try:
                    command(**options)
                except typer.Exit as exc:  # e.g. --strict's exit code 3: the bundle is written all the same
                    tracker.finish(exit_code=int(exc.exit_code or 0))
                    raise

        return run

    return decorate


def _load_trusted(bundle: Path, trusted_keys: Path | None, bundle_sha256: str | None) -> Predictor:
    """Load a bundle (a Predictor), refusing it unless it is signed by a trusted key / has the pinned sha256
    (if asked)."""
    from medclf.predictor import Predictor

    return Predictor.load(bundle, trusted_keys=trusted_keys, expected_sha256=bundle_sha256)


@app.command()
def audit(
    data: Annotated[str, typer.Argument(help="Dataset: folder, CSV manifest or MedMNIST .npz")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the JSON report")] = Path(
        "audit.json"
    ),
    workers: Annotated[
        int | None, typer.Option(help="Decoding processes (default: the CPUs available, at most 4)")
    ] = None,
    near_threshold: Annotated[
        float | None, typer.Option(help="Correlation at which two images count as copies")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    shift: Annotated[
        bool, typer.Option(help="Check, class by class, whether val/test differ in distribution from train")
    ] = True,
    threads: Annotated[int | None, typer.Option("--threads", help=_THREADS_HELP)] = None,
    shortcuts: Annotated[
        bool,
        typer.Option(
            help="Check how well acquisition cues alone (size, format, scanner...) predict each class"
        ),
    ] = True,
    path_column: PathColumnOption = None,
    label_column: LabelColumnOption = None,
    label_separator: LabelSeparatorOption = None,
    patient_column: PatientColumnOption = None,
    split_file: SplitFileOption = None,
    no_finding_label: NoFindingOption = None,
) -> None:
    """Counts, unreadable files, exact and near duplicates, leakage between splits, label conflicts, shift,
    shortcuts."""
    from medclf.api import audit as run_audit

    _apply_threads(threads)
    report = run_audit(
        data,
        workers=workers,
        near_threshold=near_threshold,
        progress=progress,
        check_shift=shift,
        check_shortcut=shortcuts,
        manifest=_manifest_options(
            path_column, label_column, label_separator, patient_column, split_file, no_finding_label
        ),
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
@_trackable("train")
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
        Path | None,
        typer.Option(
            help="Fine-tune from this bundle, a `medclf pretrain` backbone (new head), or a safetensors state "
            "dict (with --arch; torchvision/timm ResNet/DenseNet names are mapped)"
        ),
    ] = None,
    freeze: Annotated[
        str | None, typer.Option(help="With --init-from: layer groups kept frozen, e.g. stem,layer1,layer2")
    ] = None,
    slices_as_channels: Annotated[
        int | None,
        typer.Option(help="Volumes as 2.5D: K axial slabs as channels of a 2D network (0: always 3D)"),
    ] = None,
    linear_probe: Annotated[
        float | None,
        typer.Option(
            help="With --init-from: share of the epochs that train the output layer only, before all layers "
            "fine-tune with the backbone at 0.1x the learning rate (0: off; default: 0.3 below 2000 images)"
        ),
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
    threads: Annotated[int | None, typer.Option("--threads", help=_THREADS_HELP)] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Exit with code 3 when the sanity gate fails (the model is not clearly better than the "
            "majority class or a thumbnail baseline, or the time budget cut its schedule); the bundle is "
            "still written",
        ),
    ] = False,
    shortcut_mitigation: Annotated[
        str | None,
        typer.Option(
            help="auto (on when the shortcut check flags acquisition cues), on, off: randomise acquisition "
            "cues in augmentation and balance sampling over class x acquisition group"
        ),
    ] = None,
    track: TrackOption = False,
    tracking_uri: TrackingUriOption = None,
    experiment: ExperimentOption = "medclf",
    registered_model: RegisteredModelOption = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="multiclass, ordinal (grades 0..K-1, trained with a CORN head; predictions are a grade and "
            "a distribution over grades) or multilabel (findings: a sigmoid each). Default: what the data "
            "declare (class folders named 0..K-1, RetinaMNIST: ordinal; '|'-joined labels, 2-D npz labels: "
            "multilabel)"
        ),
    ] = None,
    path_column: PathColumnOption = None,
    label_column: LabelColumnOption = None,
    label_separator: LabelSeparatorOption = None,
    patient_column: PatientColumnOption = None,
    split_file: SplitFileOption = None,
    no_finding_label: NoFindingOption = None,
    multilabel_loss: Annotated[
        str | None,
        typer.Option(
            help="Multi-label findings: bce (binary cross-entropy, positives weighted by each finding's "
            "negatives per positive; default) or asymmetric (Ridnik et al. 2021)"
        ),
    ] = None,
) -> None:
    """Train a classifier and write a verified model bundle. With no options a planner decides.

    Several processes or GPUs: `torchrun --nproc_per_node N -m medclf train DATA ...` (README, Scaling out).
    Exit codes: 0 done, 2 bad input or settings, 3 with --strict when the sanity gate failed.
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
        "linear_probe": linear_probe,
        "slices_as_channels": slices_as_channels,
        "amp": amp,
        "compile": compile,
        "stream": stream,
        "memory_limit": memory_limit,
        "threads": threads,
        "shortcut_mitigation": shortcut_mitigation,
        "task": task,
        "manifest": _manifest_options(
            path_column, label_column, label_separator, patient_column, split_file, no_finding_label
        ),
        "multilabel_loss": multilabel_loss,
    }
    if include_train_copies:
        settings["include_train_copies"] = True
    cfg = cfg.updated({k: v for k, v in settings.items() if v is not None})
    if folds is not None and members is not None:
        raise MedclfError("choose --folds or --members, not both")
    if strict and (folds is not None or members is not None):
        raise MedclfError("--strict gates single runs (and their automatic members), not --folds/--members")
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
    result = run_train(data, out, config=cfg, resume=resume, progress=progress, console=err)
    if strict and result.sanity is not None and not result.sanity.get("passed", True):
        from medclf.sanity import EXIT_CODE

        raise typer.Exit(EXIT_CODE)


@app.command()
def pretrain(
    data: Annotated[
        list[str], typer.Argument(help="Image sources (folders, CSV manifests, .npz), labels ignored")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Backbone bundle folder to write")],
    arch: Annotated[
        str | None, typer.Option(help="Architecture (see `medclf models`); default compact")
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="Input size in pixels; default: the first source's, at most 64")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs; default: what fits the time budget")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step (two views each); default 128 on a CPU, 256 on a GPU")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW, default 1e-3)")] = None,
    temperature: Annotated[float | None, typer.Option(help="NT-Xent temperature (default 0.5)")] = None,
    splits: Annotated[
        str | None, typer.Option(help="Splits to learn from: train (default) or train,val; never test")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
    time_budget: Annotated[
        str | None, typer.Option(help="Wall-time budget, e.g. 30m, 1h (default 1h)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from <out>.ckpt after an interruption")] = False,
    workers: Annotated[int | None, typer.Option(help="Decoding processes")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Where preprocessed tensors are cached")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help=_THREADS_HELP)] = None,
    amp: Annotated[str | None, typer.Option(help="Mixed precision: auto, bf16, fp16, off")] = None,
    progress: Annotated[bool, typer.Option(help="Show decoding progress")] = True,
) -> None:
    """Self-supervised (SimCLR) pretraining on unlabelled images; writes a sealed backbone bundle (no head)
    for `medclf train --init-from`. Progress shows the SSL loss and, when a source has labels, the accuracy
    of a k-NN probe on its validation images. Exit codes: 0 done, 2 bad input or settings."""
    from medclf.api import pretrain as run_pretrain

    settings = {
        "arch": arch,
        "size": size,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "temperature": temperature,
        "splits": splits,
        "seed": seed,
        "time_budget": time_budget,
        "workers": workers,
        "cache_dir": cache_dir,
        "device": device,
        "threads": threads,
        "amp": amp,
    }
    run_pretrain(data, out, resume=resume, progress=progress, console=err, **settings)


@app.command()
@_trackable("evaluate")
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
    threads: Annotated[int | None, typer.Option("--threads", help=_THREADS_HELP)] = None,
    trusted_keys: TrustedKeysOption = None,
    bundle_sha256: BundleSha256Option = None,
    by: Annotated[
        str | None,
        typer.Option(
            help="Subgroup evaluation by KEY[,KEY]: a CSV column, an acquisition key (size, format, mode, ...) "
            "or a DICOM keyword; default: the keys the bundle's shortcut audit flagged"
        ),
    ] = None,
    class_map: Annotated[
        str | None,
        typer.Option(
            help="Score groups of the model's classes, e.g. 'tumour=glioma,meningioma,pituitary;normal=notumor' "
            "(external data labelled by group)"
        ),
    ] = None,
    operating_point: Annotated[
        bool | None,
        typer.Option(
            "--operating-point/--no-operating-point",
            help="Sensitivity/specificity at the bundle's operating point (default: when it has one)",
        ),
    ] = None,
    min_group_n: Annotated[
        int, typer.Option(help="Subgroups smaller than this are reported, not tested")
    ] = 30,
    track: TrackOption = False,
    tracking_uri: TrackingUriOption = None,
    experiment: ExperimentOption = "medclf",
    path_column: PathColumnOption = None,
    label_column: LabelColumnOption = None,
    label_separator: LabelSeparatorOption = None,
    patient_column: PatientColumnOption = None,
    split_file: SplitFileOption = None,
    no_finding_label: NoFindingOption = None,
) -> None:
    """metrics.json, predictions.csv, ROC/confusion/reliability plots and report.html for one split."""
    from medclf.api import evaluate as run_evaluate

    _apply_threads(threads)
    run_evaluate(
        _load_trusted(bundle, trusted_keys, bundle_sha256),
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
        by=by,
        class_map=class_map,
        operating_point=operating_point,
        min_group_n=min_group_n,
        manifest=_manifest_options(
            path_column, label_column, label_separator, patient_column, split_file, no_finding_label
        ),
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
    sr: Annotated[
        Path | None,
        typer.Option(
            "--sr", help="Also write a DICOM SR per DICOM input into this folder (<SOPInstanceUID>.sr.dcm)"
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help=_THREADS_HELP)] = None,
    trusted_keys: TrustedKeysOption = None,
    bundle_sha256: BundleSha256Option = None,
) -> None:
    """Classify images. Exit code 2 if any input was refused (the others still get answers)."""
    _apply_threads(threads)
    if format not in ("json", "csv"):
        raise MedclfError(f"--format must be json or csv, not {format!r}")
    b = _load_trusted(bundle, trusted_keys, bundle_sha256)
    results = b.predict(inputs, engine=engine, tta=tta)
    if explain is not None:
        # Explain the class each prediction chose; the heatmap's path joins that input's entry.
        chosen = {r["path"]: r["predicted"] for r in results if "predicted" in r}
        from medclf.explain import explain_inputs

        heatmaps = {
            r["path"]: r["heatmap"]
            for r in explain_inputs(b, inputs, explain, method=explain_method, targets=chosen)
            if "heatmap" in r
        }
        for r in results:
            if r["path"] in heatmaps:
                r["heatmap"] = heatmaps[r["path"]]
    sr_notes = []
    if sr is not None:
        from medclf.serve.sr import write_sr_files

        sr_notes = write_sr_files(b, results, sr)
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
    for note in sr_notes:
        err.print(f"[yellow]no SR[/] {note}", highlight=False)
    if not results:
        raise MedclfError("no input files found")
    if refused:
        raise typer.Exit(2)


def _as_csv(results: list[dict[str, Any]], classes: list[str]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    decided = any("decision" in r for r in results)  # the bundle has an operating point
    w.writerow(
        ["path", "predicted", "confidence", *[f"prob_{c}" for c in classes], "ood", "error"]
        + (["decision", "decision_threshold"] if decided else [])
    )
    for r in results:
        tail = [r["decision"]["label"], f"{r['decision']['threshold']:.6g}"] if "decision" in r else ["", ""]
        if "error" in r:
            w.writerow([r["path"], "", "", *[""] * len(classes), "", r["error"]] + (tail if decided else []))
        else:
            probs = [f"{r['probabilities'][c]:.6f}" for c in classes]
            ood = "" if "ood" not in r else str(r["ood"]).lower()
            w.writerow(
                [r["path"], r["predicted"], f"{r['confidence']:.6f}", *probs, ood, ""]
                + (tail if decided else [])
            )
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
@_trackable("export")
def export(
    bundle: Annotated[Path, typer.Argument(help="Model bundle to compress (folder or .zip)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Bundle folder to write")] = None,
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
    monai_bundle: Annotated[
        Path | None,
        typer.Option(
            "--monai-bundle", help="Write BUNDLE as a MONAI bundle into this new folder (instead of --out)"
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help=_THREADS_HELP)] = None,
    track: TrackOption = False,
    tracking_uri: TrackingUriOption = None,
    experiment: ExperimentOption = "medclf",
    registered_model: RegisteredModelOption = None,
) -> None:
    """Compress a bundle: distil, prune, export to ONNX, quantise to int8; records accuracy before/after.
    Or, with --monai-bundle, write it as a MONAI bundle."""
    from medclf.api import export as run_export

    _apply_threads(threads)
    if monai_bundle is not None:
        compressing = any(v for v in (out, data, onnx, int8, prune, distill_from, student, student_kwargs))
        if compressing:
            raise MedclfError(
                "--monai-bundle exports BUNDLE as it is: compress it first (--out), then export the result"
            )
        from medclf.api import export_monai_bundle

        written = export_monai_bundle(bundle, monai_bundle)
        err.print(f"MONAI bundle written to {written}", highlight=False)
        return
    if out is None:
        raise MedclfError("--out is required (the bundle folder to write), or --monai-bundle")
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
def info(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    trusted_keys: TrustedKeysOption = None,
    bundle_sha256: BundleSha256Option = None,
    card: Annotated[bool, typer.Option("--card", help="Print the bundle's MODEL_CARD.md instead")] = False,
) -> None:
    """Verify a bundle's integrity and show what it holds and who signed it (--card: its model card)."""
    from medclf.model_card import MODEL_CARD

    b = _load_trusted(bundle, trusted_keys, bundle_sha256)
    m = b.manifest
    if card:
        if MODEL_CARD not in m["files"]:
            raise MedclfError(f"{bundle}: this bundle has no {MODEL_CARD} (made before medclf wrote one)")
        print(b.read_file(MODEL_CARD).decode("utf-8"), end="")
        return
    val = m.get("metrics", {}).get("val", {})
    print(f"bundle      {b.source}")
    print(f"sha256      {b.sha256}  (all {len(m['files'])} file hashes verified)")
    for i, check in enumerate(b.signatures or [None]):
        text = check.describe(b.trust_checked) if check else "none (unsigned)"
        print(f"{'signatures' if i == 0 else '':11s} {text}")
    fusion = m.get("ensemble")
    if fusion:
        archs = ", ".join(f"{r['arch']} {r['size']}" for r in fusion["members"])
        print(f"model       ensemble ({fusion['method']}) of {archs}, input {list(b.spec.input_shape)}")
    else:
        print(f"model       {b.arch} {m['model'].get('kwargs', {})}, input {list(b.spec.input_shape)}")
    if m.get("kind") == "backbone":  # medclf pretrain's: no output layer, nothing to predict with
        pre = m.get("pretraining", {})
        images = sum(int(s.get("images", 0)) for s in pre.get("sources", []))
        print(
            f"kind        backbone (no output layer): fine-tune it with `medclf train --init-from {bundle}`"
        )
        print(
            f"pretrained  {pre.get('method')}, {pre.get('epochs')} epochs on {images} images of {len(pre.get('sources', []))} source(s)"
        )
        return
    print(f"calibration temperature {b.temperature:.4g}")
    print(f"classes     {', '.join(b.classes)}")
    print(f"created     {m.get('created')}  medclf {m.get('versions', {}).get('medclf')}")
    print(f"validation  n={val.get('n')} accuracy={val.get('accuracy')} auc={val.get('auc')}")
    gate = m.get("sanity")
    if gate is not None:
        if gate.get("passed") and m.get("task") == "multilabel":  # no single-label references for findings
            print(
                "sanity      passed (the schedule only: findings have no majority-class or thumbnail reference)"
            )
        elif gate.get("passed"):
            print("sanity      passed (clearly better than the majority class and a thumbnail baseline)")
        else:
            print("sanity      FAILED: " + "; ".join(gate.get("warnings", [])))
    leftover = m.get("leftover")
    if leftover and leftover.get("failure"):
        print(f"leftover    {leftover['failure']}")
    from medclf.engines import available_engines

    print(f"engines     {', '.join(available_engines(m['files']))} (default: {b.engine()})")
    if MODEL_CARD in m["files"]:
        print(f"model card  {MODEL_CARD} (medclf info --card prints it)")
    op = m.get("operating_point")
    if op:
        achieved = op.get("achieved") or {}
        ci = achieved.get("ci") or {}

        def fig(key: str) -> str:
            v, iv = achieved.get(key), ci.get(key)
            return "n/a" if v is None else f"{v:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")

        site = op.get("site") or {}
        print(f"operating   {op.get('rule')}")
        print(
            f"            site sample {site.get('source')} n={achieved.get('n')}: sensitivity {fig('sensitivity')}, "
            f"specificity {fig('specificity')} (fitted there: optimistic)"
        )


@app.command()
def recalibrate(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip); never modified")],
    data: Annotated[str, typer.Argument(help="Labelled sample from the new site (folder, CSV or .npz)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new bundle folder to write")],
    positive: Annotated[
        str | None,
        typer.Option(help="The class or --class-map group a positive decision means (two classes: class 1)"),
    ] = None,
    sensitivity: Annotated[
        float | None,
        typer.Option(help="Target sensitivity of the positive group, e.g. 0.95 (default: Youden's J)"),
    ] = None,
    class_map: Annotated[
        str | None,
        typer.Option(
            help="Groups of the model's classes, e.g. 'tumour=glioma,meningioma,pituitary;normal=notumor'"
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Use only this split of DATA (default: all)")] = None,
    engine: Annotated[str, typer.Option(help="torch, onnx, onnx-fp32, onnx-int8 or auto")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Decoding processes")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Where preprocessed tensors are cached")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Fit the temperature and an operating point (threshold) on a site's labelled sample; write a new bundle."""
    from medclf.api import recalibrate as run_recalibrate

    run_recalibrate(
        bundle,
        data,
        out,
        positive=positive,
        sensitivity=sensitivity,
        class_map=class_map,
        split=split,
        engine=engine,
        workers=workers,
        cache_dir=cache_dir,
        progress=progress,
        console=err,
    )


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
    path_column: PathColumnOption = None,
    label_column: LabelColumnOption = None,
    label_separator: LabelSeparatorOption = None,
    patient_column: PatientColumnOption = None,
    split_file: SplitFileOption = None,
    no_finding_label: NoFindingOption = None,
) -> None:
    """Traditional-ML baseline: GLCM/LBP/HOG/intensity features and classical classifiers chosen on
    validation AUC (one-vs-rest per finding for multi-label data); writes the evaluate outputs for the test
    split and baseline.json."""
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
        manifest=_manifest_options(
            path_column, label_column, label_separator, patient_column, split_file, no_finding_label
        ),
    )


@app.command("dicom-node")
def dicom_node(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the result JSON and DICOM SR files")],
    port: Annotated[int, typer.Option(help="TCP port to listen on")] = 11112,
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title (called AE)")] = "MEDCLF",
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    allow_aet: Annotated[
        list[str] | None,
        typer.Option("--allow-aet", help="Calling AE title allowed to connect (repeat; default any)"),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="Peer address or network (10.1.2.0/24) allowed to connect (repeat); required off loopback",
        ),
    ] = None,
    max_associations: Annotated[int, typer.Option(help="Connections served at once, all peers")] = 8,
    max_per_peer: Annotated[int, typer.Option(help="Connections served at once per peer address")] = 2,
    acse_timeout: Annotated[
        float, typer.Option(help="Seconds a connection may take to ask for an association")
    ] = 10.0,
    dimse_timeout: Annotated[float, typer.Option(help="Seconds a DICOM message may take to arrive")] = 30.0,
    idle_timeout: Annotated[float, typer.Option(help="Seconds an association may stay silent")] = 30.0,
    accept_modality: Annotated[
        list[str] | None,
        typer.Option(
            "--accept-modality",
            help="Accept images of this modality (MR, CT, US, MG, ...; repeat) instead of the training data's",
        ),
    ] = None,
    fhir: Annotated[
        bool, typer.Option("--fhir", help="Also write each result as a FHIR DiagnosticReport (.fhir.json)")
    ] = False,
    trusted_keys: TrustedKeysOption = None,
    bundle_sha256: BundleSha256Option = None,
) -> None:
    """DICOM Storage SCP: answers C-ECHO, classifies each image received by C-STORE and writes
    <SOPInstanceUID>.json and <SOPInstanceUID>.sr.dcm to --out. Stop with Ctrl-C."""
    import logging

    from medclf.serve.dicom_node import run_dicom_node

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    run_dicom_node(
        bundle,
        out,
        port=port,
        ae_title=ae_title,
        host=host,
        allowed_aets=allow_aet or (),
        allowed_hosts=allow_host or (),
        max_associations=max_associations,
        max_per_peer=max_per_peer,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        idle_timeout=idle_timeout,
        modalities=accept_modality or None,
        fhir=fhir,
        trusted_keys=trusted_keys,
        bundle_sha256=bundle_sha256,
    )


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
    from medclf.explain import explain_image
    from medclf.predictor import Predictor

    e = explain_image(Predictor.load(bundle), image, method=method, target=target, out=out)
    print(json.dumps({"path": str(image), **e.to_dict(), "heatmap": str(out)}, indent=2))
    if e.ood:
        err.print(f"[yellow]warning[/] {image}: {e.warning}", highlight=False)


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
    trusted_keys: TrustedKeysOption = None,
    bundle_sha256: BundleSha256Option = None,
    header_timeout: Annotated[
        float,
        typer.Option(help="Seconds a connection has to send a complete request head, else it is closed"),
    ] = 5.0,
    max_client_connections: Annotated[
        int,
        typer.Option(
            help="Open connections per client address (IPv6: per /64); trusted proxies exempt; 0: no cap"
        ),
    ] = 32,
    max_connections: Annotated[
        int, typer.Option(help="Open connections per process; beyond, the one idle longest is closed")
    ] = 1000,
) -> None:
    """HTTP API (POST /v1/predict, GET /v1/model, /healthz, /readyz, /docs) and the web page at /."""
    from medclf.serve.app import ServeSettings, run
    from medclf.serve.http_guard import ConnectionLimits

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
        trusted_keys=str(trusted_keys) if trusted_keys else None,
        bundle_sha256=bundle_sha256,
    )
    limits = ConnectionLimits(
        header_timeout_s=header_timeout,
        max_client_connections=max_client_connections,
        max_connections=max_connections,
    )
    run(bundle, host=host, port=port, workers=workers, settings=settings, log_level=log_level, limits=limits)


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


def _print_version(value: bool) -> None:
    if value:
        from medclf._version import __version__

        print(f"medclf {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit"),
    ] = False,
) -> None:
    """Deep-learning classification of medical images: audit, train, evaluate, predict."""
    from medclf import reporting

    # Every command reports on stderr (the Python API is silent by default); put back when the command ends.
    ctx.with_resource(reporting.use(reporting.ConsoleReporter(err)))


def _usage_error(exc: typer.TyperException) -> None:
    """Report a command-line usage error (unknown command or option, missing argument, bad value).

    Typer bundles its own click, whose exceptions all derive from the public ``typer.TyperException``:
    catching that (not ``click.ClickException``, a different class) is what keeps tracebacks away.
    """
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "medclf"
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `medclf` (typer checks it by name too)
        help_text = exc.format_message().strip()  # empty when rich has already printed the help
        if help_text:
            err.print(help_text, markup=False, highlight=False)
        sys.exit(2)
    message = " ".join(exc.format_message().split())  # one line, whatever click wraps
    err.print(f"{command}: error: {message} (try `{command} --help`)", markup=False, highlight=False)
    sys.exit(2)


@app.command()
def sign(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip) to sign")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key (`medclf keygen`; PEM or raw)")],
    signer: Annotated[
        str | None, typer.Option(help="Name recorded with the signature (default: the key file's name)")
    ] = None,
) -> None:
    """Sign a bundle's sha256 with an Ed25519 key (into its signatures.json; the sha256 does not change).
    Whoever runs it with --trusted-keys holding the matching .pub file then accepts it."""
    from medclf.bundle import sign_bundle

    check = sign_bundle(bundle, key, signer=signer)
    err.print(
        f"{bundle}: signed as {check.signer!r} with key {check.key_id} at {check.signed_at}; "
        "its sha256 is unchanged",
        highlight=False,
        markup=False,
    )


@app.command()
def keygen(
    prefix: Annotated[Path, typer.Argument(help="Writes PREFIX.key (private, mode 0600) and PREFIX.pub")],
) -> None:
    """Make an Ed25519 key pair for `medclf sign`: keep PREFIX.key secret, give PREFIX.pub to those who
    run your bundles (their --trusted-keys folder). $MEDCLF_KEY_PASSPHRASE, when set, encrypts the key."""
    from medclf.signing import generate_key_pair, key_id, load_public_key

    private, public = generate_key_pair(prefix)
    err.print(f"wrote {private} (private: keep it secret) and {public} (public)", highlight=False)
    print(f"key {key_id(load_public_key(public))}")


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script: user errors exit 2 with one line, never a traceback."""
    # A decoder plugin written in Rust (pylibjpeg-rle) panics on some malformed data before medclf turns
    # the failure into a refusal: keep its panic to one line, never a backtrace.
    os.environ["RUST_BACKTRACE"] = "0"
    # Before torch is imported: GNU OpenMP reads its wait policy once (medclf.threads).
    from medclf.threads import configure_openmp_env

    configure_openmp_env(sys.argv[1:])
    try:
        # With standalone_mode=False click returns the code of a typer.Exit instead of exiting, and raises
        # usage errors to _usage_error (one line) instead of printing them itself.
        rc = app(args=args, prog_name="medclf", standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except MedclfError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except typer.TyperException as exc:  # click's usage errors, as typer bundles them
        _usage_error(exc)


if __name__ == "__main__":
    main()
