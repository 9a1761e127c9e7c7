"""A registry of named model builders: ``create_model(name, in_channels, n_classes, spatial_dims)``.

In the spirit of timm's ``create_model``: builders register themselves by name, callers never branch on
architecture names, and tests iterate over :func:`list_models`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from medclf.errors import ConfigError
from medclf.models.tasks import corn_output_hook

Builder = Callable[..., nn.Module]
HEADS = ("softmax", "corn")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Builder
    description: str
    # Names of the top-level children, in input-to-output order, that --freeze may name.
    layer_groups: tuple[str, ...]
    # The module whose activations Grad-CAM explains (the last spatial feature map).
    cam_layer: str = "layer4"


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str, *, description: str, layer_groups: tuple[str, ...], cam_layer: str = "layer4"
) -> Callable[[Builder], Builder]:
    def decorate(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, fn, description, layer_groups, cam_layer)
        return fn

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; choose one of {', '.join(list_models())}"
        ) from None


def create_model(
    name: str, in_channels: int, n_classes: int, spatial_dims: int = 2, **kwargs: object
) -> nn.Module:
    """Build a fresh, randomly initialised model. Extra keyword arguments go to the builder, except
    ``head``: ``softmax`` (K class logits) or ``corn`` (ordinal grades: the network has K-1 outputs, turned
    into K grade log-probabilities by :func:`medclf.models.tasks.corn_log_probabilities`)."""
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if n_classes < 2:
        raise ConfigError(f"need at least 2 classes, got {n_classes}")
    info = model_info(name)
    head = kwargs.pop("head", "softmax")
    if head not in HEADS:
        raise ConfigError(f"unknown output head {head!r}; choose one of {', '.join(HEADS)}")
    if head == "corn" and n_classes < 3:
        raise ConfigError(f"an ordinal (CORN) head needs at least 3 grades, got {n_classes}")
    outputs = n_classes - 1 if head == "corn" else n_classes
    try:
        model = info.builder(in_channels=in_channels, n_classes=outputs, spatial_dims=spatial_dims, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for architecture {name!r}: {exc}") from exc
    if head == "corn":
        # A parameter-free hook rather than a wrapper module: the weights' names, the layer groups --freeze
        # names and Grad-CAM's layer stay those of the plain network.
        model.register_forward_hook(corn_output_hook)
    return model
