"""A medclf bundle as a MONAI bundle: ``medclf export BUNDLE --monai-bundle OUT`` (:func:`export_monai_bundle`).

The folder follows the MONAI Bundle specification and runs with MONAI's own commands::

    OUT/
      configs/metadata.json    MONAI's metadata (schema 20240725): versions, task, classes, metrics,
                               network_data_format (input, logits, probabilities)
      configs/inference.json   inference on a folder of images: ``python -m monai.bundle run ...``
      configs/logging.conf     the logging setup ConfigWorkflow looks for
      models/model.safetensors the network's weights, unchanged from the medclf bundle (no pickle)
      docs/README.md           what the model is (the bundle's MODEL_CARD.md when it has one), how to run it

``inference.json`` builds the network from medclf's registry (:func:`medclf.models.create_model`, with the
architecture and arguments of ``bundle.json``) and loads the safetensors weights: MONAI's own loaders
(``CheckpointLoader``, ``torch.load``) unpickle, which medclf never does. Its transforms are medclf's guarded
reader and medclf's preprocessing function with the bundle's spec (:class:`ReadImaged`,
:class:`Preprocessd`), so a MONAI run sees exactly the tensors ``medclf predict`` sees, and its
post-processing divides the logits by the bundle's temperature before MONAI's softmax (an ordinal model's
grade distribution: its CORN head outputs the grades' log-probabilities) or, for multi-label findings, a
sigmoid per finding: the probabilities match ``medclf predict`` (engine ``torch``) within float32 rounding,
and ``predictions.csv``'s ``predicted`` is medclf's answer (the median grade; the findings present at the
bundle's thresholds, which ``metadata.json`` records under ``medclf_task`` with the decision rule and
``inference.json`` under ``thresholds``). The MONAI bundle therefore needs
medclf installed (``required_packages_version`` says which version). It runs the PyTorch network only: no
out-of-distribution guard, no ONNX engine, no test-time augmentation.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import decollate_batch
from monai.transforms import MapTransform

from medclf._version import __version__
from medclf.errors import ConfigError
from medclf.io import read_image
from medclf.manifest import Manifest
from medclf.metrics.multilabel import DEFAULT_THRESHOLD
from medclf.preprocess import PreprocessSpec, preprocess

if TYPE_CHECKING:
    from medclf.bundle import Bundle
    from medclf.predictor import Predictor

__all__ = [
    "METADATA_SCHEMA",
    "METADATA_SCHEMA_URL",
    "ClassificationEvaluator",
    "Preprocessd",
    "ReadImaged",
    "export_monai_bundle",
    "list_images",
]

# The schema MONAI's model zoo validates bundle metadata against (the URL goes into metadata.json, and
# `verify_metadata` downloads it from there).
METADATA_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
_TENSOR = {
    "type": "object",
    "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
    "properties": {
        "type": {"type": "string"},
        "format": {"type": "string"},
        "num_channels": {"type": "integer"},
        "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}},
        "dtype": {"type": "string"},
        "value_range": {"type": "array", "items": {"type": "number"}},
        "is_patch_data": {"type": "boolean"},
        "channel_def": {"type": "object"},
    },
}
_IO = {
    "type": "object",
    "required": ["inputs", "outputs"],
    "properties": {
        name: {"type": "object", "additionalProperties": _TENSOR}
        for name in ("inputs", "outputs", "post_processed_outputs")
    },
}
# What that schema requires, restated by medclf for checks without a network connection (tests, air-gapped
# sites): the required keys, their JSON types and the network_data_format tensors (JSON Schema 2019-09).
# `python -m monai.bundle verify_metadata --meta_file ... --filepath FILE` checks against FILE when it
# exists and downloads MONAI's published schema into it when it does not.
METADATA_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2019-09/schema",
    "title": "MONAI bundle metadata (required keys of meta_schema_20240725, restated by medclf)",
    "type": "object",
    "required": [
        "schema",
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],
    "properties": {
        **{
            key: {"type": "string"}
            for key in [
                "schema",
                "version",
                "monai_version",
                "pytorch_version",
                "numpy_version",
                "task",
                "description",
                "authors",
                "copyright",
                "data_source",
                "data_type",
                "image_classes",
                "label_classes",
                "pred_classes",
                "intended_use",
            ]
        },
        **{
            key: {"type": "object"}
            for key in ("changelog", "required_packages_version", "eval_metrics", "supported_apps")
        },
        "references": {"type": "array", "items": {"type": "string"}},
        "network_data_format": _IO,
    },
}
# Strings MONAI's config parser reads as code or references at their start.
_PARSER_PREFIXES = ("$", "@", "%")
_LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def export_monai_bundle(bundle: str | Path | Bundle | Predictor, out: str | Path) -> Path:
    """Write ``bundle`` (a medclf bundle, verified on loading) as a MONAI bundle folder ``out``.

    ``out`` must not exist or be empty; the folder is assembled beside it and renamed into place, so it
    appears whole or not at all. Returns ``out``."""
    from medclf.predictor import as_bundle

    b = as_bundle(bundle)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} exists and is not an empty folder: choose a new folder for the MONAI bundle"
        )
    bad = [c for c in b.classes if str(c).startswith(_PARSER_PREFIXES)]
    if bad:
        raise ConfigError(
            f"class name(s) {bad} start with $, @ or %, which MONAI's config parser reads as code or references"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        (tmp / "docs").mkdir()
        shutil.copyfile(b.file("model.safetensors"), tmp / "models" / "model.safetensors")
        _write_json(tmp / "configs" / "metadata.json", _metadata(b))
        _write_json(tmp / "configs" / "inference.json", _inference_config(b))
        (tmp / "configs" / "logging.conf").write_text(_LOGGING_CONF, encoding="utf-8")
        (tmp / "docs" / "README.md").write_text(_readme(b), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- what inference.json runs --------------------------------------------------------------------------------


def list_images(folder: str | Path) -> list[dict[str, str]]:
    """MONAI's data list for every image under ``folder`` (recursive; hidden and non-image files skipped,
    as ``medclf predict`` walks a folder)."""
    from medclf.inference import expand_inputs

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"dataset_dir {root} is not a folder")
    return [{"image": str(path), "path": str(path)} for _, path in expand_inputs([root])]


class ReadImaged(MapTransform):
    """Read each ``keys`` path with medclf's guarded reader (:func:`medclf.io.read_image`): any format medclf
    reads, decoded as medclf decodes it (DICOM rescale and VOI LUT, NIfTI reoriented to RAS, ...)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Any) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = read_image(Path(d[key]))
        return d


