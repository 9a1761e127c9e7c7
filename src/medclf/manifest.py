"""The bundle manifest (``bundle.json``) as typed sections, its JSON Schema and its version.

Every bundle writer (training, ``ensemble``, ``export``, ``recalibrate``, bagging, ``pretrain``) still builds a
plain dict; :func:`medclf.bundle.save_bundle` stamps it with :data:`MANIFEST_VERSION` and checks it against
:data:`SCHEMA` before sealing it, and :func:`medclf.bundle.load_bundle` checks it again on load (as MONAI
checks a bundle's ``metadata.json``): a manifest that does not fit is refused in one line that names the
field (``bundle.json: model.n_classes must be an integer, not a string``).

Two version numbers, two meanings. ``format_version`` (:data:`medclf.bundle.FORMAT_VERSION`) is the layout
of the bundle folder: a newer one is refused. ``manifest_version`` is the revision of the sections described
here; they only grow (a new optional section or field), so any revision loads, and a manifest without one
(written before this module existed) is revision 0 and is checked by the same schema. Unknown keys pass
everywhere: a newer medclf (or a branch: per-label thresholds, backbone bundles) may add sections.

Readers get typed access with :meth:`Manifest.from_dict` (``.model``, ``.recipe``, ``.task``,
``.temperature``...), which holds the fallbacks for old manifests in one place: a bundle without ``task``
is multi-class, one without a calibration has temperature 1, and a recipe without ``val_fraction`` used
:data:`~medclf.data.samples.DEFAULT_VAL_FRACTION`. :meth:`Recipe.rebuild_splits` rebuilds the splits a
training run used from its recipe (``ensemble`` and the compression steps need that validation split).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from medclf.data.samples import DEFAULT_VAL_FRACTION, SampleSet

__all__ = [
    "MANIFEST_VERSION",
    "SCHEMA",
    "Manifest",
    "ManifestInvalid",
    "ModelSection",
    "Recipe",
    "check_manifest",
]

MANIFEST_VERSION = 1
DEFAULT_TASK = "multiclass"  # bundles written before task types had no "task"

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
_NUM: dict[str, Any] = {"type": "number"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_OBJ: dict[str, Any] = {"type": "object"}
_SHA256: dict[str, Any] = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_PAIR: dict[str, Any] = {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2}


def _obj(properties: dict[str, Any], required: list[str] | None = None, **more: Any) -> dict[str, Any]:
    """An object with these typed fields (others allowed: the manifest only grows)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties, **more}
    if required:
        schema["required"] = required
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [{"type": "null"}, schema]}


# The fields a reader relies on are typed; everything else in a section is free (reports, notes, figures).
SCHEMA: dict[str, Any] = _obj(
    {
        "format": {"const": "medclf-bundle"},
        "format_version": _INT,
        "manifest_version": {"type": "integer", "minimum": 1},
        "kind": _STR,  # absent: a classifier; "backbone": medclf pretrain (no output layer, no classes)
        "created": _STR,
        "versions": {"type": "object", "additionalProperties": _STR},
        "files": {"type": "object", "additionalProperties": _SHA256},
        "self_sha256": _SHA256,
        "model": _obj(
            {
                "arch": {"type": "string", "minLength": 1},
                "in_channels": {"type": "integer", "minimum": 1},
                "n_classes": {"type": "integer", "minimum": 1},
                "spatial_dims": {"enum": [2, 3]},
                "kwargs": _OBJ,
                "omitted": {"type": "array", "items": _STR},
            },
            ["arch", "in_channels", "n_classes", "spatial_dims"],
        ),
        "classes": {"type": "array", "items": _STR},
        "task": _STR,
        "preprocess": _obj(
            {
                "spatial_dims": {"enum": [2, 3]},
                "size": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
                "channels": {"type": "integer", "minimum": 1},
                "crop_foreground": _BOOL,
                "crop_threshold": _NUM,
                "crop_margin": _NUM,
                "keep_aspect": _BOOL,
                "normalise": _STR,
                "percentiles": _PAIR,
                "window": _nullable(_PAIR),
                "denoise": _STR,
                "denoise_strength": _NUM,
                "standardise": _BOOL,
                "extra": _OBJ,
                "slices_as_channels": _COUNT,
            }
        ),
        "input": _obj(
            {
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "dtype": _STR,
                "value_range": _PAIR,
            }
        ),
        "recipe": _obj(
            {
                "kind": _STR,  # "ensemble"; absent: one training run
                "seed": _INT,
                "split_seed": _nullable(_INT),
                "val_fraction": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "val_fold": _nullable({"type": "array", "items": _COUNT, "minItems": 2, "maxItems": 2}),
                "best_epoch": _COUNT,
                "epochs_run": _COUNT,
                "time_budget_s": _nullable(_NUM),
                "seconds": _NUM,
                "method": _STR,
            }
        ),
        "data": _obj(
            {
                "source": _STR,
                "kind": _STR,
                "fingerprint": _nullable(_STR),
                "counts": {"type": "object", "additionalProperties": _OBJ},
                "n_unreadable": _COUNT,
            }
        ),
        "metrics": _obj({"val": _nullable(_OBJ)}),
        "history": {"type": "array", "items": _OBJ},
        "calibration": _obj(
            {
                "temperature": {"type": "number", "exclusiveMinimum": 0},
                # Multi-label: finding -> its temperature (every finding of ``classes``; check_manifest).
                "temperatures": {
                    "type": "object",
                    "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
                },
            }
        ),
        "ood": _nullable(_obj({"file": _STR, "threshold": _NUM})),
        "operating_point": _nullable(
            _obj({"positive": _STR, "classes": {"type": "array", "items": _STR}, "threshold": _NUM})
        ),
        "ensemble": _obj({"method": _STR, "members": {"type": "array", "items": _OBJ}}),
        "compression": _OBJ,
        "recalibration": _OBJ,
        "sanity": _nullable(_OBJ),
        "shortcuts": _nullable(_OBJ),
        "leftover": _OBJ,
        "explain": _obj({"cam_layer": _STR}),
    },
    ["format", "model", "classes", "preprocess", "files", "self_sha256"],
    title="medclf bundle manifest (bundle.json)",
)
SCHEMA["$schema"] = "https://json-schema.org/draft/2020-12/schema"


