"""The ``medclf`` command: a thin Typer layer, one command = one call into the Python API (:mod:`medclf.api`).

Every :class:`~medclf.errors.MedclfError` becomes a one-line message on stderr and exit code 2. The options
shared by several commands are declared once, in :mod:`medclf.cli_options`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from medclf.cli_options import (
    MANIFEST,
    PRETRAINING,
    READING,
    TRACKING,
    TRAINING,
    BundleArgument,
    BundleSha256,
    CacheDir,
    DataArgument,
    Engine,
    Opt,
    Progress,
    Resume,
    Seed,
    Threads,
    TrustedKeys,
    Tta,
    expand,
    manifest_options,
    signature_with,
)
from medclf.errors import MedclfError

if TYPE_CHECKING:
    from medclf.api import Predictor

app = typer.Typer(
    name="medclf",
    help="Deep-learning classification of medical images: audit, train, evaluate, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
# The commands import medclf.api when they run: it loads PyTorch, which `medclf --help` does not need and
# which main() must not load before it has set the OpenMP environment.


def _trackable(
    job: str, options: Sequence[Opt] = TRACKING
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the experiment tracking ``options`` and run it as one tracked MLflow job when --track
    or --tracking-uri is given; its other options are the run's ``settings.*`` parameters."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def run(**given: Any) -> None:
            tracking = {o.name: given.pop(o.name, o.default) for o in options}
            out = given.get("monai_bundle") or given.get("out")
            # Without --out, export says what is missing itself.
            if not (tracking["track"] or tracking["tracking_uri"]) or out is None:
                return command(**given)
            from medclf import api

            with api.track(
                job,
                out,
                uri=tracking["tracking_uri"],
                experiment=tracking["experiment"],
                registered_model=tracking.get("registered_model"),
                params={k: str(v) for k, v in given.items() if v is not None},
                resume=bool(given.get("resume")),
                bagging=given.get("folds") is not None or given.get("members") is not None,
                bundle=given.get("bundle") if job == "evaluate" else None,
            ) as tracker:
                try:
                    command(**given)
                except typer.Exit as exc:  # e.g. --strict's exit code 3: the bundle is written all the same
                    tracker.finish(exit_code=int(exc.exit_code or 0))
                    raise

        run.__signature__ = signature_with(command, options)  # type: ignore[attr-defined]
        return run

    return decorate


@app.command()
@expand("manifest", MANIFEST, manifest_options)
def audit(
    data: DataArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the JSON report")] = Path(
        "audit.json"
    ),
    workers: Annotated[
        int | None, typer.Option(help="Decoding processes (default: the CPUs available, at most 4)")
    ] = None,
    near_threshold: Annotated[
        float | None, typer.Option(help="Correlation at which two images count as copies")
    ] = None,
    progress: Progress = True,
    shift: Annotated[
        bool, typer.Option(help="Check, class by class, whether val/test differ in distribution from train")
    ] = True,
    threads: Threads = None,
    shortcuts: Annotated[
        bool,
        typer.Option(
            help="Check how well acquisition cues alone (size, format, scanner...) predict each class"
        ),
    ] = True,
    manifest: dict[str, str] | None = None,
) -> None:
    """Counts, unreadable files, exact and near duplicates, leakage between splits, label conflicts, shift,
    shortcuts."""
    from medclf import api

    api.set_threads(threads)
    report = api.audit(
        data,
        workers=workers,
        near_threshold=near_threshold,
        progress=progress,
        check_shift=shift,
        check_shortcut=shortcuts,
        manifest=manifest,
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
    from medclf import api

    err.print(f"Fetching {api.medmnist_filename(name, size)} from {mirror or 'Zenodo (record 10519652)'}...")
    path = api.fetch_medmnist(name, size, out, mirror=mirror)
    err.print(f"{path}: checksum verified")


@app.command()
@_trackable("train")
@expand("settings", TRAINING)
@expand("manifest", MANIFEST, manifest_options)
def train(
    data: DataArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write")],
    settings: dict[str, Any],
    config: Annotated[Path | None, typer.Option(help="JSON or TOML file of training settings")] = None,
    resume: Resume = False,
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
    progress: Progress = True,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Exit with code 3 when the sanity gate fails (the model is not clearly better than the "
            "majority class or a thumbnail baseline, or the time budget cut its schedule); the bundle is "
            "still written",
        ),
    ] = False,
    manifest: dict[str, str] | None = None,
) -> None:
    """Train a classifier and write a verified model bundle. With no options a planner decides.

    Several processes or GPUs: `torchrun --nproc_per_node N -m medclf train DATA ...` (README, Scaling out).
    Exit codes: 0 done, 2 bad input or settings, 3 with --strict when the sanity gate failed.
    """
    from medclf import api

    cfg = api.TrainConfig.from_file(config) if config else api.TrainConfig()
    cfg = cfg.updated({**settings, "manifest": manifest})
    if folds is not None and members is not None:
        raise MedclfError("choose --folds or --members, not both")
    if strict and (folds is not None or members is not None):
        raise MedclfError("--strict gates single runs (and their automatic members), not --folds/--members")
    run: dict[str, Any] = {"config": cfg, "resume": resume, "progress": progress}
    if members is not None:
        api.train_members(data, out, members=members, method=fusion, **run)
    elif folds is not None:
        api.train_folds(data, out, folds=folds, method=fusion, **run)
    else:
        result = api.train(data, out, **run)
        if strict and result.sanity is not None and not result.sanity.get("passed", True):
            raise typer.Exit(api.SANITY_EXIT_CODE)


@app.command()
@expand("settings", PRETRAINING)
def pretrain(
    data: Annotated[
        list[str], typer.Argument(help="Image sources (folders, CSV manifests, .npz), labels ignored")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Backbone bundle folder to write")],
    settings: dict[str, Any],
    resume: Resume = False,
    progress: Annotated[bool, typer.Option(help="Show decoding progress")] = True,
) -> None:
    """Self-supervised (SimCLR) pretraining on unlabelled images; writes a sealed backbone bundle (no head)
    for `medclf train --init-from`. Progress shows the SSL loss and, when a source has labels, the accuracy
    of a k-NN probe on its validation images. Exit codes: 0 done, 2 bad input or settings."""
    from medclf import api

    api.pretrain(data, out, resume=resume, progress=progress, **settings)


@app.command()
@_trackable("evaluate", [o for o in TRACKING if o.name != "registered_model"])
@expand("reading", READING, keep_defaults=True)
@expand("manifest", MANIFEST, manifest_options)
def evaluate(
    bundle: BundleArgument,
    data: Annotated[str, typer.Argument(help="Dataset holding the split to evaluate")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder")] = Path("eval"),
    split: Annotated[str, typer.Option(help="Split to evaluate: test, val or train")] = "test",
    include_train_copies: Annotated[
        bool, typer.Option(help="Headline figures on the whole split, copies of training samples included")
    ] = False,
    *,
    reading: dict[str, Any],
    engine: Engine = "auto",
    tta: Tta = False,
    robustness: Annotated[
        bool, typer.Option("--robustness", help="Also measure accuracy under FGSM and PGD attacks")
    ] = False,
    threads: Threads = None,
    trusted_keys: TrustedKeys = None,
    bundle_sha256: BundleSha256 = None,
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
    manifest: dict[str, str] | None = None,
) -> None:
    """metrics.json, predictions.csv, ROC/confusion/reliability plots and report.html for one split."""
    from medclf import api

    api.set_threads(threads)
    api.evaluate(
        api.load_bundle(bundle, trusted_keys=trusted_keys, expected_sha256=bundle_sha256),
        data,
        out,
        split=split,
        include_train_copies=include_train_copies,
        **reading,
        engine=engine,
        tta=tta,
        robustness=robustness,
        by=by,
        class_map=class_map,
        operating_point=operating_point,
        min_group_n=min_group_n,
        manifest=manifest,
    )


@app.command()
def predict(
    bundle: BundleArgument,
    inputs: Annotated[list[str], typer.Argument(help="Image files and/or folders (searched recursively)")],
    format: Annotated[str, typer.Option("--format", "-f", help="json or csv")] = "json",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout")
    ] = None,
    engine: Engine = "auto",
    tta: Tta = False,
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
    threads: Threads = None,
    trusted_keys: TrustedKeys = None,
    bundle_sha256: BundleSha256 = None,
) -> None:
    """Classify images. Exit code 2 if any input was refused (the others still get answers)."""
    from medclf import api

    api.set_threads(threads)
    if format not in ("json", "csv"):
        raise MedclfError(f"--format must be json or csv, not {format!r}")
    b = api.load_bundle(bundle, trusted_keys=trusted_keys, expected_sha256=bundle_sha256)
    results = b.predict(inputs, engine=engine, tta=tta)
    if explain is not None:
        _add_heatmaps(b, inputs, results, explain, explain_method)
    sr_notes = api.write_sr_files(b, results, sr) if sr is not None else []
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


def _add_heatmaps(
    b: Predictor, inputs: list[str], results: list[dict[str, Any]], folder: Path, method: str
) -> None:
    """Explain the class each prediction chose; the heatmap's path joins that input's entry."""
    from medclf import api

    chosen = {r["path"]: r["predicted"] for r in results if "predicted" in r}
    heatmaps = {
        r["path"]: r["heatmap"]
        for r in api.explain_inputs(b, inputs, folder, method=method, targets=chosen)
        if "heatmap" in r
    }
    for r in results:
        if r["path"] in heatmaps:
            r["heatmap"] = heatmaps[r["path"]]


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
@expand("reading", READING, keep_defaults=True)
def ensemble(
    bundles: Annotated[list[Path], typer.Argument(help="Member bundles (folders or .zip), at least two")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Ensemble bundle folder to write")],
    data: Annotated[str, typer.Option(help="The dataset the members were trained on (for validation)")],
    method: Annotated[str, typer.Option(help="mean, weighted (fitted on validation) or stacking")] = "mean",
    calibrate: Annotated[
        bool, typer.Option(help="Fit the ensemble's temperature on the shared validation samples")
    ] = True,
    *,
    reading: dict[str, Any],
) -> None:
    """Fuse trained bundles into one ensemble bundle; weights and meta-learner come from validation only."""
    from medclf import api

    api.ensemble(
        bundles,
        out,
        data=data,
        method=method,
        calibrate=calibrate,
        **reading,
    )


@app.command()
@_trackable("export")
@expand("reading", READING, keep_defaults=True)
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
    seed: Seed = 0,
    *,
    reading: dict[str, Any],
    monai_bundle: Annotated[
        Path | None,
        typer.Option(
            "--monai-bundle", help="Write BUNDLE as a MONAI bundle into this new folder (instead of --out)"
        ),
    ] = None,
    threads: Threads = None,
) -> None:
    """Compress a bundle: distil, prune, export to ONNX, quantise to int8; records accuracy before/after.
    Or, with --monai-bundle, write it as a MONAI bundle."""
    from medclf import api

    api.set_threads(threads)
    if monai_bundle is not None:
        compressing = any(v for v in (out, data, onnx, int8, prune, distill_from, student, student_kwargs))
        return _export_monai_bundle(bundle, monai_bundle, compressing)
    if out is None:
        raise MedclfError("--out is required (the bundle folder to write), or --monai-bundle")
    api.export(
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
        **reading,
    )


def _export_monai_bundle(bundle: Path, folder: Path, compressing: bool) -> None:
    """``medclf export --monai-bundle``: BUNDLE as it is, as a MONAI bundle."""
    from medclf import api

    if compressing:
        raise MedclfError(
            "--monai-bundle exports BUNDLE as it is: compress it first (--out), then export the result"
        )
    written = api.export_monai_bundle(bundle, folder)
    err.print(f"MONAI bundle written to {written}", highlight=False)


def _json_option(name: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MedclfError(f"{name} must be JSON, e.g. '{{\"width\": 12}}' ({exc})") from None


@app.command()
def info(
    bundle: BundleArgument,
    trusted_keys: TrustedKeys = None,
    bundle_sha256: BundleSha256 = None,
    card: Annotated[bool, typer.Option("--card", help="Print the bundle's MODEL_CARD.md instead")] = False,
) -> None:
    """Verify a bundle's integrity and show what it holds and who signed it (--card: its model card)."""
    from medclf import api

    b = api.load_bundle(bundle, trusted_keys=trusted_keys, expected_sha256=bundle_sha256)
    m = b.manifest
    if card:
        if api.MODEL_CARD not in m["files"]:
            raise MedclfError(f"{bundle}: this bundle has no {api.MODEL_CARD} (made before medclf wrote one)")
        print(b.read_file(api.MODEL_CARD).decode("utf-8"), end="")
        return
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
        _print_backbone(m, bundle)
        return
    _print_classifier(b)
    if m.get("operating_point"):
        _print_operating_point(m["operating_point"])


