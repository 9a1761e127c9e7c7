"""Why did the model decide what it decided? Heatmaps over the preprocessed input, 2D and 3D.

Methods (a registry, :data:`METHODS`), all from MONAI's ``monai.visualize``:

``gradcam``
    Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391): the target class's gradients,
    averaged over space, weight the feature maps of the layer the model registry names
    (:attr:`medclf.models.registry.ModelInfo.cam_layer`, or ``explain.cam_layer`` in the bundle manifest).
``gradcampp``
    Grad-CAM++ (Chattopadhyay et al. 2018, https://arxiv.org/abs/1710.11063): pixel-wise weighting of
    those gradients, which localises several instances of a pattern better.
``occlusion``
    Occlusion sensitivity (Zeiler & Fergus 2014): how much the target class's probability drops when a
    region is hidden. Needs no layer and no gradients, so it works for any model; ``auto`` falls back to it
    when a bundle has no CAM layer (an ensemble, for example).

The heatmap has the model input's spatial shape, values in [0, 1] (1 = most important). It explains the
*preprocessed* input, i.e. exactly what the network saw; :meth:`Explanation.overlay_png` draws it over
that input with the predicted class written underneath. An explanation carries the bundle's
out-of-distribution result like a prediction does (``ood``, ``ood_score``, ``warning``), and the overlay of
a flagged input is framed in red under a banner saying the result is not valid: a heatmap of a prediction
the model cannot make must not look like evidence.

Gradient methods attach hooks to a private copy of the model, so the model that serves predictions is
never touched, and an :class:`Explainer` serialises its own use with a lock, so one instance can be shared
by the threads of a server.
"""

from __future__ import annotations

import copy
import io
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from torch import nn

from medclf.bundle import Bundle
from medclf.errors import ConfigError, MedclfError
from medclf.inference import expand_inputs, ood_answer, read_input
from medclf.io import Image, image_from_array, read_image
from medclf.predictor import Predictor, as_predictor
from medclf.preprocess import preprocess

METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "occlusion": "Occlusion sensitivity"}
DISCLAIMER = "research use only, not a diagnosis"
_DISPLAY_SIDE = 320  # the overlay PNG is upscaled to at least this many pixels per panel


@dataclass
class Explanation:
    """A prediction and the heatmap that explains it."""

    predicted: str
    class_index: int
    confidence: float
    probabilities: dict[str, float]
    method: str
    layer: str | None
    heatmap: np.ndarray  # spatial shape of the model input, float32 in [0, 1]
    image: np.ndarray  # the preprocessed input (C, *size)
    explained_class: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # The out-of-distribution guard's answer, as in a prediction (None: the bundle has no guard).
    ood: bool | None = None
    ood_score: float | None = None
    warning: str | None = None

    def ood_fields(self) -> dict[str, Any]:
        """``ood``, ``ood_score`` and (when flagged) ``warning``, as :meth:`Predictor.predict` reports them."""
        if self.ood is None:
            return {}
        out: dict[str, Any] = {"ood": self.ood, "ood_score": self.ood_score}
        if self.warning:
            out["warning"] = self.warning
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the arrays)."""
        return {
            "predicted": self.predicted,
            "confidence": self.confidence,
            "probabilities": self.probabilities,
            **self.ood_fields(),
            "method": self.method,
            "layer": self.layer,
            "explained_class": self.explained_class or self.predicted,
        }

    def image_png(self) -> bytes:
        """The preprocessed input as a greyscale (or RGB) PNG at model resolution (middle slices for 3D)."""
        return _png(
            _montage([_to_uint8_rgb(_display_image(p)) for p in _panels(self.image, self.heatmap)[0]])
        )

    def heatmap_png(self) -> bytes:
        """The heatmap alone as an RGBA PNG (colour = importance, alpha grows with importance)."""
        panels = _panels(self.image, self.heatmap)[1]
        return _png(_montage([_heat_rgba(h) for h in panels]))

    def overlay_png(self) -> bytes:
        """The input with the heatmap blended over it, and a caption naming the predicted class."""
        images, heats, names = _panels(self.image, self.heatmap)
        tiles = [_blend(_display_image(i), h) for i, h in zip(images, heats, strict=True)]
        label = METHOD_LABELS.get(self.method, self.method)
        where = f" at {self.layer}" if self.layer else ""
        lines = [
            f"Predicted: {self.predicted} ({100 * self.confidence:.1f} %)",
            f"{label} for '{self.explained_class or self.predicted}'{where}; {DISCLAIMER}",
        ]
        alert = None
        if self.ood:
            alert = f"OUT OF DISTRIBUTION (score {self.ood_score:.1f}): not a valid result"
            lines[0] = (
                f"Not valid: {self.predicted} ({100 * self.confidence:.1f} %) for an input unlike the training data"
            )
        return _png(_captioned(tiles, names, lines, alert=alert))

    def save(self, path: str | Path) -> Path:
        """Write :meth:`overlay_png` to ``path``."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.overlay_png())
        return p