class Preprocessd(MapTransform):
    """medclf's preprocessing (:func:`medclf.preprocess.preprocess`) with a bundle's spec: a decoded image
    becomes the float32 ``(C, *size)`` tensor the network was trained on."""

    def __init__(self, keys: KeysCollection, spec: dict[str, Any], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spec = PreprocessSpec.from_dict(dict(spec))

    def __call__(self, data: Any) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.from_numpy(preprocess(d[key], self.spec))
        return d


class ClassificationEvaluator:
    """Runs the network over a data loader and writes ``predictions.csv`` (``path``, ``predicted``,
    ``prob_<class>`` ...) into ``output_dir``: the ``evaluator`` of ``inference.json``, MONAI's
    ``SupervisedEvaluator`` without its ignite dependency.

    ``predicted`` is medclf's answer for the bundle's ``task`` (:func:`medclf.inference.class_answer`): the
    most probable class; an ordinal model's median grade (plus ``expected_grade_index``, the mean of the
    distribution); or the multi-label findings present at their ``thresholds`` (one per class, in order)
    joined by ``|`` (``No Finding`` when none is; plus ``present_<finding>``, 1 or 0)."""

    def __init__(
        self,
        dataloader: Any,
        network: torch.nn.Module,
        inferer: Any,
        postprocessing: Any,
        classes: Sequence[str],
        output_dir: str | Path,
        device: torch.device | str = "cpu",
        task: str = "multiclass",
        thresholds: Sequence[float] | None = None,
    ) -> None:
        self.dataloader = dataloader
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.classes = [str(c) for c in classes]
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        if task not in _TASKS:
            raise ConfigError(f"unknown task {task!r}; choose from {', '.join(_TASKS)}")
        if thresholds is not None and len(thresholds) != len(self.classes):
            raise ConfigError(f"{len(thresholds)} thresholds for {len(self.classes)} findings")
        self.task = task
        self.thresholds = (
            dict(zip(self.classes, map(float, thresholds), strict=True)) if thresholds is not None else None
        )

    @torch.no_grad()
    def run(self) -> list[dict[str, Any]]:
        self.network.eval()
        rows: list[dict[str, Any]] = []
        for batch in self.dataloader:
            logits = self.inferer(batch["image"].to(self.device), self.network)
            for path, pred in zip(batch["path"], decollate_batch(logits), strict=True):
                probs = np.asarray(self.postprocessing(pred).detach().cpu(), dtype=np.float64)
                rows.append({"path": str(path), **self._answer(probs)})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._columns())
            writer.writeheader()
            for row in rows:
                writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        return rows

    def _columns(self) -> list[str]:
        extra = {
            "ordinal": ["expected_grade_index"],
            "multilabel": [f"present_{c}" for c in self.classes],
        }.get(self.task, [])
        return ["path", "predicted", *[f"prob_{c}" for c in self.classes], *extra]

    def _answer(self, probs: np.ndarray) -> dict[str, Any]:
        """One row's columns after ``path``: medclf's answer for the task."""
        from medclf.inference import class_answer

        answer = class_answer(self.classes, probs, self.task, self.thresholds)
        row: dict[str, Any] = {
            "predicted": answer["predicted"],
            **{f"prob_{c}": float(p) for c, p in zip(self.classes, probs, strict=True)},
        }
        if "grade" in answer:
            row["expected_grade_index"] = float(answer["grade"]["expected_index"])
        for name, finding in (answer.get("findings") or {}).items():
            row[f"present_{name}"] = int(finding["present"])
        return row