def _print_backbone(m: dict[str, Any], bundle: Path) -> None:
    pre = m.get("pretraining", {})
    images = sum(int(s.get("images", 0)) for s in pre.get("sources", []))
    print(f"kind        backbone (no output layer): fine-tune it with `medclf train --init-from {bundle}`")
    print(
        f"pretrained  {pre.get('method')}, {pre.get('epochs')} epochs on {images} images of {len(pre.get('sources', []))} source(s)"
    )


def _print_classifier(b: Predictor) -> None:
    """What `medclf info` says of a bundle that classifies: classes, validation, sanity gate, engines."""
    from medclf import api

    m = b.manifest
    val = m.get("metrics", {}).get("val", {})
    per = b.finding_temperatures
    if per is None:
        print(f"calibration temperature {b.temperature:.4g}")
    else:  # multi-label: one per finding
        print(
            "calibration temperatures "
            + ", ".join(f"{c} {t:.4g}" for c, t in zip(b.classes, per, strict=True))
        )
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
    print(f"engines     {', '.join(api.available_engines(b))} (default: {b.engine()})")
    if api.MODEL_CARD in m["files"]:
        print(f"model card  {api.MODEL_CARD} (medclf info --card prints it)")


def _print_operating_point(op: dict[str, Any]) -> None:
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
@expand("reading", READING, keep_defaults=True)
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
    engine: Engine = "auto",
    *,
    reading: dict[str, Any],
) -> None:
    """Fit the temperature and an operating point (threshold) on a site's labelled sample; write a new bundle."""
    from medclf import api

    api.recalibrate(
        bundle,
        data,
        out,
        positive=positive,
        sensitivity=sensitivity,
        class_map=class_map,
        split=split,
        engine=engine,
        **reading,
    )


