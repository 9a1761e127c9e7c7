"""Inference with a model bundle: the one owner of engines, test-time augmentation and the
out-of-distribution guard at prediction time.

:mod:`medclf.bundle` reads and verifies a bundle's files; a :class:`Predictor` runs the model they hold.
:meth:`Predictor.predict` classifies files, folders, arrays or images; :meth:`Predictor.predict_tensors`
preprocessed batches, through the engine chosen (:mod:`medclf.engines`; the predictor keeps the runners
it builds, since ONNX Runtime sessions are costly to create), averaged over test-time views
(:mod:`medclf.tta`), and :meth:`Predictor.ood_scores` applies the bundle's out-of-distribution guard
(:mod:`medclf.ood`). ``medclf.load_bundle`` returns a Predictor. It reads the bundle's fields through
(``classes``, ``spec``, ``manifest``, ``model``, ``sha256``, ...), so code that held the loaded
:class:`~medclf.bundle.Bundle` keeps working; ``Predictor.bundle`` is that Bundle.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from medclf.bundle import Bundle, load_bundle
from medclf.engines import Runner, TorchRunner, build_runner, probabilities, resolve_engine
from medclf.errors import BundleError, MedclfError
from medclf.inference import class_answer, expand_inputs, ood_answer, read_input
from medclf.ood import OODDetector
from medclf.operating_point import OperatingPoint
from medclf.preprocess import PreprocessSpec, preprocess
from medclf.signing import SignatureCheck, TrustedKeys
from medclf.tta import predict_with_tta
from medclf.tta import resolve as resolve_tta

__all__ = ["Predictor", "as_bundle", "as_predictor", "prediction_fields"]


class Predictor:
    """A loaded, verified bundle, ready to classify. Build it with :meth:`load` (or ``medclf.load_bundle``)
    from a path, or wrap a :class:`~medclf.bundle.Bundle` already loaded."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        # The runners built so far, by concrete engine name (see :meth:`runner`).
        self.runners: dict[str, Runner] = {}
        self._ood: OODDetector | None = None  # read from the bundle on first use

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        expected_sha256: str | None = None,
        trusted_keys: str | Path | TrustedKeys | None = None,
        max_parameters: int | None = None,
    ) -> Predictor:
        """Load and verify the bundle at ``path`` (see :func:`medclf.bundle.load_bundle` for the options)."""
        return cls(
            load_bundle(
                path,
                expected_sha256=expected_sha256,
                trusted_keys=trusted_keys,
                max_parameters=max_parameters,
            )
        )

    # -- the bundle, read through ------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.bundle.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self.bundle.manifest

    @property
    def model(self) -> nn.Module:
        return self.bundle.model

    @property
    def spec(self) -> PreprocessSpec:
        return self.bundle.spec

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def source(self) -> Path | None:
        return self.bundle.source

    @property
    def signatures(self) -> list[SignatureCheck]:
        return self.bundle.signatures

    @property
    def trust_checked(self) -> bool:
        return self.bundle.trust_checked

    @property
    def sha256(self) -> str:
        return self.bundle.sha256

    @property
    def arch(self) -> str:
        return self.bundle.arch

    @property
    def temperature(self) -> float:
        return self.bundle.temperature

    @property
    def finding_temperatures(self) -> tuple[float, ...] | None:
        return self.bundle.finding_temperatures

    @property
    def output_temperature(self) -> float | tuple[float, ...]:
        return self.bundle.output_temperature

    def file(self, name: str) -> Path:
        return self.bundle.file(name)

    def read_file(self, name: str, limit: int = 16 << 20) -> bytes:
        return self.bundle.read_file(name, limit)

    def signature_summary(self) -> str:
        return self.bundle.signature_summary()

    def close(self) -> None:
        """See :meth:`medclf.bundle.Bundle.close`."""
        self.bundle.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- engines, test-time views, the OOD guard -----------------------------------------------------------
    def engine(self, name: str = "auto") -> str:
        """The concrete engine (``torch``, ``onnx-fp32`` or ``onnx-int8``) ``name`` means for this bundle."""
        return resolve_engine(self.manifest.get("files", {}), name)

    def runner(self, name: str = "auto") -> tuple[str, Runner]:
        """The concrete engine ``name`` means, and its runner (built once, then kept)."""
        if self.manifest.get("kind") == "backbone":
            raise BundleError(
                f"{self.source or self.path} is a backbone (medclf pretrain): it has no output layer to classify "
                "with; fine-tune it with `medclf train DATA --init-from` it"
            )
        resolved = self.engine(name)
        if resolved not in self.runners:
            self.runners[resolved] = build_runner(self.bundle, resolved)
        return resolved, self.runners[resolved]

    def features(self, x: np.ndarray | torch.Tensor, engine: str = "auto") -> np.ndarray:
        """Penultimate features (for the out-of-distribution guard) from ``engine``; from the PyTorch model
        when that engine's graph does not carry them."""
        _, run = self.runner(engine)
        feats = run.features(x) if hasattr(run, "features") else None
        if feats is None:
            _, run = self.runner("torch")
            feats = cast(TorchRunner, run).features(x)
        return feats

    def tta_views(self, tta: bool | str | Sequence[str] | None) -> list[str]:
        """The test-time view names that ``tta`` means for this bundle's inputs ([] for none)."""
        return resolve_tta(tta, self.spec.size)

    @property
    def ood(self) -> OODDetector | None:
        """The out-of-distribution detector fitted at training (:class:`medclf.ood.OODDetector`), or None."""
        info = self.manifest.get("ood")
        if not info:
            return None
        if self._ood is None:
            self._ood = OODDetector.load(self.file(info["file"]), info)
        return self._ood

    def ood_scores(
        self, x: np.ndarray | torch.Tensor, *, engine: str = "auto"
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(flags, scores) of the OOD guard for preprocessed inputs, or None when the bundle has none.

        The features come from ``engine`` (an exported ONNX graph carries them), so an ONNX prediction
        does not also run the PyTorch model; the input statistics (detector version 2) from ``x`` itself."""
        detector = self.ood
        if detector is None:
            return None
        return detector.flags(self.features(x, engine), x)

    # -- prediction ----------------------------------------------------------------------------------------
    def predict_tensors(
        self,
        x: np.ndarray | torch.Tensor,
        *,
        batch_size: int = 64,
        engine: str = "auto",
        tta: bool | str | Sequence[str] | None = None,
        calibrated: bool = True,
    ) -> np.ndarray:
        """Class probabilities (float64) for already preprocessed inputs ``(N, C, *size)``.

        The bundle's temperature (a multi-label bundle's: one per finding) is applied to the logits of
        whichever engine runs (``calibrated=False``: not, for reporting calibration before scaling). ``tta``: test-time augmentation, ``True`` for the
        default views or a list of view names (see :mod:`medclf.tta`); the probabilities are averaged."""
        views = self.tta_views(tta)
        if views:

            def plain(v: np.ndarray) -> np.ndarray:
                return self.predict_tensors(v, batch_size=batch_size, engine=engine, calibrated=calibrated)

            return predict_with_tta(plain, x, views)
        _, run = self.runner(engine)
        temperature = self.output_temperature if calibrated else 1.0
        task = self.manifest.get("task", "multiclass")
        out = [
            probabilities(run(x[start : start + batch_size]), temperature, task)
            for start in range(0, len(x), batch_size)
        ]
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float64)
        return np.concatenate(out)

    def predict(
        self,
        inputs: Any,
        *,
        batch_size: int = 32,
        engine: str = "auto",
        tta: bool | str | Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Classify file paths, folders, numpy arrays or :class:`~medclf.io.Image` objects.

        Returns one dict per input: ``path``, ``predicted``, ``confidence``, ``probabilities`` (and
        ``ood``/``ood_score``/``warning`` with the bundle's guard, ``decision`` at its operating point); or
        ``path``, ``error`` and ``reason`` for an input that cannot be used (the others still get their
        answers). ``engine``: see :mod:`medclf.engines` (``auto`` runs the bundle's ONNX model when it has
        one). ``tta``: see :meth:`predict_tensors`.
        """
        engine = self.engine(engine)  # an engine the bundle cannot run is refused before any file is read
        views = self.tta_views(tta)  # so is an unknown test-time transform
        point = OperatingPoint.from_manifest(self.manifest)
        columns = point.columns(self.classes) if point is not None else None
        results: list[dict[str, Any]] = []
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            x = np.stack([t for _, t in pending])
            probs = self.predict_tensors(x, batch_size=batch_size, engine=engine, tta=views)
            ood = self.ood_scores(x, engine=engine)
            detector = self.ood
            for j, ((slot, _), p) in enumerate(zip(pending, probs, strict=True)):
                task = self.manifest.get("task", "multiclass")
                thresholds = (self.manifest.get("thresholds") or {}).get("labels")
                results[slot].update(class_answer(self.classes, p, task, thresholds))
                if point is not None:
                    # The bundle's operating point (medclf recalibrate): a yes/no call at a site's threshold.
                    results[slot]["decision"] = point.decide(float(p[columns].sum()))
                if ood is not None and detector is not None:
                    results[slot].update(ood_answer(bool(ood[0][j]), float(ood[1][j]), detector.threshold))
            pending.clear()

        for name, item in expand_inputs(inputs):
            try:
                for ref, image in read_input(name, item):
                    t0 = time.perf_counter()
                    tensor = preprocess(image, self.spec)
                    results.append(
                        {"path": ref, "preprocess_ms": round((time.perf_counter() - t0) * 1000, 2)}
                    )
                    pending.append((len(results) - 1, tensor))
                    if len(pending) >= batch_size:
                        flush()
            except MedclfError as exc:
                reason = getattr(exc, "reason", "invalid")
                results.append({"path": name, "error": exc.message, "reason": reason})
            except OSError as exc:
                results.append(
                    {"path": name, "error": f"{name}: {exc.strerror or exc}", "reason": "unreadable"}
                )
        flush()
        for r in results:
            r.pop("preprocess_ms", None)
        return results