# -- the files -----------------------------------------------------------------------------------------------


# The logits over the temperature: one, or one per finding (broadcast over the last axis).
_DIVIDE_BY_TEMPERATURE = {
    "_target_": "Lambda",
    "func": "$lambda logits: logits.double() / torch.as_tensor(@temperature, dtype=torch.float64, "
    "device=logits.device)",
}


def _inference_config(b: Bundle) -> dict[str, Any]:
    model = b.manifest["model"]
    task = _task(b)
    # A multi-label bundle's thresholds, one per finding in the order of the classes (a list: class names
    # as keys could clash with the config parser's id separators).
    thresholds = {"thresholds": _thresholds(b)} if task == "multilabel" else {}
    return {
        "imports": [
            "$import torch",
            "$from safetensors.torch import load_file",
            "$import medclf.interop.monai_bundle as monai_bundle",
        ],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/images'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "classes": list(b.classes),
        "task": task,
        **thresholds,
        "temperature": _temperature(b),
        "network_def": {
            "_target_": "medclf.models.create_model",
            "name": model["arch"],
            "in_channels": model["in_channels"],
            "n_classes": model["n_classes"],
            "spatial_dims": model["spatial_dims"],
            **model.get("kwargs", {}),
        },
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.safetensors'",
        "datalist": "$monai_bundle.list_images(@dataset_dir)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "medclf.interop.monai_bundle.ReadImaged", "keys": "image"},
                {
                    "_target_": "medclf.interop.monai_bundle.Preprocessd",
                    "keys": "image",
                    "spec": b.spec.to_dict(),
                },
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 16,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                _DIVIDE_BY_TEMPERATURE,
                {"_target_": "Activations", **_TASKS[task]["activation"]},
            ],
        },
        "evaluator": {
            "_target_": "medclf.interop.monai_bundle.ClassificationEvaluator",
            "dataloader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "classes": "@classes",
            "output_dir": "@output_dir",
            "device": "@device",
            "task": "@task",
            **{key: f"@{key}" for key in thresholds},
        },
        "initialize": [
            "$@network.load_state_dict(load_file(@checkpoint, device=str(@device)))",
            "$@network.eval()",
        ],
        "run": ["$@evaluator.run()"],
    }


def _metadata(b: Bundle) -> dict[str, Any]:
    import monai
    import safetensors

    m = b.manifest
    task = _task(b)
    stats = (m.get("data") or {}).get("fingerprint_stats") or {}
    formats = ", ".join(sorted((stats.get("formats") or {}).keys())) or "images"
    spec = b.spec
    return {
        "schema": METADATA_SCHEMA_URL,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported from the medclf bundle with sha256 {b.sha256}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medclf": __version__, "safetensors": safetensors.__version__},
        "name": f"medclf {b.arch} classifier",
        "task": _task_sentence(b, task),
        "description": (
            f"A {b.arch} network trained with medclf (bundle sha256 {b.sha256}). Inference reads each image "
            "with medclf's guarded reader and applies medclf's preprocessing with the bundle's spec, then "
            f"divides the logits by {_temperature_text(b)} before "
            f"{_TASKS[task]['activation_text']}{_decision_clause(task)}. "
            "Requires the medclf package. See docs/README.md."
        ),
        "authors": "the model's trainer, with medclf",
        "copyright": "the model's trainer; see docs/README.md",
        "data_source": "see docs/README.md (training data fingerprint)",
        "data_type": formats,
        "image_classes": f"{spec.channels} channel(s), {spec.spatial_dims}D, resized to {list(spec.size)} and "
        f"normalised by medclf ({spec.normalise})",
        "pred_classes": _pred_classes(b, task),
        "eval_metrics": _metrics(m),
        "intended_use": "Research and education. Not validated for clinical use; a prediction is not a diagnosis.",
        "references": ["medclf bundle sha256 " + b.sha256],
        "network_data_format": _data_format(b, task),
        # How the outputs become medclf's answer (MONAI's metadata has no field for a decision rule).
        "medclf_task": _task_record(b, task),
    }


