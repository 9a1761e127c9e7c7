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
from medclf.data.fetch import fetch_medmnist
from medclf.data.signatures import NEAR_THRESHOLD
from medclf.data.sources import load_source
from medclf.evaluation.runner import evaluate
from medclf.folds import train
from medclf.predictor import Predictor, as_predictor
from medclf.signing import TrustedKeys
from medclf.training import TrainConfig, TrainResult

if TYPE_CHECKING:
    from rich.console import Console

    from medclf.compress import ExportResult
    from medclf.fusion import EnsembleResult

__all__ = [
    "Bundle",
    "Predictor",
    "TrainConfig",
    "TrainResult",
    "audit",
    "baseline",
    "ensemble",
    "evaluate",
    "export",
    "fetch_medmnist",
    "load_bundle",
    "predict",
    "pretrain",
    "recalibrate",
    "sign_bundle",
    "train",
    "train_folds",
    "train_members",
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
    console: Console | None = None,
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
        console=console,
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
