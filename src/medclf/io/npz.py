"""NumPy arrays as images: ``.npz`` files and in-memory arrays (MedMNIST layouts).

``np.load`` is always called with ``allow_pickle=False``, and every member's ``.npy`` header is read first,
so object (pickled) arrays are refused before any data is loaded and sizes are known up front.

Array layouts (as MedMNIST and PIL store them; channels are always LAST in the input):
``(H, W)`` grey; ``(H, W, 1|3|4)`` grey / RGB / RGBA (alpha dropped); ``(1, H, W)`` grey;
``(D, H, W)`` volume; ``(D, H, W, 1|3|4)`` volume with channels; ``(1, D, H, W)`` grey volume.
A ``(3, H, W)`` array is therefore a 3-slice volume, not channel-first RGB.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medclf.io.guard import (
    FileStamp,
    ReadLimits,
    check_file,
    check_memory,
    check_shape,
    check_unchanged,
    collapse_grey,
    library_errors,
    reader_errors,
    reject,
    replace_nonfinite,
)
from medclf.io.image import Image

# Keys a single-image .npz may use when it holds more than one array (e.g. an image plus its spacing).
IMAGE_KEYS = ("image", "img", "pixels", "arr_0", "data")
# MedMNIST-style dataset files: train_images, val_labels, ...
_DATASET_SUFFIXES = ("_images", "_labels")
# A MedMNIST file has six members, an image file one or two: thousands are an attack on the parser.
_MAX_MEMBERS = 64


def _member_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every member, from the .npy headers only (no array data is read)."""
    headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with library_errors(path, "NPZ archive", reason="malformed"), zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > _MAX_MEMBERS:
            raise reject(
                f"the .npz archive has {len(infos)} members, more than the {_MAX_MEMBERS} medclf reads",
                "malformed",
                path,
            )
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise reject(
                    f"the archive member {info.filename!r} is not a .npy array", "unsupported_format", path
                )
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            headers[info.filename[: -len(".npy")]] = (tuple(int(s) for s in shape), np.dtype(dtype))
    pickled = [k for k, (_, dt) in headers.items() if dt.hasobject]
    if pickled:
        raise reject(
            f"the .npz holds object arrays ({', '.join(pickled)}), which need pickle to load; "
            "refusing (pickle can run arbitrary code)",
            "pickle",
            path,
        )
    return headers