# ----------------------------------------------------------------------------------------------- methods
HeatmapFn = Callable[["Explainer", torch.Tensor, int], np.ndarray]
METHODS: dict[str, HeatmapFn] = {}


def _method(name: str) -> Callable[[HeatmapFn], HeatmapFn]:
    def register(fn: HeatmapFn) -> HeatmapFn:
        METHODS[name] = fn
        return fn

    return register


def _minmax(x: torch.Tensor) -> torch.Tensor:
    # MONAI's default normaliser maps max to 0 (it flips); a heatmap here always has 1 = most important.
    out = x.detach().float().cpu()
    lo, hi = out.amin(), out.amax()
    return (out - lo) / (hi - lo) if hi > lo else torch.zeros_like(out)


def _grad_cam(monai_class: str) -> HeatmapFn:
    def run(explainer: Explainer, x: torch.Tensor, class_index: int) -> np.ndarray:
        cam = explainer._cam(monai_class)
        with torch.enable_grad():
            heat = cam(x.clone().requires_grad_(True), class_idx=class_index)
        return heat[0, 0].numpy()

    return run


_method("gradcam")(_grad_cam("GradCAM"))
_method("gradcampp")(_grad_cam("GradCAMpp"))


@_method("occlusion")
def _occlusion(explainer: Explainer, x: torch.Tensor, class_index: int) -> np.ndarray:
    from monai.visualize import OcclusionSensitivity

    size = x.shape[2:]
    # About 8 windows per axis in 2D (4 in 3D), overlapping by half: detail without thousands of passes.
    mask = [max(2, s // (8 if len(size) == 2 else 4)) for s in size]
    activate = _activation(explainer.predictor)
    occ = OcclusionSensitivity(
        explainer.predictor.model,
        mask_size=mask,
        n_batch=16,
        verbose=False,
        mode="mean_img",
        overlap=0.5,
        activate=activate,
    )
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI 1.6 indexes with lists, which torch deprecates: not the user's concern.
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
        occluded, _ = occ(x)
        full = activate(explainer.predictor.model(x))[0, class_index]
    drop = torch.clamp(full - occluded[0, class_index], min=0.0)
    return _minmax(drop).numpy()


def _activation(predictor: Predictor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bundle's probabilities from its logits, as :func:`medclf.engines.probabilities` computes them: the
    softmax through its temperature, or for multi-label findings a sigmoid per finding through its own."""
    if predictor.manifest.get("task") == "multilabel":
        per = torch.tensor(predictor.output_temperature, dtype=torch.float32)
        return lambda logits: torch.sigmoid(logits / per)
    temperature = predictor.temperature
    return lambda logits: torch.softmax(logits / temperature, dim=1)


# ----------------------------------------------------------------------------------------------- explainer
def cam_layer_of(bundle: Bundle | Predictor) -> str | None:
    """The layer Grad-CAM explains for this bundle, or None when it has none (then: occlusion).

    The manifest's ``explain.cam_layer`` wins; otherwise the model registry's entry for the architecture.
    The layer must exist in ``bundle.model``.
    """
    from medclf.models import model_info

    layer = bundle.manifest.get("explain", {}).get("cam_layer")
    if layer is None:
        try:
            layer = model_info(str(bundle.manifest.get("model", {}).get("arch"))).cam_layer
        except ConfigError:
            return None
    model = getattr(bundle, "model", None)
    if not isinstance(model, nn.Module) or layer not in dict(model.named_modules()):
        return None
    return str(layer)


class Explainer:
    """Heatmaps for one bundle. Thread-safe; build it once and reuse it (it keeps its own model copy)."""

    def __init__(self, bundle: Bundle | Predictor, method: str = "auto") -> None:
        if method != "auto" and method not in METHODS:
            raise ConfigError(
                f"unknown explanation method {method!r}; choose auto or one of {', '.join(METHODS)}"
            )
        self.predictor = as_predictor(bundle)
        self.layer = cam_layer_of(self.predictor)
        if method == "auto":
            method = "gradcam" if self.layer else "occlusion"
        if method != "occlusion" and self.layer is None:
            raise ConfigError(
                f"{METHOD_LABELS[method]} needs a layer to explain, and this bundle ({self.predictor.arch}) has none; "
                "use --method occlusion"
            )
        if not isinstance(getattr(self.predictor, "model", None), nn.Module):
            raise ConfigError("this bundle holds no PyTorch model to explain")
        self.method = method
        self._lock = threading.Lock()
        self._cams: dict[str, Any] = {}

    def _cam(self, monai_class: str) -> Any:
        if monai_class not in self._cams:
            import monai.visualize

            # Hooks go on a private copy: the serving model is never modified (MONAI also turns off the
            # target layer's in-place flag).
            model = copy.deepcopy(self.predictor.model).eval()
            cls = getattr(monai.visualize, monai_class)
            self._cams[monai_class] = cls(nn_module=model, target_layers=self.layer, postprocessing=_minmax)
        return self._cams[monai_class]

    def explain_tensor(self, x: np.ndarray | torch.Tensor, *, target: str | int | None = None) -> Explanation:
        """Explain one preprocessed input ``(C, *size)``; ``target`` is a class name or index (default: predicted)."""
        t = torch.as_tensor(np.asarray(x, dtype=np.float32))[None]
        probs = self.predictor.predict_tensors(t)[0]
        k = int(np.argmax(probs))
        target_index = k if target is None else self._class_index(target)
        with self._lock:
            heat = METHODS[self.method](self, t, target_index)
        heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0).clip(0.0, 1.0)
        return Explanation(
            **self._ood(t),
            predicted=self.predictor.classes[k],
            class_index=k,
            confidence=float(probs[k]),
            probabilities={c: float(p) for c, p in zip(self.predictor.classes, probs, strict=True)},
            method=self.method,
            layer=self.layer if self.method != "occlusion" else None,
            heatmap=heat,
            image=np.asarray(t[0].numpy()),
            explained_class=self.predictor.classes[target_index],
        )

    def _ood(self, t: torch.Tensor) -> dict[str, Any]:
        """The bundle's out-of-distribution answer for one preprocessed input, as in prediction."""
        scores = self.predictor.ood_scores(t.numpy())
        detector = self.predictor.ood
        if scores is None or detector is None:
            return {}
        return ood_answer(bool(scores[0][0]), float(scores[1][0]), detector.threshold)

    def explain(
        self, item: Image | np.ndarray | str | Path, *, target: str | int | None = None
    ) -> Explanation:
        """Explain an image file, a decoded :class:`Image` or an array; read and preprocessed as in prediction."""
        if isinstance(item, np.ndarray):
            item = image_from_array(item)
        elif not isinstance(item, Image):
            item = read_image(item)
        return self.explain_tensor(preprocess(item, self.predictor.spec), target=target)

    def _class_index(self, target: str | int) -> int:
        classes = self.predictor.classes
        if isinstance(target, int) and 0 <= target < len(classes):
            return target
        if isinstance(target, str) and target in classes:
            return classes.index(target)
        raise ConfigError(f"unknown class {target!r}; the model's classes are {', '.join(classes)}")


def explain_image(
    bundle: Bundle | Predictor,
    item: Image | np.ndarray | str | Path,
    *,
    method: str = "auto",
    target: str | int | None = None,
    out: str | Path | None = None,
) -> Explanation:
    """Explain one image; with ``out``, also write the overlay PNG there."""
    explanation = Explainer(bundle, method).explain(item, target=target)
    if out is not None:
        explanation.save(out)
    return explanation


def explain_inputs(
    bundle: Bundle | Predictor,
    inputs: Any,
    out_dir: str | Path,
    *,
    method: str = "auto",
    targets: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Predict like :meth:`Predictor.predict` and write one overlay PNG per input into ``out_dir``.

    Each successful entry gains ``heatmap`` (the PNG's path) and ``explanation`` (the method). Refused
    inputs get an ``error`` entry as in prediction. ``targets`` maps an input's ``path`` to the class to
    explain (default: the predicted class), e.g. the class a prediction with other options chose.
    """
    explainer = Explainer(bundle, method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    results: list[dict[str, Any]] = []
    for name, item in expand_inputs(inputs):
        try:
            for ref, image in read_input(name, item):
                e = explainer.explain_tensor(
                    preprocess(image, explainer.predictor.spec), target=(targets or {}).get(ref)
                )
                png = e.save(out / _unique_name(ref, used))
                results.append(
                    {
                        "path": ref,
                        "predicted": e.predicted,
                        "confidence": e.confidence,
                        "probabilities": e.probabilities,
                        **e.ood_fields(),
                        "heatmap": str(png),
                        "explanation": e.method,
                    }
                )
        except MedclfError as exc:
            results.append({"path": name, "error": exc.message, "reason": getattr(exc, "reason", "invalid")})
        except OSError as exc:
            results.append({"path": name, "error": f"{name}: {exc.strerror or exc}", "reason": "unreadable"})
    return results


def _unique_name(ref: str, used: set[str]) -> str:
    """``dir/scan.nii.gz`` -> ``scan.heatmap.png``; ``data.npz:test/3`` -> ``data_test_3.heatmap.png``."""
    path, member = (ref, "") if Path(ref).exists() or ":" not in ref else ref.rsplit(":", 1)
    stem = Path(path).name.split(".")[0] + (f"_{member}" if member else "")
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem) or "image"
    name, n = f"{stem}.heatmap.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.heatmap.png"
    used.add(name)
    return name


# ----------------------------------------------------------------------------------------------- drawing
def _panels(image: np.ndarray, heat: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """2D: one panel. 3D: three orthogonal slices."""
    if heat.ndim == 2:
        return [image], [heat], [""]
    # Through the maximum; through the middle when the map is flat (nothing stood out).
    flat = float(heat.max()) <= float(heat.min())
    centre = [s // 2 for s in heat.shape] if flat else np.unravel_index(int(np.argmax(heat)), heat.shape)
    images, heats, names = [], [], []
    for axis in range(3):
        idx = [slice(None)] * 3
        idx[axis] = slice(int(centre[axis]), int(centre[axis]) + 1)
        sl = tuple(idx)
        # Volumes are stored [x, y, z] (RAS): rotate so that the second in-plane axis points up.
        images.append(np.rot90(np.squeeze(image[(slice(None), *sl)], axis=axis + 1), axes=(1, 2)))
        heats.append(np.rot90(np.squeeze(heat[sl], axis=axis)))
        names.append(f"axis {axis}, slice {int(centre[axis])}")
    return images, heats, names


def _display_image(x: np.ndarray) -> np.ndarray:
    """(C, H, W) model input -> (H, W, 3) float in [0, 1] for display (min-max, so z-scored inputs work)."""
    x = np.asarray(x, dtype=np.float32)
    x = np.repeat(x[:1], 3, axis=0) if x.shape[0] != 3 else x
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.moveaxis(x, 0, -1)


def _to_uint8_rgb(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _colormap() -> Any:
    from matplotlib import colormaps

    return colormaps["jet"]


def _heat_rgba(heat: np.ndarray) -> np.ndarray:
    rgba = _colormap()(np.clip(heat, 0, 1))
    rgba[..., 3] = _alpha(heat) / 0.6  # low importance stays transparent
    return np.round(rgba * 255).astype(np.uint8)


def _alpha(heat: np.ndarray) -> np.ndarray:
    """Opacity of the heatmap: 0 below 15 % importance (no blue veil over the whole image), 0.6 at the top."""
    return 0.6 * np.clip((heat - 0.15) / 0.85, 0.0, 1.0) ** 0.8


def _upscale(a: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return a
    h, w = a.shape[:2]
    im = PILImage.fromarray(a)
    return np.asarray(im.resize((w * factor, h * factor), PILImage.Resampling.BILINEAR))


def _blend(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    factor = max(1, -(-_DISPLAY_SIDE // max(heat.shape)))
    grey = _upscale(_to_uint8_rgb(image), factor).astype(np.float32) / 255
    heat_up = _upscale(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), factor).astype(np.float32) / 255
    colour = _colormap()(heat_up)[..., :3]
    alpha = _alpha(heat_up)[..., None]
    return _to_uint8_rgb((1 - alpha) * grey + alpha * colour)


def _montage(tiles: list[np.ndarray], gap: int = 0) -> np.ndarray:
    if len(tiles) == 1:
        return tiles[0]
    h = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, h - t.shape[0]), (0, gap), (0, 0))) for t in tiles]
    return np.concatenate(padded, axis=1)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (OSError, ValueError):
        return ImageFont.load_default()


ALERT_COLOUR = (200, 30, 30)  # the banner and frame of an out-of-distribution overlay


def _captioned(
    tiles: list[np.ndarray], names: list[str], lines: list[str], alert: str | None = None
) -> np.ndarray:
    """The tiles with the caption ``lines`` underneath; with ``alert``, a red banner above and a red frame."""
    body = _montage(tiles, gap=6 if len(tiles) > 1 else 0)
    big, small = _font(17), _font(12)
    measure = ImageDraw.Draw(PILImage.new("RGB", (1, 1)))
    texts = [(lines[0], big), (lines[1], small)] + ([(alert, big)] if alert else [])
    text_width = max(measure.textlength(text, font=font) for text, font in texts)
    frame = 6 if alert else 0
    top = 34 + frame if alert else 0
    width = max(body.shape[1] + 2 * frame, int(text_width) + 20)
    band = 58
    canvas = PILImage.new("RGB", (width, top + body.shape[0] + frame + band), (22, 27, 34))
    draw = ImageDraw.Draw(canvas)
    x0 = (width - body.shape[1]) // 2
    if alert:
        draw.rectangle((0, 0, width - 1, top - frame - 1), fill=ALERT_COLOUR)
        draw.text((10, 7), alert, fill=(255, 255, 255), font=big)
        draw.rectangle(
            (x0 - frame, top - frame, x0 + body.shape[1] + frame - 1, top + body.shape[0] + frame - 1),
            fill=ALERT_COLOUR,
        )
    canvas.paste(PILImage.fromarray(body), (x0, top))
    for n, name in enumerate(names):
        if name:
            draw.text((x0 + n * (tiles[0].shape[1] + 6) + 6, top + 4), name, fill=(255, 255, 255), font=small)
    y = top + body.shape[0] + frame
    draw.text((10, y + 8), lines[0], fill=(255, 255, 255), font=big)
    draw.text((10, y + 34), lines[1], fill=(190, 198, 208), font=small)
    return np.asarray(canvas)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


__all__ = [
    "METHODS",
    "Explainer",
    "Explanation",
    "cam_layer_of",
    "explain_image",
    "explain_inputs",
]