@app.command()
def models() -> None:
    """List the registered architectures."""
    from medclf import api

    for name, description in api.list_models().items():
        print(f"{name:14s} {description}")


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the demo's data, bundle and report")
    ] = Path("demo-out"),
    n_per_class: Annotated[int, typer.Option(help="Simulated cases per class")] = 200,
    time_budget: Annotated[str, typer.Option(help="Training time budget")] = "120s",
    seed: Seed = 0,
) -> None:
    """Simulated brain MRI (from the MNI152 template): audit, train, evaluate, report, predict."""
    # The demo is itself a script over the API, a layer above it (pyproject.toml, [tool.importlinter]).
    from medclf.demo import run_demo

    run_demo(out, n_per_class=n_per_class, time_budget=time_budget, seed=seed)


@app.command()
@expand("manifest", MANIFEST, manifest_options)
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
    cache_dir: CacheDir = None,
    progress: Progress = True,
    manifest: dict[str, str] | None = None,
) -> None:
    """Traditional-ML baseline: GLCM/LBP/HOG/intensity features and classical classifiers chosen on
    validation AUC (one-vs-rest per finding for multi-label data); writes the evaluate outputs for the test
    split and baseline.json."""
    from medclf import api

    api.baseline(
        data,
        out,
        size=size,
        methods=methods,
        seed=seed,
        workers=workers,
        cache_dir=cache_dir,
        progress=progress,
        manifest=manifest,
    )


