"""Standard architectures from MONAI (2D and 3D), registered under short names.

MONAI is imported inside the builders: importing it loads every MONAI submodule (seconds), which commands
that never build one of these networks (a compact model's predict, serve, audit) should not pay for.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medclf.models.registry import register_model

RESNET_GROUPS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")


def _resnet(
    depth: int, in_channels: int, n_classes: int, spatial_dims: int, small_input: bool = False
) -> nn.Module:
    # Small inputs (MedMNIST's 28-64 px) lose everything to a 7x7/2 stem plus max-pool: use 3x3/1, no pool.
    stem: dict[str, Any] = (
        {"conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": True}
        if small_input
        else {"conv1_t_size": 7, "conv1_t_stride": 2, "no_max_pool": False}
    )
    from monai.networks import nets

    builder = {18: nets.resnet18, 34: nets.resnet34}[depth]
    return builder(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=n_classes, **stem)


@register_model("resnet18", description="ResNet-18 (MONAI)", layer_groups=RESNET_GROUPS)
def resnet18(in_channels: int, n_classes: int, spatial_dims: int = 2, small_input: bool = False) -> nn.Module:
    return _resnet(18, in_channels, n_classes, spatial_dims, small_input)


@register_model("resnet34", description="ResNet-34 (MONAI)", layer_groups=RESNET_GROUPS)
def resnet34(in_channels: int, n_classes: int, spatial_dims: int = 2, small_input: bool = False) -> nn.Module:
    return _resnet(34, in_channels, n_classes, spatial_dims, small_input)


@register_model(
    "densenet121",
    description="DenseNet-121 (MONAI)",
    layer_groups=("features", "class_layers"),
    cam_layer="class_layers.relu",
)
def densenet121(in_channels: int, n_classes: int, spatial_dims: int = 2, dropout: float = 0.0) -> nn.Module:
    from monai.networks import nets

    return nets.DenseNet121(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=n_classes, dropout_prob=dropout
    )
