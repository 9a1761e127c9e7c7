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
post-processing divides the logits by the bundle's temperature before MONAI's softmax: the probabilities
match ``medclf predict`` (engine ``torch``) within float32 rounding. The MONAI bundle therefore needs
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
    ``SupervisedEvaluator`` without its ignite dependency."""

    def __init__(
        self,
        dataloader: Any,
        network: torch.nn.Module,
        inferer: Any,
        postprocessing: Any,
        classes: Sequence[str],
        output_dir: str | Path,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dataloader = dataloader
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.classes = [str(c) for c in classes]
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)

    @torch.no_grad()
    def run(self) -> list[dict[str, Any]]:
        self.network.eval()
        rows: list[dict[str, Any]] = []
        for batch in self.dataloader:
            logits = self.inferer(batch["image"].to(self.device), self.network)
            for path, pred in zip(batch["path"], decollate_batch(logits), strict=True):
                probs = np.asarray(self.postprocessing(pred).detach().cpu(), dtype=np.float64)
                rows.append(
                    {
                        "path": str(path),
                        "predicted": self.classes[int(np.argmax(probs))],
                        **{f"prob_{c}": float(p) for c, p in zip(self.classes, probs, strict=True)},
                    }
                )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(
                fh, fieldnames=["path", "predicted", *[f"prob_{c}" for c in self.classes]]
            )
            writer.writeheader()
            for row in rows:
                writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        return rows


# -- the files -----------------------------------------------------------------------------------------------


def _inference_config(b: Bundle) -> dict[str, Any]:
    model = b.manifest["model"]
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
        "temperature": b.temperature,
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
                {"_target_": "Lambda", "func": "$lambda logits: logits.double() / @temperature"},
                {"_target_": "Activations", "softmax": True},
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
    classes = list(b.classes)
    stats = (m.get("data") or {}).get("fingerprint_stats") or {}
    formats = ", ".join(sorted((stats.get("formats") or {}).keys())) or "images"
    spec = b.spec
    value_range = list((m.get("input") or {}).get("value_range") or [])
    channel_def = {str(i): name for i, name in enumerate(classes)}
    return {
        "schema": METADATA_SCHEMA_URL,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported from the medclf bundle with sha256 {b.sha256}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medclf": __version__, "safetensors": safetensors.__version__},
        "name": f"medclf {b.arch} classifier",
        "task": f"Classification of {spec.spatial_dims}D medical images into {len(classes)} classes: "
        + ", ".join(classes),
        "description": (
            f"A {b.arch} network trained with medclf (bundle sha256 {b.sha256}). Inference reads each image "
            "with medclf's guarded reader and applies medclf's preprocessing with the bundle's spec, then "
            f"divides the logits by the calibrated temperature ({b.temperature:.6g}) before the softmax. "
            "Requires the medclf package. See docs/README.md."
        ),
        "authors": "the model's trainer, with medclf",
        "copyright": "the model's trainer; see docs/README.md",
        "data_source": "see docs/README.md (training data fingerprint)",
        "data_type": formats,
        "image_classes": f"{spec.channels} channel(s), {spec.spatial_dims}D, resized to {list(spec.size)} and "
        f"normalised by medclf ({spec.normalise})",
        "pred_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(classes)),
        "eval_metrics": _metrics(m),
        "intended_use": "Research and education. Not validated for clinical use; a prediction is not a diagnosis.",
        "references": ["medclf bundle sha256 " + b.sha256],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "any",
                    "num_channels": spec.channels,
                    "spatial_shape": list(spec.size),
                    "dtype": "float32",
                    "value_range": value_range,
                    "is_patch_data": False,
                    "channel_def": {str(i): "image" for i in range(spec.channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "logits",
                    "format": "classes",
                    "num_channels": len(classes),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [],
                    "is_onehot": False,
                    "channel_def": channel_def,
                }
            },
            "post_processed_outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(classes),
                    "spatial_shape": [1],
                    "dtype": "float64",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "channel_def": channel_def,
                }
            },
        },
    }


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
    return f"""# medclf {b.arch} classifier (MONAI bundle)

Exported by `medclf export --monai-bundle` from the medclf bundle with sha256 `{b.sha256}`.
Research and education only: not validated for clinical use; a prediction is not a diagnosis.

{card}## What it does

- Classes: {", ".join(b.classes)}
- Input: {b.spec.channels} channel(s), {b.spec.spatial_dims}D, {list(b.spec.size)} after medclf's preprocessing
- Calibration: the logits are divided by the temperature {b.temperature:.6g} before the softmax
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

writes `/path/to/out/predictions.csv` (`path`, `predicted`, `prob_<class>`): the same probabilities as
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
