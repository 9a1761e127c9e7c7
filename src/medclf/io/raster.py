"""PNG, JPEG and TIFF reader: Pillow, with tifffile for the TIFFs Pillow cannot hold losslessly.

Greyscale modes (1, L, LA, I;16*, I, F) give one channel and keep their full range (a 16-bit PNG stays
0..65535); colour modes (RGB, RGBA, P, PA, CMYK, YCbCr, ...) give three, alpha dropped, unless R == G == B
everywhere, which gives one channel and ``meta["was_rgb_grey"]``. EXIF / TIFF orientation is applied.
A multi-page TIFF whose pages share size and mode is a volume ``(C, pages, H, W)``; other formats' extra
frames (APNG, MPO) are ignored. Spacing is 1.0: raster DPI describes printing, not anatomy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image as PILImage
from PIL import ImageOps

from medclf.errors import InputRejected
from medclf.io.guard import ReadLimits, check_shape, collapse_grey, library_errors, reject
from medclf.io.image import Image

# Pillow refuses images above twice this many pixels at open time: keep its guard as a backstop behind
# ours (checked from the header below), consistent with the default limits rather than its own 89M.
PILImage.MAX_IMAGE_PIXELS = ReadLimits().max_pixels

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
_GREY_AS_IS = {"L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_GREY_CONVERT = {"1", "LA", "La"}
_RGB_CONVERT = {"RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
# Tolerance for RGB -> grey on lossy JPEG, whose chroma may carry +-1 noise on grey content.
_JPEG_GREY_TOLERANCE = 2.0


def read_raster(path: Path, fmt: str, limits: ReadLimits) -> Image:
    """Decode a PNG, JPEG or TIFF file (``fmt`` as sniffed) into an :class:`Image`."""
    try:
        with library_errors(path, f"{fmt.upper()} header", reason="malformed"):
            im = _open(path, fmt)
    except InputRejected as exc:
        if fmt == "tiff" and exc.reason == "malformed":  # e.g. float RGB: Pillow cannot open it, tifffile can
            return _read_tifffile(path, limits)
        raise
    with im:
        if fmt == "tiff" and _needs_tifffile(im):
            return _read_tifffile(path, limits)
        return _read_pillow(im, path, fmt, limits)


def _open(path: Path, fmt: str) -> PILImage.Image:
    try:
        return PILImage.open(path, formats=[_PIL_FORMAT[fmt]])
    except PILImage.DecompressionBombError as exc:
        raise reject(
            f"refused by the image decoder's size guard: {exc}", "decompression_bomb", path
        ) from None


def _needs_tifffile(im: PILImage.Image) -> bool:
    """TIFFs Pillow would get wrong go to tifffile.

    Pillow reduces 16-bit multi-sample TIFFs to 8 bits per sample, and its TIFF loader applies the
    Orientation tag itself, inconsistently across versions (13.0 scrambles the transposing ones, 5-8).
    """
    tags = getattr(im, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    oriented = int(tags.get(274, 1) or 1) != 1
    return oriented or (int(tags.get(277, 1)) > 1 and max(int(b) for b in bits) > 8)


def _channels_of(mode: str) -> int:
    if mode in _GREY_AS_IS or mode in _GREY_CONVERT:
        return 1
    if mode == "RGB" or mode in _RGB_CONVERT:
        return 3
    return 0


def _read_pillow(im: PILImage.Image, path: Path, fmt: str, limits: ReadLimits) -> Image:
    mode = im.mode
    channels = _channels_of(mode)
    if channels == 0:
        raise reject(f"{fmt.upper()} pixel mode {mode} is not supported", "unsupported_dtype", path)
    width, height = im.size
    with library_errors(path, f"{fmt.upper()} header", reason="malformed"):
        n_frames = int(getattr(im, "n_frames", 1) or 1)
        pages = 1
        if fmt == "tiff" and n_frames > 1:
            # A volume only if every page matches the first (not, say, a pyramid's thumbnails).
            for i in range(1, n_frames):
                im.seek(i)
                if im.size != (width, height) or im.mode != mode:
                    break
            else:
                pages = n_frames
            im.seek(0)
    spatial = (pages, height, width) if pages > 1 else (height, width)
    check_shape(spatial, channels, limits, path, what=f"{fmt.upper()} image")

    # Orientation is per page; the first page's is what gets reported.
    meta: dict[str, Any] = {
        "mode": mode,
        "decoder": "pillow",
        "exif_transposed": _orientation(im) in range(2, 9),
    }
    if n_frames > pages:
        meta["frames_ignored"] = n_frames - pages
    if fmt == "png" and _png_colour_16bit(path):
        meta["precision_reduced"] = True  # Pillow decodes 16-bit RGB(A)/LA PNG at 8 bits per channel

    arrays = []
    for i in range(pages):
        with library_errors(path, f"{fmt.upper()} pixel data"):
            if i:
                im.seek(i)
            try:
                im.load()
            except OSError as exc:
                if "truncated" in str(exc).lower():
                    raise reject(f"the {fmt.upper()} file is truncated ({exc})", "truncated", path) from None
                raise
            # PNG/JPEG EXIF orientation (oriented TIFFs never reach here, see _needs_tifffile).
            page = ImageOps.exif_transpose(im)
            if page.mode in _GREY_CONVERT:
                page = page.convert("L")
            elif page.mode in _RGB_CONVERT:
                page = page.convert("RGB")
            arrays.append(np.asarray(page))
    arr = np.stack(arrays)  # (pages, H, W) or (pages, H, W, 3)
    pixels = (
        arr[np.newaxis].astype(np.float32) if arr.ndim == 3 else np.moveaxis(arr, -1, 0).astype(np.float32)
    )
    pixels = collapse_grey(pixels, meta, tolerance=_JPEG_GREY_TOLERANCE if fmt == "jpeg" else 0.0)
    if pages == 1:
        pixels = pixels[:, 0]
    return Image(np.ascontiguousarray(pixels), (1.0,) * (pixels.ndim - 1), fmt, meta)


def _orientation(im: PILImage.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def _png_colour_16bit(path: Path) -> bool:
    with open(path, "rb") as fh:
        ihdr = fh.read(26)
    # IHDR data starts at byte 16: width, height, bit depth (24), colour type (25: 2 RGB, 4 LA, 6 RGBA).
    return len(ihdr) == 26 and ihdr[24] == 16 and ihdr[25] in (2, 4, 6)


# TIFF orientation tag -> the numpy equivalent of Pillow's exif_transpose, on the last two axes.
def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    h, w = arr.ndim - 2, arr.ndim - 1
    ops = {
        2: lambda a: np.flip(a, w),
        3: lambda a: np.flip(a, (h, w)),
        4: lambda a: np.flip(a, h),
        5: lambda a: np.swapaxes(a, h, w),
        6: lambda a: np.rot90(a, -1, (h, w)),
        7: lambda a: np.flip(np.swapaxes(a, h, w), (h, w)),
        8: lambda a: np.rot90(a, 1, (h, w)),
    }
    return ops[orientation](arr) if orientation in ops else arr


def _photometric_name(value: int) -> str:
    try:
        return tifffile.PHOTOMETRIC(value).name
    except ValueError:
        return str(value)


def _read_tifffile(path: Path, limits: ReadLimits) -> Image:
    with library_errors(path, "TIFF header", reason="malformed"), tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        page = tif.pages.first
        shape, axes, dtype = tuple(int(s) for s in series.shape), str(series.axes), series.dtype
        photometric = int(page.photometric)
        extrasamples = tuple(page.extrasamples)
        tag = page.tags.get(274)  # Orientation
        orientation = int(tag.value) if tag is not None else 1
    if dtype.kind not in "biuf":
        raise reject(f"TIFF sample type {dtype} is not supported", "unsupported_dtype", path)
    if "Y" not in axes or "X" not in axes:
        raise reject(f"TIFF layout {axes} {shape} is not an image", "unsupported_layout", path)
    samples = shape[axes.index("S")] if "S" in axes else 1
    rgb = photometric == tifffile.PHOTOMETRIC.RGB
    if rgb and samples >= 3:
        channels = 3  # RGB plus any alpha / extra samples, which are dropped
    elif photometric == tifffile.PHOTOMETRIC.MINISBLACK and (
        samples == 1 or samples - len(extrasamples) == 1
    ):
        channels = 1
    else:
        raise reject(
            f"TIFF with photometric interpretation {_photometric_name(photometric)} and {samples} samples per pixel "
            "is not supported",
            "unsupported_layout",
            path,
        )
    others = [(i, a) for i, a in enumerate(axes) if a not in "SYX" and shape[i] > 1]
    if len(others) > 1:
        raise reject(f"TIFF with dimensions {axes} {shape} is not supported", "unsupported_layout", path)
    depth = shape[others[0][0]] if others else 1
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    spatial = (depth, height, width) if depth > 1 else (height, width)
    check_shape(spatial, channels, limits, path, what="TIFF image")

    with library_errors(path, "TIFF pixel data"):
        arr = tifffile.imread(path, series=0)
    # Reorder to (S, other, Y, X) whatever the stored axis order, then keep the channels we use.
    order = [axes.index("S")] if "S" in axes else []
    order += [others[0][0]] if others else []
    order += [axes.index("Y"), axes.index("X")]
    rest = [i for i in range(arr.ndim) if i not in order]  # singleton axes
    arr = np.transpose(arr, order + rest).reshape([arr.shape[i] for i in order])
    if "S" not in axes:
        arr = arr[np.newaxis]
    arr = arr[:channels]
    if not others:
        arr = arr[:, np.newaxis]
    pixels = _orient(arr, orientation).astype(np.float32)  # (C, D, H, W)
    meta: dict[str, Any] = {
        "mode": f"{'RGB' if channels == 3 else 'L'};{dtype.name}",
        "decoder": "tifffile",
        "exif_transposed": orientation in range(2, 9),
    }
    pixels = collapse_grey(pixels, meta)
    if depth == 1:
        pixels = pixels[:, 0]
    return Image(np.ascontiguousarray(pixels), (1.0,) * (pixels.ndim - 1), "tiff", meta)
