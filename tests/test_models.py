"""Every registered architecture builds in 2D and 3D, runs forward and backward, and is registered once."""

import pytest
import torch

from medclf.errors import ConfigError
from medclf.models import create_model, list_models, model_info

SMALL = {
    "compact": {},
    "compact-s": {},
    "compact-l": {},
    "resnet18": {"small_input": True},
    "resnet34": {"small_input": True},
    "densenet121": {},
}


def test_registry_lists_the_promised_models():
    assert {"compact", "resnet18", "resnet34", "densenet121"} <= set(list_models())


def _kwargs(name, dims, size):
    if name == "ensemble":  # two members, one at a smaller input size (resampled inside the ensemble)
        member = {"arch": "compact-s", "kwargs": {}, "in_channels": 1, "n_classes": 3, "spatial_dims": dims}
        small = [size // 2] * dims
        return {"members": [{**member, "size": [size] * dims}, {**member, "size": small, "temperature": 2.0}]}
    return SMALL.get(name, {})


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("dims", [2, 3])
def test_forward_backward(name, dims):
    torch.manual_seed(0)
    size = 32 if dims == 2 or name == "densenet121" else 16  # DenseNet downsamples 32x
    model = create_model(name, in_channels=1, n_classes=3, spatial_dims=dims, **_kwargs(name, dims, size))
    x = torch.randn(2, 1, *([size] * dims))
    out = model(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    groups = model_info(name).layer_groups
    names = {n for n, _ in model.named_children()}
    assert set(groups) <= names, f"layer groups {groups} must be children of the model ({names})"
    if name == "ensemble":  # no single feature map: explanations fall back to occlusion
        assert model_info(name).cam_layer not in dict(model.named_modules())
        return
    cam = dict(model.named_modules())[model_info(name).cam_layer]
    assert cam is not None


def test_three_channel_input():
    model = create_model("compact", in_channels=3, n_classes=2, spatial_dims=2)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 2)


def test_unknown_model_and_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="unknown architecture"):
        create_model("alexnet-9000", 1, 2)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        create_model("compact", 1, 1)
    with pytest.raises(ConfigError, match="bad arguments"):
        create_model("compact", 1, 2, not_an_argument=3)
