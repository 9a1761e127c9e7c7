"""The Python API; the CLI is a thin layer over these functions.

import medclf
result = medclf.train("data/", "runs/model", time_budget="10m")
metrics = medclf.evaluate("runs/model", "data/", "runs/eval")
bundle = medclf.load_bundle("runs/model")                             # a Predictor: verified, ready to run
bundle.predict(["scan.dcm", "slice.png"])
medclf.sign_bundle("runs/model", "keys/alice.key")                   # Ed25519, into signatures.json
medclf.load_bundle("runs/model", trusted_keys="trusted/")            # refuses what no trusted key signed
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medclf.bundle import Bundle, sign_bundle
from medclf.data.audit import AuditReport
from medclf.data.audit import audit as _audit
from medclf.data.fetch import fetch_medmnist, medmnist_filename
from medclf.data.signatures import NEAR_THRESHOLD
from medclf.data.sources import load_source
from medclf.evaluation.runner import evaluate
from medclf.folds import train
from medclf.model_card import MODEL_CARD
from medclf.predictor import Predictor, as_predictor
from medclf.sanity import EXIT_CODE as SANITY_EXIT_CODE
from medclf.signing import TrustedKeys
from medclf.training import TrainConfig, TrainResult

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from medclf.compress import ExportResult
    from medclf.explain import Explanation
    from medclf.fusion import EnsembleResult
    from medclf.privacy import DeidReport
    from medclf.tracking import Tracker

__all__ = [
    "MODEL_CARD",
    "SANITY_EXIT_CODE",
    "Bundle",
    "Predictor",
    "TrainConfig",
    "TrainResult",
    "add_api_key",
    "audit",
    "available_engines",
    "baseline",
    "deidentify",
    "dicom_node",
    "ensemble",
    "evaluate",
    "explain_image",
    "explain_inputs",
    "export",
    "export_monai_bundle",
    "fetch_medmnist",
    "format_audit_log",
    "generate_key_pair",
    "list_api_keys",
    "list_models",
    "load_bundle",
    "medmnist_filename",
    "predict",
    "pretrain",
    "public_key_id",
    "read_audit_log",
    "recalibrate",
    "remove_api_key",
    "serve",
    "set_threads",
    "sign_bundle",
    "track",
    "train",
    "train_folds",
    "train_members",
    "write_sr_files",
]


def audit(
    data: str | Path,
    *,
    workers: int | None = None,
    near_threshold: float | None = None,
    progress: bool = True,
    check_shift: bool = True,
    check_shortcut: bool = True,
    manifest: dict[str, str] | None = None,
) -> AuditReport:
    """Audit a dataset: counts, unreadable files, exact/near duplicates, cross-split leakage, conflicts,
    (``check_shift``) whether val/test differ in distribution from train, class by class, and
    (``check_shortcut``) how well acquisition cues alone predict each class (shortcut learning).
    ``workers``: decoding processes (default: the CPUs available, see :mod:`medclf.threads`). ``manifest``:
    how to read a CSV manifest (:class:`medclf.data.sources.ManifestOptions`)."""
    from medclf import threads

    samples = load_source(data, default_split="train", manifest=manifest)
    return _audit(
        samples,
        workers=workers or threads.decode_workers(),
        near_threshold=near_threshold or NEAR_THRESHOLD,
        progress=progress,
        check_shift=check_shift,
        check_shortcut=check_shortcut,
    )


def load_bundle(
    path: str | Path,
    *,
    expected_sha256: str | None = None,
    trusted_keys: str | Path | TrustedKeys | None = None,
    max_parameters: int | None = None,
) -> Predictor:
    """Load and verify a bundle folder or ``.zip`` (every hash; ``trusted_keys``: a signature by one of them;
    ``expected_sha256``: this bundle only; see :func:`medclf.bundle.load_bundle`), ready to predict.

    Returns a :class:`~medclf.predictor.Predictor`: ``.predict(inputs)``, ``.predict_tensors(x)``, and the
    bundle's fields (``classes``, ``spec``, ``manifest``, ``sha256``, ...) read through; ``.bundle`` is the
    verified :class:`~medclf.bundle.Bundle`."""
    return Predictor.load(
        path, expected_sha256=expected_sha256, trusted_keys=trusted_keys, max_parameters=max_parameters
    )


def predict(
    bundle: str | Path | Bundle | Predictor,
    inputs: Any,
    *,
    batch_size: int = 32,
    engine: str = "auto",
    tta: bool | str | Sequence[str] | None = None,
    trusted_keys: str | Path | None = None,
    bundle_sha256: str | None = None,
) -> list[dict[str, Any]]:
    """Classify files, folders or arrays with a bundle (see :meth:`Predictor.predict`). ``trusted_keys`` /
    ``bundle_sha256``: refuse a bundle path that no trusted key signed / with another sha256 (see
    :func:`~medclf.bundle.load_bundle`)."""
    b = as_predictor(bundle, trusted_keys=trusted_keys, expected_sha256=bundle_sha256)
    return b.predict(inputs, batch_size=batch_size, engine=engine, tta=tta)


def ensemble(
    bundles: Sequence[str | Path | Bundle | Predictor],
    out: str | Path,
    *,
    data: str | Path,
    method: str = "mean",
    **options: Any,
) -> EnsembleResult:
    """Fuse trained bundles into one ensemble bundle (``method``: mean, weighted or stacking); anything
    fitted is fitted on validation predictions of ``data``, the dataset the members were trained on.
    See :func:`medclf.fusion.ensemble`."""
    from medclf.fusion import ensemble as _ensemble

    return _ensemble(bundles, out, data=data, method=method, **options)


def train_folds(
    data: str | Path, out: str | Path, *, folds: int = 5, method: str = "mean", **settings: Any
) -> EnsembleResult:
    """K-fold bagging: ``folds`` training runs, each validating on another fold, fused into one ensemble
    bundle within one time budget. See :func:`medclf.folds.train_folds`."""
    from medclf.folds import train_folds as _train_folds

    return _train_folds(data, out, folds=folds, method=method, **settings)


def train_members(
    data: str | Path, out: str | Path, *, members: int = 3, method: str = "mean", **settings: Any
) -> EnsembleResult:
    """Seed bagging: ``members`` runs with different training seeds and one shared validation split, fused
    into one ensemble bundle within one time budget. See :func:`medclf.folds.train_members`."""
    from medclf.folds import train_members as _train_members

    return _train_members(data, out, members=members, method=method, **settings)


def export(bundle: str | Path | Bundle | Predictor, out: str | Path, **options: Any) -> ExportResult:
    """Compress a bundle into a new one: ``onnx=True``, ``int8=True``, ``prune=0.5``, ``student="compact-s"``
    and/or ``distill_from=TEACHER``, with ``data=`` the training data; see
    :func:`medclf.compress.export_bundle` for every option. Returns the new bundle's path and its
    ``compression`` record (what was done, validation accuracy before and after)."""
    from medclf.compress import export_bundle

    return export_bundle(bundle, out, **options)


def export_monai_bundle(bundle: str | Path | Bundle | Predictor, out: str | Path) -> Path:
    """Write ``bundle`` as a MONAI bundle folder ``out`` (metadata, inference config, safetensors weights,
    README) that MONAI's ``python -m monai.bundle run`` executes with medclf's reader and preprocessing;
    see :mod:`medclf.interop.monai_bundle`."""
    from medclf.interop.monai_bundle import export_monai_bundle as write

    return write(bundle, out)


def baseline(
    data: str | Path,
    out: str | Path,
    *,
    size: int | None = None,
    methods: Sequence[str] | str = ("logreg", "rf", "svm"),
    seed: int = 0,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    manifest: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Traditional-ML baseline: hand-crafted features (intensity, GLCM, LBP, HOG) and classical classifiers
    chosen on validation AUC; writes the ``evaluate`` outputs for the test split plus ``baseline.json``.

    Returns the test metrics (headline without copies of training samples, ``all_samples`` with them) and
    a ``baseline`` key holding the selection table. See :mod:`medclf.traditional`.
    """
    from medclf.traditional import run_baseline

    return run_baseline(
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


def recalibrate(
    bundle: str | Path | Bundle | Predictor, data: str | Path, out: str | Path, **options: Any
) -> dict[str, Any]:
    """Fit a bundle's temperature and an operating point (``positive=``, ``sensitivity=`` or Youden's J,
    ``class_map=``) on a labelled sample from a new site; write a new sealed bundle to ``out`` and return
    its ``operating_point`` record. See :func:`medclf.evaluation.recalibrate.recalibrate`."""
    from medclf.evaluation.recalibrate import recalibrate as _recalibrate

    return _recalibrate(bundle, data, out, **options)


def pretrain(data: str | Path | Sequence[str | Path], out: str | Path, **settings: Any) -> Any:
    """Self-supervised (SimCLR) pretraining on the images of one or more sources, labels ignored; writes a
    sealed backbone bundle that ``train(..., init_from=out)`` fine-tunes. Returns a
    :class:`medclf.pretrain.PretrainResult`. See :func:`medclf.pretrain.pretrain`."""
    from medclf.pretrain import pretrain as _pretrain

    sources = [data] if isinstance(data, (str, Path)) else list(data)
    return _pretrain(sources, out, **settings)


# What the `medclf` command needs beyond the functions above: the CLI calls nothing but this module.


def set_threads(threads: int | None = None) -> None:
    """Run PyTorch (and ONNX Runtime sessions and decoding workers) on ``threads`` threads; None: the CPUs
    that other processes leave free. See :func:`medclf.threads.apply`."""
    from medclf import threads as thread_policy

    thread_policy.apply(threads)


def track(job: str, out: str | Path, **options: Any) -> AbstractContextManager[Tracker]:
    """Track one job (``"train"``, ``"evaluate"``, ``"export"``) writing ``out`` as an MLflow run, from
    entering to leaving the ``with`` block; ``options``: ``uri``, ``experiment``, ``registered_model``,
    ``params``, ... See :func:`medclf.tracking.track`."""
    from medclf.tracking import track as _track

    return _track(job, out, **options)


def explain_image(
    bundle: Bundle | Predictor,
    image: str | Path,
    *,
    method: str = "auto",
    target: str | int | None = None,
    out: str | Path | None = None,
) -> Explanation:
    """A heatmap of what drove ``bundle``'s prediction for one image (``method``: auto, gradcam, gradcampp,
    occlusion; ``target``: the class to explain, default the predicted one; ``out``: also write the overlay
    PNG there). See :func:`medclf.explain.explain_image`."""
    from medclf.explain import explain_image as _explain_image

    return _explain_image(bundle, image, method=method, target=target, out=out)


def explain_inputs(
    bundle: Bundle | Predictor, inputs: Any, out_dir: str | Path, **options: Any
) -> list[dict[str, Any]]:
    """Predict like :meth:`Predictor.predict` and write one heatmap PNG per input into ``out_dir``
    (``method=``, ``targets=``). See :func:`medclf.explain.explain_inputs`."""
    from medclf.explain import explain_inputs as _explain_inputs

    return _explain_inputs(bundle, inputs, out_dir, **options)


def write_sr_files(bundle: Predictor, results: Sequence[dict[str, Any]], out_dir: str | Path) -> list[str]:
    """One DICOM SR (``<SOPInstanceUID>.sr.dcm``) per DICOM input of ``results`` (from :func:`predict`)
    into ``out_dir``; returns why an input got none. See :func:`medclf.serve.sr.write_sr_files`."""
    from medclf.serve.sr import write_sr_files as _write_sr_files

    return _write_sr_files(bundle, results, out_dir)


def available_engines(bundle: Bundle | Predictor) -> list[str]:
    """The inference engines (torch, onnx-fp32, onnx-int8) that ``bundle``'s files can run."""
    from medclf.engines import available_engines as _available_engines

    return _available_engines(bundle.manifest["files"])


def list_models() -> dict[str, str]:
    """The registered architectures: name -> one-line description."""
    from medclf.models import list_models as _list_models
    from medclf.models import model_info

    return {name: model_info(name).description for name in _list_models()}


def serve(
    bundle: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "info",
    **settings: Any,
) -> None:
    """Serve ``bundle`` over HTTP until interrupted. ``settings``: the fields of
    :class:`medclf.serve.app.ServeSettings` (``api_key_file``, ``engine``, ...) and of
    :class:`medclf.serve.http_guard.ConnectionLimits` (``header_timeout_s``, ``max_connections``, ...), by
    name. See :func:`medclf.serve.app.run`."""
    from dataclasses import fields

    from medclf.serve.app import ServeSettings, run
    from medclf.serve.http_guard import ConnectionLimits

    limit_names = {f.name for f in fields(ConnectionLimits)}
    server = ServeSettings(**{k: v for k, v in settings.items() if k not in limit_names})
    limits = ConnectionLimits(**{k: v for k, v in settings.items() if k in limit_names})
    run(bundle, host=host, port=port, workers=workers, settings=server, log_level=log_level, limits=limits)


def dicom_node(bundle: str | Path, out: str | Path, **options: Any) -> None:
    """Run a DICOM Storage SCP that classifies each image it receives and writes the results to ``out``,
    until interrupted. See :func:`medclf.serve.dicom_node.run_dicom_node` for ``options``."""
    from medclf.serve.dicom_node import run_dicom_node

    run_dicom_node(bundle, out, **options)


def add_api_key(key_file: str | Path, key_id: str | None = None) -> tuple[str, str]:
    """Make an API key for ``medclf serve``, store only its hash in ``key_file`` (created when missing, mode
    0600) and return ``(key_id, key)``."""
    from medclf.serve.auth import add_key

    return add_key(key_file, key_id)


def list_api_keys(key_file: str | Path) -> list[str]:
    """The ids of the keys in an API key file."""
    from medclf.serve.auth import read_key_file

    return list(read_key_file(key_file))


def remove_api_key(key_file: str | Path, key_id: str) -> None:
    """Revoke an API key (a running server notices at its next request)."""
    from medclf.serve.auth import remove_key

    remove_key(key_file, key_id)


def read_audit_log(db: str | Path, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` rows of the audit log ``medclf serve`` writes, oldest first."""
    from medclf.serve.auditlog import read_rows

    return read_rows(db, limit=limit)


def format_audit_log(rows: Sequence[dict[str, Any]]) -> str:
    """Audit log rows (:func:`read_audit_log`) as a plain text table."""
    from medclf.serve.auditlog import format_rows

    return format_rows(rows)


def deidentify(src: str | Path, out: str | Path, **options: Any) -> DeidReport:
    """De-identify a DICOM file or folder into ``out`` (PS3.15 Basic Application Level Confidentiality
    Profile); ``src`` is never modified. See :func:`medclf.privacy.deidentify` for ``options``."""
    from medclf.privacy import deidentify as _deidentify

    return _deidentify(src, out, **options)


def generate_key_pair(prefix: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair for :func:`sign_bundle`, ``PREFIX.key`` (private, mode 0600) and
    ``PREFIX.pub``, and return their paths. See :func:`medclf.signing.generate_key_pair`."""
    from medclf.signing import generate_key_pair as _generate_key_pair

    return _generate_key_pair(prefix)


def public_key_id(path: str | Path) -> str:
    """The short fingerprint by which signatures name the public key in file ``path``."""
    from medclf.signing import key_id, load_public_key

    return key_id(load_public_key(path))
