"""Explanations: heatmaps find what drives a known model, in 2D and 3D; outputs, fallbacks and the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from torch import nn

from medclf.api import load_bundle
from medclf.errors import ConfigError
from medclf.explain import Explainer, explain_image, explain_inputs
from medclf.predictor import Predictor
from medclf.preprocess import PreprocessSpec


class BrightnessProbe(nn.Module):
    """A model whose answer is known: class 1's logit is the mean of a (positive) feature map that copies
    the input, class 0's is its negative. Whatever is bright drives class 1, so a heatmap for class 1
    must peak where the input is bright."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.features = conv(1, 1, 1, bias=False)
        nn.init.ones_(self.features.weight)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.act(self.features(x)).flatten(1).mean(1, keepdim=True)
        return torch.cat([-m, m], dim=1) * 20


def probe_bundle(
    template: Predictor, spatial_dims: int, size: int, *, cam_layer: str | None = "features"
) -> Predictor:
    """An in-memory bundle around :class:`BrightnessProbe` (never written to disk)."""
    manifest = {
        "model": {"arch": "brightness-probe", "spatial_dims": spatial_dims},
        "classes": ["dark", "bright"],
        "files": {},
        "self_sha256": "0" * 64,
    }
    if cam_layer:
        manifest["explain"] = {"cam_layer": cam_layer}
    spec = PreprocessSpec(
        spatial_dims=spatial_dims, size=(size,) * spatial_dims, crop_foreground=False, normalise="none"
    )
    probe = dataclasses.replace(
        template.bundle,
        model=BrightnessProbe(spatial_dims).eval(),
        manifest=manifest,
        spec=spec,
        classes=["dark", "bright"],
    )
    return Predictor(probe)  # a new Predictor: no engine runner shared with the template


def blob(spatial_dims: int, size: int, centre: tuple[int, ...]) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(size)] * spatial_dims, indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return (0.05 + np.exp(-d2 / (2 * 2.0**2))).astype(np.float32)[None]


@pytest.fixture(scope="module")
def loaded(tiny_bundle) -> Predictor:
    return load_bundle(tiny_bundle)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "occlusion"])
def test_2d_heatmap_peaks_where_the_evidence_is(loaded, method):
    bundle = probe_bundle(loaded, 2, 32)
    x = blob(2, 32, (8, 22))
    e = Explainer(bundle, method).explain_tensor(x)
    assert e.predicted == "bright" and e.method == method
    assert e.heatmap.shape == (32, 32)
    assert e.heatmap.min() >= 0.0 and e.heatmap.max() <= 1.0 and e.heatmap.max() == pytest.approx(1.0)
    peak = np.unravel_index(int(np.argmax(e.heatmap)), e.heatmap.shape)
    assert abs(peak[0] - 8) <= 3 and abs(peak[1] - 22) <= 3, peak
    assert e.heatmap[28, 3] < 0.2  # far from the blob: unimportant


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_3d_heatmap_peaks_where_the_evidence_is(loaded, method):
    bundle = probe_bundle(loaded, 3, 16)
    e = Explainer(bundle, method).explain_tensor(blob(3, 16, (4, 10, 11)))
    assert e.heatmap.shape == (16, 16, 16)
    peak = np.unravel_index(int(np.argmax(e.heatmap)), e.heatmap.shape)
    assert max(abs(p - c) for p, c in zip(peak, (4, 10, 11), strict=True)) <= 3, peak
    overlay = PILImage.open(io.BytesIO(e.overlay_png()))
    assert overlay.width > 2 * overlay.height - 100  # three orthogonal slices side by side (+ caption)
    image, heat = (PILImage.open(io.BytesIO(p)) for p in (e.image_png(), e.heatmap_png()))
    assert image.size == heat.size == (48, 16) and heat.mode == "RGBA"


def test_target_class_can_be_chosen(loaded):
    bundle = probe_bundle(loaded, 2, 32)
    e = Explainer(bundle, "gradcam").explain_tensor(blob(2, 32, (8, 22)), target="dark")
    # Class 0 falls as the input brightens: Grad-CAM (positive evidence only) finds nothing for it.
    assert e.predicted == "bright" and e.explained_class == "dark"
    assert float(e.heatmap.max()) == 0.0
    with pytest.raises(ConfigError, match="unknown class"):
        Explainer(bundle).explain_tensor(blob(2, 32, (8, 22)), target="grey")


def test_without_a_cam_layer_auto_falls_back_to_occlusion(loaded):
    bundle = probe_bundle(loaded, 2, 32, cam_layer=None)  # an architecture the registry does not know
    explainer = Explainer(bundle)
    assert explainer.method == "occlusion" and explainer.layer is None
    assert explainer.explain_tensor(blob(2, 32, (8, 22))).heatmap.max() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="occlusion"):
        Explainer(bundle, "gradcam")
    with pytest.raises(ConfigError, match="unknown explanation method"):
        Explainer(bundle, "lime")


