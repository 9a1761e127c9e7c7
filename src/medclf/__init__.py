"""medclf: deep-learning classification of medical images.

The public API (imported lazily, so ``import medclf`` stays fast)::

    medclf.train(data, out, **settings) -> TrainResult
    medclf.evaluate(bundle, data, out, split="test") -> dict
    medclf.audit(data) -> AuditReport
    medclf.baseline(data, out) -> dict        # hand-crafted features + classical classifiers
    medclf.load_bundle(path) -> Predictor     # .predict(paths_or_arrays); .bundle: the verified Bundle
    medclf.predict(bundle, inputs) -> list[dict]
    medclf.sign_bundle(bundle, key) -> SignatureCheck    # Ed25519; load_bundle(..., trusted_keys=DIR)
    medclf.export(bundle, out, data=..., onnx=True, int8=True) -> ExportResult   # compression
    medclf.export_monai_bundle(bundle, out) -> Path                           # a MONAI bundle
    medclf.ensemble([b1, b2], out, data=..., method="mean") -> EnsembleResult   # fusion
    medclf.train_folds(data, out, folds=5) -> EnsembleResult                  # K-fold bagging
    medclf.train_members(data, out, members=3) -> EnsembleResult              # seed bagging
    medclf.fetch_medmnist("breastmnist", size=128, out_dir="data") -> Path   # checksum-verified download
    medclf.recalibrate(bundle, site_data, out, positive=..., sensitivity=0.95) -> dict   # site operating point
    medclf.pretrain([data1, data2], out, time_budget="1h") -> PretrainResult   # SimCLR backbone bundle

The API prints nothing; to see messages and progress as the CLI shows them::

    with medclf.reporting.use(medclf.reporting.ConsoleReporter()):
        medclf.train(data, out)
"""

from __future__ import annotations

from typing import Any

from medclf import reporting as reporting  # light: no rich until something is shown
from medclf._version import __version__ as __version__

_API = {
    "train",
    "evaluate",
    "audit",
    "baseline",
    "load_bundle",
    "predict",
    "sign_bundle",
    "export",
    "export_monai_bundle",
    "ensemble",
    "train_folds",
    "train_members",
    "fetch_medmnist",
    "pretrain",
    "recalibrate",
    "Bundle",
    "Predictor",
    "TrainConfig",
    "TrainResult",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        from medclf import api

        return getattr(api, name)
    raise AttributeError(f"module 'medclf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