class ManifestInvalid(ValueError):
    """A manifest does not fit :data:`SCHEMA`; the message names the field, in one line."""


def check_manifest(manifest: Any) -> None:
    """Raise :class:`ManifestInvalid` (one line naming the field) unless ``manifest`` fits :data:`SCHEMA`."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(manifest))
    if error is not None:
        raise ManifestInvalid(_describe(error))
    # What a schema cannot say: per-finding temperatures name exactly the bundle's findings.
    temperatures = manifest.get("calibration", {}).get("temperatures")
    if temperatures is not None:
        classes = manifest.get("classes") or []
        if manifest.get("task") != "multilabel":
            raise ManifestInvalid(
                "calibration.temperatures is for multi-label bundles (task multilabel) only"
            )
        if set(temperatures) != set(classes):
            odd = sorted(set(temperatures) ^ set(classes))
            raise ManifestInvalid(
                f"calibration.temperatures must name every finding of classes, exactly: {odd}"
            )


@lru_cache(maxsize=1)
def _validator() -> Any:
    # Imported here: jsonschema (and its referencing stack) is only needed once a bundle is read or written.
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(SCHEMA)
    return Draft202012Validator(SCHEMA)


_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def _describe(error: Any) -> str:
    """``model.n_classes must be an integer, not a string``: the path of the field and what is wrong."""
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = next((k for k in error.validator_value if k not in error.instance), "?")
        path.append(missing)
        what = "is missing"
    elif error.validator == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        found = _JSON_TYPES.get(type(error.instance), "?")
        what = f"must be {' or '.join(_a(t) for t in wanted)}, not {found}"
    elif error.validator == "anyOf" and error.context:
        return _describe(error.context[-1])  # "null or ...": the non-null branch says what was meant
    else:
        what = " ".join(error.message.split())  # one line
        what = what if len(what) <= 160 else what[:157] + "..."
    where = ".".join(_short(str(p)) for p in path) or "the manifest"
    return f"{where} {what}"


def _short(name: str) -> str:
    return name if len(name) <= 40 else name[:37] + "..."  # a key is the author's choice: keep one line short


def _a(json_type: str) -> str:
    return f"an {json_type}" if json_type[0] in "aeiou" else f"a {json_type}"


# -- typed access ---------------------------------------------------------------------------------------------
def _section(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class ModelSection:
    """The network: a registered architecture and the arguments that build it."""

    arch: str
    in_channels: int
    n_classes: int
    spatial_dims: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    omitted: list[str] = field(default_factory=list)  # a backbone bundle's output layer, left out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSection:
        return cls(
            arch=str(d.get("arch", "")),
            in_channels=int(d.get("in_channels", 1)),
            n_classes=int(d.get("n_classes", 0)),
            spatial_dims=int(d.get("spatial_dims", 2)),
            kwargs=dict(d.get("kwargs") or {}),
            omitted=list(d.get("omitted") or []),
        )


@dataclass(frozen=True)
class Recipe:
    """How the bundle was made. For one training run: the seeds and the validation split it used."""

    kind: str | None = None  # "ensemble" for a fused bundle; None for one training run
    seed: int = 0
    split_seed: int | None = None  # the split's own seed (seed bagging: one split, several training seeds)
    val_fraction: float = DEFAULT_VAL_FRACTION
    val_fold: tuple[int, int] | None = None  # (k, K): validated on fold k of K instead of a carved fraction
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        fold = d.get("val_fold")
        split_seed = d.get("split_seed")
        fraction = d.get("val_fraction")
        return cls(
            kind=d.get("kind"),
            seed=int(d.get("seed") or 0),
            split_seed=None if split_seed is None else int(split_seed),
            val_fraction=DEFAULT_VAL_FRACTION if fraction is None else float(fraction),
            val_fold=(int(fold[0]), int(fold[1])) if fold else None,
            raw=d,
        )

    @property
    def is_ensemble(self) -> bool:
        return self.kind == "ensemble"

    @property
    def seed_of_split(self) -> int:
        """The seed the validation split was drawn with (the training seed when none was recorded)."""
        return self.seed if self.split_seed is None else self.split_seed

    def rebuild_splits(self, samples: SampleSet) -> SampleSet:
        """``samples`` split as the training run split them: its fold of K-fold bagging, or the fraction it
        carved from the training split with its split seed (a split the dataset has stays as it is)."""
        # Imported here: the splitters need scikit-learn, which loading a bundle to predict does not.
        from medclf.data.splits import ensure_validation, fold_split

        if self.val_fold is not None:
            return fold_split(samples, *self.val_fold, seed=self.seed_of_split)
        return ensure_validation(samples, fraction=self.val_fraction, seed=self.seed_of_split)

    def get(self, key: str, default: Any = None) -> Any:
        """Any other recorded field (``best_epoch``, ``schedule``, ...), as written."""
        return self.raw.get(key, default)


@dataclass(frozen=True)
class Manifest:
    """A typed view of a manifest dict (not a copy: ``raw`` is the dict itself). Lenient on purpose: an
    in-memory or old manifest without a section gets the documented fallback; the schema check is
    :func:`check_manifest`, done by :func:`medclf.bundle.load_bundle`."""

    raw: Mapping[str, Any]
    version: int  # manifest_version; 0: written before manifests had one
    kind: str  # "classifier" or what the manifest says ("backbone")
    model: ModelSection
    classes: list[str]
    task: str
    recipe: Recipe
    files: dict[str, str]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        return cls(
            raw=d,
            version=int(d.get("manifest_version") or 0),
            kind=str(d.get("kind") or "classifier"),
            model=ModelSection.from_dict(_section(d, "model")),
            classes=[str(c) for c in d.get("classes") or []],
            task=str(d.get("task") or DEFAULT_TASK),
            recipe=Recipe.from_dict(_section(d, "recipe")),
            files=dict(_section(d, "files")),
        )

    @property
    def preprocess(self) -> Mapping[str, Any]:
        return _section(self.raw, "preprocess")

    @property
    def data(self) -> Mapping[str, Any]:
        return _section(self.raw, "data")

    @property
    def metrics(self) -> Mapping[str, Any]:
        return _section(self.raw, "metrics")

    @property
    def val_metrics(self) -> Mapping[str, Any]:
        """The validation metrics recorded at training (empty when there are none, e.g. some ensembles)."""
        return _section(self.metrics, "val")

    @property
    def calibration(self) -> Mapping[str, Any]:
        return _section(self.raw, "calibration")

    @property
    def temperature(self) -> float:
        """The calibration temperature (1: none fitted; a multi-label bundle's are per finding:
        :attr:`finding_temperatures`)."""
        return float(self.calibration.get("temperature", 1.0))

    @property
    def finding_temperatures(self) -> tuple[float, ...] | None:
        """A multi-label bundle's temperature per finding, in the order of ``classes``; None when it has none
        (single-label bundles, and multi-label ones written before they were fitted: their logits are not
        scaled)."""
        per = self.calibration.get("temperatures")
        if self.task != "multilabel" or not isinstance(per, Mapping):
            return None
        return tuple(float(per[c]) for c in self.classes)

    @property
    def output_temperature(self) -> float | tuple[float, ...]:
        """What every engine divides the network's logits by before the softmax or sigmoid
        (:func:`medclf.engines.probabilities`): the per-finding temperatures when there are, else the one."""
        per = self.finding_temperatures
        return per if per is not None else self.temperature

    def section(self, name: str) -> Mapping[str, Any]:
        """Any optional section (``ood``, ``operating_point``, ``compression``, ``ensemble``, ...), or an
        empty mapping when the manifest has none."""
        return _section(self.raw, name)