def _data_format(b: Bundle, task: str) -> dict[str, Any]:
    """MONAI's ``network_data_format``: the preprocessed image in; the logits out, one channel per class
    (finding, grade), and after post-processing the probabilities."""
    spec = b.spec

    def output(kind: str, dtype: str, value_range: list[int]) -> dict[str, Any]:
        return {
            "type": kind,
            "format": _TASKS[task]["format"],
            "num_channels": len(b.classes),
            "spatial_shape": [1],
            "dtype": dtype,
            "value_range": value_range,
            "is_onehot": False,
            "channel_def": {str(i): name for i, name in enumerate(b.classes)},
        }

    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "any",
                "num_channels": spec.channels,
                "spatial_shape": list(spec.size),
                "dtype": "float32",
                "value_range": list((b.manifest.get("input") or {}).get("value_range") or []),
                "is_patch_data": False,
                "channel_def": {str(i): "image" for i in range(spec.channels)},
            }
        },
        "outputs": {"pred": output("logits", "float32", [])},
        "post_processed_outputs": {"pred": output("probabilities", "float64", [0, 1])},
    }


# How each task's logits become medclf's answer, which the exported bundle reproduces: MONAI's
# ``Activations`` after the temperature, the outputs' ``format`` in the metadata, and in words.
_TASKS: dict[str, dict[str, Any]] = {
    "multiclass": {
        "activation": {"softmax": True},
        "format": "classes",
        "activation_text": "the softmax",
        "decision": "the prediction is the most probable class",
    },
    "ordinal": {
        # An ordinal (CORN) head outputs the grades' log-probabilities, which the softmax returns as they are.
        "activation": {"softmax": True},
        "format": "ordinal",
        "activation_text": "the softmax, which gives the distribution over the ordered grades",
        "decision": "the predicted grade is the median of the grade distribution (the first grade whose cumulative "
        "probability reaches one half), not its most probable grade",
    },
    "multilabel": {
        "activation": {"sigmoid": True},
        "format": "classes",
        "activation_text": "an independent sigmoid per finding",
        "decision": "a finding is present when its probability reaches its own threshold "
        "(medclf_task.thresholds); several findings, or none, may be present",
    },
}


def _task(b: Bundle) -> str:
    task = Manifest.from_dict(b.manifest).task
    if task not in _TASKS:
        raise ConfigError(f"{b.path}: task {task!r} cannot be exported as a MONAI bundle")
    return task


def _thresholds(b: Bundle) -> list[float]:
    """A multi-label bundle's threshold per finding, in the order of its classes (0.5 where it has none, as
    ``medclf predict`` decides)."""
    labels = (b.manifest.get("thresholds") or {}).get("labels") or {}
    return [float(labels.get(c, DEFAULT_THRESHOLD)) for c in b.classes]


def _task_sentence(b: Bundle, task: str) -> str:
    dims, classes = b.spec.spatial_dims, list(b.classes)
    if task == "multilabel":
        findings = ", ".join(f"{c} (threshold {t:.4g})" for c, t in zip(classes, _thresholds(b), strict=True))
        return (
            f"Multi-label classification of {dims}D medical images: {len(classes)} findings, each present or "
            f"absent on its own: {findings}"
        )
    if task == "ordinal":
        return f"Ordinal grading of {dims}D medical images on {len(classes)} ordered grades: " + " < ".join(
            classes
        )
    return f"Classification of {dims}D medical images into {len(classes)} classes: " + ", ".join(classes)


def _decision_clause(task: str) -> str:
    # One class per image goes without saying (and the single-label description stays as it was).
    return "" if task == "multiclass" else f"; {_TASKS[task]['decision']}"


