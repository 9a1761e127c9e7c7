"""The options of the ``medclf`` command, each declared once (name, type, default, help) for every command
that takes it.

A single shared option is a :data:`typing.Annotated` alias (``workers: Workers = None``). Options that
travel together are a table of :class:`Opt`: the training settings (named as the fields of
:class:`medclf.training.TrainConfig` they set), the pretraining settings, the CSV manifest options and the
experiment tracking options. :func:`expand` gives a command a table's options in place of one parameter,
which receives what was given as one dict.

Nothing here imports torch (``TrainConfig`` does): ``medclf --help`` stays quick, and ``medclf.cli.main``
sets the OpenMP environment before torch is loaded.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

THREADS_HELP = "PyTorch/ONNX Runtime threads (default: the CPUs not busy with other processes)"

DataArgument = Annotated[str, typer.Argument(help="Dataset: folder, CSV manifest or MedMNIST .npz")]
BundleArgument = Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")]
Workers = Annotated[int | None, typer.Option(help="Decoding processes")]
CacheDir = Annotated[str | None, typer.Option(help="Where preprocessed tensors are cached")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar")]
Threads = Annotated[int | None, typer.Option("--threads", help=THREADS_HELP)]
Seed = Annotated[int, typer.Option(help="Random seed")]
Resume = Annotated[bool, typer.Option(help="Continue from <out>.ckpt after an interruption")]
Engine = Annotated[
    str, typer.Option(help="torch, onnx, onnx-fp32, onnx-int8 or auto (ONNX when the bundle has it)")
]
Tta = Annotated[
    bool, typer.Option("--tta", help="Test-time augmentation: average over flips and small shifts")
]
# Trust options of the commands that run a bundle (predict, evaluate, info, serve, dicom-node).
TrustedKeys = Annotated[
    Path | None,
    typer.Option(
        "--trusted-keys",
        help="Folder of Ed25519 public keys (*.pub, *.pem) or one key file: refuse a bundle none of them signed",
    ),
]
BundleSha256 = Annotated[
    str | None,
    typer.Option("--bundle-sha256", help="Refuse any bundle but the one with this sha256 (`medclf info`)"),
]
# Options of train and pretrain whose meaning is the same in both.
_Epochs = Annotated[int | None, typer.Option(help="Epochs; default: what fits the time budget")]
_SeedOrDefault = Annotated[int | None, typer.Option(help="Random seed")]
_Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")]
_Amp = Annotated[str | None, typer.Option(help="Mixed precision: auto, bf16, fp16, off")]


@dataclass(frozen=True)
class Opt:
    """One option of a table: the parameter's (and setting's) name, its ``Annotated[type, typer.Option(...)]``
    declaration and its default."""

    name: str
    declaration: Any
    default: Any = None

    def parameter(self) -> inspect.Parameter:
        return inspect.Parameter(
            self.name, inspect.Parameter.KEYWORD_ONLY, default=self.default, annotation=self.declaration
        )


def opt(name: str, type_: Any, help: str, default: Any = None, *flags: str) -> Opt:
    """An :class:`Opt` declared by its type and help text (``flags``: its option names, when not ``--name``)."""
    return Opt(name, Annotated[type_, typer.Option(*flags, help=help)], default)


def signature_with(command: Callable[..., Any], table: Sequence[Opt], replacing: str | None = None) -> Any:
    """``command``'s signature with ``table``'s options in place of its parameter ``replacing`` (appended when
    None): what typer reads to build the command line. Every parameter becomes keyword-only, as click passes
    them."""
    signature = inspect.signature(command, eval_str=True)
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()]
    at = [p.name for p in params].index(replacing) if replacing else len(params)
    rest = params[at + 1 :] if replacing else []
    return signature.replace(parameters=[*params[:at], *(o.parameter() for o in table), *rest])


def given(table: Sequence[Opt], values: dict[str, Any], keep_defaults: bool = False) -> dict[str, Any]:
    """Pop ``table``'s options from ``values``; return those set to something else than their default (paths
    as strings), so that a setting left alone keeps the value a config file or the planner gives it; with
    ``keep_defaults``, all of them."""
    chosen = {o.name: values.pop(o.name, o.default) for o in table}
    return {
        o.name: str(chosen[o.name]) if isinstance(chosen[o.name], Path) else chosen[o.name]
        for o in table
        if keep_defaults or chosen[o.name] != o.default
    }


def expand(
    into: str,
    table: Sequence[Opt],
    collect: Callable[[dict[str, Any]], Any] | None = None,
    *,
    keep_defaults: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command: its parameter ``into`` becomes ``table``'s options on the command line and
    receives :func:`given` of them (passed through ``collect`` when given)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def run(**values: Any) -> Any:
            chosen = given(table, values, keep_defaults)
            return command(**values, **{into: collect(chosen) if collect else chosen})

        run.__signature__ = signature_with(command, table, replacing=into)  # type: ignore[attr-defined]
        return run

    return decorate


# How a command that reads a dataset reads it (keywords of the API's functions), passed on all three:
# expand(..., keep_defaults=True).
READING = (Opt("workers", Workers), Opt("cache_dir", CacheDir), Opt("progress", Progress, True))

# Training settings, by the name of the TrainConfig field each sets (tests/test_cli_options.py checks them).
TRAINING = (
    opt("arch", str | None, "Architecture (see `medclf models`); default: planner"),
    opt("size", int | None, "Input size in pixels (square/cube); default: planner"),
    Opt("epochs", _Epochs),
    opt("batch_size", int | None, "Global batch size, split across torchrun processes; default: planner"),
    opt("lr", float | None, "Peak learning rate (AdamW)"),
    Opt("seed", _SeedOrDefault),
    opt("time_budget", str | None, "Wall-time budget, e.g. 90s, 10m, 2h (default 10m)"),
    opt(
        "augment",
        str | None,
        "Augmentation preset: none, light, standard, mri, xray, strong (default: planner)",
    ),
    opt("mix", str | None, "Batch mixing: none, mixup, cutmix (default none)"),
    opt("mix_alpha", float | None, "Beta(alpha, alpha) of --mix (default: mixup 0.4, cutmix 1.0)"),
    opt("denoise", str | None, "Denoising: none, nlm, gaussian, median"),
    opt(
        "normalise",
        str | None,
        "Intensity scaling: auto (CT: HU window; 8-bit colour photographs: fixed 0..255; else each image's "
        "0.5-99.5 percentiles), percentile, fixed (0..255, 8-bit images)",
    ),
    Opt("workers", Workers),
    Opt("cache_dir", CacheDir),
    opt(
        "include_train_copies",
        bool,
        "Keep validation samples that copy training samples in model selection",
        False,
    ),
    Opt("device", _Device),
    opt(
        "init_from",
        Path | None,
        "Fine-tune from this bundle, a `medclf pretrain` backbone (new head), or a safetensors state dict (with "
        "--arch; torchvision/timm ResNet/DenseNet names are mapped)",
    ),
    opt("freeze", str | None, "With --init-from: layer groups kept frozen, e.g. stem,layer1,layer2"),
    opt(
        "slices_as_channels",
        int | None,
        "Volumes as 2.5D: K axial slabs as channels of a 2D network (0: always 3D)",
    ),
    opt(
        "linear_probe",
        float | None,
        "With --init-from: share of the epochs that train the output layer only, before all layers fine-tune "
        "with the backbone at 0.1x the learning rate (0: off; default: 0.3 below 2000 images)",
    ),
    Opt("amp", _Amp),
    opt("compile", bool | None, "torch.compile the network", None, "--compile/--no-compile"),
    opt("stream", str | None, "Stream training data from the disk cache: auto, on, off"),
    opt("memory_limit", str | None, "Memory the cached training data may fill, e.g. 8G (default: free RAM)"),
    Opt("threads", Threads),
    opt(
        "shortcut_mitigation",
        str | None,
        "auto (on when the shortcut check flags acquisition cues), on, off: randomise acquisition cues in "
        "augmentation and balance sampling over class x acquisition group",
    ),
    opt(
        "task",
        str | None,
        "multiclass, ordinal (grades 0..K-1, trained with a CORN head; predictions are a grade and a "
        "distribution over grades) or multilabel (findings: a sigmoid each). Default: what the data declare "
        "(class folders named 0..K-1, RetinaMNIST: ordinal; '|'-joined labels, 2-D npz labels: multilabel)",
    ),
    opt(
        "class_weights",
        str | None,
        "One class per image: balanced (each class weighs as much in the loss; default for classes) or none "
        "(the training prior stands; default for ordinal grades)",
    ),
    opt(
        "multilabel_loss",
        str | None,
        "Multi-label findings: bce (binary cross-entropy, positives weighted by each finding's negatives per "
        "positive; default) or asymmetric (Ridnik et al. 2021)",
    ),
)

# Pretraining settings, by the name of the medclf.pretrain.PretrainConfig field each sets.
PRETRAINING = (
    opt("arch", str | None, "Architecture (see `medclf models`); default compact"),
    opt("size", int | None, "Input size in pixels; default: the first source's, at most 64"),
    Opt("epochs", _Epochs),
    opt("batch_size", int | None, "Images per step (two views each); default 128 on a CPU, 256 on a GPU"),
    opt("lr", float | None, "Peak learning rate (AdamW, default 1e-3)"),
    opt("temperature", float | None, "NT-Xent temperature (default 0.5)"),
    opt("splits", str | None, "Splits to learn from: train (default) or train,val; never test"),
    Opt("seed", _SeedOrDefault),
    opt("time_budget", str | None, "Wall-time budget, e.g. 30m, 1h (default 1h)"),
    Opt("workers", Workers),
    Opt("cache_dir", CacheDir),
    Opt("device", _Device),
    Opt("threads", Threads),
    Opt("amp", _Amp),
)

# How to read a CSV manifest whose columns are not medclf's own (medclf.data.sources.ManifestOptions).
MANIFEST = (
    opt("path_column", str | None, "CSV column of image paths (default: path, Image Index)"),
    opt("label_column", str | None, "CSV column of labels (default: label, Finding Labels)"),
    opt(
        "label_separator",
        str | None,
        "Findings in one label cell are joined by this (multi-label; '|' recognised)",
    ),
    opt("patient_column", str | None, "CSV column of patient ids (default: patient_id, Patient ID)"),
    opt("split_file", Path | None, "CSV of '<image>,split' rows (train/valid/test), e.g. NIH's"),
    opt("no_finding_label", str | None, "Label meaning no finding: the empty set (default: No Finding)"),
)


def manifest_options(chosen: dict[str, Any]) -> dict[str, str] | None:
    """The MANIFEST options given, as the ``manifest`` argument of the API (None when none is)."""
    if "no_finding_label" in chosen:
        chosen["no_finding"] = chosen.pop("no_finding_label")
    return chosen or None


# Experiment tracking (medclf.tracking; README, Experiment tracking) of train, evaluate and export.
TRACKING = (
    opt(
        "track",
        bool,
        "Log this run to MLflow (default store: sqlite:///runs/mlruns/mlflow.db, no server)",
        False,
        "--track",
    ),
    opt(
        "tracking_uri",
        str | None,
        "MLflow tracking server or store, e.g. http://mlflow.team:5000 (implies --track; default "
        "$MLFLOW_TRACKING_URI, else the local store)",
        None,
        "--tracking-uri",
    ),
    opt("experiment", str, "MLflow experiment of the run", "medclf", "--experiment"),
    opt(
        "registered_model",
        str | None,
        "MLflow registered model the bundle becomes a version of (default: its folder name)",
        None,
        "--registered-model",
    ),
)