def read_npz(path: str | Path, *, limits: ReadLimits | None = None) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` (e.g. a MedMNIST dataset), never unpickling anything."""
    limits = limits or ReadLimits()
    p = Path(path)
    before = FileStamp.of(p)
    with reader_errors(p, before):
        check_file(p, limits)
        if not zipfile.is_zipfile(p):
            raise reject("not a NumPy .npz file (not a ZIP archive)", "unsupported_format", p)
        headers = _member_headers(p)
        total = sum(math.prod(shape) * dt.itemsize for shape, dt in headers.values())
        if total > limits.max_npz_bytes:
            raise reject(
                f"the .npz arrays need {total} bytes in memory, more than the limit of {limits.max_npz_bytes}",
                "too_large",
                p,
            )
        with library_errors(p, "NPZ arrays", reason="malformed"), np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    check_unchanged(p, before)
    return arrays


def read_npz_image(path: Path, limits: ReadLimits) -> Image:
    """The single image of an ``.npz`` (see :func:`medclf.io.read_image`); datasets are refused."""
    headers = _member_headers(path)
    if any(k.endswith(_DATASET_SUFFIXES) for k in headers):
        raise reject(
            "this .npz is a dataset (it holds train_images/train_labels-style arrays), not a single image; "
            "use it as DATA (the dataset argument of training or evaluation)",
            "dataset_npz",
            path,
        )
    candidates = [k for k in headers if k != "spacing"]
    key = candidates[0] if len(candidates) == 1 else next((k for k in IMAGE_KEYS if k in headers), None)
    if key is None:
        raise reject(
            f"the .npz holds several arrays ({', '.join(sorted(headers)) or 'none'}) and none is named "
            f"{' or '.join(IMAGE_KEYS[:2])}",
            "ambiguous_npz",
            path,
        )
    shape, dtype = headers[key]
    _check_array(shape, dtype, limits, path)  # before loading anything
    check_memory(
        math.prod(shape), dtype.itemsize, limits, path, what="array", compressed_bytes=path.stat().st_size
    )
    with library_errors(path, "NPZ array", reason="malformed"), np.load(path, allow_pickle=False) as z:
        arr = z[key]
        spacing = z["spacing"] if "spacing" in headers else None
    image = _image(arr, str(path), "npz", limits)
    if spacing is not None and spacing.dtype.kind in "iuf":  # otherwise ignored, like a missing one
        sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
        if len(sp) == image.spatial_dims and np.all(np.isfinite(sp)) and np.all(sp > 0):
            image.spacing = tuple(float(s) for s in sp)
    return image


def iter_npz_images(
    path: str | Path, *, limits: ReadLimits | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Every image of a MedMNIST-style dataset ``.npz`` as ``("split/index", array)``.

    One ``*_images`` array is in memory at a time, and each must fit in half of
    ``limits.max_memory_bytes``: a dataset file at prediction time is bounded like a single image.
    """
    limits = limits or ReadLimits()
    p = Path(path)
    with reader_errors(p, FileStamp.of(p)):
        yield from _iter_npz_images(p, limits)


def _iter_npz_images(p: Path, limits: ReadLimits) -> Iterator[tuple[str, np.ndarray]]:
    check_file(p, limits)
    headers = _member_headers(p)
    for key in sorted(k for k in headers if k.endswith("_images")):
        shape, dtype = headers[key]
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > limits.max_memory_bytes // 2:
            bomb = nbytes > 100 * p.stat().st_size
            raise reject(
                f"the .npz array {key} {shape} needs {nbytes} bytes in memory, more than half the read memory "
                f"limit of {limits.max_memory_bytes}",
                "decompression_bomb" if bomb else "too_large",
                p,
            )
        if dtype.kind not in "biuf":
            raise reject(f"array dtype {dtype} is not supported", "unsupported_dtype", p)
        with library_errors(p, "NPZ array", reason="malformed"), np.load(p, allow_pickle=False) as z:
            arr = z[key]
        split = key[: -len("_images")]
        for i in range(len(arr)):
            yield f"{split}/{i}", arr[i]


def _layout(shape: tuple[int, ...]) -> tuple[str, int, tuple[int, ...]] | None:
    """(layout, channels, spatial shape) for the array layouts in the module docstring, else None."""
    if len(shape) == 2:
        return "hw", 1, shape
    if len(shape) == 3:
        if shape[-1] in (1, 3, 4):
            return "hwc", min(shape[-1], 3), shape[:2]
        if shape[0] == 1:
            return "1hw", 1, shape[1:]
        return "dhw", 1, shape
    if len(shape) == 4:
        if shape[-1] in (1, 3, 4):
            return "dhwc", min(shape[-1], 3), shape[:3]
        if shape[0] == 1:
            return "1dhw", 1, shape[1:]
    return None


def _check_array(
    shape: tuple[int, ...], dtype: np.dtype, limits: ReadLimits, source: str | Path
) -> tuple[str, int]:
    if dtype.kind not in "biuf":
        raise reject(
            f"array dtype {dtype} is not supported (need bool, integer or real)", "unsupported_dtype", source
        )
    layout = _layout(shape)
    if layout is None:
        raise reject(
            f"array shape {shape} is not an image layout ((H,W), (H,W,C), (D,H,W) or (D,H,W,C) with C in 1, 3, 4)",
            "unsupported_layout",
            source,
        )
    kind, channels, spatial = layout
    check_shape(spatial, channels, limits, source, what="array")
    return kind, channels


def _image(arr: np.ndarray, source: str, fmt: str, limits: ReadLimits) -> Image:
    kind, channels = _check_array(arr.shape, arr.dtype, limits, source)
    if kind in ("hw", "dhw"):
        px = arr[np.newaxis]
    elif kind in ("1hw", "1dhw"):
        px = arr
    else:  # channels last -> first, alpha dropped
        px = np.moveaxis(arr, -1, 0)[:channels]
    meta: dict[str, Any] = {"source": source}
    pixels = replace_nonfinite(px.astype(np.float32), meta, source)
    pixels = collapse_grey(pixels, meta)
    return Image(np.ascontiguousarray(pixels), (1.0,) * (pixels.ndim - 1), fmt, meta)


def image_from_array(arr: np.ndarray, source: str = "array", *, limits: ReadLimits | None = None) -> Image:
    """Turn an array as MedMNIST stores it ((H,W), (H,W,3), (D,H,W), ...) into an :class:`Image`.

    ``source`` names the array in messages and ``meta["source"]``. The same shape limits as files apply;
    refusals are :class:`~medclf.errors.InputRejected`.
    """
    return _image(np.asarray(arr), source, "array", limits or ReadLimits())