def test_trained_bundle_uses_the_registry_layer_and_leaves_the_model_untouched(loaded, sim_data, tmp_path):
    path = sorted((sim_data / "test" / "tumour").glob("*.png"))[0]
    e = explain_image(loaded, path, out=tmp_path / "heat.png")
    assert e.method == "gradcam" and e.layer == "layer4"
    assert e.heatmap.shape == loaded.spec.size and np.isfinite(e.heatmap).all()
    assert e.heatmap.min() >= 0.0 and e.heatmap.max() <= 1.0
    [prediction] = loaded.predict([path])
    assert e.predicted == prediction["predicted"]
    assert e.confidence == pytest.approx(prediction["confidence"], abs=1e-6)
    overlay = PILImage.open(tmp_path / "heat.png")
    assert overlay.mode == "RGB" and overlay.width >= 320
    # Hooks live on a private copy: the model that serves predictions carries none.
    assert not any(m._forward_hooks or m._backward_hooks for m in loaded.model.modules())
    assert np.array_equal(e.heatmap, explain_image(loaded, path).heatmap)  # deterministic


def test_explain_inputs_writes_one_png_per_input_and_reports_refusals(loaded, sim_data, tmp_path):
    good = sorted((sim_data / "test" / "oedema").glob("*.png"))[:2]
    twin = tmp_path / "other" / good[0].name  # same file name in another folder: must not overwrite
    twin.parent.mkdir()
    twin.write_bytes(good[0].read_bytes())
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    results = explain_inputs(loaded, [*good, twin, bad], tmp_path / "out")
    assert [("error" in r) for r in results] == [False, False, False, True]
    pngs = [r["heatmap"] for r in results[:3]]
    assert len(set(pngs)) == 3 and all(PILImage.open(p).format == "PNG" for p in pngs)
    assert results[3]["reason"] == "unsupported_format"


def medclf(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """Run the command line in this process (no torch import per call); a traceback fails the test."""
    from medclf.cli import main

    monkeypatch.setattr(sys, "argv", ["medclf", *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        main()
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def test_cli_explain_and_predict_explain(tiny_bundle, sim_data, tmp_path, capsys, monkeypatch):
    image = sorted((sim_data / "test" / "tumour").glob("*.png"))[0]
    code, out, err = medclf(
        capsys, monkeypatch, "explain", tiny_bundle, image, "--out", tmp_path / "heat.png"
    )
    assert code == 0, err
    assert json.loads(out)["method"] == "gradcam"
    assert PILImage.open(tmp_path / "heat.png").format == "PNG"

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 200)
    code, out, err = medclf(capsys, monkeypatch, "explain", tiny_bundle, junk, "--out", tmp_path / "no.png")
    assert code == 2 and "unsupported" in err and not (tmp_path / "no.png").exists()

    images = sorted((sim_data / "test" / "normal").glob("*.png"))[:2]
    code, out, err = medclf(
        capsys, monkeypatch, "predict", tiny_bundle, *images, "--explain", tmp_path / "maps"
    )
    assert code == 0, err
    results = json.loads(out)
    assert [r["path"] for r in results] == [str(p) for p in images]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(
        f"{p.stem}.heatmap.png" for p in images
    )
    assert all(os.path.exists(r["heatmap"]) for r in results)


def test_out_of_distribution_travels_with_the_explanation(
    tiny_bundle, sim_data, tmp_path, capsys, monkeypatch
):
    """Issue 21, item 12: `medclf explain`, `explain_inputs` and the heatmap PNG carry the OOD result."""
    from medclf.explain import ALERT_COLOUR

    image = sorted((sim_data / "test" / "tumour").glob("*.png"))[0]
    guarded = load_bundle(tiny_bundle)
    guarded.ood.threshold = 1e9  # nothing is flagged
    calm = explain_image(guarded, image)
    assert calm.ood is False and np.isfinite(calm.ood_score) and calm.warning is None
    assert set(calm.to_dict()) >= {"ood", "ood_score"} and "warning" not in calm.to_dict()
    calm_png = np.asarray(PILImage.open(io.BytesIO(calm.overlay_png())))

    guarded.ood.threshold = -1.0  # every input is flagged
    flagged = explain_image(guarded, image, out=tmp_path / "ood.png")
    [prediction] = guarded.predict([image])
    assert flagged.to_dict()["ood"] is True and prediction["ood"] is True
    assert flagged.ood_score == pytest.approx(prediction["ood_score"], abs=1e-3)
    assert flagged.warning == prediction["warning"]
    # The overlay: a red banner above and a red frame around the image, absent without the flag.
    png = np.asarray(PILImage.open(tmp_path / "ood.png"))
    assert tuple(png[2, 2]) == ALERT_COLOUR and tuple(calm_png[2, 2]) != ALERT_COLOUR
    assert png.shape[0] > calm_png.shape[0]

    [entry] = explain_inputs(guarded, [image], tmp_path / "maps")
    assert entry["ood"] is True and entry["warning"] == prediction["warning"]
    assert tuple(np.asarray(PILImage.open(entry["heatmap"]))[2, 2]) == ALERT_COLOUR

    monkeypatch.setattr("medclf.predictor.Predictor.load", lambda _path, **_options: guarded)
    code, out, err = medclf(capsys, monkeypatch, "explain", tiny_bundle, image, "--out", tmp_path / "cli.png")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["ood"] is True and answer["warning"] == prediction["warning"]
    assert "warning" in err and "unlike the images" in err
