"""The ``medclf`` command: a thin Typer layer, one command = one call into the Python API.

Every :class:`~medclf.errors.MedclfError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import csv
import json
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
) -> None:
    """Counts, unreadable files, exact and near duplicates, leakage between splits, label conflicts."""
    from medclf.api import audit as run_audit

    report = run_audit(data, workers=workers, near_threshold=near_threshold, progress=progress)
    report.render(Console())
    report.write_json(out)
    err.print(f"Audit written to {out}")


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
    batch_size: Annotated[int | None, typer.Option(help="Batch size; default: planner")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW)")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
    time_budget: Annotated[
        str | None, typer.Option(help="Wall-time budget, e.g. 90s, 10m, 2h (default 10m)")
    ] = None,
    augment: Annotated[str | None, typer.Option(help="Augmentation preset (none, light, standard)")] = None,
    denoise: Annotated[str | None, typer.Option(help="Denoising: none, nlm, gaussian, median")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON or TOML file of training settings")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from <out>.ckpt after an interruption")] = False,
    workers: Annotated[int | None, typer.Option(help="Decoding processes")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Where preprocessed tensors are cached")] = None,
    include_train_copies: Annotated[
        bool, typer.Option(help="Keep validation samples that copy training samples in model selection")
    ] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
) -> None:
    """Train a classifier and write a verified model bundle. With no options a planner decides."""
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
        "denoise": denoise,
        "workers": workers,
        "cache_dir": cache_dir,
        "device": device,
    }
    if include_train_copies:
        settings["include_train_copies"] = True
    cfg = cfg.updated({k: v for k, v in settings.items() if v is not None})
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
    )


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")],
    inputs: Annotated[list[str], typer.Argument(help="Image files and/or folders (searched recursively)")],
    format: Annotated[str, typer.Option("--format", "-f", help="json or csv")] = "json",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout")
    ] = None,
) -> None:
    """Classify images. Exit code 2 if any input was refused (the others still get answers)."""
    from medclf.api import load_bundle

    if format not in ("json", "csv"):
        raise MedclfError(f"--format must be json or csv, not {format!r}")
    b = load_bundle(bundle)
    results = b.predict(inputs)
    text = _as_csv(results, b.classes) if format == "csv" else json.dumps(results, indent=2)
    if out:
        out.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    else:
        sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    refused = [r for r in results if "error" in r]
    for r in refused:
        err.print(f"[red]refused[/] {r['error']}", highlight=False)
    if not results:
        raise MedclfError("no input files found")
    if refused:
        raise typer.Exit(2)


def _as_csv(results: list[dict[str, Any]], classes: list[str]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "predicted", "confidence", *[f"prob_{c}" for c in classes], "error"])
    for r in results:
        if "error" in r:
            w.writerow([r["path"], "", "", *[""] * len(classes), r["error"]])
        else:
            probs = [f"{r['probabilities'][c]:.6f}" for c in classes]
            w.writerow([r["path"], r["predicted"], f"{r['confidence']:.6f}", *probs, ""])
    return buf.getvalue()


@app.command()
def info(bundle: Annotated[Path, typer.Argument(help="Model bundle (folder or .zip)")]) -> None:
    """Verify a bundle's integrity and show what it holds."""
    from medclf.api import load_bundle

    b = load_bundle(bundle)
    m = b.manifest
    val = m.get("metrics", {}).get("val", {})
    print(f"bundle      {b.path}")
    print(f"sha256      {b.sha256}  (all {len(m['files'])} file hashes verified)")
    print(f"model       {b.arch} {m['model'].get('kwargs', {})}, input {list(b.spec.input_shape)}")
    print(f"classes     {', '.join(b.classes)}")
    print(f"created     {m.get('created')}  medclf {m.get('versions', {}).get('medclf')}")
    print(f"validation  n={val.get('n')} accuracy={val.get('accuracy')} auc={val.get('auc')}")


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


def main() -> None:
    """Entry point of the console script: user errors exit 2 with one line, never a traceback."""
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