def prediction_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """The prediction in one entry of :meth:`Predictor.predict`, as ``medclf predict``'s JSON gives it, less
    the input's ``path``: what the HTTP API and the DICOM node return. One function for all of them, so that
    a field the prediction gains (``findings``, ``positive``, ``grade``, ...) reaches every output."""
    return {key: value for key, value in entry.items() if key != "path"}


def as_predictor(
    bundle: str | Path | Bundle | Predictor,
    *,
    expected_sha256: str | None = None,
    trusted_keys: str | Path | TrustedKeys | None = None,
) -> Predictor:
    """``bundle`` as a Predictor: itself, a wrapped :class:`Bundle`, or the bundle at a path, loaded and
    verified (the options apply to a path only)."""
    if isinstance(bundle, Predictor):
        return bundle
    if isinstance(bundle, Bundle):
        return Predictor(bundle)
    return Predictor.load(bundle, expected_sha256=expected_sha256, trusted_keys=trusted_keys)


def as_bundle(bundle: str | Path | Bundle | Predictor) -> Bundle:
    """The :class:`Bundle` itself, a Predictor's, or the bundle at a path, loaded and verified."""
    if isinstance(bundle, Predictor):
        return bundle.bundle
    if isinstance(bundle, Bundle):
        return bundle
    return load_bundle(bundle)