def _pred_classes(b: Bundle, task: str) -> str:
    if task == "multilabel":
        return ", ".join(
            f"{i}: {c} (present when p >= {t:.4g})"
            for i, (c, t) in enumerate(zip(b.classes, _thresholds(b), strict=True))
        )
    listed = ", ".join(f"{i}: {c}" for i, c in enumerate(b.classes))
    return f"ordered grades, {listed}" if task == "ordinal" else listed


def _temperature(b: Bundle) -> float | list[float]:
    """What the logits are divided by: the one temperature, or one per finding in the classes' order."""
    t = b.output_temperature
    return [float(v) for v in t] if isinstance(t, tuple) else float(t)


def _temperature_text(b: Bundle) -> str:
    t = _temperature(b)
    if isinstance(t, list):
        each = ", ".join(f"{c} {v:.6g}" for c, v in zip(b.classes, t, strict=True))
        return f"the calibrated temperature of each finding ({each})"
    return f"the calibrated temperature ({t:.6g})"


def _task_record(b: Bundle, task: str) -> dict[str, Any]:
    """The ``medclf_task`` entry: the task, its activation and decision rule, and what the rule needs."""
    record: dict[str, Any] = {
        "type": task,
        "temperature": _temperature(b),
        "activation": _TASKS[task]["activation_text"],
        "decision": _TASKS[task]["decision"],
    }
    if task == "ordinal":
        record["grades"] = list(b.classes)
        record["head"] = b.manifest["model"].get("kwargs", {}).get("head")
    if task == "multilabel":
        recorded = b.manifest.get("thresholds") or {}
        record["thresholds"] = dict(zip(b.classes, _thresholds(b), strict=True))
        record["thresholds_rule"] = recorded.get("rule")
        record["thresholds_fitted_on"] = recorded.get("fitted_on")
    return record


def _metrics(manifest: dict[str, Any]) -> dict[str, float]:
    out = {}
    for split, figures in (manifest.get("metrics") or {}).items():
        if isinstance(figures, dict):
            for key in ("accuracy", "balanced_accuracy", "auc"):
                value = figures.get(key)
                if isinstance(value, (int, float)):
                    out[f"{split}_{key}"] = float(value)
    return out


def _readme(b: Bundle) -> str:
    m = b.manifest
    card = ""
    if "MODEL_CARD.md" in m.get("files", {}):
        card = (b.path / "MODEL_CARD.md").read_text(encoding="utf-8").strip() + "\n\n"
    metrics = _metrics(m)
    figures = "\n".join(f"- {k}: {v:.4f}" for k, v in metrics.items()) or "- none recorded"
    task = _task(b)
    # The classes line and the extra columns of predictions.csv, by task (single-label as it always read).
    kind, extra = {
        "multiclass": ("Classes", ""),
        "ordinal": ("Grades, in order", ", `expected_grade_index`"),
        "multilabel": (
            "Findings (thresholds: `medclf_task` in `configs/metadata.json`)",
            ", `present_<finding>`",
        ),
    }[task]
    outputs = f"{_TASKS[task]['activation_text']}{_decision_clause(task)}"
    return f"""# medclf {b.arch} classifier (MONAI bundle)

Exported by `medclf export --monai-bundle` from the medclf bundle with sha256 `{b.sha256}`.
Research and education only: not validated for clinical use; a prediction is not a diagnosis.

{card}## What it does

- {kind}: {", ".join(b.classes)}
- Input: {b.spec.channels} channel(s), {b.spec.spatial_dims}D, {list(b.spec.size)} after medclf's preprocessing
- Calibration: the logits are divided by {_temperature_text(b)} before {outputs}
- Metrics recorded in the medclf bundle:
{figures}

## Requirements

MONAI, PyTorch and **medclf {__version__}** (`pip install medclf`): the network comes from medclf's registry
(`medclf.models.create_model`), and images are read and preprocessed by medclf's own functions, exactly as
`medclf predict` does. The weights are `models/model.safetensors` (no pickle). MONAI's command line also
needs `fire` (and `jsonschema` for `verify_metadata`).

## Inference on a folder of images

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir /path/to/images --output_dir /path/to/out
```

writes `/path/to/out/predictions.csv` (`path`, `predicted`, `prob_<class>`{extra}): the same probabilities as
`medclf predict` with `--engine torch` (within 1e-4). Not included: medclf's out-of-distribution guard,
its ONNX engines and test-time augmentation.

## Checking the metadata

```bash
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath /tmp/meta_schema.json
```

downloads MONAI's schema into `/tmp/meta_schema.json` (when that file is absent) and validates against it.
"""


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