@app.command("dicom-node")
def dicom_node(
    bundle: BundleArgument,
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
    trusted_keys: TrustedKeys = None,
    bundle_sha256: BundleSha256 = None,
) -> None:
    """DICOM Storage SCP: answers C-ECHO, classifies each image received by C-STORE and writes
    <SOPInstanceUID>.json and <SOPInstanceUID>.sr.dcm to --out. Stop with Ctrl-C."""
    import logging

    from medclf import api

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    api.dicom_node(
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
    bundle: BundleArgument,
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
    from medclf import api

    e = api.explain_image(api.load_bundle(bundle), image, method=method, target=target, out=out)
    print(json.dumps({"path": str(image), **e.to_dict(), "heatmap": str(out)}, indent=2))
    if e.ood:
        err.print(f"[yellow]warning[/] {image}: {e.warning}", highlight=False)


@app.command()
def serve(
    bundle: BundleArgument,
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
    engine: Engine = "auto",
    tta: Tta = False,
    trusted_keys: TrustedKeys = None,
    bundle_sha256: BundleSha256 = None,
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
    from medclf import api

    api.serve(
        bundle,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
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
        header_timeout_s=header_timeout,
        max_client_connections=max_client_connections,
        max_connections=max_connections,
    )


serve_keys_app = typer.Typer(help="API keys for `medclf serve`: stored as sha256 hashes, shown once.")
app.add_typer(serve_keys_app, name="serve-keys")


@serve_keys_app.command("add")
def serve_keys_add(
    key_file: Annotated[Path, typer.Argument(help="Key file (created when missing, mode 0600)")],
    key_id: Annotated[str | None, typer.Option("--id", help="A name for the key (default: random)")] = None,
) -> None:
    """Make a new API key, store only its hash, and print the key once."""
    from medclf import api

    new_id, key = api.add_api_key(key_file, key_id)
    err.print(f"Added key {new_id!r} to {key_file}. It is shown only now; store it safely:", highlight=False)
    print(key)


@serve_keys_app.command("list")
def serve_keys_list(key_file: Annotated[Path, typer.Argument(help="Key file")]) -> None:
    """The key ids in a key file."""
    from medclf import api

    for key_id in api.list_api_keys(key_file):
        print(key_id)


@serve_keys_app.command("remove")
def serve_keys_remove(
    key_file: Annotated[Path, typer.Argument(help="Key file")],
    key_id: Annotated[str, typer.Argument(help="Id of the key to revoke")],
) -> None:
    """Revoke a key (a running server notices the change at its next request)."""
    from medclf import api

    api.remove_api_key(key_file, key_id)
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
    from medclf import api

    rows = api.read_audit_log(db, limit=limit)
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(api.format_audit_log(rows))


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
    from medclf import api

    result = api.deidentify(
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
        from medclf import __version__

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
    from medclf import api

    check = api.sign_bundle(bundle, key, signer=signer)
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
    from medclf import api

    private, public = api.generate_key_pair(prefix)
    err.print(f"wrote {private} (private: keep it secret) and {public} (public)", highlight=False)
    print(f"key {api.public_key_id(public)}")


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script: user errors exit 2 with one line, never a traceback."""
    # A decoder plugin written in Rust (pylibjpeg-rle) panics on some malformed data before medclf turns
    # the failure into a refusal: keep its panic to one line, never a backtrace.
    os.environ["RUST_BACKTRACE"] = "0"
    # Before torch is imported (medclf.api imports it): GNU OpenMP reads its wait policy once
    # (medclf.threads). The one module below the API that the command line calls directly.
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
